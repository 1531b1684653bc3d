"""The Python API: compress a model in memory or on disk."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx
import onnx_ir as ir

from bctonnx.passes import PassError, run_pipeline
from bctonnx.passes.pipeline import PassSummary

from .blockformat import BlockSizeError
from .config import CompressionConfig, resolve_config
from .errors import BctError
from .modelio import (
    MODEL_FILENAME,
    check_output_path,
    copy_sidecars,
    load_model,
    model_file_bytes,
    save_model,
)


@dataclass
class CompressReport:
    """What a compression did: config, sizes (bytes on disk) and a summary per pass."""

    config: CompressionConfig
    input_bytes: int = 0
    output_bytes: int = 0
    passes: list[PassSummary] = field(default_factory=list)

    @property
    def ratio(self) -> float:
        """FP32 file bytes / compressed file bytes, everything counted."""
        return self.input_bytes / self.output_bytes if self.output_bytes else float("nan")

    def to_dict(self) -> dict[str, Any]:
        return {
            "config": self.config.to_dict(),
            "input_bytes": self.input_bytes,
            "output_bytes": self.output_bytes,
            "ratio": self.ratio,
            "passes": [p.__dict__ for p in self.passes],
        }


def _run(model: ir.Model, config: CompressionConfig, progress=None) -> list[PassSummary]:
    try:
        return run_pipeline(model, config, progress=progress)
    except (PassError, BlockSizeError) as exc:
        raise BctError(str(exc)) from None


def compress(
    model: onnx.ModelProto | str | os.PathLike,
    preset: str | CompressionConfig = "w8a8",
    **overrides: Any,
) -> onnx.ModelProto:
    """Compress a model (a ModelProto, an .onnx path or an exported model directory).

    ``preset`` is a preset name (``w8a8``, ``w4a8``) or a `CompressionConfig`; ``overrides``
    are `resolve_config` keywords (``weight_bits=4``, ``block_size=64``, ``exclude=[...]``).
    The caller's ModelProto is never modified. Returns the compressed ModelProto.
    """
    config = resolve_config(preset, **overrides)
    if isinstance(model, onnx.ModelProto):
        # a fresh IR graph: passes edit it, never the caller's proto (tensors are only read)
        ir_model = ir.serde.deserialize_model(model)
    else:
        ir_model, _ = load_model(model)
    _run(ir_model, config)
    return ir.serde.serialize_model(ir_model)


def output_target(src: Path, dst: Path) -> tuple[bool, Path]:
    """(directory mode, the model file to write) for compressing ``src`` into ``dst``;
    raises BctError for an output that would clobber the input or cannot be written."""
    if src.is_dir():
        if dst.exists() and not dst.is_dir():
            raise BctError(f"output {dst} exists and is not a directory")
        if dst.exists() and dst.resolve() == src.resolve():
            raise BctError(f"output directory {dst} is the input directory; choose another")
        return True, dst / MODEL_FILENAME
    if src.exists():
        check_output_path(src, dst)
    return False, dst


def compress_file(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    config: CompressionConfig,
    progress=None,
) -> CompressReport:
    """Compress a file or exported model directory to ``dst`` (file, or directory if src is one).

    The output is written under a temporary name and renamed into place; the input is never
    touched.
    """
    src, dst = Path(src), Path(dst)
    dir_mode, out_file = output_target(src, dst)
    model, in_path = load_model(src)
    if not dir_mode:
        check_output_path(in_path, out_file)
    report = CompressReport(config=config, input_bytes=model_file_bytes(in_path))
    report.passes = _run(model, config, progress)
    created_dir = False
    if dir_mode and not dst.exists():
        dst.mkdir(parents=True)
        created_dir = True
    try:
        report.output_bytes = save_model(model, out_file)
        if dir_mode:
            copy_sidecars(src, dst)
    except BaseException:
        if created_dir:
            import shutil

            shutil.rmtree(dst, ignore_errors=True)
        raise
    return report

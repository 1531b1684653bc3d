"""The Python API: compress a model in memory or on disk.

- `compress_model` (model, preset, overrides) -> `CompressResult`: ``.model`` (the compressed
  ``onnx.ModelProto``) and ``.report`` (`CompressReport`: config, bytes in/out, ratio, one
  summary per pass). ``model`` is an ``onnx.ModelProto``, an ``.onnx`` path or an exported
  model directory (``model.onnx`` + config + tokenizer).
- `compress` is the same returning only the ModelProto (kept for existing callers).
- `compress_file` (src, dst, config) -> `CompressReport`: writes the result to disk (a file, or a
  directory with config and tokenizer copied), with external data on request or when needed.

The caller's ModelProto is never modified. Models with external data (over 2 GB) are read
lazily; an external-data location outside the model's folder is refused, never read. An
in-memory result holds every tensor in the proto: for models near protobuf's 2 GB limit use
`compress_file`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import onnx
import onnx_ir as ir

from bctonnx.passes import PassError, build_pipeline, run_pipeline
from bctonnx.passes.pipeline import PassSummary

from .blockformat import BlockSizeError
from .config import CompressionConfig, resolve_config
from .errors import BctError
from .modelio import (
    MODEL_FILENAME,
    _check_external_data,
    check_output_path,
    copy_sidecars,
    load_model,
    model_file_bytes,
    save_model,
)
from .validate import find_tokenizer_dir

log = logging.getLogger(__name__)


@dataclass
class CompressReport:
    """What a compression did: config, sizes in bytes (on disk for files, external data
    included; serialized size for in-memory models) and a summary per pass."""

    config: CompressionConfig
    input_bytes: int = 0
    output_bytes: int = 0
    passes: list[PassSummary] = field(default_factory=list)
    # pruning / N:M: one record per layer (what was kept, the refit's relative error) and the
    # calibration tokens they read
    pruning: list[dict] = field(default_factory=list)
    calibration_tokens: int = 0
    # --target-ratio: the search's summary (bctonnx.search.RatioPlan.to_dict)
    search: dict | None = None

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
            "pruning": self.pruning,
            "calibration_tokens": self.calibration_tokens,
            "search": self.search,
        }


@dataclass
class CompressResult:
    """`compress_model`'s result: the compressed model and what was done to it."""

    model: onnx.ModelProto
    report: CompressReport


ModelInput = onnx.ModelProto | str | os.PathLike


@contextmanager
def user_errors() -> Iterator[None]:
    """A model the passes or the config cannot handle becomes a one-sentence `BctError`."""
    try:
        yield
    except (PassError, BlockSizeError) as exc:
        raise BctError(str(exc)) from None


def special_token_ids(model_path: str | os.PathLike) -> tuple[int, ...] | None:
    """Ids of the tokens token dropping always keeps ([CLS], [SEP]; RoBERTa's <s>, </s>),
    from the tokenizer beside the model; None when there is none."""
    from .validate import find_tokenizer_dir, load_tokenizer

    directory = find_tokenizer_dir(model_path)
    if directory is None:
        return None
    tokenizer = load_tokenizer(directory)
    names = ("cls_token_id", "sep_token_id", "bos_token_id", "eos_token_id")
    ids = {getattr(tokenizer, n, None) for n in names} - {None, tokenizer.pad_token_id}
    return tuple(sorted(ids))


def with_special_ids(config: CompressionConfig, model: object) -> CompressionConfig:
    """A token-dropping config gets the special-token ids of the model's tokenizer (when it
    has none yet and the model is a path with a tokenizer beside it)."""
    if not config.token_keep or config.special_token_ids is not None:
        return config
    ids = special_token_ids(model) if isinstance(model, (str, os.PathLike)) else None
    if ids is None:
        log.warning(
            "token dropping: no tokenizer beside the model, so special tokens are found by "
            "position only (the first and last real token, the last of each token type)"
        )
        return config
    return replace(config, special_token_ids=ids)


def prune_context(
    model: ir.Model, config: CompressionConfig, tokenizer_dir: str | os.PathLike | None
):
    """The calibration context of pruning / N:M sparsity (None when the config needs none):
    ``config.calib_texts`` or the package's corpus, tokenized with the model's tokenizer."""
    if not config.needs_calibration:
        return None
    from bctonnx.passes.pruning import PruneContext

    from .calibration import calibration_set, read_calibration_texts

    texts = read_calibration_texts(config.calib_texts) if config.calib_texts else None
    names = [v.name for v in model.graph.inputs]
    if tokenizer_dir is None:  # the one-line error now, not after minutes of passes
        calibration_set(None, names)
    return PruneContext(
        lambda: calibration_set(tokenizer_dir, names, texts, source=config.calib_texts)
    )


def _run(
    model: ir.Model,
    config: CompressionConfig,
    progress=None,
    tokenizer_dir: str | os.PathLike | None = None,
    report: CompressReport | None = None,
) -> list[PassSummary]:
    context = prune_context(model, config, tokenizer_dir)
    with user_errors():
        summaries = run_pipeline(model, config, progress=progress, prune=context)
    if report is not None and context is not None:
        report.pruning = context.records
        report.calibration_tokens = context.tokens
    return summaries


def check_architecture(model_dir: Path) -> None:
    """An exported directory whose config.json names an architecture bctonnx does not handle
    is refused with one sentence (a bare .onnx file is judged by its graph alone)."""
    from bctonnx.models import UnsupportedModel, family_of

    if (model_dir / "config.json").is_file():
        try:
            family_of(model_dir)
        except UnsupportedModel as exc:
            raise BctError(f"{model_dir}: {exc}") from None


def load_input(
    model: ModelInput, base_dir: str | os.PathLike | None = None
) -> tuple[ir.Model, int]:
    """The IR model to compress (a fresh graph: the caller's proto is only read) and its size
    in bytes (file and external data; for a proto, its serialized size plus external data).

    A ModelProto whose tensors live in external data needs ``base_dir``, the folder its
    locations are relative to (normally the folder of the .onnx file); they are checked to stay
    inside it before anything is read.
    """
    if not isinstance(model, onnx.ModelProto):
        path = Path(model)
        if path.is_dir():
            check_architecture(path)
        ir_model, in_path = load_model(path)
        return ir_model, model_file_bytes(in_path)
    from .modelio import _all_tensors

    external = [t for t in _all_tensors(model) if t.data_location == onnx.TensorProto.EXTERNAL]
    if external and base_dir is None:
        raise BctError(
            f"the ModelProto keeps {len(external)} tensor(s) in external data (e.g. "
            f"'{external[0].name}'); pass base_dir= (the folder of its .onnx file) or the path"
        )
    if external:
        _check_external_data(model, Path(base_dir))
    ir_model = ir.serde.deserialize_model(model)
    if external:
        ir.external_data.set_base_dir(ir_model.graph, str(Path(base_dir).resolve()))
    external_bytes = sum(ir.serde.deserialize_tensor(t).nbytes for t in external)
    return ir_model, model.ByteSize() + external_bytes


def compress_model(
    model: ModelInput,
    preset: str | CompressionConfig = "w8a8",
    *,
    base_dir: str | os.PathLike | None = None,
    progress: Callable[[str], None] | None = None,
    tokenizer: str | os.PathLike | None = None,
    **overrides: Any,
) -> CompressResult:
    """Compress a model in memory: a ModelProto, an .onnx path or an exported model directory.

    ``preset`` is a preset name (``w8a8``, ``w4a8``) or a `CompressionConfig`; ``overrides``
    are `resolve_config` keywords (``weight_bits=4``, ``block_size=64``, ``exclude=[...]``,
    ``mode="integer"``). ``base_dir``: for a ModelProto with external data, the folder its
    locations are relative to. ``progress`` is called with each pass's name. ``tokenizer``:
    the tokenizer folder pruning / N:M sparsity read their calibration text with (default:
    the model's folder).

    Returns `CompressResult`: ``.model`` holds every tensor (none left in external data);
    ``.report.input_bytes`` / ``.output_bytes`` are serialized sizes (a path: bytes on disk),
    ``.report.ratio`` their quotient, ``.report.passes`` one `PassSummary` per pass.
    Raises `BctError` (one sentence) for an input bctonnx cannot compress.
    """
    config = with_special_ids(resolve_config(preset, **overrides), model)
    if tokenizer is None and not isinstance(model, onnx.ModelProto):
        tokenizer = find_tokenizer_dir(model)
    search = None
    if config.target_ratio:
        config, search = _search(model, config, tokenizer, base_dir)
    ir_model, input_bytes = load_input(model, base_dir)
    report = CompressReport(config=config, input_bytes=input_bytes, search=search)
    report.passes = _run(ir_model, config, progress, tokenizer, report)
    # tensors no pass changed may still point into the input's external data file
    ir.external_data.load_to_model(ir_model)
    proto = ir.serde.serialize_model(ir_model)
    report.output_bytes = proto.ByteSize()
    return CompressResult(model=proto, report=report)


def compress(
    model: ModelInput,
    preset: str | CompressionConfig = "w8a8",
    **overrides: Any,
) -> onnx.ModelProto:
    """`compress_model` returning only the compressed ModelProto (``compress_model(...).model``).

    Kept as it always was for existing callers; use `compress_model` for the report.
    """
    return compress_model(model, preset, **overrides).model


def structured_model(
    model: ModelInput, config: CompressionConfig, tokenizer_dir=None, base_dir=None
) -> onnx.ModelProto:
    """The FP32 model after canonicalize and the config's pruning / N:M passes only (no
    quantization): what a search compresses many times without redoing the refits."""
    from bctonnx.passes import Canonicalize
    from bctonnx.passes.prune_ffn import PruneFFN
    from bctonnx.passes.prune_heads import PruneHeads
    from bctonnx.passes.sparsify_nm import SparsifyNM

    ir_model, _ = load_input(model, base_dir)
    context = prune_context(ir_model, config, tokenizer_dir)
    with user_errors():
        for p in build_pipeline(config, context):
            if isinstance(p, (Canonicalize, PruneHeads, PruneFFN, SparsifyNM)):
                p(ir_model)
    ir.external_data.load_to_model(ir_model)
    return ir.serde.serialize_model(ir_model)


def _search(model, config: CompressionConfig, tokenizer, base_dir):
    """--target-ratio: the searched config (target_ratio cleared) and the search's summary."""
    from .search import search_ratio

    plan = search_ratio(model, config, tokenizer_dir=tokenizer, base_dir=base_dir)
    return plan.config, plan.to_dict()


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
    config: CompressionConfig | str = "w8a8",
    progress: Callable[[str], None] | None = None,
    *,
    external_data: bool | None = None,
) -> CompressReport:
    """Compress a file or exported model directory to ``dst`` (file, or directory if src is one).

    ``config``: a `CompressionConfig` or a preset name. ``external_data``: None = tensors go to
    ``<dst>.data`` only when the model would exceed protobuf's 2 GB limit, True = always
    (``model.onnx`` + ``model.onnx.data``), False = never. The output is written under a
    temporary name and renamed into place; the input is never touched.
    """
    if isinstance(config, str):
        config = resolve_config(config)
    config = with_special_ids(config, src)
    src, dst = Path(src), Path(dst)
    dir_mode, out_file = output_target(src, dst)
    if dir_mode:
        check_architecture(src)
    model, in_path = load_model(src)
    if not dir_mode:
        check_output_path(in_path, out_file)
    tokenizer = find_tokenizer_dir(src)
    search = None
    if config.target_ratio:
        config, search = _search(src, config, tokenizer, None)
        model, in_path = load_model(src)
    report = CompressReport(config=config, input_bytes=model_file_bytes(in_path), search=search)
    report.passes = _run(model, config, progress, tokenizer, report)
    created_dir = False
    if dir_mode and not dst.exists():
        dst.mkdir(parents=True)
        created_dir = True
    try:
        report.output_bytes = save_model(model, out_file, external=external_data)
        if dir_mode:
            copy_sidecars(src, dst)
    except BaseException:
        if created_dir:
            import shutil

            shutil.rmtree(dst, ignore_errors=True)
        raise
    return report

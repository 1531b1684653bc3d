"""Loading and saving models safely.

Loading refuses, with one clear sentence: a missing path, a directory without model.onnx (and
not exactly one other .onnx file), an empty file, bytes that are not an ONNX model (or a
truncated one), and external-data locations outside the model's folder (never read). Saving
writes to a temporary name in the target folder and renames it into place, so a failed run
never leaves a half-written file and never touches the input.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path

import onnx
import onnx_ir as ir
from google.protobuf.message import DecodeError

from .errors import BctError, ModelLoadError

MODEL_FILENAME = "model.onnx"
# Above this many bytes of tensors a model is saved with external data (protobuf's 2 GB limit).
EXTERNAL_DATA_THRESHOLD = 1_800_000_000
# Files an exported model directory carries besides the ONNX graph.
SIDECAR_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "sentencepiece.bpe.model",
    "spiece.model",
    "added_tokens.json",
)


def resolve_model_path(path: str | os.PathLike) -> Path:
    """The ONNX file a user means: the file itself, DIR/model.onnx, or a directory's only
    .onnx file (optimum's ORTOptimizer writes model_optimized.onnx beside the config)."""
    p = Path(path)
    if not p.exists():
        raise ModelLoadError(f"{p}: no such file or directory")
    if p.is_dir():
        candidate = p / MODEL_FILENAME
        if candidate.is_file():
            return candidate
        found = sorted(f.name for f in p.glob("*.onnx") if f.is_file())
        if len(found) == 1:
            return p / found[0]
        if found:
            raise ModelLoadError(
                f"{p}: directory has no {MODEL_FILENAME} and {len(found)} .onnx files "
                f"({', '.join(found)}); name the one to use"
            )
        raise ModelLoadError(f"{p}: directory has no {MODEL_FILENAME}")
    return p


def _check_external_data(proto: onnx.ModelProto, base: Path) -> None:
    base = base.resolve()
    for tensor in _all_tensors(proto):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        location = next((e.value for e in tensor.external_data if e.key == "location"), "")
        target = (base / location).resolve()
        if os.path.isabs(location) or not target.is_relative_to(base):
            raise ModelLoadError(
                f"tensor '{tensor.name}' points at external data outside the model's folder "
                f"({location!r}); refusing to read it"
            )
        if not target.is_file():
            raise ModelLoadError(
                f"tensor '{tensor.name}': external data file {location!r} is missing"
            )


def _all_tensors(proto: onnx.ModelProto):
    def graph_tensors(graph):
        yield from graph.initializer
        for node in graph.node:
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.TENSOR:
                    yield attr.t
                for g in [attr.g] if attr.type == onnx.AttributeProto.GRAPH else attr.graphs:
                    yield from graph_tensors(g)

    yield from graph_tensors(proto.graph)


def external_data_files(proto: onnx.ModelProto) -> list[str]:
    """The external-data file names ``proto``'s tensors point at (relative to its folder)."""
    files = []
    for tensor in _all_tensors(proto):
        for entry in tensor.external_data:
            if entry.key == "location" and entry.value not in files:
                files.append(entry.value)
    return files


def load_proto(path: str | os.PathLike) -> tuple[onnx.ModelProto, Path]:
    """Parse an ONNX file (external data left unloaded) and check it is a usable model."""
    p = resolve_model_path(path)
    if p.stat().st_size == 0:
        raise ModelLoadError(f"{p}: file is empty (0 bytes)")
    try:
        proto = onnx.load(str(p), load_external_data=False)
    except (DecodeError, ValueError, RuntimeError, OSError) as exc:
        raise ModelLoadError(
            f"{p}: not an ONNX model or truncated ({type(exc).__name__})"
        ) from None
    if not proto.graph.node or not proto.opset_import:
        raise ModelLoadError(f"{p}: not an ONNX model or truncated (no graph or no opset)")
    _check_external_data(proto, p.parent)
    try:
        # by path: external data is checked relative to the model's folder, not the cwd
        onnx.checker.check_model(str(p))
    except onnx.checker.ValidationError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else "invalid model"
        raise ModelLoadError(f"{p}: not a valid ONNX model or truncated: {first}") from None
    return proto, p


def load_model(path: str | os.PathLike) -> tuple[ir.Model, Path]:
    """Load as onnx_ir (external tensors stay on disk until a pass reads them)."""
    proto, p = load_proto(path)
    model = ir.serde.deserialize_model(proto)
    # external tensors resolve relative to the model's folder
    for value in model.graph.initializers.values():
        tensor = value.const_value
        if isinstance(tensor, ir.ExternalTensor):
            tensor.base_dir = str(p.parent)
    return model, p


def check_output_path(inp: Path, out: Path) -> None:
    out_abs = out.resolve()
    if out_abs == inp.resolve() or (out.exists() and inp.exists() and out.samefile(inp)):
        raise BctError(f"output {out} is the input model; choose another output path")
    if out.exists() and out.is_dir():
        raise BctError(f"output {out} is a directory; give a file name ending in .onnx")
    if not out_abs.parent.exists():
        raise BctError(f"output folder {out_abs.parent} does not exist")


def tensor_bytes(model: ir.Model) -> int:
    return sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value)


def save_model(
    model: ir.Model | onnx.ModelProto, out: str | os.PathLike, external: bool | None = None
) -> int:
    """Atomically write ``out`` (and ``out``.data with external data); returns bytes.

    ``external``: None = external data only above EXTERNAL_DATA_THRESHOLD bytes of tensors
    (protobuf's 2 GB limit), True = always, False = never (refused above the limit). Tensors
    the model still reads from its input's external data are copied, never referenced.
    """
    out = Path(out)
    if isinstance(model, onnx.ModelProto):
        model = ir.serde.deserialize_model(model)
    if external is None:
        external = tensor_bytes(model) > EXTERNAL_DATA_THRESHOLD
    elif not external and tensor_bytes(model) > EXTERNAL_DATA_THRESHOLD:
        raise BctError(
            f"{out}: the model's tensors exceed protobuf's 2 GB limit for one file; "
            "save it with external data"
        )
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    os.close(fd)
    tmp_data = f"{Path(tmp).name}.data"
    try:
        if external:
            ir.save(model, tmp, external_data=tmp_data)
            data_final = out.parent / f"{out.name}.data"
            # the graph names its data file: rewrite locations to the final name
            proto = onnx.load(tmp, load_external_data=False)
            for t in _all_tensors(proto):
                for e in t.external_data:
                    if e.key == "location":
                        e.value = data_final.name
            onnx.save(proto, tmp)
            os.replace(out.parent / tmp_data, data_final)
        else:
            # unchanged tensors may still live in the input's data file: copy them in
            ir.external_data.load_to_model(model)
            ir.save(model, tmp)
        # mkstemp creates 0600: give the file the mode a plain open() would (servers such as
        # Triton often read models as another user)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, out)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        with contextlib.suppress(OSError):
            os.unlink(out.parent / tmp_data)
        raise
    return model_file_bytes(out)


def model_file_bytes(path: str | os.PathLike) -> int:
    """Bytes on disk of an ONNX model, its external data files included."""
    p = resolve_model_path(path)
    total = p.stat().st_size
    proto = onnx.load(str(p), load_external_data=False)
    seen = set()
    for t in _all_tensors(proto):
        for e in t.external_data:
            if e.key == "location" and e.value not in seen:
                seen.add(e.value)
                f = p.parent / e.value
                if f.is_file():
                    total += f.stat().st_size
    return total


def copy_sidecars(src_dir: Path, dst_dir: Path, overwrite: bool = True) -> list[str]:
    """Copy config and tokenizer files of an exported model directory."""
    copied = []
    for name in SIDECAR_FILES:
        f = src_dir / name
        if f.is_file() and (overwrite or not (dst_dir / name).exists()):
            shutil.copy2(f, dst_dir / name)
            copied.append(name)
    return copied

"""Triton Inference Server: a compressed model as a model repository for the onnxruntime
backend (``bctonnx package``; importable as ``bctonnx.package`` too, its earlier name).

    REPO/
      NAME/
        config.pbtxt              platform "onnxruntime_onnx", inputs/outputs, batching
        1/model.onnx              (+ its external data files, same relative names)
        libbctonnx_ops.so         only when the model uses bctonnx-domain ops (integer mode)

How Triton's onnxruntime backend loads a custom-op library: the model configuration lists it in
``model_operations { op_library_filename: "..." }`` ("ONNX" in Triton's user guide,
docs/user_guide/custom_operations.md, triton-inference-server/server). The backend
(triton-inference-server/onnxruntime_backend, src/onnxruntime.cc, ``ModelState::LoadModel``)
passes every ``op_library_filename`` unchanged to ``OrtApi::RegisterCustomOpsLibrary`` on the
session options before it creates the session: the string goes to ``dlopen`` as it is, so a
relative path would resolve against the server's working directory, not the model folder.
The config therefore names the library by an absolute path: where the repository is seen by the
server (``server_repo``, e.g. ``/models`` inside a container; default: this repository's
absolute path) joined with ``NAME/libbctonnx_ops.so``. The library was built against ONNX
Runtime's C API; the server's onnxruntime must be at least as new as the headers it was
compiled with (see ``bctonnx/ops/build_support.py``).

`load_repository_model` reads a repository back the way the backend does (config, op
libraries, ``<version>/model.onnx``) into an onnxruntime session and checks the config against
the model's inputs and outputs; the tests use it, and so can a deployment check.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx

from ..errors import BctError
from ..modelio import MODEL_FILENAME, external_data_files, load_proto
from ..runtime import LIBRARY_NAME, require_op_library, uses_op_domain

CONFIG_NAME = "config.pbtxt"
PLATFORM = "onnxruntime_onnx"
VERSION = "1"

# ONNX element type -> Triton model-config data type (model_config.proto DataType)
TRITON_TYPES: dict[int, str] = {
    onnx.TensorProto.FLOAT: "TYPE_FP32",
    onnx.TensorProto.FLOAT16: "TYPE_FP16",
    onnx.TensorProto.BFLOAT16: "TYPE_BF16",
    onnx.TensorProto.DOUBLE: "TYPE_FP64",
    onnx.TensorProto.INT64: "TYPE_INT64",
    onnx.TensorProto.INT32: "TYPE_INT32",
    onnx.TensorProto.INT16: "TYPE_INT16",
    onnx.TensorProto.INT8: "TYPE_INT8",
    onnx.TensorProto.UINT64: "TYPE_UINT64",
    onnx.TensorProto.UINT32: "TYPE_UINT32",
    onnx.TensorProto.UINT16: "TYPE_UINT16",
    onnx.TensorProto.UINT8: "TYPE_UINT8",
    onnx.TensorProto.BOOL: "TYPE_BOOL",
    onnx.TensorProto.STRING: "TYPE_STRING",
}
_NAME_RE = re.compile(r"^[A-Za-z0-9_.-]+$")


@dataclass
class TensorSpec:
    """One model input or output as Triton sees it (dims without the batch axis when
    max_batch_size > 0; -1 = any size)."""

    name: str
    data_type: str
    dims: list[int]
    reshape: list[int] | None = None  # [] for a tensor that is one value per batch item


@dataclass
class PackageResult:
    repository: Path
    name: str
    model_dir: Path  # REPO/NAME
    config_path: Path
    max_batch_size: int
    inputs: list[TensorSpec] = field(default_factory=list)
    outputs: list[TensorSpec] = field(default_factory=list)
    op_library: str | None = None  # the path written into config.pbtxt, if any

    def to_dict(self) -> dict[str, Any]:
        return {
            "repository": str(self.repository),
            "name": self.name,
            "config": str(self.config_path),
            "max_batch_size": self.max_batch_size,
            "inputs": [s.__dict__ for s in self.inputs],
            "outputs": [s.__dict__ for s in self.outputs],
            "op_library_filename": self.op_library,
        }


# --- model I/O -> config ----------------------------------------------------------------------


def _full_dims(value: onnx.ValueInfoProto) -> list[int] | None:
    if not value.type.HasField("tensor_type") or not value.type.tensor_type.HasField("shape"):
        return None
    return [
        d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else -1
        for d in value.type.tensor_type.shape.dim
    ]


def _specs(values, max_batch_size: int, what: str, initializers: set[str]) -> list[TensorSpec]:
    specs = []
    for value in values:
        if value.name in initializers:
            continue
        elem = value.type.tensor_type.elem_type if value.type.HasField("tensor_type") else 0
        if elem not in TRITON_TYPES:
            raise BctError(f"{what} '{value.name}': a type Triton's config cannot state ({elem})")
        dims = _full_dims(value)
        if dims is None:
            raise BctError(f"{what} '{value.name}' has no shape in the model; cannot write dims")
        if max_batch_size > 0:
            if not dims or dims[0] != -1:
                raise BctError(
                    f"{what} '{value.name}' has a fixed first axis {dims[:1]}: the model cannot "
                    "be batched by Triton; use --max-batch-size 0"
                )
            dims = dims[1:]
        # Triton needs at least one dim: one value per item is dims [1] reshaped to []
        specs.append(TensorSpec(value.name, TRITON_TYPES[elem], dims or [1], None if dims else []))
    return specs


def _io_block(key: str, specs: list[TensorSpec]) -> list[str]:
    lines = [f"{key} ["]
    for i, s in enumerate(specs):
        lines += [
            "  {",
            f'    name: "{s.name}"',
            f"    data_type: {s.data_type}",
            f"    dims: [ {', '.join(str(d) for d in s.dims)} ]",
            *(
                [f"    reshape: {{ shape: [ {', '.join(map(str, s.reshape))} ] }}"]
                if s.reshape is not None
                else []
            ),
            "  }" + ("," if i < len(specs) - 1 else ""),
        ]
    return lines + ["]"]


def render_config(
    name: str,
    inputs: list[TensorSpec],
    outputs: list[TensorSpec],
    max_batch_size: int,
    op_library: str | None,
) -> str:
    """config.pbtxt text for the onnxruntime backend (protobuf text format of ModelConfig)."""
    lines = [
        "# Written by bctonnx package. Triton model configuration, onnxruntime backend.",
        f'name: "{name}"',
        f'platform: "{PLATFORM}"',
        f"max_batch_size: {max_batch_size}",
        *_io_block("input", inputs),
        *_io_block("output", outputs),
        "# the op library is CPU code: keep the instances on CPU",
        "instance_group [",
        "  {",
        "    count: 1",
        "    kind: KIND_CPU",
        "  }",
        "]",
    ]
    if max_batch_size > 0:
        lines += ["dynamic_batching { }"]
    if op_library is not None:
        lines += [
            "# bctonnx's custom ops (integer mode); the backend passes this path to",
            "# OrtApi::RegisterCustomOpsLibrary (dlopen) as it is: keep it absolute",
            "model_operations {",
            f'  op_library_filename: "{op_library}"',
            "}",
        ]
    return "\n".join(lines) + "\n"


# --- writing the repository ---------------------------------------------------------------------


def _readable(folder: Path) -> None:
    """Modes a plain mkdir/open would give (mkdtemp and copies of 0600 files are private; the
    server often runs as another user)."""
    umask = os.umask(0)
    os.umask(umask)
    for path in [folder, *folder.rglob("*")]:
        os.chmod(path, (0o777 if path.is_dir() or path.suffix == ".so" else 0o666) & ~umask)


def write_triton_repository(
    model: str | os.PathLike,
    repository: str | os.PathLike,
    *,
    name: str | None = None,
    max_batch_size: int = 8,
    server_repo: str | None = None,
    include_op_library: bool | None = None,
) -> PackageResult:
    """Write ``REPOSITORY/NAME`` for Triton's onnxruntime backend (see the module doc).

    ``model``: an .onnx file or a model directory (``model.onnx`` inside). ``name``: the model's
    name in Triton (default: the directory's or file's name). ``max_batch_size`` 0 = no
    batching by Triton (full shapes in dims). ``server_repo``: the repository's path as the
    server sees it (absolute; default: this repository's absolute path). ``include_op_library``:
    None = when the model uses bctonnx-domain ops, True/False to force.

    Nothing is written when an input is refused (`BctError`), and the model folder appears
    whole or not at all (built under a temporary name, then renamed).
    """
    proto, model_path = load_proto(model)
    src = Path(model)
    name = name or (src.name if src.is_dir() else model_path.stem.split(".")[0])
    if not _NAME_RE.match(name):
        raise BctError(f"model name {name!r}: use letters, digits, '_', '-' and '.' only")
    if max_batch_size < 0:
        raise BctError(f"--max-batch-size must be >= 0, got {max_batch_size}")
    if server_repo is not None and not os.path.isabs(server_repo):
        raise BctError(
            f"--server-repo {server_repo!r} must be absolute: the backend dlopens the path as it is"
        )
    repo = Path(repository)
    if repo.exists() and not repo.is_dir():
        raise BctError(f"repository {repo} exists and is not a directory")
    target = repo / name
    if target.exists():
        raise BctError(f"{target} already exists; choose another --name or repository")
    initializers = {t.name for t in proto.graph.initializer}
    inputs = _specs(proto.graph.input, max_batch_size, "input", initializers)
    outputs = _specs(proto.graph.output, max_batch_size, "output", set())
    needs_library = uses_op_domain(proto)
    if include_op_library is None:
        include_op_library = needs_library
    elif not include_op_library and needs_library:
        raise BctError("the model uses bctonnx-domain ops (integer mode): it needs the op library")
    library_src = require_op_library() if include_op_library else None
    base = server_repo if server_repo is not None else str(repo.resolve())
    op_library = f"{base.rstrip('/')}/{name}/{LIBRARY_NAME}" if library_src else None

    repo.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=repo))
    try:
        version_dir = tmp / VERSION
        version_dir.mkdir()
        shutil.copy2(model_path, version_dir / MODEL_FILENAME)
        # checked by load_proto to stay inside the folder
        for location in external_data_files(proto):
            dest = version_dir / location
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(model_path.parent / location, dest)
        if library_src:
            shutil.copy2(library_src, tmp / LIBRARY_NAME)
        text = render_config(name, inputs, outputs, max_batch_size, op_library)
        (tmp / CONFIG_NAME).write_text(text, encoding="utf-8")
        _readable(tmp)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return PackageResult(
        repository=repo,
        name=name,
        model_dir=target,
        config_path=target / CONFIG_NAME,
        max_batch_size=max_batch_size,
        inputs=inputs,
        outputs=outputs,
        op_library=op_library,
    )


# --- reading it back --------------------------------------------------------------------------

_TOKEN_RE = re.compile(
    r'\s+|#[^\n]*|(?P<str>"(?:[^"\\]|\\.)*")|(?P<num>-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?)'
    r"|(?P<ident>[A-Za-z_][A-Za-z0-9_.]*)|(?P<punct>[{}\[\]:,<>;])"
)


def _tokens(text: str) -> list[tuple[str, str]]:
    out, pos = [], 0
    while pos < len(text):
        m = _TOKEN_RE.match(text, pos)
        if m is None:
            raise ValueError(f"config.pbtxt: cannot parse at {text[pos : pos + 20]!r}")
        pos = m.end()
        if m.lastgroup:
            out.append((m.lastgroup, m.group(m.lastgroup)))
    return out


def parse_pbtxt(text: str) -> dict[str, list[Any]]:
    """A small reader for protobuf text format (what config.pbtxt files use): every field maps
    to the list of its values (repeated or not); messages become dicts, strings are unquoted,
    numbers become int/float, enum names stay strings."""
    tokens = _tokens(text)
    pos = 0

    def scalar(kind: str, tok: str) -> Any:
        if kind == "str":
            return bytes(tok[1:-1], "utf-8").decode("unicode_escape")
        if kind == "num":
            return float(tok) if any(c in tok for c in ".eE") else int(tok)
        if kind == "ident":
            return {"true": True, "false": False}.get(tok, tok)
        raise ValueError(f"config.pbtxt: unexpected {tok!r}")

    def value() -> Any:
        nonlocal pos
        kind, tok = tokens[pos]
        if tok in ("{", "<"):
            pos += 1
            return message("}" if tok == "{" else ">")
        pos += 1
        return scalar(kind, tok)

    def values() -> list[Any]:
        nonlocal pos
        if tokens[pos][1] != "[":
            return [value()]
        pos += 1
        items = []
        while tokens[pos][1] != "]":
            items.append(value())
            if tokens[pos][1] == ",":
                pos += 1
        pos += 1
        return items

    def message(end: str | None) -> dict[str, list[Any]]:
        nonlocal pos
        fields: dict[str, list[Any]] = {}
        while pos < len(tokens) and tokens[pos][1] != end:
            kind, key = tokens[pos]
            if kind != "ident":
                raise ValueError(f"config.pbtxt: expected a field name, got {key!r}")
            pos += 1
            if tokens[pos][1] == ":":
                pos += 1
            fields.setdefault(key, []).extend(values())
            if pos < len(tokens) and tokens[pos][1] in (",", ";"):
                pos += 1
        if end is not None:
            if pos >= len(tokens):
                raise ValueError(f"config.pbtxt: missing {end!r}")
            pos += 1
        return fields

    return message(None)


_ORT_TYPES = {v: k for k, v in TRITON_TYPES.items()}


def load_repository_model(repository: str | os.PathLike, name: str, version: str | None = None):
    """An onnxruntime CPU session built the way Triton's onnxruntime backend builds it from
    ``REPOSITORY/NAME``: config.pbtxt read, each ``model_operations.op_library_filename``
    registered, ``<version>/model.onnx`` loaded (the highest version by default). The config's
    inputs and outputs are checked against the session's (names, types, dims; the batch axis
    added back when max_batch_size > 0). Returns ``(session, config dict)``."""
    import onnxruntime as ort

    model_dir = Path(repository) / name
    config = parse_pbtxt((model_dir / CONFIG_NAME).read_text(encoding="utf-8"))
    if config.get("platform", [None])[0] != PLATFORM and config.get("backend") != ["onnxruntime"]:
        raise ValueError(f"{name}: not an onnxruntime model ({config.get('platform')})")
    if version is None:
        versions = sorted(int(p.name) for p in model_dir.iterdir() if p.name.isdigit())
        version = str(versions[-1])
    so = ort.SessionOptions()
    so.log_severity_level = 3
    for ops in config.get("model_operations", []):
        for lib in ops.get("op_library_filename", []):
            so.register_custom_ops_library(lib)
    path = model_dir / version / config.get("default_model_filename", [MODEL_FILENAME])[0]
    session = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    batch = config.get("max_batch_size", [0])[0]

    def check(kind: str, declared: list[dict], actual) -> None:
        by_name = {a.name: a for a in actual}
        if sorted(d["name"][0] for d in declared) != sorted(by_name):
            raise ValueError(
                f"{name}: config {kind}s {[d['name'][0] for d in declared]} != model's"
            )
        for d in declared:
            a = by_name[d["name"][0]]
            elem = _ORT_TYPES[d["data_type"][0]]
            expected = onnx.helper.tensor_dtype_to_string(elem).split(".")[-1].lower()
            if a.type != f"tensor({expected})":
                raise ValueError(f"{name}: {kind} {a.name} is {a.type}, config says {expected}")
            shape = d["reshape"][0].get("shape", []) if "reshape" in d else d["dims"]
            dims = ([-1] if batch > 0 else []) + list(shape)
            model_dims = [x if isinstance(x, int) and x > 0 else -1 for x in a.shape]
            if dims != model_dims:
                raise ValueError(f"{name}: {kind} {a.name} has dims {model_dims}, config {dims}")

    check("input", config.get("input", []), session.get_inputs())
    check("output", config.get("output", []), session.get_outputs())
    return session, config

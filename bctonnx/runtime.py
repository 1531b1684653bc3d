"""Sessions: onnxruntime options with bctonnx's native op library registered.

The library (``bctonnx/ops/libbctonnx_ops.so``, ops of the ``bctonnx`` domain) is built by the
normal install: ``pip install .`` ships it in the wheel, ``pip install -e .`` builds it next to
the sources (see ``bctonnx/ops/build_support.py``). ``BCTONNX_OP_LIBRARY=/path/to/lib.so``
selects another build of it (for example a sanitizer build, as the test suite does).
"""

from __future__ import annotations

import os
from pathlib import Path

import onnxruntime as ort

from .errors import BctError

OP_DOMAIN = "bctonnx"
LIBRARY_NAME = "libbctonnx_ops.so"
REBUILD_HINT = "rebuild it with `pip install .` (or `pip install -e .` in a source checkout)"
LIBRARY_ENV = "BCTONNX_OP_LIBRARY"


def op_library_path() -> str | None:
    """Absolute path of the native custom-op library, or None when it is not built.

    It lives in the ``bctonnx.ops`` package directory in every layout: an installed wheel, an
    editable install, or a source checkout where it was built in place; ``$BCTONNX_OP_LIBRARY``,
    when set, names another build instead (an error if it is not a file).
    """
    override = os.environ.get(LIBRARY_ENV)
    if override:
        if not Path(override).is_file():
            raise BctError(f"{LIBRARY_ENV}={override} is not a file")
        return str(Path(override).resolve())
    from . import ops

    path = Path(ops.__file__).resolve().parent / LIBRARY_NAME
    return str(path) if path.is_file() else None


def require_op_library() -> str:
    """The op library's path; `BctError` with the rebuild command when it is missing."""
    path = op_library_path()
    if path is None:
        raise BctError(f"bctonnx's native op library ({LIBRARY_NAME}) is not built: {REBUILD_HINT}")
    return path


def session_options(threads: int | None = None) -> ort.SessionOptions:
    """onnxruntime SessionOptions ready for bctonnx models (op library registered if built)."""
    so = ort.SessionOptions()
    lib = op_library_path()
    if lib is not None:
        so.register_custom_ops_library(lib)
    if threads:
        so.intra_op_num_threads = threads
    so.log_severity_level = 3
    return so


def _graph_uses_domain(graph, domain: str) -> bool:
    for node in graph.node:
        if node.domain == domain:
            return True
        for attr in node.attribute:
            subgraphs = [attr.g] if attr.HasField("g") else []
            if any(_graph_uses_domain(g, domain) for g in [*subgraphs, *attr.graphs]):
                return True
    return False


def uses_op_domain(model, domain: str = OP_DOMAIN) -> bool:
    """Whether an ONNX ModelProto imports or uses ops of ``domain``."""
    if any(o.domain == domain for o in model.opset_import):
        return True
    if any(n.domain == domain for f in model.functions for n in f.node):
        return True
    return _graph_uses_domain(model.graph, domain)


def _model_needs_library(model: str | bytes) -> bool:
    import onnx

    try:
        if isinstance(model, bytes):
            proto = onnx.load_from_string(model)
        else:
            proto = onnx.load(model, load_external_data=False)
    except Exception:  # noqa: BLE001 - unreadable: onnxruntime reports it in its own words
        return False
    return uses_op_domain(proto)


def make_session(
    path: str | os.PathLike | bytes, threads: int | None = None
) -> ort.InferenceSession:
    """An onnxruntime CPU session; a model with ``bctonnx``-domain ops needs the op library
    (`BctError` saying how to build it when it is missing)."""
    model = path if isinstance(path, bytes) else str(path)
    if op_library_path() is None and _model_needs_library(model):
        where = "this model" if isinstance(model, bytes) else model
        raise BctError(
            f"{where} uses {OP_DOMAIN}-domain ops (integer mode) but bctonnx's native op library "
            f"({LIBRARY_NAME}) is not built: {REBUILD_HINT}"
        )
    return ort.InferenceSession(model, session_options(threads), providers=["CPUExecutionProvider"])

"""Sessions: onnxruntime options with bctonnx's op library registered (once it exists)."""

from __future__ import annotations

import os

import onnxruntime as ort


def op_library_path() -> str | None:
    """Path of the native custom-op library, or None when this build has none."""
    return None


def session_options(threads: int | None = None) -> ort.SessionOptions:
    """onnxruntime SessionOptions ready for bctonnx models."""
    so = ort.SessionOptions()
    lib = op_library_path()
    if lib is not None:
        so.register_custom_ops_library(lib)
    if threads:
        so.intra_op_num_threads = threads
    so.log_severity_level = 3
    return so


def make_session(
    path: str | os.PathLike | bytes, threads: int | None = None
) -> ort.InferenceSession:
    model = path if isinstance(path, bytes) else str(path)
    return ort.InferenceSession(model, session_options(threads), providers=["CPUExecutionProvider"])

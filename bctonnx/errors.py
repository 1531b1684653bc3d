"""User-facing errors: the CLI prints their message on one line and exits non-zero."""

from __future__ import annotations


class BctError(Exception):
    """A user mistake or an input bctonnx cannot handle; the message says which and why."""

    exit_code = 2


class ModelLoadError(BctError):
    """The input is missing, empty, not ONNX, truncated, or refers to data it may not read."""

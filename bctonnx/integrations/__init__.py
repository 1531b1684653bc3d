"""Where bctonnx meets the outside world: the tools that deploy or drive a compressed model.

- `triton`: a Triton Inference Server model repository (``bctonnx package``);
- `olive`: ``BCTCompression``, a pass for Olive workflows (``olive run --config``), and the
  package config Olive resolves it through (extra ``bctonnx[olive]``);
- `mlflow`: a compressed model logged as an MLflow pyfunc model, served by
  ``mlflow models serve`` (extra ``bctonnx[mlflow]``; also ``bctonnx.mlflow``).

optimum and transformers pipelines need no module here: a compressed directory is already what
``ORTModel*.from_pretrained`` reads (`bctonnx.modelio` copies the config and tokenizer beside
``model.onnx``; `bctonnx.export` writes the FP32 export).

These modules sit above the core (`bctonnx.api`, `bctonnx.textio`, `bctonnx.runtime`) and
import from it, never the other way round; the CLI sits above them.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from ..errors import BctError


def require_extra(module: str, extra: str, what: str) -> ModuleType:
    """``import module``, or a one-line `BctError` naming the extra to install."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        missing = exc.name or module
        raise BctError(
            f"{what} needs {missing}, which is not installed: pip install 'bctonnx[{extra}]'"
        ) from None

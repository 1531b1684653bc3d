"""bctonnx: blockwise compression of transformer encoders (BCT) as an ONNX compiler."""

from __future__ import annotations

__version__ = "0.1.0"


def _source_checkout_layout() -> None:
    """Run from a source checkout (``python -m bctonnx.cli`` in the repo), ``passes/`` and
    ``models/`` sit beside this package instead of inside it: let ``bctonnx.passes`` and
    ``bctonnx.models`` resolve there. Installed (wheel or editable) this does nothing."""
    from pathlib import Path

    here = Path(__file__).resolve().parent
    root = here.parent
    if (here / "passes").exists() or not (root / "passes" / "__init__.py").is_file():
        return
    pyproject = root / "pyproject.toml"
    if pyproject.is_file() and 'name = "bctonnx"' in pyproject.read_text(encoding="utf-8"):
        __path__.append(str(root))  # type: ignore[name-defined]


_source_checkout_layout()

from .api import (  # noqa: E402 (after the layout fix above)
    CompressReport,
    CompressResult,
    compress,
    compress_file,
    compress_model,
)
from .blockformat import BlockFormat  # noqa: E402 (after the layout fix above)
from .config import PRESETS, CompressionConfig, resolve_config  # noqa: E402 (after the layout fix above)
from .errors import BctError  # noqa: E402 (after the layout fix above)
from .runtime import op_library_path, session_options  # noqa: E402 (after the layout fix above)

__all__ = [
    "PRESETS",
    "BctError",
    "BlockFormat",
    "CompressReport",
    "CompressResult",
    "CompressionConfig",
    "__version__",
    "compress",
    "compress_file",
    "compress_model",
    "op_library_path",
    "resolve_config",
    "session_options",
]

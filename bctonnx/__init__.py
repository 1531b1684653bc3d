"""bctonnx: blockwise compression of transformer encoders (BCT) as an ONNX compiler."""

from __future__ import annotations

__version__ = "0.1.0"

from .api import CompressReport, compress, compress_file
from .blockformat import BlockFormat
from .config import PRESETS, CompressionConfig, resolve_config
from .errors import BctError
from .runtime import op_library_path, session_options

__all__ = [
    "PRESETS",
    "BctError",
    "BlockFormat",
    "CompressReport",
    "CompressionConfig",
    "__version__",
    "compress",
    "compress_file",
    "op_library_path",
    "resolve_config",
    "session_options",
]

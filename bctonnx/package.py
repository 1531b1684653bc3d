"""The Triton repository writer's earlier name: it lives in `bctonnx.integrations.triton`.

``import bctonnx.package`` (and ``from bctonnx.package import load_repository_model, ...``)
gives that very module, so existing code and monkeypatches keep working.
"""

import sys

from .integrations import triton

sys.modules[__name__] = triton

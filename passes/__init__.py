"""The graph-rewriting passes, in pipeline order (installed as ``bctonnx.passes``).

    canonicalize -> quantize_weights -> quantize_embeddings -> quantize_activations -> lower_qdq

Every pass is an ``onnx_ir`` in-place pass over one ``onnx_ir.Model``. The quantize passes
emit mid-level nodes (domain ``bctonnx.mid``: BlockDequantize, BlockGather, BlockFakeQuant)
that say *what* is quantized and in which block format; a lowering pass decides *how*.
"""

from .canonicalize import Canonicalize
from .common import PassError
from .lower_qdq import LowerQDQ
from .pipeline import build_pipeline, run_pipeline
from .quantize_activations import QuantizeActivations
from .quantize_embeddings import QuantizeEmbeddings
from .quantize_weights import QuantizeWeights

__all__ = [
    "Canonicalize",
    "LowerQDQ",
    "PassError",
    "QuantizeActivations",
    "QuantizeEmbeddings",
    "QuantizeWeights",
    "build_pipeline",
    "run_pipeline",
]

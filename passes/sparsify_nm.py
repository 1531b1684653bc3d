"""sparsify_nm: N:M sparsity on the linear weights, the kept weights reconstructed on
calibration text (one-shot, SparseGPT-style), before they are quantized.

    MatMul(x, W[K, N]) + b  ->  MatMul(x, W'[K, N]) + b'     (W': in every group of M
                                consecutive elements along K, at most N nonzero)

for every linear layer whose weight format (`QuantizeWeights.format_for`: the config's, or a
per-node override) has N:M sparsity, layer by layer in graph order (each input's statistics
with the earlier layers already sparsified; the layers that read one tensor, such as Q, K and
V, share them): the Gram matrix ``G`` of the layer's input on calibration tokens (plus a
constant column), then `bctonnx.refit.sparsegpt_nm`: inputs in K order, each group of M
keeping the N weights with the largest ``w^2 / (G^-1)_ii^2`` per output column, the error of
the dropped ones pushed onto the inputs not yet visited and onto the bias through the Cholesky
factor of ``G^-1``. `quantize_weights` then quantizes the result with the same format: the
zeros stay zeros (codes 0, or the zero point), and the format stores only the kept codes and
one pattern per group (`bctonnx.blockformat`, "N:M sparsity").

A Gemm weight, or one this pass cannot reach, gets the N:M pattern by magnitude alone when it
is quantized (no reconstruction).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import onnx_ir as ir

from bctonnx.blockformat import BlockFormat
from bctonnx.refit import sparsegpt_nm

from .common import excluded, nodes_with_role
from .encoder_layers import linear_from_matmul
from .pruning import Layerwise, PruneContext, set_linear
from .quantize_weights import QuantizeWeights

log = logging.getLogger(__name__)


class SparsifyNM(ir.passes.InPlacePass):
    """N:M-sparse linear weights, reconstructed on calibration activations."""

    def __init__(
        self,
        fmt: BlockFormat,
        context: PruneContext,
        exclude: Sequence[str] = (),
        overrides: Sequence[tuple[str, BlockFormat]] = (),
    ):
        super().__init__()
        self.formats = QuantizeWeights(fmt, exclude, overrides)
        self.exclude = tuple(exclude)
        self.context = context

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        layers = []
        seen: set[int] = set()
        for node in nodes_with_role(model.graph, "linear"):
            if excluded(node, self.exclude) or id(node.inputs[1]) in seen:
                continue
            fmt = self.formats.format_for(node)
            lin = linear_from_matmul(node)
            if not fmt.nm_m or lin is None:
                continue
            if len(list(node.inputs[1].uses())) != 1:
                continue  # a shared weight: the pattern by magnitude when it is quantized
            if _is_nm_sparse(lin.weight, *fmt.nm):
                continue  # already sparse (a model this pass has seen): nothing to do
            seen.add(id(node.inputs[1]))
            layers.append((lin, fmt))
        if not layers:
            return ir.passes.PassResult(model, modified=False)
        inputs: list[ir.Value] = []
        for lin, _ in layers:
            if lin.matmul.inputs[0] not in inputs:
                inputs.append(lin.matmul.inputs[0])
        widest = max(lin.weight.shape[0] for lin, _ in layers)
        self.context.calibration.require(widest, "--sparsity")
        stats = Layerwise(self.context, model, [x.name for x in inputs], [])
        done = 0
        for i, x in enumerate(inputs):
            readers = [(lin, fmt) for lin, fmt in layers if lin.matmul.inputs[0] is x]
            k = readers[0][0].weight.shape[0]
            g, _, _ = stats.input_gram(model, i, k).total()
            for lin, fmt in readers:
                w, b = lin.weight, lin.bias
                n, m = fmt.nm
                w2, b2 = sparsegpt_nm(w, b, g, n, m)  # no bias: one is added (compensation)
                # the output error the sparsity leaves, relative to the layer's output
                dw = np.concatenate([w2 - w, (b2 - (b if b is not None else 0))[None]])
                full = np.concatenate([w, (b if b is not None else np.zeros(w.shape[1]))[None]])
                rel = float(np.einsum("ij,ik,kj->", dw, g, dw)) / max(
                    float(np.einsum("ij,ik,kj->", full, g, full)), 1e-30
                )
                self.context.records.append(
                    {"kind": "nm", "layer": lin.name, "nm": f"{n}:{m}", "rel_error": rel}
                )
                log.info("sparsify_nm %s: %d:%d, relative output error %.4f", lin.name, n, m, rel)
                set_linear(model.graph, lin, w2, b2, suffix="nm")
                done += 1
        return ir.passes.PassResult(model, modified=bool(done))


def _is_nm_sparse(w: np.ndarray, n: int, m: int) -> bool:
    """Every group of ``m`` along K of ``w`` [K, N] has at most ``n`` nonzero weights."""
    k = w.shape[0]
    if k % m:
        return False
    return bool(((w.reshape(k // m, m, -1) != 0).sum(axis=1) <= n).all())

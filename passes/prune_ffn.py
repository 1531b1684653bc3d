"""prune_ffn: whole FFN neurons removed, the FFN output layer refit on calibration text.

    MatMul(x, W1[H, I]) + b1 -> Gelu -> MatMul(., W2[I, H]) + b2
        ->  MatMul(x, W1[:, keep]) + b1[keep] -> Gelu -> MatMul(., W2'[keep', H]) + b2'

per FFN block, layer by layer (`pruning`: each layer sees the earlier layers already pruned):

1. calibration statistics: the Gram matrix of the block's GELU outputs (plus a constant
   column) in the model as pruned so far, and their cross terms with the FP32 reference
   model's output of this block (after the bias);
2. which neurons go: greedy Optimal Brain Surgeon on that least-squares problem
   (`bctonnx.refit.obs_prune`): one neuron at a time, the one whose removal raises the
   refit's error least;
3. the kept rows of W2 and b2 refit by ridge least squares (bias compensation included),
   the ridge strength chosen on held-out calibration tokens (`bctonnx.refit.refit`).

The kept count is ``(1 - fraction) * I`` rounded to a multiple of the weight and activation
block sizes (and of 128 where ``I`` is one: `pruning.alignment`), so the result is a smaller
dense matrix that quantizes and runs as usual. A fraction that removes nothing leaves the block
untouched (bit for bit).
"""

from __future__ import annotations

import logging

import numpy as np
import onnx_ir as ir

from bctonnx.refit import obs_prune

from .common import PassError
from .encoder_layers import FFNBlock, Linear, ffn_blocks
from .pruning import (
    StructurePrune,
    alignment,
    fraction_for,
    kept_count,
    refit_consumer,
    set_linear,
)

log = logging.getLogger(__name__)


class PruneFFN(StructurePrune):
    """Remove a fraction of every FFN block's neurons and refit its output layer."""

    flag = "--prune-ffn"

    def find_blocks(self, graph: ir.Graph) -> list[FFNBlock]:
        blocks = ffn_blocks(graph)
        if not blocks:
            raise PassError("--prune-ffn: no FFN block (MatMul -> Gelu -> MatMul) in the graph")
        return blocks

    def units(self, block: FFNBlock) -> int:
        return block.width

    def kept(self, block: FFNBlock) -> int:
        fraction = fraction_for(block.down.name, self.fraction, self.overrides)
        width = block.width
        return kept_count(width, fraction, alignment(self.weight_block, self.act_block, width))

    def entry(self, block: FFNBlock) -> ir.Value:
        return block.up.matmul.inputs[0]

    def consumer(self, block: FFNBlock) -> Linear:
        return block.down

    def consumer_input(self, block: FFNBlock) -> str:
        return block.act.outputs[0].name

    def prune(self, model: ir.Model, block: FFNBlock, keep: int, gram) -> None:
        width = block.width
        removed = obs_prune(gram, [[j] for j in range(width)], width - keep)
        kept = np.setdiff1d(np.arange(width), np.asarray(removed, np.int64))
        w, b, alpha, before, after = refit_consumer(gram, kept, block.down)
        self.context.records.append(
            {
                "kind": "ffn",
                "layer": block.down.name,
                "width": width,
                "kept": int(len(kept)),
                "alpha": alpha,
                "rel_error_before": before,
                "rel_error_after": after,
            }
        )
        log.info(
            "prune_ffn %s: %d -> %d neurons, ridge %.0e, relative error %.4f (full %.4f)",
            block.down.name,
            width,
            len(kept),
            alpha,
            after,
            before,
        )
        w1, b1 = block.up.weight, block.up.bias
        set_linear(model.graph, block.up, w1[:, kept], None if b1 is None else b1[kept])
        set_linear(model.graph, block.down, w, b)

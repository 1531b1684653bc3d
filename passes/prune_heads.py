"""prune_heads: whole attention heads removed, the attention output layer refit on calibration
text.

    Q, K, V = MatMul(x, Wq|Wk|Wv[H, h*d]) + b -> Reshape([.., h, d]) -> ... attention ...
    context -> Reshape([.., h*d]) -> MatMul(., Wo[h*d, H]) + bo
        ->  Wq|Wk|Wv[:, kept heads' columns], their biases; Reshape([0, -1, h', d]);
            Reshape([0, 0, h'*d]); Wo'[kept heads' rows], bo' refit

per self-attention block, layer by layer (`pruning`: each layer sees the earlier layers already
pruned):

1. calibration statistics: the Gram matrix of the attention context (the output projection's
   input, plus a constant column) in the model as pruned so far, and its cross terms with the
   FP32 reference model's output of the projection (after the bias);
2. which heads go: greedy Optimal Brain Surgeon on groups of ``head_dim`` context features
   (`bctonnx.refit.obs_prune`): the head whose removal raises the refit's error least goes
   first (a head contributes to the layer's output only through its rows of Wo);
3. the kept rows of Wo and bo refit by ridge least squares, the ridge strength chosen on
   held-out calibration tokens.

The kept head count keeps ``h' * d`` a multiple of the weight and activation block sizes (and
of 128 where ``h * d`` is one). A fraction that removes no head leaves the block untouched.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx_ir as ir

from bctonnx.refit import obs_prune

from .common import PassError
from .encoder_layers import AttentionBlock, Linear, attention_blocks
from .pruning import (
    StructurePrune,
    fraction_for,
    kept_heads,
    refit_consumer,
    set_linear,
    set_reshape_target,
)

log = logging.getLogger(__name__)


class PruneHeads(StructurePrune):
    """Remove a fraction of every self-attention block's heads and refit its output layer."""

    flag = "--prune-heads"

    def find_blocks(self, graph: ir.Graph) -> list[AttentionBlock]:
        blocks = attention_blocks(graph)
        if not blocks:
            raise PassError(
                "--prune-heads: no self-attention block (Q/K/V MatMul -> Reshape to heads -> "
                "scores -> context -> Reshape -> output MatMul) in the graph"
            )
        return blocks

    def units(self, block: AttentionBlock) -> int:
        return block.heads

    def kept(self, block: AttentionBlock) -> int:
        fraction = fraction_for(block.o.name, self.fraction, self.overrides)
        return kept_heads(block.heads, block.head_dim, fraction, self.weight_block, self.act_block)

    def entry(self, block: AttentionBlock) -> ir.Value:
        return block.q.matmul.inputs[0]

    def consumer(self, block: AttentionBlock) -> Linear:
        return block.o

    def consumer_input(self, block: AttentionBlock) -> str:
        return block.merge.outputs[0].name

    def prune(self, model: ir.Model, block: AttentionBlock, keep: int, gram) -> None:
        graph = model.graph
        d, heads = block.head_dim, block.heads
        groups = [list(range(h * d, (h + 1) * d)) for h in range(heads)]
        removed = obs_prune(gram, groups, heads - keep)
        kept_heads = [h for h in range(heads) if h not in removed]
        cols = np.concatenate([groups[h] for h in kept_heads])
        w, b, alpha, before, after = refit_consumer(gram, cols, block.o)
        self.context.records.append(
            {
                "kind": "heads",
                "layer": block.o.name,
                "width": heads,
                "kept": keep,
                "kept_heads": kept_heads,
                "alpha": alpha,
                "rel_error_before": before,
                "rel_error_after": after,
            }
        )
        log.info(
            "prune_heads %s: %d -> %d heads (kept %s), ridge %.0e, relative error %.4f (full %.4f)",
            block.o.name,
            heads,
            keep,
            kept_heads,
            alpha,
            after,
            before,
        )
        for lin in (block.q, block.k, block.v):
            bias = lin.bias
            set_linear(graph, lin, lin.weight[:, cols], None if bias is None else bias[cols])
        set_linear(graph, block.o, w, b)
        for split in block.splits:
            set_reshape_target(graph, split, [0, -1, keep, d])
        set_reshape_target(graph, block.merge, [0, 0, keep * d])

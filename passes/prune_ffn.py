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
from collections.abc import Sequence

import numpy as np
import onnx_ir as ir

from bctonnx.refit import error, obs_prune, refit

from .common import PassError
from .encoder_layers import ffn_blocks
from .pruning import (
    Layerwise,
    PruneContext,
    alignment,
    fraction_for,
    kept_count,
    refresh_shapes,
    set_linear,
)

log = logging.getLogger(__name__)


class PruneFFN(ir.passes.InPlacePass):
    """Remove a fraction of every FFN block's neurons and refit its output layer."""

    def __init__(
        self,
        fraction: float,
        context: PruneContext,
        *,
        weight_block: int = 1,
        act_block: int = 1,
        overrides: Sequence[tuple[str, float]] = (),
        residual: bool = True,
    ):
        super().__init__()
        self.residual = residual
        self.fraction = fraction
        self.context = context
        self.weight_block = weight_block
        self.act_block = act_block
        self.overrides = tuple(overrides)

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        blocks = ffn_blocks(model.graph)
        if not blocks:
            raise PassError("--prune-ffn: no FFN block (MatMul -> Gelu -> MatMul) in the graph")
        plan = []
        for block in blocks:
            fraction = fraction_for(block.down.name, self.fraction, self.overrides)
            width = block.width
            keep = kept_count(width, fraction, alignment(self.weight_block, self.act_block, width))
            plan.append((block, keep))
        widest = max((b.width for b, k in plan if k < b.width), default=0)
        if widest:
            self.context.calibration.require(widest, "--prune-ffn")
        todo = [(i, b, k) for i, (b, k) in enumerate(plan) if k < b.width]
        if todo:
            inputs = [b.up.matmul.inputs[0] for b, _ in plan]
            sums = [b.down.residual_sum(x) for (b, _), x in zip(plan, inputs, strict=True)]
            residual = self.residual and all(s is not None for s in sums)
            stats = Layerwise(
                self.context,
                model,
                [x.name for x in inputs],
                [s.name for s in sums] if residual else [b.down.output.name for b, _ in plan],
                residual=residual,
            )
        for i, block, keep in todo:
            self._prune(
                model,
                block,
                keep,
                stats.gram(
                    model, i, block.act.outputs[0].name, block.width, block.down.weight.shape[1]
                ),
            )
        modified = bool(todo)
        if modified:
            refresh_shapes(model)
        return ir.passes.PassResult(model, modified=modified)

    def _prune(self, model: ir.Model, block, keep: int, gram) -> None:
        graph = model.graph
        width = block.width
        w2 = block.down.weight
        removed = obs_prune(gram, [[j] for j in range(width)], width - keep)
        kept = np.setdiff1d(np.arange(width), np.asarray(removed, np.int64))
        w, b, alpha = refit(gram, kept)
        g, c, yy = gram.total()
        full = np.concatenate(
            [w2, (block.down.bias if block.down.bias is not None else np.zeros(w2.shape[1]))[None]]
        )
        before = error(full, g, c, yy, np.arange(width))
        after = error(np.concatenate([w, b[None]]), g, c, yy, kept)
        ref = float(yy)
        self.context.records.append(
            {
                "kind": "ffn",
                "layer": block.down.name,
                "width": width,
                "kept": int(len(kept)),
                "alpha": alpha,
                "rel_error_before": before / ref,
                "rel_error_after": after / ref,
            }
        )
        log.info(
            "prune_ffn %s: %d -> %d neurons, ridge %.0e, relative error %.4f (full %.4f)",
            block.down.name,
            width,
            len(kept),
            alpha,
            after / ref,
            before / ref,
        )
        w1, b1 = block.up.weight, block.up.bias
        set_linear(graph, block.up, w1[:, kept], None if b1 is None else b1[kept])
        set_linear(graph, block.down, w, b)

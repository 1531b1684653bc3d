"""What the pruning passes share (not a pass): the calibration context, kept counts aligned to
the kernels' blocks, calibration statistics of one layer, and rewriting a linear layer's
constants.

Pruning is sequential: each layer is pruned and refit on the activations of the model as it
is by then (earlier layers already pruned), against the targets of the reference model (the
canonicalized FP32 model before any pruning), so a layer's refit also absorbs what the layers
before it lost.
"""

from __future__ import annotations

import fnmatch
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx
import onnx_ir as ir
import onnx_ir.passes.common as common_passes

from bctonnx.calibration import Calibration, Runner, token_rows
from bctonnx.refit import Gram

from .canonicalize import infer_shapes
from .common import new_initializer, take_over
from .encoder_layers import Linear

log = logging.getLogger(__name__)

KERNEL_TILE = 128  # widths that are multiples of it stay so (BlockMatMul's 128-long K blocks)


@dataclass
class PruneContext:
    """Calibration text (tokenized when a pass first reads it: ``source`` is the tokenized
    set or a function that makes it), the reference model and what the passes did (one
    record per layer)."""

    source: Calibration | Callable[[], Calibration]
    reference: onnx.ModelProto | None = None
    records: list[dict] = field(default_factory=list)

    @property
    def calibration(self) -> Calibration:
        if not isinstance(self.source, Calibration):
            self.source = self.source()
        return self.source

    @property
    def tokens(self) -> int:
        """Calibration tokens read (0 when no pass needed them)."""
        return self.source.tokens if isinstance(self.source, Calibration) else 0

    def reference_of(self, model: ir.Model) -> onnx.ModelProto:
        if self.reference is None:
            self.reference = ir.serde.serialize_model(model)
        return self.reference


def fraction_for(name: str, default: float, overrides: Sequence[tuple[str, float]]) -> float:
    """The pruning fraction of a layer: the first override whose glob matches the name of its
    consuming linear node, else the default."""
    for pattern, fraction in overrides:
        if fnmatch.fnmatchcase(name, pattern):
            return fraction
    return default


def kept_count(width: int, fraction: float, quantum: int) -> int:
    """How many of ``width`` units stay when ``fraction`` of them go, as a multiple of
    ``quantum`` (at least one quantum; ties keep more). A fraction that rounds to nothing
    removed keeps all."""
    if fraction <= 0 or width % quantum:
        return width
    units = width // quantum
    keep = math.floor(units * (1.0 - fraction) + 0.5)
    return max(1, min(units, keep)) * quantum


def alignment(weight_block: int, act_block: int, width: int) -> int:
    """The quantum of a pruned width: a multiple of the weight and activation blocks (so the
    smaller matrix quantizes as usual), and of the kernels' 128 where the width is at least
    four of them."""
    q = math.lcm(weight_block, act_block)
    tile = math.lcm(q, KERNEL_TILE)
    if width % tile == 0 and width // tile >= 4:  # wide enough to keep several choices
        q = tile
    return q


def kept_heads(
    heads: int, head_dim: int, fraction: float, weight_block: int, act_block: int
) -> int:
    """Heads kept of ``heads`` when removing ``fraction``: a multiple of the heads that fill
    one quantum of width (`alignment`); all of them when the head count is not such a multiple."""
    q = alignment(weight_block, act_block, heads * head_dim)
    per = q // math.gcd(q, head_dim)  # heads per quantum of width
    if heads % per:
        return heads
    return kept_count(heads, fraction, per)


class Layerwise:
    """Calibration statistics of blocks pruned one after the other, in graph order.

    One run of the reference model stores every block's target (float16, one row per real
    token); the model as it is being pruned is run only from the input of the block at hand
    (``cuts[i]``, kept per batch as float32) to what that block's refit reads, and, when the
    next block is reached, from there to its input: each layer's activations are computed
    once, with the earlier layers as pruned by then.
    """

    def __init__(
        self,
        ctx: PruneContext,
        model: ir.Model,
        cuts: Sequence[str],
        targets: Sequence[str],
        residual: bool = False,
    ):
        """``residual``: the targets are the reference's residual sums ``cut + y`` (the
        LayerNorm's input) and a block's refit target is that sum minus its own input as it
        is now, so the refit also makes up for what the earlier layers changed in the
        residual stream."""
        self.ctx, self.cuts, self.targets = ctx, list(cuts), list(targets)
        self.residual = residual
        calib = ctx.calibration
        self.target_rows = []
        if self.targets:
            reference = Runner(ctx.reference_of(model), self.targets)
            for batch in calib.batches:
                out = reference.run(batch)
                self.target_rows.append(
                    [token_rows(out[t], batch).astype(np.float16) for t in self.targets]
                )
        first = Runner(_current(model), [self.cuts[0]])
        self.cut_values = [first.run(batch)[self.cuts[0]] for batch in calib.batches]
        self.position = 0

    def _move_to(self, model: ir.Model, i: int) -> None:
        if i == self.position:
            return
        src, dst = self.cuts[self.position], self.cuts[i]
        runner = Runner(_current(model), [dst], [src])
        batches = self.ctx.calibration.batches
        self.cut_values = [
            runner.run(batch, {src: v})[dst]
            for batch, v in zip(batches, self.cut_values, strict=True)
        ]
        self.position = i

    def input_gram(self, model: ir.Model, i: int, inputs: int) -> Gram:
        """Gram matrix of block ``i``'s input itself (the model as pruned so far)."""
        self._move_to(model, i)
        calib = self.ctx.calibration
        gram = Gram(inputs, 0)
        for index, (batch, v) in enumerate(zip(calib.batches, self.cut_values, strict=True)):
            x = token_rows(v, batch)
            gram.add(x, np.zeros((x.shape[0], 0), np.float32), held_out=calib.held_out(index))
        return gram

    def gram(self, model: ir.Model, i: int, x_name: str, inputs: int, outputs: int) -> Gram:
        """Gram matrices of input ``x_name`` of block ``i`` (the model as pruned so far)
        against block ``i``'s target in the reference model."""
        self._move_to(model, i)
        calib = self.ctx.calibration
        cut = self.cuts[i]
        runner = Runner(_current(model), [x_name], [cut])
        gram = Gram(inputs, outputs)
        for index, (batch, v) in enumerate(zip(calib.batches, self.cut_values, strict=True)):
            x = token_rows(runner.run(batch, {cut: v})[x_name], batch)
            y = self.target_rows[index][i].astype(np.float32)
            if self.residual:
                y = y - token_rows(v, batch)
            gram.add(x, y, held_out=calib.held_out(index))
        return gram


def _current(model: ir.Model) -> onnx.ModelProto:
    return ir.serde.serialize_model(model)


def set_linear(
    graph: ir.Graph,
    lin: Linear,
    weight: np.ndarray,
    bias: np.ndarray | None,
    *,
    suffix: str = "pruned",
) -> None:
    """Give a linear layer new constants (fresh initializers named ``<old>.<suffix>``; the
    old ones become unused). A layer without a bias Add gets one when ``bias`` is not None
    (the refits compensate into the bias)."""
    name = (lin.matmul.inputs[1].name or lin.name).removesuffix(".pruned")
    w = new_initializer(graph, f"{name}.{suffix}", np.ascontiguousarray(weight, np.float32))
    lin.matmul.replace_input_with(1, w)
    if bias is None:
        return
    b = np.ascontiguousarray(bias, np.float32)
    if lin.add is None:
        value = new_initializer(graph, f"{name}.{suffix}_bias", b)
        out = lin.matmul.outputs[0]
        add = ir.Node("", "Add", [out, value], name=f"{lin.name}/bias_compensation")
        graph.insert_after(lin.matmul, add)
        take_over(out, add.outputs[0], reader=add)
        lin.add = add
        return
    old = lin.bias_value
    index = 1 if lin.add.inputs[0] is lin.matmul.outputs[0] else 0
    if old.shape is not None:
        b = b.reshape([1] * (len(old.shape) - 1) + [-1])
    base = (old.name or name).removesuffix(".pruned")
    lin.add.replace_input_with(index, new_initializer(graph, f"{base}.{suffix}", b))


def set_reshape_target(graph: ir.Graph, node: ir.Node, target: Sequence[int]) -> None:
    """A Reshape's target becomes a constant (0 = keep that input dimension)."""
    value = new_initializer(
        graph, f"{node.name}.pruned_shape", np.asarray(list(target), dtype=np.int64)
    )
    node.replace_input_with(1, value)
    if "allowzero" in node.attributes:
        node.attributes.pop("allowzero")


def refresh_shapes(model: ir.Model) -> None:
    """Re-infer every intermediate shape after widths changed."""
    common_passes.RemoveUnusedNodesPass()(model)
    outputs = {id(v) for v in model.graph.outputs}
    for node in model.graph:
        for value in node.outputs:
            if id(value) not in outputs:
                value.shape = None
    infer_shapes(model)


class StructurePrune(ir.passes.InPlacePass):
    """What PruneFFN and PruneHeads share: the settings, and the layer-by-layer loop (a kept
    count per block, one calibration run for every block's statistics, then each block pruned
    in order on the model as pruned so far). A subclass names its blocks and how they are cut
    by the hooks below."""

    flag = ""  # the CLI flag, for messages

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

    # --- hooks -------------------------------------------------------------------------------
    def find_blocks(self, graph: ir.Graph) -> list:
        """The blocks to prune (a PassError when there is none)."""
        raise NotImplementedError

    def units(self, block) -> int:
        """How many prunable units (neurons, heads) the block has."""
        raise NotImplementedError

    def kept(self, block) -> int:
        """How many of them stay."""
        raise NotImplementedError

    def entry(self, block) -> ir.Value:
        """The block's input (the residual stream before it)."""
        raise NotImplementedError

    def consumer(self, block) -> Linear:
        """The linear layer that reads the pruned units and is refit."""
        raise NotImplementedError

    def consumer_input(self, block) -> str:
        """The name of the consumer's input (what the Gram matrix is taken of)."""
        raise NotImplementedError

    def prune(self, model: ir.Model, block, keep: int, gram) -> None:
        """Cut the block down to ``keep`` units, refit the consumer on ``gram``."""
        raise NotImplementedError

    # --- the loop ----------------------------------------------------------------------------
    def call(self, model: ir.Model) -> ir.passes.PassResult:
        plan = [(b, self.kept(b)) for b in self.find_blocks(model.graph)]
        todo = [(i, b, k) for i, (b, k) in enumerate(plan) if k < self.units(b)]
        if not todo:
            return ir.passes.PassResult(model, modified=False)
        widest = max(self.consumer(b).weight.shape[0] for _, b, _ in todo)
        self.context.calibration.require(widest, self.flag)
        inputs = [self.entry(b) for b, _ in plan]
        sums = [self.consumer(b).residual_sum(x) for (b, _), x in zip(plan, inputs, strict=True)]
        residual = self.residual and all(s is not None for s in sums)
        stats = Layerwise(
            self.context,
            model,
            [x.name for x in inputs],
            [s.name for s in sums] if residual else [self.consumer(b).output.name for b, _ in plan],
            residual=residual,
        )
        for i, block, keep in todo:
            w = self.consumer(block).weight
            gram = stats.gram(model, i, self.consumer_input(block), w.shape[0], w.shape[1])
            self.prune(model, block, keep, gram)
        refresh_shapes(model)
        return ir.passes.PassResult(model, modified=True)


def refit_consumer(gram, rows: np.ndarray, consumer: Linear) -> tuple:
    """The consumer's kept input ``rows`` refit on ``gram``: (weights, bias, ridge strength,
    relative error before, relative error after), errors relative to the targets' energy."""
    from bctonnx.refit import error, refit

    w, b, alpha = refit(gram, rows)
    g, c, yy = gram.total()
    weight = consumer.weight
    bias = consumer.bias if consumer.bias is not None else np.zeros(weight.shape[1], np.float32)
    before = error(np.concatenate([weight, bias[None]]), g, c, yy, np.arange(weight.shape[0]))
    after = error(np.concatenate([w, b[None]]), g, c, yy, rows)
    return w, b, alpha, before / float(yy), after / float(yy)

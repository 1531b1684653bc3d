"""quantize_activations: every intermediate result that feeds compute gets block-quantized
with dynamic per-block scales computed in the graph (no calibration data).

Quantized tensors:
- the activation inputs of every ``linear`` MatMul/Gemm, and both inputs of the attention
  matmuls (``attention.qk``: Q and K^T; ``attention.pv``: P and V);
- the inputs and outputs of ``gelu``, ``softmax`` and ``layernorm``;
- the inputs and outputs of ``residual`` adds.

    x  ->  BlockFakeQuant(x)   (mid-level; lowered to dynamic QuantizeLinear/DequantizeLinear
                                 or to the integer ops)

Each tensor is quantized once, along its last axis; every reader (and a graph output) reads
the quantized version, which keeps the tensor's name. A MatMul operand made by a Transpose
(K^T in attention) is quantized before the Transpose, so its blocks run along the reduction
axis. Where the last axis is only known at run time (sequence length) the last block may be
partial. Nodes matched by ``exclude`` add nothing to the set.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import onnx_ir as ir

from bctonnx.blockformat import BlockFormat

from .common import (
    MID_DOMAIN,
    excluded,
    fmt_attrs,
    is_const,
    is_float,
    role,
    take_over,
)

# role -> (input indices, output indices) whose tensors are quantized
QUANTIZED_IO: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {
    "linear": ((0,), ()),
    "attention.qk": ((0, 1), ()),
    "attention.pv": ((0, 1), ()),
    "gelu": ((0,), (0,)),
    "softmax": ((0,), (0,)),
    "layernorm": ((0,), (0,)),
    "residual": ((0, 1), (0,)),
}


def _from_attention_scores(value: ir.Value, depth: int = 3) -> bool:
    node = value.producer()
    if node is None or depth == 0:
        return False
    if role(node) == "attention.qk":
        return True
    # token_drop's proportional attention adds log(weights) to the scores
    return (node.op_type in ("Div", "Mul", "Cast") or role(node) == "attention.bias") and (
        _from_attention_scores(node.inputs[0], depth - 1)
    )


def _before_mask(value: ir.Value) -> ir.Value:
    """Softmax(scores + mask): quantize the scores, not the sum.

    The additive mask holds huge negatives (down to -3.4e38) at padded positions; a block
    containing one would get a scale so large that every real score rounds to zero. The mask
    add stays in float and the Softmax (or the integer softmax) sees the mask as it is.
    """
    node = value.producer()
    if node is None or role(node) != "attention.mask":
        return value
    for inp in node.inputs:
        if inp is not None and _from_attention_scores(inp):
            return inp
    return value


def _is_scalar(value: ir.Value | None) -> bool:
    if value is None or value.shape is None:
        return False
    return all(d == 1 for d in value.shape)


def _through_scalar_scaling(value: ir.Value) -> ir.Value:
    """Step over Mul/Div by a scalar (exports scale K^T by 1/sqrt(sqrt(d)), computed from
    the shape): scaling commutes with blockwise quantization."""
    node = value.producer()
    while (
        node is not None
        and node.op_type in ("Mul", "Div")
        and len(value.uses()) == 1
        and _is_scalar(node.inputs[1])
    ):
        value = node.inputs[0]
        node = value.producer()
    return value


def _before_transpose(value: ir.Value) -> ir.Value:
    """For K^T = Transpose(K) moving K's last axis inward, quantize K instead."""
    original = value
    value = _through_scalar_scaling(value)
    node = value.producer()
    if node is None or node.op_type != "Transpose" or not is_float(node.inputs[0]):
        return original
    perm = node.attributes.get("perm")
    src = node.inputs[0]
    if perm is None or src.shape is None:
        return original
    perm = list(perm.as_ints())
    if perm[-1] == len(perm) - 1 or len(value.uses()) != 1:
        return original
    return src


class QuantizeActivations(ir.passes.InPlacePass):
    """Insert BlockFakeQuant on every activation that feeds compute (see module doc)."""

    def __init__(self, fmt: BlockFormat, exclude: Sequence[str] = ()):
        super().__init__()
        # activation scales are computed at run time, in float32
        self.fmt = replace(fmt, axis=-1, scale_dtype="float32")
        self.exclude = tuple(exclude)

    def targets(self, graph: ir.Graph) -> list[ir.Value]:
        chosen: dict[int, ir.Value] = {}
        for node in graph:
            r = role(node)
            if r not in QUANTIZED_IO or excluded(node, self.exclude):
                continue
            ins, outs = QUANTIZED_IO[r]
            values = [node.inputs[i] for i in ins if i < len(node.inputs)]
            values += [node.outputs[i] for i in outs]
            for value in values:
                if r.startswith("attention") and value is node.inputs[1]:
                    value = _before_transpose(value)
                if r == "softmax" and value is node.inputs[0]:
                    value = _before_mask(value)
                if is_float(value) and not is_const(value) and value.shape is not None:
                    chosen.setdefault(id(value), value)
        return list(chosen.values())

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        targets = self.targets(graph)
        for value in targets:
            fake_quant(graph, value, self.fmt)
        return ir.passes.PassResult(model, modified=bool(targets))


def fake_quant(graph: ir.Graph, value: ir.Value, fmt: BlockFormat) -> ir.Value:
    """Insert BlockFakeQuant after ``value``; every reader then reads its output."""
    node = ir.Node(
        MID_DOMAIN,
        "BlockFakeQuant",
        [value],
        ir.convenience.convert_attributes(fmt_attrs(fmt)),
        name=f"{value.name}/BlockFakeQuant",
    )
    producer = value.producer()
    if producer is not None and producer.graph is graph:
        graph.insert_after(producer, node)
    else:
        graph.insert_before(graph.node(0), node) if len(graph) else graph.append(node)
    out = node.outputs[0]
    out.dtype = ir.DataType.FLOAT
    out.shape = value.shape
    take_over(value, out, reader=node)
    return out

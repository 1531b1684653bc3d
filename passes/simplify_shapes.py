"""simplify_shapes: ``Shape`` reads the earliest tensor that has the same shape.

Exported encoders take ``Shape`` of hidden states (attention reshapes, pooling). After
quantization those hidden states are ``DequantizeLinear`` outputs, so a dequantization of a
whole [batch, seq, hidden] tensor ran only for its shape (measured on MiniLM integer w8a8:
12 such DequantizeLinear, ~1 ms per run at batch 1 x 128). A ``Shape`` (with or without
start/end) now reads through the shape-preserving ops below; a producer left without readers
is removed by the pipeline's final dead-node sweep.

    Shape(DequantizeLinear(q, s[, zp]))  -> Shape(q)
    Shape(QuantizeLinear(x, ...))        -> Shape(x)
    Shape(Cast(x)) / Shape(Identity(x))  -> Shape(x)
    Shape(bctonnx.BlockDequantize(q, s)) -> Shape(q)

and a ``Reshape`` whose target is computed at run time (Shape -> Gather -> Unsqueeze -> Concat
in exports) gets a constant one when the inferred shapes allow: the leading dims that stay are
``0`` (ONNX: copy the input's dim), the rest are their static sizes. MiniLM: attention's heads
split and merge of every layer; the shape arithmetic then dies (28 -> 10 Shape, 32 -> 8 Concat).
"""

from __future__ import annotations

import math

import numpy as np
import onnx_ir as ir

from .common import OPS_DOMAIN, is_const, new_initializer

SHAPE_PRESERVING = frozenset({"DequantizeLinear", "QuantizeLinear", "Cast", "Identity"})
OPS_SHAPE_PRESERVING = frozenset({"BlockDequantize"})  # output 0 has input 0's shape


def _preserves_shape(node: ir.Node) -> bool:
    if node.domain in ("", "ai.onnx"):
        return node.op_type in SHAPE_PRESERVING
    return node.domain == OPS_DOMAIN and node.op_type in OPS_SHAPE_PRESERVING


def shape_source(value: ir.Value) -> ir.Value:
    """The first tensor up the chain of shape-preserving ops that ``value`` comes from."""
    node = value.producer()
    while (
        node is not None
        and _preserves_shape(node)
        and node.inputs
        and node.inputs[0] is not None
        and value is node.outputs[0]
    ):
        value = node.inputs[0]
        node = value.producer()
    return value


def _same_dim(a, b) -> bool:
    """Two dims known equal: equal ints, or the same named symbolic dim."""
    if isinstance(a, int) or isinstance(b, int):
        return isinstance(a, int) and isinstance(b, int) and a == b
    return a.value is not None and a.value == b.value


def constant_target(node: ir.Node) -> np.ndarray | None:
    """A constant target for a Reshape with a computed one: [0] * k + the static sizes of the
    output's last dims, for the largest k that the inferred shapes prove (the first k dims
    stay; one of them may be unknown, as the element count is kept), or None."""
    if node.op_type != "Reshape" or node.domain not in ("", "ai.onnx") or len(node.inputs) < 2:
        return None
    allowzero = node.attributes.get("allowzero")
    if is_const(node.inputs[1]) or (allowzero is not None and allowzero.as_int() != 0):
        return None
    src, dst = node.inputs[0].shape, node.outputs[0].shape
    if src is None or dst is None:
        return None
    for k in range(min(len(src), len(dst)), -1, -1):
        tail_src, tail_dst = list(src[k:]), list(dst[k:])
        if not all(isinstance(d, int) and d > 0 for d in tail_src + tail_dst):
            continue
        if math.prod(tail_src) != math.prod(tail_dst):
            continue
        if sum(not _same_dim(a, b) for a, b in zip(src[:k], dst[:k], strict=True)) > 1:
            continue
        return np.array([0] * k + tail_dst, np.int64)
    return None


class SimplifyShapes(ir.passes.InPlacePass):
    """Point every ``Shape`` node at its input's shape source, give computed Reshape targets
    constants (see module doc)."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        modified = False
        targets: dict[bytes, ir.Value] = {}
        for node in model.graph:
            target = constant_target(node)
            if target is None:
                continue
            key = target.tobytes()
            if key not in targets:
                targets[key] = new_initializer(
                    model.graph, "reshape_" + "_".join(map(str, target)), ir.tensor(target)
                )
            node.replace_input_with(1, targets[key])
            modified = True
        for node in model.graph:
            if node.op_type != "Shape" or node.domain not in ("", "ai.onnx") or not node.inputs:
                continue
            source = shape_source(node.inputs[0])
            if source is not node.inputs[0]:
                node.replace_input_with(0, source)
                modified = True
        return ir.passes.PassResult(model, modified=modified)

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
"""

from __future__ import annotations

import onnx_ir as ir

from .common import OPS_DOMAIN

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


class SimplifyShapes(ir.passes.InPlacePass):
    """Point every ``Shape`` node at its input's shape source (see module doc)."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        modified = False
        for node in model.graph:
            if node.op_type != "Shape" or node.domain not in ("", "ai.onnx") or not node.inputs:
                continue
            source = shape_source(node.inputs[0])
            if source is not node.inputs[0]:
                node.replace_input_with(0, source)
                modified = True
        return ir.passes.PassResult(model, modified=modified)

"""lower_dequantize: (mode integer, last) the dequantizations left in the integer graph run in
the op library: ``DequantizeLinear(q, s, axis=-1, block_size=B)`` of int8 codes (made by a
bctonnx op, or known int8, such as embedding rows gathered from the int8 table), no zero point
-> ``bctonnx.BlockDequantize(q, s, block_size=B)`` (specification:
``ref_quant.block_dequantize``: the same values, one float32 product per element).

What is left after ``lower_matmul`` are the embeddings' sums and the encoder's output: whole
[batch, seq, hidden] tensors, which onnxruntime 1.31's blocked DequantizeLinear converts at
~1.4 ns per element (measured on MiniLM: ~70 us for 1 x 128 x 384, ~5 us in the library), and
the weights of a classifier's Gemm heads (pooler, classifier; blocks along K, the last axis of
a transB weight): onnxruntime does not fold a DequantizeLinear of constants, so it ran every
time (~0.3 ms a run for MiniLM's 384 x 384 pooler at 1 thread, ~0.04 ms as BlockDequantize).
"""

from __future__ import annotations

import onnx_ir as ir

from .common import OPS_DOMAIN, OPS_VERSION, take_over
from .lower_matmul import blocked_codes


def _int8_blocked(dq: ir.Node):
    """(codes, scales, block) of a DequantizeLinear of known-int8 codes, blocked on the last
    axis, without a zero point; None otherwise."""
    block = dq.attributes.get("block_size")
    axis = dq.attributes.get("axis")
    if len(dq.inputs) != 2 or block is None or block.as_int() < 1:
        return None
    q = dq.inputs[0]
    last = -1 if q.shape is None else len(q.shape) - 1
    if axis is None or axis.as_int() not in (-1, last) or not _is_int8(q):
        return None
    return dq.inputs[0], dq.inputs[1], block.as_int()


def _is_int8(value: ir.Value) -> bool:
    """int8 by its type, or rows gathered from an int8 table (lower_qdq's embeddings)."""
    if value.dtype is not None:
        return value.dtype == ir.DataType.INT8
    node = value.producer()
    return (
        node is not None
        and node.op_type == "Gather"
        and node.domain == ""
        and node.inputs[0] is not None
        and node.inputs[0].dtype == ir.DataType.INT8
    )


class LowerDequantize(ir.passes.InPlacePass):
    """DequantizeLinear of our ops' codes -> BlockDequantize (see module doc)."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        count = 0
        for node in list(graph):
            if node.op_type != "DequantizeLinear" or node.domain != "":
                continue
            found = blocked_codes(node.outputs[0]) or _int8_blocked(node)
            if found is None:
                continue
            q, s, block = found
            new = ir.Node(
                OPS_DOMAIN,
                "BlockDequantize",
                [q, s],
                ir.convenience.convert_attributes({"block_size": block}),
                name=node.name,
            )
            graph.insert_before(node, new)
            new.outputs[0].dtype = ir.DataType.FLOAT
            take_over(node.outputs[0], new.outputs[0])
            graph.remove(node, safe=True)
            count += 1
        if count:
            model.opset_imports[OPS_DOMAIN] = OPS_VERSION
        return ir.passes.PassResult(model, modified=bool(count))

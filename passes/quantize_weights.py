"""quantize_weights: every ``linear`` MatMul/Gemm weight becomes a block-quantized constant.

    MatMul(x, W[K, N])        ->  MatMul(x, BlockDequantize(codes[K, N], scales[K/B, N] [, zp]))
    (superblock formats: scales[K/S, N] and a fourth input, multipliers[K/B, N]; zp "" when
    symmetric)
    Gemm(x, W, transB=1)      ->  Gemm(x, BlockDequantize(codes[N, K], scales[N, K/B]), transB=1)

Blocks run along the reduction axis K (axis 0 of W, or axis 1 when Gemm transposes it), so an
integer kernel can apply each scale once per block of the dot product. ``BlockDequantize`` is
a mid-level node (domain ``bctonnx.mid``); a lowering pass decides its concrete form.
A weight shared by several nodes is quantized once. A superblock format applies to each weight
with the superblock that fits its K (`BlockFormat.superblock_for`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx_ir as ir

from bctonnx.blockformat import (
    BlockFormat,
    BlockQuantized,
    BlockSizeError,
    divisors_hint,
    quantize,
)

from .common import (
    MID_DOMAIN,
    PassError,
    const_array,
    excluded,
    fmt_attrs,
    new_initializer,
    nodes_with_role,
)


def weight_reduction_axis(node: ir.Node) -> int:
    if node.op_type == "Gemm":
        trans_b = node.attributes.get("transB")
        return 1 if trans_b is not None and trans_b.as_int() else 0
    return -2  # MatMul: W[..., K, N]


class QuantizeWeights(ir.passes.InPlacePass):
    """MatMul/Gemm constant weights -> BlockDequantize(codes, scales), blocked along K."""

    def __init__(
        self,
        fmt: BlockFormat,
        exclude: Sequence[str] = (),
        overrides: Sequence[tuple[str, BlockFormat]] = (),
    ):
        super().__init__()
        self.fmt = fmt
        self.exclude = tuple(exclude)
        self.overrides = tuple(overrides)

    def format_for(self, node: ir.Node) -> BlockFormat:
        """The node's format: the first override whose glob matches its name, else the default."""
        for pattern, fmt in self.overrides:
            if excluded(node, (pattern,)):
                return fmt
        return self.fmt

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        done: dict[int, ir.Value] = {}
        for node in nodes_with_role(graph, "linear"):
            if excluded(node, self.exclude):
                continue
            weight = node.inputs[1]
            if id(weight) not in done:
                done[id(weight)] = self._quantize(graph, node, weight)
            node.replace_input_with(1, done[id(weight)])
        return ir.passes.PassResult(model, modified=bool(done))

    def _quantize(self, graph: ir.Graph, node: ir.Node, weight: ir.Value) -> ir.Value:
        array = const_array(weight).astype(np.float32)
        axis = weight_reduction_axis(node) % array.ndim
        fmt = self.format_for(node).with_axis(axis)
        try:
            q = quantize(array, fmt)
        except BlockSizeError:
            size = array.shape[axis]
            raise PassError(
                f"block size {fmt.block_size} does not divide the reduction axis ({size}) of "
                f"weight '{weight.name}' of node '{node.name}'; block sizes that do: "
                f"{divisors_hint(size)} (or exclude the node)"
            ) from None
        return block_dequantize(graph, weight.name or node.name, q)


def block_dequantize(graph: ir.Graph, name: str, q: BlockQuantized) -> ir.Value:
    """Append a mid-level BlockDequantize of a constant block-quantized tensor (codes, scales,
    zero points for asymmetric formats, multipliers for superblock ones; read back by
    `common.stored_weight`); returns its float output."""
    inputs = [
        new_initializer(graph, f"{name}.bct_codes", q.codes),
        new_initializer(graph, f"{name}.bct_scales", q.scale_codes),
    ]
    if q.zero_points is not None:
        inputs.append(new_initializer(graph, f"{name}.bct_zp", q.zero_points))
    if q.multipliers is not None:
        if q.zero_points is None:
            inputs.append(None)
        inputs.append(new_initializer(graph, f"{name}.bct_mult", q.multipliers))
    node = ir.Node(
        MID_DOMAIN,
        "BlockDequantize",
        inputs,
        ir.convenience.convert_attributes(fmt_attrs(q.fmt)),
        name=f"{name}/BlockDequantize",
    )
    graph.append(node)
    out = node.outputs[0]
    out.name = f"{name}.bct_dq"
    out.dtype = ir.DataType.FLOAT
    out.shape = ir.Shape(q.codes.shape)
    return out


__all__ = ["QuantizeWeights", "block_dequantize", "weight_reduction_axis", "PassError"]

"""quantize_embeddings: word, position and token-type tables become block-quantized tables.

    Gather(T[V, H], ids)  ->  BlockGather(codes[V, H], scales[V, H/B], ids[, zp[V, H/B]])

Blocks run along the hidden axis H, so a looked-up row carries its own scales: only the rows a
batch uses are ever dequantized (the table stays compressed in memory).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import replace

import numpy as np
import onnx_ir as ir

from bctonnx.blockformat import BlockFormat, BlockSizeError, divisors_hint, quantize

from .common import (
    MID_DOMAIN,
    PassError,
    const_array,
    excluded,
    fmt_attrs,
    new_initializer,
    nodes_with_role,
    take_over,
)


class QuantizeEmbeddings(ir.passes.InPlacePass):
    """Gather(table, ids) on constant 2-D float tables -> BlockGather(codes, scales, ids).

    ``fit_block``: the format's block size is a maximum; a table whose hidden size it does not
    divide is cut in blocks of their greatest common divisor (without it: an error)."""

    def __init__(self, fmt: BlockFormat, exclude: Sequence[str] = (), fit_block: bool = False):
        super().__init__()
        self.fmt = fmt
        self.exclude = tuple(exclude)
        self.fit_block = fit_block

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        tables: dict[int, tuple[BlockFormat, list[ir.Value]]] = {}
        modified = False
        for node in nodes_with_role(graph, "embedding"):
            axis_attr = node.attributes.get("axis")
            if excluded(node, self.exclude) or (axis_attr is not None and axis_attr.as_int() != 0):
                continue
            table = node.inputs[0]
            if id(table) not in tables:
                tables[id(table)] = self._quantize_table(graph, node, table)
            fmt, (codes_v, scales_v, *zp_v) = tables[id(table)]
            gather = ir.Node(
                MID_DOMAIN,
                "BlockGather",
                [codes_v, scales_v, node.inputs[1], *zp_v],
                ir.convenience.convert_attributes(fmt_attrs(fmt)),
                name=f"{node.name}/BlockGather",
            )
            graph.insert_after(node, gather)
            out = gather.outputs[0]
            out.dtype = ir.DataType.FLOAT
            take_over(node.outputs[0], out)
            graph.remove(node, safe=True)
            modified = True
        return ir.passes.PassResult(model, modified=modified)

    def _quantize_table(
        self, graph: ir.Graph, node: ir.Node, table: ir.Value
    ) -> tuple[BlockFormat, list[ir.Value]]:
        array = const_array(table).astype(np.float32)
        if self.fmt.scale_bits != 8:
            raise PassError("4-bit scale codes apply to weights only, not embedding tables")
        fmt = self.fmt.with_axis(1)
        if self.fit_block and array.ndim == 2:
            fmt = replace(fmt, block_size=math.gcd(fmt.block_size, array.shape[1]))
        try:
            q = quantize(array, fmt)
        except BlockSizeError:
            hidden = array.shape[1]
            raise PassError(
                f"block size {self.fmt.block_size} does not divide the hidden size ({hidden}) "
                f"of embedding table '{table.name}' (node '{node.name}'); block sizes that do: "
                f"{divisors_hint(hidden)} (or exclude the node)"
            ) from None
        name = table.name or node.name
        values = [
            new_initializer(graph, f"{name}.bct_codes", q.codes),
            new_initializer(graph, f"{name}.bct_scales", q.scale_codes),
        ]
        if q.zero_points is not None:
            values.append(new_initializer(graph, f"{name}.bct_zp", q.zero_points))
        return fmt, values

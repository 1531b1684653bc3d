"""lower_gather: (mode integer) each embedding lookup runs as one op of the library.

    bctonnx.mid.BlockGather(codes[V, H], scale codes[V, H/B], ids[, zp[V, H/B]])
      -> bctonnx.BlockGather(table, scale codes, ids[, zero points], bits, block_size, frac_bits)

(specification: ``ref_quant.block_gather``; the same values as lower_qdq's Gather + Cast + Mul
+ Pow + DequantizeLinear, with the 4-bit tables' nibbles unpacked in the kernel instead of by
~12 more nodes per lookup). The tables are stored as lower_qdq stores them (int8 [V, H], or
int4 pairs packed into uint8 [V, H/2]; zero points int8 [V, nb], or packed [V, ceil(nb/2)]:
``blockformat.pack_int4_rows``),
so the file keeps its size. Formats the op does not take (float or 4-bit-offset scales,
superblocks, N:M) are left to lower_qdq. MiniLM's three lookups went from 18 (w8a8) and 66
(w4a8) onnxruntime nodes to three.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx_ir as ir

from bctonnx.blockformat import BlockFormat, pack_int4_rows

from .common import (
    MID_DOMAIN,
    OPS_DOMAIN,
    OPS_VERSION,
    const_array,
    fmt_from_node,
    new_initializer,
    take_over,
)


def native_format(fmt: BlockFormat, hidden: int) -> bool:
    """Whether bctonnx.BlockGather takes tables of this format and hidden size."""
    return (
        fmt.scale_kind == "pow2"
        and fmt.scale_bits == 8
        and not fmt.superblock
        and not fmt.nm_n
        and fmt.axis in (-1, 1)
        and hidden % fmt.block_size == 0
        and (not fmt.packed or hidden % 2 == 0)
    )


class LowerGather(ir.passes.InPlacePass):
    """mid BlockGather -> bctonnx.BlockGather where the format allows (see module doc)."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        tables: dict[tuple[int, str], ir.Value] = {}  # one stored copy per table and kind
        count = 0
        for node in list(graph):
            if node.domain == MID_DOMAIN and node.op_type == "BlockGather":
                count += _lower(graph, node, tables)
        if count:
            model.opset_imports[OPS_DOMAIN] = OPS_VERSION
        return ir.passes.PassResult(model, modified=bool(count))


def _lower(graph: ir.Graph, node: ir.Node, tables: dict) -> bool:
    fmt = fmt_from_node(node)
    codes, scale_codes = const_array(node.inputs[0]), const_array(node.inputs[1])
    zp = const_array(node.inputs[3]) if len(node.inputs) > 3 else None
    if codes is None or scale_codes is None or codes.ndim != 2 or scale_codes.dtype != np.int8:
        return False
    if not native_format(fmt, codes.shape[1]) or (len(node.inputs) > 3 and zp is None):
        return False

    def stored(source: ir.Value, kind: str, array: Callable[[], np.ndarray]) -> ir.Value:
        key = (id(source), kind)
        if key not in tables:
            tables[key] = new_initializer(graph, f"{node.name or 'gather'}/{kind}", array())
        return tables[key]

    if fmt.packed:  # int4 pairs, row by row (hidden is even)
        table = stored(node.inputs[0], "codes_packed", lambda: pack_int4_rows(codes))
    else:
        table = stored(node.inputs[0], "codes", lambda: codes.astype(np.int8))
    inputs = [table, stored(node.inputs[1], "scales", lambda: scale_codes), node.inputs[2]]
    if zp is not None and fmt.packed:  # a padding nibble when the count is odd
        inputs.append(stored(node.inputs[3], "zp_packed", lambda: pack_int4_rows(zp)))
    elif zp is not None:
        inputs.append(stored(node.inputs[3], "zp", lambda: zp.astype(np.int8)))
    attrs = {
        "bits": 4 if fmt.packed else 8,
        "block_size": fmt.block_size,
        "frac_bits": fmt.frac_bits,
    }
    new = ir.Node(
        OPS_DOMAIN, "BlockGather", inputs, ir.convenience.convert_attributes(attrs), name=node.name
    )
    graph.insert_before(node, new)
    new.outputs[0].dtype = ir.DataType.FLOAT
    new.outputs[0].shape = node.outputs[0].shape
    take_over(node.outputs[0], new.outputs[0])
    graph.remove(node, safe=True)
    return True

"""lower_dequantize: (mode integer, last) the dequantizations left in the integer graph run in
the op library: ``DequantizeLinear(q, s, axis=-1, block_size=B)`` of int8 codes that a bctonnx
op made (so ``s`` holds exact powers of two) -> ``bctonnx.BlockDequantize(q, s, block_size=B)``
(specification: ``ref_quant.block_dequantize``; the same values, ``q * s`` is exact).

What is left after ``lower_matmul`` are the embeddings' sums and the encoder's output: whole
[batch, seq, hidden] tensors, which onnxruntime 1.31's blocked DequantizeLinear converts at
~1.4 ns per element (measured on MiniLM: ~70 us for 1 x 128 x 384, ~5 us in the library).
"""

from __future__ import annotations

import onnx_ir as ir

from .common import OPS_DOMAIN, OPS_VERSION, take_over
from .lower_matmul import blocked_codes


class LowerDequantize(ir.passes.InPlacePass):
    """DequantizeLinear of our ops' codes -> BlockDequantize (see module doc)."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        count = 0
        for node in list(graph):
            if node.op_type != "DequantizeLinear" or node.domain != "":
                continue
            found = blocked_codes(node.outputs[0])
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

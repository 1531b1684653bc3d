"""lower_integer: the integer form. GELU, Softmax and LayerNorm become bctonnx's integer ops
and every activation is quantized by the native BlockQuantize op; the result needs the op
library (``bctonnx.session_options()``).

    BlockFakeQuant(x)                        -> BlockQuantize(x) -> (q:int8, s:pow2)
                                                -> DequantizeLinear(q, s, block_size)
    Gelu(fq(x)) -> fq                        -> IntGelu(q, s) -> DequantizeLinear
                                                (approximate="tanh" carried over)
    Softmax(fq(scores) + mask) -> fq         -> IntSoftmax(q, s, mask) -> Cast(uint8 p) * 2^-8
    LayerNormalization(fq(x), g, b) -> fq    -> IntLayerNorm(q, s, g_q, g_s, b_q, b_s)
                                                -> DequantizeLinear

Activations use BCT's shift scales: pure powers of two (``pow2``, ``frac_bits=0``) in blocks
of the config's activation block size along the last axis, so a tensor made by an integer op
is already in block format: the BlockFakeQuant after it is dropped, not applied twice.
gamma/beta are quantized with the same block format (8 bits, via ``bctonnx.blockformat``).
MatMuls stay float on dequantized blocks here (the QDQ form of the weights is lowered by
``lower_qdq`` afterwards).

A GELU/Softmax/LayerNorm that does not have the expected form (softmax not over the last
axis, LayerNorm with non-constant gamma/beta or not over the last axis, a mask add that is
not there) is left in float with a warning naming the node: never silently wrong.
"""

from __future__ import annotations

import logging
from dataclasses import replace

import numpy as np
import onnx_ir as ir

from bctonnx.blockformat import BlockFormat, quantize

from .common import (
    MID_DOMAIN,
    OPS_DOMAIN,
    OPS_VERSION,
    PassError,
    const_array,
    fmt_from_node,
    new_initializer,
    role,
    take_over,
)

log = logging.getLogger(__name__)

SOFTMAX_OUT_SCALE = np.float32(2.0**-8)  # IntSoftmax: uint8 probabilities in steps of 1/256


def integer_format(fmt: BlockFormat) -> BlockFormat:
    """The activation format of the integer form: BCT's shift scales along the last axis."""
    return replace(fmt, axis=-1, scale_kind="pow2", frac_bits=0, clip="none", symmetric=True)


class LowerInteger(ir.passes.InPlacePass):
    """Integer GELU/Softmax/LayerNorm and native BlockQuantize (see module doc)."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        fq_nodes = [n for n in graph if n.domain == MID_DOMAIN and n.op_type == "BlockFakeQuant"]
        if not fq_nodes:
            return ir.passes.PassResult(model, modified=False)
        self.graph = graph
        self.quantized: dict[int, tuple[ir.Value, ir.Value, BlockFormat]] = {}
        self.count = 0
        for node in list(graph):
            r = role(node)
            if r == "gelu":
                self._gelu(node)
            elif r == "softmax":
                self._softmax(node)
            elif r == "layernorm":
                self._layernorm(node)
        # the fake quants only the replaced ops read (their inputs, the scores before the
        # mask add) go; the rest become BlockQuantize + DequantizeLinear
        self._drop_unused_fake_quants()
        for node in [n for n in graph if n.domain == MID_DOMAIN and n.op_type == "BlockFakeQuant"]:
            q, s, fmt = self._quantize(node)
            self._replace_output(node, self._dequantize(node, q, s, fmt))
        model.opset_imports[OPS_DOMAIN] = OPS_VERSION
        return ir.passes.PassResult(model, modified=True)

    # --- building blocks ----------------------------------------------------------------------

    def _node(
        self,
        op_type: str,
        inputs,
        anchor: ir.Node,
        num_outputs=1,
        domain=OPS_DOMAIN,
        name: str | None = None,
        **attrs,
    ) -> ir.Node:
        """A node before ``anchor``; integer ops are named after the node they replace."""
        self.count += 1
        node = ir.Node(
            domain,
            op_type,
            inputs,
            ir.convenience.convert_attributes(attrs),
            num_outputs=num_outputs,
            name=name or f"bi{self.count}",
        )
        self.graph.insert_before(anchor, node)
        for i, out in enumerate(node.outputs):
            out.name = f"bi{self.count}/{i}"
        return node

    def _quantize(self, fq: ir.Node) -> tuple[ir.Value, ir.Value, BlockFormat]:
        """BlockQuantize for the tensor a BlockFakeQuant reads (once per tensor)."""
        if id(fq) in self.quantized:
            return self.quantized[id(fq)]
        fmt = integer_format(fmt_from_node(fq))
        if fmt.bits > 8:
            raise PassError("the integer form needs activations of at most 8 bits")
        node = self._node(
            "BlockQuantize",
            [fq.inputs[0]],
            fq,
            num_outputs=2,
            block_size=fmt.block_size,
            bits=fmt.bits,
        )
        q, s = node.outputs
        q.dtype, s.dtype = ir.DataType.INT8, ir.DataType.FLOAT
        self.quantized[id(fq)] = (q, s, fmt)
        return q, s, fmt

    def _dequantize(self, anchor: ir.Node, q: ir.Value, s: ir.Value, fmt: BlockFormat) -> ir.Value:
        node = self._node(
            "DequantizeLinear", [q, s], anchor, domain="", axis=-1, block_size=fmt.block_size
        )
        out = node.outputs[0]
        out.dtype = ir.DataType.FLOAT
        return out

    def _replace_output(self, old_node: ir.Node, new: ir.Value) -> None:
        """``new`` takes over the node's output; the node goes."""
        take_over(old_node.outputs[0], new)
        self.graph.remove(old_node, safe=True)

    @staticmethod
    def _fake_quant_of(value: ir.Value | None) -> ir.Node | None:
        node = value.producer() if value is not None else None
        if node is not None and node.domain == MID_DOMAIN and node.op_type == "BlockFakeQuant":
            return node
        return None

    def _finish(self, node: ir.Node, result: ir.Value) -> None:
        """The op's output is already in block format: the BlockFakeQuant after it goes too."""
        out = node.outputs[0]
        fq_after = [
            u.node
            for u in out.uses()
            if u.node.op_type == "BlockFakeQuant" and u.node.domain == MID_DOMAIN
        ]
        for fq in fq_after:
            self._replace_output(fq, result)
        if out.uses() or any(o is out for o in self.graph.outputs):
            take_over(out, result)
        for extra in node.outputs[1:]:
            if extra.uses():
                raise PassError(f"node '{node.name}': only its first output can be replaced")
        self.graph.remove(node, safe=True)

    def _drop_unused_fake_quants(self) -> None:
        for node in list(self.graph):
            if (
                node.domain == MID_DOMAIN
                and node.op_type == "BlockFakeQuant"
                and not node.outputs[0].uses()
                and not any(o is node.outputs[0] for o in self.graph.outputs)
            ):
                self.graph.remove(node, safe=True)

    def _skip(self, node: ir.Node, why: str) -> None:
        log.warning("integer form: node '%s' (%s) stays float: %s", node.name, node.op_type, why)

    # --- the three ops ------------------------------------------------------------------------

    def _gelu(self, node: ir.Node) -> None:
        fq = self._fake_quant_of(node.inputs[0])
        if node.op_type != "Gelu" or fq is None:
            self._skip(node, "its input is not block-quantized")
            return
        approx = node.attributes.get("approximate")
        approx = "none" if approx is None else approx.as_string()
        if approx not in ("none", "tanh"):
            self._skip(node, f"GELU with approximate={approx!r}")
            return
        q, s, fmt = self._quantize(fq)
        attrs = {"approximate": approx} if approx == "tanh" else {}
        y = self._node(
            "IntGelu",
            [q, s],
            node,
            num_outputs=2,
            name=node.name,
            block_size=fmt.block_size,
            **attrs,
        )
        self._finish(node, self._dequantize(node, *y.outputs, fmt))

    def _softmax(self, node: ir.Node) -> None:
        axis = node.attributes.get("axis")
        x = node.inputs[0]
        if axis is not None and axis.as_int() not in (-1, (len(x.shape) - 1) if x.shape else -1):
            self._skip(node, "softmax not over the last axis")
            return
        scores, mask = x, None
        add = x.producer()
        if add is not None and role(add) == "attention.mask":
            fqs = [self._fake_quant_of(v) for v in add.inputs]
            if fqs[0] is not None:
                scores, mask = add.inputs
            elif fqs[1] is not None:
                mask, scores = add.inputs
        fq = self._fake_quant_of(scores)
        if fq is None:
            self._skip(node, "its scores are not block-quantized")
            return
        q, s, fmt = self._quantize(fq)
        inputs = [q, s] + ([mask] if mask is not None else [])
        p = self._node(
            "IntSoftmax", inputs, node, name=node.name, block_size=fmt.block_size
        ).outputs[0]
        p.dtype = ir.DataType.UINT8
        # Cast + Mul, not DequantizeLinear: onnxruntime 1.31 fuses a per-tensor DQ(P) with the
        # blocked DQ(V) into a quantized MatMul that ignores V's block scales (wrong results)
        scale = new_initializer(self.graph, f"bi{self.count}/p_scale", ir.tensor(SOFTMAX_OUT_SCALE))
        as_float = self._node("Cast", [p], node, domain="", to=ir.DataType.FLOAT).outputs[0]
        as_float.dtype = ir.DataType.FLOAT
        dq = self._node("Mul", [as_float, scale], node, domain="").outputs[0]
        dq.dtype = ir.DataType.FLOAT
        self._finish(node, dq)
        if add is not None and not add.outputs[0].uses():
            self.graph.remove(add, safe=True)

    def _layernorm(self, node: ir.Node) -> None:
        x = node.inputs[0]
        fq = self._fake_quant_of(x)
        axis = node.attributes.get("axis")
        gamma = const_array(node.inputs[1]) if len(node.inputs) > 1 else None
        beta = const_array(node.inputs[2]) if len(node.inputs) > 2 else None
        rank = len(x.shape) if x.shape is not None else None
        if node.op_type != "LayerNormalization" or fq is None:
            self._skip(node, "its input is not block-quantized")
            return
        if axis is not None and axis.as_int() not in (-1, (rank - 1) if rank else -1):
            self._skip(node, "not normalized over the last axis")
            return
        if gamma is None or gamma.ndim != 1:
            self._skip(node, "gamma is not a constant vector")
            return
        if beta is None:
            beta = np.zeros_like(gamma)
        q, s, fmt = self._quantize(fq)
        param_fmt = BlockFormat(bits=8, block_size=fmt.block_size, axis=0, scale_kind="pow2")
        params = []
        for name, array in (("gamma", gamma), ("beta", beta)):
            pq = quantize(array.astype(np.float32).reshape(-1), param_fmt, allow_partial=True)
            params.append(new_initializer(self.graph, f"{node.name}.{name}_q", pq.codes))
            params.append(new_initializer(self.graph, f"{node.name}.{name}_scale", pq.scales()))
        eps = node.attributes.get("epsilon")
        y = self._node(
            "IntLayerNorm",
            [q, s, *params],
            node,
            num_outputs=2,
            name=node.name,
            block_size=fmt.block_size,
            epsilon=eps.as_float() if eps is not None else 1e-5,
        )
        self._finish(node, self._dequantize(node, *y.outputs, fmt))

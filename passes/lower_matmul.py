"""lower_matmul: (mode integer) linear layers and attention (scores, context) become native
integer matmuls, ``BlockMatMul``, ``BlockBatchMatMul`` (specification: bctonnx/ops/ref_matmul.py)
and ``AttentionPV`` (bctonnx/ops/ref_attention.py).

Runs after ``lower_integer`` (activations are then int8 codes + pow2 block scales, from
``BlockQuantize`` or an integer op) and before ``lower_qdq`` (weights are still mid-level
``BlockDequantize`` nodes with their constant codes)::

    MatMul(DequantizeLinear(q, s), BlockDequantize(codes, scales[, zp]))  [+ Add(bias)]
        -> BlockMatMul(q, s, codes, scales[, base][, zp][, bias])        q from an integer op
        -> BlockMatMul(x, -, codes, scales, ...)                           q, s = BlockQuantize(x)
    ... -> [Reshape | Transpose | Mul(scalar)]* -> BlockQuantize           output fusion:
        -> BlockMatMul(..., y_multiplier) -> (y_q, y_scale) -> the same Reshape / Transpose
           on codes and scales (quantization along the last axis commutes with them when the
           new last axis is a multiple of the block; the scalar, attention's 1/sqrt(sqrt(d))
           computed from static dims, is folded to a constant)
    ... -> BlockQuantize -> DequantizeLinear -> Add(DequantizeLinear(r_q, r_s)) -> BlockQuantize
        -> BlockMatMul(..., r_q, r_s) -> (y_q, y_scale)                   residual fusion
    MatMul(DQ(Q codes), [Mul(c)] Transpose(DQ(K codes)))  [-> BlockQuantize]     attention.qk
        -> BlockBatchMatMul(Q codes, Q scales, K codes', K scales', c) [-> (y_q, y_scale)]
           (the heads' Transpose(0, 2, 1, 3) of Q and of K read token-major in the op)

The ops multiply int8 activations by the stored weight codes (or by K's codes) with int32
accumulation and apply both scales per block: the weights are never dequantized (they stay
int8 / packed int4 in the file and in memory; superblock weights, packed int4 in the file, are
widened to int8 ``m * (q - zp)`` by the kernel at load and count as 8-bit weights in blocks of
their superblock from there on), the activation quantization is the same
``BlockQuantize`` rule, done inside the kernel when its input is float, and the quantizations
that follow are done in the kernel's epilogue. Weights keep their block size (128 / 32);
activation blocks stay the config's activation block size (32 in the presets) along K, and the
kernel works on segments of the smaller of the two, which must divide the larger. So the result
equals the ``lower_integer`` form up to float rounding (the order of the float sums,
ref_matmul.py "Arithmetic"). One option changes that, on purpose: with
``match_weight_blocks`` (the w8a8-fast and w4a8 presets), a layer whose weight blocks are a
larger multiple of the activation blocks (128 vs 32) reads its activations re-blocked to the
weight block size (at most `MATCHED_BLOCK`: w4a8's superblocks of 384 are read in blocks of
128)::

    BlockMatMul(q, s, ...)  ->  BlockMatMul(BlockRequantize(q, s, 32 -> 128), ...)
                                (one BlockRequantize per codes tensor, shared by Q, K and V;
                                 an IntGelu read by this layer alone makes 128-blocks itself;
                                 a float input is quantized by the kernel at 128 directly)

BlockRequantize is BlockQuantize of the same real values at the larger block, so the layer sees
activations in blocks of 128: one activation and one weight scale per 128-long K segment, a
quarter of the float steps and tile stores of 32-long ones. Everything else (the residual stream,
GELU, attention) keeps its blocks of 32. Measured on MiniLM w8a8 (integer, 256 SST-2
sentences): embedding cosine vs FP32 0.9980 without, 0.9967 with; BlockMatMul 29.7 -> 17.1 ms at
8 x 128 tokens, 2 threads (onnxruntime profile); STS-B Spearman -0.03 -> -0.21 vs FP32.

Left alone (then lowered by ``lower_qdq`` as before), with a debug log naming the node: an
activation input that is not block-quantized (excluded nodes), weights that are not pow2-scaled
(``--scale-kind float``), 8-bit asymmetric weights, block sizes that do not nest, and ``Gemm``.
    MatMul(Cast(IntSoftmax p) * 2^-8, DQ(V codes)) [-> Transpose(0, 2, 1, 3)]    attention.pv
        -> AttentionPV(p, V codes, V scales) (ref_attention.py: V's blocks run along the head
           dimension, across the reduction, so each 32-token segment of V is brought to one
           exponent before the integer sum; the heads' transposes of V and of the output are
           fused into the op's layouts)
"""

from __future__ import annotations

import logging
import math

import numpy as np
import onnx_ir as ir

from bctonnx.blockformat import BlockFormat, nm_compress, pack_int4, split_scale_codes

from .common import (
    MID_DOMAIN,
    OPS_DOMAIN,
    OPS_VERSION,
    const_array,
    fmt_from_node,
    is_const,
    new_initializer,
    nm_pattern_tensor,
    role,
    stored_weight,
    take_over,
    uint4_tensor,
)
from .simplify_shapes import constant_target

log = logging.getLogger(__name__)

# match_weight_blocks re-blocks activations to the weight blocks, up to this size: superblocks
# of 384 are read in activation blocks of 128 (3 float steps per superblock; larger
# activation blocks cost accuracy: every outlier channel coarsens its whole block)
MATCHED_BLOCK = 128

PV_SEGMENT = 32  # AttentionPV: tokens per common-exponent segment of V (ref_attention.py)


def _attr_int(node: ir.Node, name: str, default: int | None = None) -> int | None:
    attr = node.attributes.get(name)
    return attr.as_int() if attr is not None else default


def _single_user(value: ir.Value) -> ir.Node | None:
    """The one node reading ``value`` (None if several, none, or it is a graph output)."""
    uses = list(value.uses())
    graph = value.graph
    if len(uses) != 1 or (graph is not None and any(o is value for o in graph.outputs)):
        return None
    return uses[0].node


def _is(node: ir.Node | None, op_type: str, domain: str = "") -> bool:
    return node is not None and node.op_type == op_type and node.domain == domain


def supported_weight_format(fmt: BlockFormat) -> str | None:
    """Why BlockMatMul cannot take these weights (None if it can)."""
    if fmt.scale_kind != "pow2":
        return "weight scales are not pow2 codes"
    if fmt.bits == 8 and not fmt.symmetric:
        return "8-bit asymmetric weights (q - zp does not fit in int8)"
    if fmt.axis != 0:
        return "weights not blocked along K"
    return None


class LowerMatMul(ir.passes.InPlacePass):
    """MatMul on block-quantized operands -> BlockMatMul (see module doc)."""

    def __init__(self, match_weight_blocks: bool = False):
        super().__init__()
        self.match_weight_blocks = match_weight_blocks

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        self.graph = model.graph
        # per BlockDequantize node: (inputs 2..5, multipliers), see _weights
        self.weights: dict[int, tuple[list[ir.Value | None], ir.Value | None, ir.Value | None]] = {}
        self.shared: dict = {}
        count = 0
        for node in list(self.graph):
            if node.op_type != "MatMul" or node.domain != "":
                continue
            bd = node.inputs[1].producer()
            if _is(bd, "BlockDequantize", MID_DOMAIN):
                count += self._lower(node, bd)
            elif role(node) == "attention.qk":
                count += self._lower_scores(node)
            elif role(node) == "attention.pv":
                count += self._lower_context(node)
        if count:
            model.opset_imports[OPS_DOMAIN] = OPS_VERSION
            self._drop_dead()
        return ir.passes.PassResult(model, modified=bool(count))

    # --- matching -----------------------------------------------------------------------------

    def _skip(self, node: ir.Node, why: str) -> bool:
        log.debug("BlockMatMul: node '%s' stays MatMul: %s", node.name, why)
        return False

    def _activation(self, node: ir.Node):
        """(inputs x, x_scale; act_block_size, act_bits) for the MatMul's A operand, or a reason."""
        dq = node.inputs[0].producer()
        if not _is(dq, "DequantizeLinear") or len(dq.inputs) != 2:
            return "its input is not a DequantizeLinear of block-quantized codes"
        block = _attr_int(dq, "block_size", 0)
        axis = _attr_int(dq, "axis", 1)
        q, s = dq.inputs
        rank = len(q.shape) if q.shape is not None else None
        if not block or (axis != -1 and (rank is None or axis != rank - 1)):
            return "its input is not blocked along the last axis"
        if q.dtype not in (None, ir.DataType.INT8):  # integer ops' outputs may be untyped here
            return "its input codes are not int8"
        src = q.producer()
        if _is(src, "BlockQuantize", OPS_DOMAIN):
            bits = _attr_int(src, "bits", 8)
            if _attr_int(src, "block_size") != block:
                return "BlockQuantize and DequantizeLinear disagree on the block size"
            only_here = (
                all(u.node is dq for out in src.outputs for u in out.uses())
                and _single_user(dq.outputs[0]) is node
                and not any(o in self.graph.outputs for o in src.outputs)
            )
            if only_here:  # the kernel quantizes x itself, the BlockQuantize goes
                return (src.inputs[0], None), block, bits
            return (q, s), block, bits
        if src is not None and src.domain == OPS_DOMAIN:  # IntLayerNorm / IntGelu codes
            return (q, s), block, 8
        return "its input codes do not come from a bctonnx op"

    def _lower(self, node: ir.Node, bd: ir.Node) -> bool:
        fmt = fmt_from_node(bd)
        codes = const_array(bd.inputs[0])
        if codes is None or codes.ndim != 2:
            return self._skip(node, "its weight codes are not a constant matrix")
        fmt = fmt.with_axis(fmt.axis % 2)
        why = supported_weight_format(fmt)
        if why:
            return self._skip(node, why)
        act = self._activation(node)
        if isinstance(act, str):
            return self._skip(node, act)
        (x, x_scale), act_block, act_bits = act
        kernel_block = fmt.superblock or fmt.block_size  # superblock weights are widened
        if max(act_block, kernel_block) % min(act_block, kernel_block):
            return self._skip(node, "weight and activation block sizes do not nest")
        x, x_scale, act_block = self._reblocked(node, x, x_scale, act_block, act_bits, fmt, codes)

        out = node.outputs[0]
        bias = None
        add = _single_user(out)
        if _is(add, "Add") and len(add.inputs) == 2:
            other = add.inputs[1] if add.inputs[0] is out else add.inputs[0]
            b = const_array(other)
            if b is not None and b.dtype == np.float32 and b.size == codes.shape[1]:
                if b.ndim == 1 or (b.ndim >= 1 and b.shape[-1] == b.size):
                    bias, out = other, add.outputs[0]
        if bias is not None and bias.shape is not None and len(bias.shape) != 1:
            bias = self._reshaped_bias(bias)

        attrs = {
            "block_size": fmt.block_size,
            "frac_bits": fmt.frac_bits,
            "act_block_size": act_block,
            "act_bits": act_bits,
        }
        n_out = codes.shape[1]
        chain, quant = self._chain_to_quantize(out, n_out)
        y_mul = next((c.inputs[1] for c, _ in chain if c.op_type == "Mul"), None)
        if y_mul is not None and not is_const(y_mul):
            # attention's 1/sqrt(sqrt(d)) is computed from Shape(Q): fold it to a constant,
            # else the op would read a value computed from its own output
            folded = _fold_scalar(y_mul)
            if folded is None:
                log.debug("BlockMatMul: node '%s': its output scale is not constant", node.name)
                chain, quant, y_mul = [], None, None
            else:
                y_mul = self._const(folded, f"{node.name}/y_multiplier")
        residual = self._residual(quant) if quant is not None and not chain else None
        if residual is not None:
            attrs["residual_block_size"] = residual[2]
        weights, multipliers, pattern = self._weights(bd, fmt)
        inputs = [x, x_scale, *weights, bias, y_mul, *(residual[:2] if residual else (None, None))]
        if multipliers is not None:
            attrs["superblock"] = fmt.superblock
        if multipliers is not None or pattern is not None:
            inputs.append(multipliers)
        if pattern is not None:  # N:M: kept codes + patterns, expanded by the kernel at load
            attrs["nm_n"], attrs["nm_m"] = fmt.nm
            inputs.append(pattern)
        new = self._fused_node("BlockMatMul", inputs, attrs, node, quant)
        if quant is None:
            take_over(out, new.outputs[0])
            return True
        _, y_q, y_s = new.outputs
        y_q.shape = out.shape  # the codes have the product's shape (the scales its rank)
        if residual is not None:
            quant = residual[3]  # the BlockQuantize of the residual sum
        for step, shape_readers in chain:  # Reshape / Transpose replayed on codes and scales
            target = constant_target(step)
            if target is not None:  # known from the shapes: constant targets, 0 = keep a dim
                scales_to = target.copy()
                scales_to[-1] //= attrs["out_block_size"]  # the last axis is a block multiple
                y_q = self._emit("Reshape", [y_q, self._const(target, "reshape")], new, y_q.dtype)
                y_q.shape = step.outputs[0].shape
                y_s = self._emit(
                    "Reshape", [y_s, self._const(scales_to, "reshape")], new, y_s.dtype
                )
            elif step.op_type == "Reshape":
                y_q = self._emit("Reshape", [y_q, step.inputs[1]], new, y_q.dtype)
                y_q.shape = step.outputs[0].shape
                # the scales: the codes' new shape with the last axis cut to blocks
                blocks = step.outputs[0].shape[-1] // attrs["out_block_size"]
                lead = self._emit("Shape", [y_q], new, ir.DataType.INT64, end=-1)
                target = self._emit(
                    "Concat",
                    [lead, self._const(np.array([blocks], np.int64), f"blocks{blocks}")],
                    new,
                    ir.DataType.INT64,
                    axis=0,
                )
                y_s = self._emit("Reshape", [y_s, target], new, y_s.dtype)
            elif step.op_type == "Transpose":
                perm = list(step.attributes["perm"].as_ints())
                y_q = self._emit("Transpose", [y_q], new, y_q.dtype, perm=perm)
                y_q.shape = step.outputs[0].shape
                y_s = self._emit("Transpose", [y_s], new, y_s.dtype, perm=perm)
            for reader in shape_readers:  # same shape as the float tensor it read
                reader.replace_input_with(0, y_q)
        take_over(quant.outputs[0], y_q)
        take_over(quant.outputs[1], y_s)
        return True

    def _reblocked(
        self, node: ir.Node, x, x_scale, act_block: int, act_bits: int, fmt: BlockFormat, codes
    ):
        """With ``match_weight_blocks``, the activations in blocks of the weight block size
        when that is a larger multiple of theirs and divides K: an IntGelu read by this layer
        alone makes its output in those blocks, other int8 codes go through one BlockRequantize
        (shared by the linear layers reading the same codes), a float input is quantized by the
        kernel at that block size directly."""
        # the kernel's weight blocks (superblock weights are widened), at most MATCHED_BLOCK
        b = fmt.superblock or fmt.block_size
        b = math.gcd(b, MATCHED_BLOCK) if b > MATCHED_BLOCK else b
        if not self.match_weight_blocks or b <= act_block or b % act_block or codes.shape[0] % b:
            return x, x_scale, act_block
        if x_scale is None:
            return x, None, b
        src = x.producer()
        if _is(src, "IntGelu", OPS_DOMAIN) and self._only_read_by(src, node):
            # the GELU's exact values quantized in blocks of b directly (ref_nonlinear.int_gelu
            # out_block_size): no second rounding, no extra op
            src.attributes["out_block_size"] = ir.AttrInt64("out_block_size", b)
            x_scale.shape = None
            return x, x_scale, b
        key = ("reblock", id(x), id(x_scale), b)
        if key not in self.shared:
            requant = ir.Node(
                OPS_DOMAIN,
                "BlockRequantize",
                [x, x_scale],
                ir.convenience.convert_attributes(
                    {"in_block_size": act_block, "block_size": b, "bits": act_bits}
                ),
                num_outputs=2,
                name=f"{x.name}/reblock{b}",
            )
            self.graph.append(requant)  # run_pipeline sorts the graph after every pass
            q, s = requant.outputs
            q.dtype, s.dtype = ir.DataType.INT8, ir.DataType.FLOAT
            q.name, s.name = f"{x.name}.b{b}", f"{x_scale.name}.b{b}"
            q.shape = x.shape
            self.shared[key] = (q, s)
        q, s = self.shared[key]
        return q, s, b

    def _only_read_by(self, src: ir.Node, node: ir.Node) -> bool:
        """Every output of ``src`` is read only by DequantizeLinear nodes that feed ``node``
        alone (the lower_integer form of one MatMul's input)."""
        for out in src.outputs:
            if out in self.graph.outputs:
                return False
            for use in out.uses():
                dq = use.node
                if not _is(dq, "DequantizeLinear") or dq.outputs[0] in self.graph.outputs:
                    return False
                if any(u.node is not node for u in dq.outputs[0].uses()):
                    return False
        return True

    def _lower_scores(self, node: ir.Node) -> bool:
        """Attention scores MatMul(DQ(q_a, s_a), [Mul(, c)] Transpose(DQ(q_b, s_b)) [Mul(, c)])
        with K's blocks on the reduction axis -> BlockBatchMatMul(q_a, s_a, q_b', s_b', c)
        where ' is the transpose that keeps K last; its BlockQuantize fused when alone."""
        a = blocked_codes(node.inputs[0])
        if a is None:
            return self._skip(node, "Q is not block-quantized codes")
        value, mul, transpose = node.inputs[1], None, None
        while True:
            producer = value.producer()
            if _is(producer, "Mul") and mul is None and self._scalar(producer.inputs[1]):
                mul = producer.inputs[1]
                value = producer.inputs[0]
            elif _is(producer, "Transpose") and transpose is None:
                transpose = producer
                value = producer.inputs[0]
            else:
                break
        b = blocked_codes(value)
        if b is None or transpose is None:
            return self._skip(node, "K^T is not a transpose of block-quantized codes")
        (q_a, s_a, block_a), (q_b, s_b, block_b) = a, b
        rank = len(value.shape) if value.shape is not None else None
        perm = transpose.attributes.get("perm")
        perm = list(perm.as_ints()) if perm is not None else None
        k_dim = node.inputs[0].shape[-1] if node.inputs[0].shape is not None else None
        if (
            rank is None
            or perm is None
            or len(perm) != rank
            or perm[-2] != rank - 1
            or block_a != block_b
            or not isinstance(k_dim, int)
            or k_dim % block_a
        ):
            return self._skip(node, "K^T is not blocked along the reduction axis")
        if mul is not None and not is_const(mul):
            folded = _fold_scalar(mul)
            if folded is not None:
                mul = self._const(folded, f"{node.name}/y_multiplier")
        rows = [*perm[:-2], perm[-1], perm[-2]]  # K [..., N, K]: blocks stay on the last axis
        attrs = {"block_size": block_a}
        if rows == list(range(rank)):  # K already [..., N, K]
            q_rows, s_rows = q_b, s_b
        elif rows == [0, 2, 1, 3]:  # K token-major [b, N, h, K]: read in place
            q_rows, s_rows = q_b, s_b
            attrs["b_transposed"] = 1
        else:
            q_rows = self._emit("Transpose", [q_b], node, ir.DataType.INT8, perm=rows)
            s_rows = self._emit("Transpose", [s_b], node, ir.DataType.FLOAT, perm=rows)
        heads_first = [_heads_transpose_input(x) for x in (q_a, s_a)]
        if all(x is not None for x in heads_first):  # Q token-major: its transpose fused too
            q_a, s_a = heads_first
            attrs["a_transposed"] = 1
        quant = _single_user(node.outputs[0])
        if not (_is(quant, "BlockQuantize", OPS_DOMAIN) and _attr_int(quant, "block_size")):
            quant = None
        new = self._fused_node(
            "BlockBatchMatMul", [q_a, s_a, q_rows, s_rows, mul], attrs, node, quant
        )
        if quant is not None:
            take_over(quant.outputs[0], new.outputs[1])
            take_over(quant.outputs[1], new.outputs[2])
        else:
            take_over(node.outputs[0], new.outputs[0])
        return True

    def _lower_context(self, node: ir.Node) -> bool:
        """Attention context MatMul(Mul(Cast(p: uint8), 2^k), DQ(q_v, s_v)) with p from
        IntSoftmax -> AttentionPV(p, q_v, s_v) (ref_attention.py); a following
        Transpose(0, 2, 1, 3), the heads back next to each other, fused."""
        mul = node.inputs[0].producer()
        if not _is(mul, "Mul") or not self._scalar(mul.inputs[1]) or not is_const(mul.inputs[1]):
            return self._skip(node, "P is not Cast(uint8) * constant")
        factor = float(const_array(mul.inputs[1]).reshape(-1)[0])
        exponent = int(np.log2(factor)) if factor > 0 else 1
        cast = mul.inputs[0].producer()
        if (
            not _is(cast, "Cast")
            or not _is(cast.inputs[0].producer(), "IntSoftmax", OPS_DOMAIN)
            or cast.inputs[0].dtype != ir.DataType.UINT8
            or not -32 <= exponent <= 0
            or np.float32(2.0**exponent) != np.float32(factor)
        ):
            return self._skip(node, "P is not IntSoftmax's uint8 codes times a power of two")
        v = blocked_codes(node.inputs[1])
        if v is None:
            return self._skip(node, "V is not block-quantized codes")
        q_v, s_v, block = v
        attrs = {"block_size": block, "segment": PV_SEGMENT, "p_exponent": exponent}
        heads_first = [_heads_transpose_input(x) for x in (q_v, s_v)]
        if all(x is not None for x in heads_first):  # V's Transpose(0, 2, 1, 3) fused too
            q_v, s_v = heads_first
            attrs["v_transposed"] = 1
        out = node.outputs[0]
        transpose = _single_user(out)
        rank = len(out.shape) if out.shape is not None else None
        perm = transpose.attributes.get("perm") if _is(transpose, "Transpose") else None
        if rank == 4 and perm is not None and list(perm.as_ints()) == [0, 2, 1, 3]:
            attrs["transpose_output"] = 1
            out = transpose.outputs[0]
        new = self._fused_node("AttentionPV", [cast.inputs[0], q_v, s_v], attrs, node, None)
        take_over(out, new.outputs[0])
        return True

    def _fused_node(
        self, op_type: str, inputs: list, attrs: dict, anchor: ir.Node, quant: ir.Node | None
    ) -> ir.Node:
        """The bctonnx node that replaces ``anchor`` (inserted before it; trailing absent
        inputs dropped). With ``quant``, the BlockQuantize that follows, its quantization is
        fused: outputs (y absent, y_q int8, y_scale float); else one float output."""
        if quant is not None:
            attrs["out_block_size"] = _attr_int(quant, "block_size")
            attrs["out_bits"] = _attr_int(quant, "bits", 8)
        while inputs[-1] is None:
            inputs.pop()
        new = ir.Node(
            OPS_DOMAIN,
            op_type,
            inputs,
            ir.convenience.convert_attributes(attrs),
            num_outputs=3 if quant is not None else 1,
            name=anchor.name,
        )
        self.graph.insert_before(anchor, new)
        if quant is None:
            new.outputs[0].dtype = ir.DataType.FLOAT
        else:
            y, y_q, y_s = new.outputs
            y.name = ""  # absent: only the quantized output is produced
            y_q.dtype, y_s.dtype = ir.DataType.INT8, ir.DataType.FLOAT
        return new

    @staticmethod
    def _scalar(value: ir.Value | None) -> bool:
        return (
            value is not None
            and value.dtype in (None, ir.DataType.FLOAT)
            and value.shape is not None
            and all(d == 1 for d in value.shape)
        )

    def _chain_to_quantize(
        self, out: ir.Value, n: int
    ) -> tuple[list[tuple[ir.Node, list[ir.Node]]], ir.Node | None]:
        """The BlockQuantize that alone reads ``out``, directly or through Reshapes whose
        last axis is a multiple of the block (with N one too, the blocks are the same runs of
        the flat data before and after), Transposes that keep the last axis last and one Mul by
        a scalar (it becomes the op's y_multiplier): blockwise quantization along the last axis
        commutes with those. Shape nodes may also read a step (they get the replayed codes, of
        the same shape). Returns ([(step, its Shape readers)], BlockQuantize) or ([], None)."""
        chain: list[tuple[ir.Node, list[ir.Node]]] = []
        value, dims = out, [n]
        graph_outputs = {id(v) for v in self.graph.outputs}
        while True:
            if id(value) in graph_outputs:
                return [], None
            users = [u.node for u in value.uses()]
            shapes = [u for u in users if _is(u, "Shape")] if chain else []
            rest = [u for u in users if u not in shapes]
            if len(rest) != 1 or len({id(u) for u in rest}) != 1:
                return [], None
            user = rest[0]
            if _is(user, "BlockQuantize", OPS_DOMAIN) and _attr_int(user, "block_size"):
                block = _attr_int(user, "block_size")
                if len(dims) > 1 and any(d % block for d in dims):
                    return [], None
                if shapes:
                    return [], None
                return chain, user
            if _is(user, "Reshape") and user.inputs[0] is value:
                shape = user.outputs[0].shape
                if shape is None or not shape or not isinstance(shape[-1], int):
                    return [], None
                dims.append(shape[-1])
            elif _is(user, "Transpose"):
                perm = user.attributes.get("perm")
                rank = len(value.shape) if value.shape is not None else None
                if perm is None or rank is None or list(perm.as_ints())[-1] != rank - 1:
                    return [], None
            elif _is(user, "Mul") and user.inputs[0] is value:
                factor = user.inputs[1]
                if (
                    any(c.op_type == "Mul" for c, _ in chain)
                    or factor is None
                    or factor.dtype not in (None, ir.DataType.FLOAT)
                    or factor.shape is None
                    or any(d != 1 for d in factor.shape)
                ):
                    return [], None
            else:
                return [], None
            chain.append((user, []))
            if len(chain) > 1:
                chain[-2] = (chain[-2][0], shapes)
            elif shapes:
                return [], None
            value = user.outputs[0]

    def _residual(self, quant: ir.Node):
        """BlockQuantize(y) -> DequantizeLinear -> Add(DequantizeLinear(r_q, r_s)) ->
        BlockQuantize: (r_q, r_s, residual block size, the final BlockQuantize) or None."""
        q, s = quant.outputs
        dq = _single_user(q)
        if not _is(dq, "DequantizeLinear") or _single_user(s) is not dq or dq.inputs[1] is not s:
            return None
        if _attr_int(dq, "block_size") != _attr_int(quant, "block_size"):
            return None
        add = _single_user(dq.outputs[0])
        if not _is(add, "Add") or len(add.inputs) != 2:
            return None
        other = add.inputs[1] if add.inputs[0] is dq.outputs[0] else add.inputs[0]
        rdq = other.producer()
        if not _is(rdq, "DequantizeLinear") or len(rdq.inputs) != 2:
            return None
        r_q, r_s = rdq.inputs
        r_block = _attr_int(rdq, "block_size", 0)
        r_shape = other.shape  # the codes of integer ops may be unshaped here
        y_shape = dq.outputs[0].shape
        axis = _attr_int(rdq, "axis", 1)
        if r_shape is None or y_shape is None or len(r_shape) != len(y_shape):
            return None  # equal shapes are checked at run time
        if not r_block or (axis != -1 and axis != len(r_shape) - 1):
            return None
        if r_q.dtype not in (None, ir.DataType.INT8) or r_s.dtype not in (None, ir.DataType.FLOAT):
            return None
        if r_shape[-1] != y_shape[-1]:
            return None
        final = _single_user(add.outputs[0])
        if not (_is(final, "BlockQuantize", OPS_DOMAIN) and _attr_int(final, "block_size")):
            return None
        if _attr_int(final, "block_size") != _attr_int(quant, "block_size"):
            return None
        if _attr_int(final, "bits", 8) != _attr_int(quant, "bits", 8):
            return None
        return r_q, r_s, r_block, final

    def _emit(self, op_type: str, inputs, anchor: ir.Node, dtype, **attrs) -> ir.Value:
        node = ir.Node(
            "",
            op_type,
            inputs,
            ir.convenience.convert_attributes(attrs),
            name=f"{anchor.name}/{op_type}_{len(self.graph)}",
        )
        self.graph.append(node)  # run_pipeline sorts the graph after every pass
        node.outputs[0].dtype = dtype
        node.outputs[0].name = node.name
        return node.outputs[0]

    def _const(self, array: np.ndarray, name: str) -> ir.Value:
        key = ("const", array.dtype.str, array.tobytes())
        if key not in self.shared:
            self.shared[key] = new_initializer(self.graph, f"bmm/{name}", ir.tensor(array))
        return self.shared[key]

    # --- building blocks ----------------------------------------------------------------------

    def _reshaped_bias(self, bias: ir.Value) -> ir.Value:
        array = const_array(bias).astype(np.float32).reshape(-1)
        return new_initializer(self.graph, f"{bias.name}.bct_bias", ir.tensor(array))

    def _weights(
        self, bd: ir.Node, fmt: BlockFormat
    ) -> tuple[list, ir.Value | None, ir.Value | None]:
        """Constant inputs 2..5 (codes, scales, scale base, zero points) in the stored form:
        int4 packed (ONNX INT4) or int8 codes, int8 scale codes or 4-bit offsets (UINT4)
        + int8 base per column, int4 / int8 zero points; input 10, the multipliers of
        superblock weights (UINT4) or None; input 11, the patterns of N:M-sparse weights
        (whose codes are then the kept ones, `blockformat.nm_compress`) or None. Shared by
        every MatMul of a weight."""
        if id(bd) in self.weights:
            return self.weights[id(bd)]
        name = (bd.inputs[0].name or bd.name).removesuffix(".bct_codes")
        w = stored_weight(bd)
        codes, scale_codes = w.codes.astype(np.int8), w.scale_codes.astype(np.int8)
        g = self.graph
        pattern = None
        if fmt.nm_m:
            codes, patterns = nm_compress(w)
            pattern = new_initializer(g, f"{name}.bmm_nm_pattern", nm_pattern_tensor(patterns, fmt))
        values: list[ir.Value | None] = [
            new_initializer(g, f"{name}.bmm_codes", _int_tensor(codes, fmt.packed))
        ]
        if fmt.scale_bits == 4:
            base, offsets = split_scale_codes(scale_codes, 0)
            values += [
                new_initializer(g, f"{name}.bmm_scale_offsets", uint4_tensor(offsets)),
                new_initializer(g, f"{name}.bmm_scale_base", ir.tensor(base.astype(np.int8))),
            ]
        else:
            values += [new_initializer(g, f"{name}.bmm_scales", ir.tensor(scale_codes)), None]
        if w.zero_points is not None:
            zp = w.zero_points.astype(np.int8)
            values.append(new_initializer(g, f"{name}.bmm_zp", _int_tensor(zp, fmt.packed)))
        else:
            values.append(None)
        mult = None
        if w.multipliers is not None:
            mult = new_initializer(g, f"{name}.bmm_mult", uint4_tensor(w.multipliers))
        self.weights[id(bd)] = values, mult, pattern
        return values, mult, pattern

    def _drop_dead(self) -> None:
        """Remove what the rewrites left unread (MatMul, bias Add, BlockQuantize, DQ, weights,
        the float Reshape/Transpose chains), so lower_qdq does not lower dead weights."""
        outputs = {id(v) for v in self.graph.outputs}
        changed = True
        while changed:
            changed = False
            for node in reversed(list(self.graph)):
                if not any(id(o) in outputs or o.uses() for o in node.outputs):
                    self.graph.remove(node, safe=True)
                    changed = True


def blocked_codes(value: ir.Value):
    """(codes, scales, block) when ``value`` is DequantizeLinear of int8 codes made by a
    bctonnx op (through Reshape / Transpose) with scales blocked along the last axis."""
    dq = value.producer()
    if not _is(dq, "DequantizeLinear") or len(dq.inputs) != 2:
        return None
    block = _attr_int(dq, "block_size", 0)
    axis = _attr_int(dq, "axis", 1)
    rank = len(value.shape) if value.shape is not None else None
    if not block or (axis != -1 and (rank is None or axis != rank - 1)):
        return None
    q, s = dq.inputs
    if q.dtype not in (None, ir.DataType.INT8):
        return None
    src = q.producer()
    while src is not None and src.domain == "" and src.op_type in ("Reshape", "Transpose"):
        src = src.inputs[0].producer()
    if src is None or src.domain != OPS_DOMAIN:
        return None  # pow2 scales are guaranteed only for our ops' codes
    return q, s, block


def _heads_transpose_input(value: ir.Value) -> ir.Value | None:
    """x when ``value`` is Transpose(x, perm=(0, 2, 1, 3)) (attention's [b, S, h, d] ->
    [b, h, S, d]), else None."""
    node = value.producer()
    if not _is(node, "Transpose"):
        return None
    perm = node.attributes.get("perm")
    return node.inputs[0] if perm is not None and list(perm.as_ints()) == [0, 2, 1, 3] else None


def _fold_scalar(value: ir.Value, max_nodes: int = 32) -> np.ndarray | None:
    """The value of a float scalar computed only from constants and the *static* dims of
    Shape nodes (e.g. 1/sqrt(sqrt(head_dim)) from Shape(Q)), else None.

    The subgraph is evaluated with onnx's reference evaluator twice, with every symbolic dim
    of the shaped tensors set to 1 and then to 3; the result must not change."""
    import onnx
    from onnx.reference import ReferenceEvaluator

    nodes: list[ir.Node] = []
    shaped: dict[int, ir.Value] = {}  # tensors whose shape only is read
    consts: dict[int, ir.Value] = {}
    stack, seen = [value], set()
    while stack:
        v = stack.pop()
        if id(v) in seen:
            continue
        seen.add(id(v))
        if is_const(v):
            consts[id(v)] = v
            continue
        node = v.producer()
        if node is None or len(nodes) >= max_nodes or node.domain not in ("", "ai.onnx"):
            return None
        nodes.append(node)
        if node.op_type == "Shape":
            if node.inputs[0].shape is None:
                return None
            shaped[id(node.inputs[0])] = node.inputs[0]
            continue
        stack.extend(i for i in node.inputs if i is not None)
    if not shaped:
        return None
    inputs = [
        onnx.helper.make_tensor_value_info(f"shaped{i}", onnx.TensorProto.FLOAT, None)
        for i in range(len(shaped))
    ]
    names = {key: f"shaped{i}" for i, key in enumerate(shaped)}
    for key in consts:
        names[key] = f"const{len(names)}"
    inits = [onnx.numpy_helper.from_array(const_array(v), names[key]) for key, v in consts.items()]
    protos = []
    for k, node in enumerate(reversed(nodes)):
        for out in node.outputs:
            names.setdefault(id(out), f"v{k}_{len(names)}")
        proto = ir.serde.serialize_node(node)
        del proto.input[:]
        proto.input.extend(names[id(i)] if i is not None else "" for i in node.inputs)
        del proto.output[:]
        proto.output.extend(names[id(o)] for o in node.outputs)
        protos.append(proto)
    graph = onnx.helper.make_graph(
        protos,
        "fold",
        inputs,
        [onnx.helper.make_tensor_value_info(names[id(value)], onnx.TensorProto.FLOAT, None)],
        inits,
    )
    opset = value.graph.opset_imports.get("", 21) if value.graph is not None else 21
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", opset)])
    results = []
    try:
        evaluator = ReferenceEvaluator(model)
        for fill in (1, 3):
            feeds = {
                names[key]: np.zeros(
                    [d if isinstance(d, int) else fill for d in v.shape], np.float32
                )
                for key, v in shaped.items()
            }
            results.append(np.asarray(evaluator.run(None, feeds)[0]))
    except Exception:  # noqa: BLE001 - anything unexpected: not foldable
        return None
    a, b = results
    if a.size != 1 or a.dtype != np.float32 or not np.array_equal(a, b):
        return None
    return a.reshape(()).astype(np.float32)


def _int_tensor(codes: np.ndarray, packed: bool) -> ir.TensorProtocol:
    if packed:
        return ir.PackedTensor(pack_int4(codes), ir.DataType.INT4, shape=ir.Shape(codes.shape))
    return ir.tensor(codes.astype(np.int8))


__all__ = ["LowerMatMul", "supported_weight_format"]

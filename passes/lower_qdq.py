"""lower_qdq: the portable form. Every mid-level node becomes standard ONNX (opset 21), so the
model runs on stock onnxruntime with no op library.

    BlockDequantize(codes, scales[, zp]) -> DequantizeLinear(codes:int4|int8, scale[, zp], axis,
                                          block_size) (superblocks: scale = the superblock's
                                          scale, Gathered per block, times Cast(multipliers),
                                          folded at load like the pow2 decoding)
    BlockGather(codes, scales, ids[, zp]) -> Gather rows and their scales (and zero points),
                                          then DequantizeLinear (int4 tables: stored packed as
                                          uint8 [V, H/2]; the rows are unpacked with
                                          Xor/And/BitShift into offset binary, zero point 8, or
                                          the block's zero point + 8 stored as uint8)
    BlockFakeQuant(x)                  -> per-block max |x| in the graph (Reshape, Abs,
                                          ReduceMax; Pad first when the last axis is not a
                                          multiple of the block), scale = amax / qmax, then
                                          QuantizeLinear(int8) -> DequantizeLinear

Scales stored as float16 are Cast to float32, pow2 codes become ``2 ** (code / 2**frac_bits)``
with Cast/Mul/Pow on the constant (onnxruntime folds these at load time), so the file keeps
one or two bytes per block.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from bctonnx.blockformat import (
    BlockFormat,
    nm_compress,
    nm_patterns,
    pack_int4,
    pack_int4_rows,
    split_scale_codes,
)

from .common import (
    MID_DOMAIN,
    TARGET_OPSET,
    PassError,
    const_array,
    fmt_from_node,
    new_initializer,
    nm_pattern_tensor,
    rank,
    role,
    stored_weight,
    take_over,
    uint4_tensor,
)

_SCALE_FLOOR = np.float32(2.0**-126)


class _Emitter:
    """Builds standard ONNX nodes in front of one anchor node.

    Names are short (``bq<n>/<op>``) and small constants are shared across the graph: at
    ~900 inserted nodes, long names and repeated constants would cost a visible part of the
    compression ratio.
    """

    def __init__(self, graph: ir.Graph, anchor: ir.Node, shared: dict):
        self.graph, self.anchor, self.shared = graph, anchor, shared
        shared["__count__"] = shared.get("__count__", 0) + 1
        self.prefix = f"bq{shared['__count__']}"
        self.count = 0

    def op(self, op_type: str, inputs, **attrs) -> ir.Value:
        self.count += 1
        node = ir.Node(
            "",
            op_type,
            inputs,
            ir.convenience.convert_attributes(attrs),
            name=f"{self.prefix}/{self.count}",
        )
        self.graph.insert_before(self.anchor, node)
        node.outputs[0].name = f"{self.prefix}/{self.count}"
        return node.outputs[0]

    def const(self, array, name: str, share: bool = False) -> ir.Value:
        """A constant; small ones (and ``share`` ones) are shared by every emitter of the
        graph."""
        tensor = array if isinstance(array, ir.TensorProtocol) else ir.tensor(np.asarray(array))
        key = None
        if not isinstance(array, ir.TensorProtocol) and (share or np.asarray(array).size <= 16):
            arr = np.asarray(array)
            key = (arr.dtype.str, arr.shape, arr.tobytes())
            if key in self.shared:
                return self.shared[key]
            full = f"bc/{name}_{len(self.shared)}"
        else:
            full = f"{self.prefix}/{name}"
        value = new_initializer(self.graph, full, tensor)
        if key is not None:
            self.shared[key] = value
        return value

    def decode_scales(self, scale_codes: ir.Value, fmt: BlockFormat) -> ir.Value:
        """float32 scales from stored scale codes (see blockformat.decode_scales)."""
        if fmt.scale_kind == "pow2":
            exponent = (
                scale_codes
                if scale_codes.dtype == ir.DataType.FLOAT
                else self.op("Cast", [scale_codes], to=ir.DataType.FLOAT)
            )
            if fmt.frac_bits:
                exponent = self.op(
                    "Mul", [exponent, self.const(np.float32(2.0**-fmt.frac_bits), "inv_steps")]
                )
            return self.op("Pow", [self.const(np.float32(2.0), "two"), exponent])
        if fmt.scale_dtype == "float16":
            return self.op("Cast", [scale_codes], to=ir.DataType.FLOAT)
        return scale_codes


def _codes_tensor(codes: np.ndarray, fmt: BlockFormat) -> ir.TensorProtocol:
    if fmt.packed:
        return ir.PackedTensor(pack_int4(codes), ir.DataType.INT4, shape=ir.Shape(codes.shape))
    return ir.tensor(codes.astype(np.int8))


def _finish(node: ir.Node, result: ir.Value) -> None:
    """``result`` replaces the mid node's output (readers, graph outputs and name)."""
    graph = node.graph
    take_over(node.outputs[0], result)
    graph.remove(node, safe=True)


def lower_block_dequantize(graph: ir.Graph, node: ir.Node, shared: dict) -> None:
    w = stored_weight(node)
    fmt = w.fmt
    e = _Emitter(graph, node, shared)
    if fmt.nm_m:
        kept, patterns = nm_compress(w)
        codes = e.const(_codes_tensor(kept, fmt), "codes")
    else:
        codes = e.const(_codes_tensor(w.codes, fmt), "codes")
    if fmt.scale_bits == 4:
        # code = base (int8 per slice) + offset (uint4 per block), decoded in float
        base, offsets = split_scale_codes(w.scale_codes, fmt.axis)
        code = e.op(
            "Add",
            [
                e.op(
                    "Cast", [e.const(uint4_tensor(offsets), "scale_offsets")], to=ir.DataType.FLOAT
                ),
                e.op("Cast", [e.const(base, "scale_base")], to=ir.DataType.FLOAT),
            ],
        )
        code.dtype = ir.DataType.FLOAT
        scales = e.decode_scales(code, fmt)
    else:
        scales = e.decode_scales(e.const(w.scale_codes, "scales"), fmt)
    if fmt.superblock:  # block scale = superblock scale * multiplier (blockformat.block_scales)
        axis = fmt.axis % w.codes.ndim
        nblocks = w.multipliers.shape[axis]
        which = np.arange(nblocks, dtype=np.int64) // fmt.blocks_per_superblock
        spread = e.op("Gather", [scales, e.const(which, "sb", share=True)], axis=axis)
        mult = e.op("Cast", [e.const(uint4_tensor(w.multipliers), "mult")], to=ir.DataType.FLOAT)
        scales = e.op("Mul", [spread, mult])
    inputs = [codes, scales]
    if w.zero_points is not None:
        inputs.append(e.const(_codes_tensor(w.zero_points, fmt), "zp"))
    if not fmt.nm_m:
        _finish(
            node,
            e.op("DequantizeLinear", inputs, axis=fmt.axis, block_size=fmt.block_size),
        )
        return
    # N:M: the kept codes dequantize with the blocks' scales (a block keeps n/m of its
    # elements), then are scattered to their positions among zeros
    n, m = fmt.nm
    kept_values = e.op(
        "DequantizeLinear", inputs, axis=fmt.axis, block_size=fmt.block_size * n // m
    )
    _finish(node, _nm_scatter(e, kept_values, patterns, fmt, w.codes.shape))


def _nm_scatter(
    e: _Emitter, kept: ir.Value, patterns: np.ndarray, fmt: BlockFormat, shape: tuple
) -> ir.Value:
    """Dense float weights from N:M kept values (``blockformat.nm_expand`` in standard ops):
    the stored pattern indices pick rows of the patterns' position table (Gather), which
    ScatterElements uses to place each group's kept values among zeros."""
    n, m = fmt.nm
    axis = fmt.axis % len(shape)
    if len(shape) != 2:
        raise PassError(f"N:M sparsity needs a 2-D weight, got shape {list(shape)}")
    size, cols = shape[axis], shape[1 - axis]
    if axis == 1:  # work with the blocked axis first: [K, N]
        kept = e.op("Transpose", [kept], perm=[1, 0])
        patterns = patterns.T
    table = e.const(nm_patterns(n, m), f"nm_table_{n}_{m}", share=True)
    index = e.op(
        "Cast", [e.const(nm_pattern_tensor(patterns, fmt), "nm_pattern")], to=ir.DataType.INT64
    )
    positions = e.op("Gather", [table, index], axis=0)  # [K/m, N, n]
    positions = e.op("Transpose", [positions], perm=[0, 2, 1])  # [K/m, n, N]
    grouped = e.op("Reshape", [kept, e.const(np.array([size // m, n, cols], np.int64), "nm_kept")])
    zeros = e.op(
        "ConstantOfShape",
        [e.const(np.array([size // m, m, cols], np.int64), "nm_dense")],
        value=ir.tensor(np.zeros(1, np.float32)),
    )
    dense = e.op("ScatterElements", [zeros, positions, grouped], axis=1)
    dense = e.op("Reshape", [dense, e.const(np.array([size, cols], np.int64), "nm_shape")])
    if axis == 1:
        dense = e.op("Transpose", [dense], perm=[1, 0])
    return dense


def lower_block_gather(graph: ir.Graph, node: ir.Node, shared: dict) -> None:
    fmt = fmt_from_node(node)
    e = _Emitter(graph, node, shared)
    codes, scale_codes, ids = (
        const_array(node.inputs[0]),
        const_array(node.inputs[1]),
        node.inputs[2],
    )
    zp_table = const_array(node.inputs[3]) if len(node.inputs) > 3 else None

    def table(source: ir.Value, make, name: str) -> ir.Value:
        """One stored copy of a table however many lookups read it (an optimized graph can
        keep the exporter's Gather beside EmbedLayerNormalization's)."""
        key = ("table", id(source), name)
        if key not in shared:
            shared[key] = e.const(make(), name)
        return shared[key]

    scales = e.decode_scales(
        e.op("Gather", [table(node.inputs[1], lambda: scale_codes, "scales"), ids], axis=0), fmt
    )
    q_args = dict(axis=-1, block_size=fmt.block_size)
    if not fmt.packed:
        rows = e.op(
            "Gather", [table(node.inputs[0], lambda: codes.astype(np.int8), "codes"), ids], axis=0
        )
        dq_inputs = [rows, scales]
        if zp_table is not None:
            zp = table(node.inputs[3], lambda: zp_table.astype(np.int8), "zp")
            dq_inputs.append(e.op("Gather", [zp, ids], axis=0))
        _finish(node, e.op("DequantizeLinear", dq_inputs, **q_args))
        return
    vocab, hidden = codes.shape
    ids_rank = rank(ids)
    if hidden % 2 or ids_rank is None:
        raise PassError(f"cannot pack table '{node.inputs[0].name}' (odd hidden or unknown rank)")
    packed = table(node.inputs[0], lambda: pack_int4_rows(codes), "codes_packed")
    nibbles = _gather_nibbles(e, packed, ids, ids_rank)
    if zp_table is None:
        zero_point = e.op("Expand", [e.const(np.uint8(8), "eight"), e.op("Shape", [scales])])
    else:  # zero points packed per row the same way (a padding nibble when the count is odd)
        nblocks = zp_table.shape[1]
        zp = table(node.inputs[3], lambda: pack_int4_rows(zp_table), "zp_packed")
        zero_point = _gather_nibbles(e, zp, ids, ids_rank)
        if nblocks % 2:
            zero_point = e.op(
                "Slice",
                [
                    zero_point,
                    e.const(np.array([0], np.int64), "zero1"),
                    e.const(np.array([nblocks], np.int64), f"len{nblocks}"),
                    e.const(np.array([-1], np.int64), "last_axis"),
                ],
            )
    _finish(node, e.op("DequantizeLinear", [nibbles, scales, zero_point], **q_args))


def _gather_nibbles(e: _Emitter, packed: ir.Value, ids: ir.Value, ids_rank: int) -> ir.Value:
    """Gather rows of a table of packed int4 pairs; returns them unpacked as offset-binary
    uint8 (code + 8), which DequantizeLinear reads with zero point 8 (or zp + 8)."""
    rows = e.op("Gather", [packed, ids], axis=0)
    rows = e.op("BitwiseXor", [rows, e.const(np.uint8(0x88), "xor88")])
    low = e.op("BitwiseAnd", [rows, e.const(np.uint8(0x0F), "low_mask")])
    high = e.op("BitShift", [rows, e.const(np.uint8(4), "four")], direction="RIGHT")
    last = e.const(np.array([-1], np.int64), "last_axis")
    pairs = e.op(
        "Concat", [e.op("Unsqueeze", [low, last]), e.op("Unsqueeze", [high, last])], axis=-1
    )
    shape = e.const(np.array([0] * ids_rank + [-1], np.int64), "row_shape")
    return e.op("Reshape", [pairs, shape])


def _attention_mask_of(node: ir.Node) -> ir.Value | None:
    """The additive attention mask added to this quantization's output (quantize_activations
    quantizes the scores before the mask), else None."""
    users = list(node.outputs[0].uses())
    if len(users) != 1 or role(users[0][0]) != "attention.mask":
        return None
    add, index = users[0]
    other = add.inputs[1 - index] if len(add.inputs) == 2 else None
    return other


def lower_block_fake_quant(graph: ir.Graph, node: ir.Node, shared: dict) -> None:
    fmt = fmt_from_node(node)
    x = node.inputs[0]
    r = rank(x)
    if r is None:
        raise PassError(f"tensor '{x.name}' has unknown rank; cannot quantize it blockwise")
    e = _Emitter(graph, node, shared)
    mask = _attention_mask_of(node)
    if mask is not None:
        # attention scores: the keys the mask drops are zeroed first, so their scores cannot
        # raise a block's scale; a sequence's output then does not depend on its padding (as
        # the integer form's BlockAttention; their probabilities are 0 either way)
        dropped = e.op("Less", [mask, e.const(np.float32(-1000.0), "mask_threshold")])
        kept = e.op("Where", [dropped, e.const(np.float32(0.0), "zero"), x])
        kept.shape, kept.type = x.shape, x.type
        x = kept
    b = fmt.block_size
    last = x.shape[-1]
    if isinstance(last, int) and last % b == 0:
        blocked = e.op("Reshape", [x, e.const(np.array([0] * (r - 1) + [last // b, b]), "blocks")])
    else:
        if isinstance(last, int):
            pad = e.const(np.array([b - last % b], np.int64), "pad")
        else:  # (b - D % b) % b at run time
            size = e.op("Shape", [x], start=-1)
            bb = e.const(np.array([b], np.int64), "block")
            pad = e.op("Mod", [e.op("Sub", [bb, e.op("Mod", [size, bb])]), bb])
        pads = e.op("Concat", [e.const(np.zeros(2 * r - 1, np.int64), "zeros"), pad], axis=0)
        padded = e.op("Pad", [x, pads])
        blocked = e.op("Reshape", [padded, e.const(np.array([0] * (r - 1) + [-1, b]), "blocks")])
    amax = e.op("ReduceMax", [e.op("Abs", [blocked]), e.const(np.array([-1]), "axes")], keepdims=0)
    # the same rule as blockformat.encode_scales: the smallest scale >= amax / qmax
    ideal = e.op("Div", [amax, e.const(np.float32(fmt.qmax), "qmax")])
    if fmt.scale_kind == "pow2":
        steps = e.const(np.float32(2**fmt.frac_bits), "steps")
        two = e.const(np.float32(2.0), "two")
        cmax = e.const(np.float32(127), "cmax")
        tiny = e.op("Max", [ideal, e.const(np.float32(1e-45), "tiny")])
        log2 = e.op("Div", [e.op("Log", [tiny]), e.const(np.float32(np.log(2.0)), "ln2")])
        code = e.op("Ceil", [e.op("Mul", [log2, steps])])
        code = e.op("Clip", [code, e.const(np.float32(-128), "cmin"), cmax])
        # log/ceil in float can land a step off either way: settle on the smallest code whose
        # scale covers amax / qmax, as blockformat.encode_scales does
        one = e.const(np.float32(1.0), "one")
        lower = e.op("Sub", [code, one])
        lower_ok = e.op(
            "And",
            [
                e.op("GreaterOrEqual", [e.op("Pow", [two, e.op("Div", [lower, steps])]), ideal]),
                e.op("Greater", [code, e.const(np.float32(-128), "cmin")]),
            ],
        )
        code = e.op("Where", [lower_ok, lower, code])
        short = e.op(
            "And",
            [
                e.op("Less", [e.op("Pow", [two, e.op("Div", [code, steps])]), ideal]),
                e.op("Less", [code, cmax]),
            ],
        )
        code = e.op("Where", [short, e.op("Add", [code, one]), code])
        scale = e.op("Pow", [two, e.op("Div", [code, steps])])
    else:
        if fmt.scale_dtype != "float32":
            raise PassError("activation scales are computed at run time in float32")
        scale = e.op("Max", [ideal, e.const(_SCALE_FLOOR, "floor")])
    q = e.op("QuantizeLinear", [x, scale], axis=-1, block_size=b, output_dtype=ir.DataType.INT8)
    _finish(node, e.op("DequantizeLinear", [q, scale], axis=-1, block_size=b))


LOWERINGS = {
    "BlockDequantize": lower_block_dequantize,
    "BlockGather": lower_block_gather,
    "BlockFakeQuant": lower_block_fake_quant,
}


class LowerQDQ(ir.passes.InPlacePass):
    """Mid-level block nodes -> standard QuantizeLinear/DequantizeLinear (opset 21)."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        mids = [n for n in graph if n.domain == MID_DOMAIN]
        shared: dict = {}
        for node in mids:
            LOWERINGS[node.op_type](graph, node, shared)
        graph.opset_imports.pop(MID_DOMAIN, None)
        model.opset_imports.pop(MID_DOMAIN, None)
        graph.opset_imports[""] = TARGET_OPSET
        return ir.passes.PassResult(model, modified=bool(mids))

"""BlockMatMul / BlockBatchMatMul kernels bit-exact with their numpy references
(bctonnx/ops/ref_matmul.py) on every instruction-set path this CPU has, and the lower_matmul
pass on the tiny BERT."""

from __future__ import annotations

import ctypes
import logging
import math
from collections import Counter
from dataclasses import replace

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from conftest import tiny_feeds
from onnx import TensorProto, helper
from test_integer import require_library
from test_passes import cosine

import bctonnx
from bctonnx.blockformat import BlockFormat, quantize, split_scale_codes
from bctonnx.ops.ref_matmul import block_batch_matmul, block_matmul
from bctonnx.ops.ref_quant import block_quantize

ISAS = {"scalar": 0, "avx2": 1, "avx512": 2, "amx": 3}

W8 = BlockFormat(bits=8, block_size=128, scale_kind="pow2", frac_bits=3)  # w8a8 weights
W4 = BlockFormat(  # w4a8 weights
    bits=4, block_size=32, scale_kind="pow2", frac_bits=3, clip="mse", symmetric=False,
    scale_bits=4,
)  # fmt: skip
W8B32 = BlockFormat(bits=8, block_size=32, scale_kind="pow2", frac_bits=3)  # mixed-precision int8
W4SYM = BlockFormat(bits=4, block_size=16, scale_kind="pow2", frac_bits=0)
W6ASYM = BlockFormat(bits=6, block_size=32, scale_kind="pow2", frac_bits=2, symmetric=False)
W8B12 = BlockFormat(bits=8, block_size=12, scale_kind="pow2", frac_bits=2)
W4SB = replace(W4, superblock=128)  # w4a8 weights: blocks of 32 in superblocks of 128
W4SYMSB = BlockFormat(bits=4, block_size=16, scale_kind="pow2", frac_bits=0, superblock=64)


def sb(w) -> dict:
    """block_matmul's superblock keywords for weights ``w``."""
    return {"w_multipliers": w.multipliers, "superblock": w.fmt.superblock}


def available_isas() -> list[str]:
    """Every instruction-set path this CPU runs; on an AVX-512 CPU without AMX also
    ``amx-emulated``: the AMX path with its tile instructions emulated (platform.h), so its
    integer and float steps are checked on any AVX-512 machine."""
    lib = ctypes.CDLL(require_library())
    best = lib.bctonnx_block_matmul_isa(b"")
    names = [name for name, level in ISAS.items() if level <= best]
    if best == ISAS["avx512"]:
        names.append("amx-emulated")
    return names


@pytest.fixture(scope="module")
def isas() -> list[str]:
    return available_isas()


def session(model: onnx.ModelProto | str, monkeypatch, isa: str = "", threads: int = 2):
    """A session of ``model`` (a ModelProto or a model file) whose kernels use ``isa`` ("": the
    CPU's best; BCTONNX_ISA is read when a kernel is created, i.e. at session creation)."""
    require_library()
    if isa == "amx-emulated":
        monkeypatch.setenv("BCTONNX_AMX_EMULATE", "1")
        isa = "amx"
    if isa:
        monkeypatch.setenv("BCTONNX_ISA", isa)
    data = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    try:
        return ort.InferenceSession(
            data,
            bctonnx.session_options(threads=threads),
            providers=["CPUExecutionProvider"],
        )
    finally:
        monkeypatch.delenv("BCTONNX_ISA", raising=False)
        monkeypatch.delenv("BCTONNX_AMX_EMULATE", raising=False)


def _int(name: str, array: np.ndarray, packed: bool, unsigned: bool = False) -> onnx.TensorProto:
    if packed:
        dtype = TensorProto.UINT4 if unsigned else TensorProto.INT4
    else:
        dtype = TensorProto.INT8
    return helper.make_tensor(name, dtype, list(array.shape), array.reshape(-1).tolist())


def matmul_model(
    w: object,
    rank: int,
    *,
    x_int8: bool,
    act_block: int,
    bias: np.ndarray | None = None,
    y_mul: float | None = None,
    residual_block: int = 0,
    out_block: int = 0,
) -> onnx.ModelProto:
    """One BlockMatMul node on weights ``w`` (a blockformat.BlockQuantized [K, N])."""
    fmt = w.fmt
    inits = [_int("w_codes", w.codes, fmt.packed)]
    scale, base = "w_scales", ""
    if fmt.scale_bits == 4:
        b, offsets = split_scale_codes(w.scale_codes, 0)
        inits += [_int("w_scales", offsets, True, unsigned=True), _int("w_base", b, False)]
        base = "w_base"
    else:
        inits.append(_int("w_scales", w.scale_codes, False))
    zp = ""
    if w.zero_points is not None:
        inits.append(_int("w_zp", w.zero_points, fmt.packed))
        zp = "w_zp"
    names = {"bias": "", "y_mul": "", "res": "", "res_s": ""}
    if bias is not None:
        inits.append(helper.make_tensor("bias", TensorProto.FLOAT, [bias.size], bias.tolist()))
        names["bias"] = "bias"
    if y_mul is not None:
        inits.append(helper.make_tensor("y_mul", TensorProto.FLOAT, [], [y_mul]))
        names["y_mul"] = "y_mul"
    lead = ["B", "S"][: rank - 1]
    graph_inputs = [
        helper.make_tensor_value_info(
            "x", TensorProto.INT8 if x_int8 else TensorProto.FLOAT, [*lead, w.codes.shape[0]]
        )
    ]
    if x_int8:
        graph_inputs.append(helper.make_tensor_value_info("x_scale", TensorProto.FLOAT, None))
    if residual_block:
        names["res"], names["res_s"] = "res", "res_s"
        graph_inputs += [
            helper.make_tensor_value_info("res", TensorProto.INT8, None),
            helper.make_tensor_value_info("res_s", TensorProto.FLOAT, None),
        ]
    inputs = ["x", "x_scale" if x_int8 else "", "w_codes", scale, base, zp, names["bias"]]
    inputs += [names["y_mul"], names["res"], names["res_s"], ""]
    if w.multipliers is not None:
        inits.append(_int("w_mult", w.multipliers, True, unsigned=True))
        inputs[-1] = "w_mult"
    while not inputs[-1]:
        inputs.pop()
    outputs = ["y", "y_q", "y_scale", "seg"] if out_block else ["y", "", "", "seg"]
    attrs = dict(block_size=fmt.block_size, frac_bits=fmt.frac_bits, act_block_size=act_block)
    if fmt.superblock:
        attrs["superblock"] = fmt.superblock
    if out_block:
        attrs["out_block_size"] = out_block
    if residual_block:
        attrs["residual_block_size"] = residual_block
    node = helper.make_node("BlockMatMul", inputs, outputs, domain="bctonnx", **attrs)
    graph_outputs = [
        helper.make_tensor_value_info(n, t, None)
        for n, t in (
            ("y", TensorProto.FLOAT),
            ("y_q", TensorProto.INT8),
            ("y_scale", TensorProto.FLOAT),
            ("seg", TensorProto.INT32),
        )
        if n in outputs
    ]
    graph = helper.make_graph([node], "block_matmul", graph_inputs, graph_outputs, inits)
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("bctonnx", 1)]
    )
    model.ir_version = 10
    return model


def weights(k: int, n: int, fmt: BlockFormat, seed: int = 0):
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((k, n)).astype(np.float32) * 0.05
    w[rng.integers(0, k), :] *= 8  # an outlier row: blocks with different scales
    return quantize(w, fmt.with_axis(0))


def activations(shape, seed: int = 1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape).astype(np.float32)
    x[..., 3] *= 40  # an outlier channel, as in BERT
    x[..., -5:] *= 1e-3  # a block of small values
    return x


def run(model, monkeypatch, isa, feeds) -> dict[str, np.ndarray]:
    sess = session(model, monkeypatch, isa)
    outs = sess.run(None, feeds)
    return {o.name: v for o, v in zip(sess.get_outputs(), outs, strict=True)}


CASES = [
    # (weight format, x shape (..., K), N, activation block)
    (W8, (1, 256), 33, 32),  # M = 1, N odd, K not a multiple of 64-byte vectors per block
    (W8, (2, 5, 384), 50, 32),  # rank 3, batch > 1
    (W8, (7, 128), 16, 64),  # activation block 64 inside a weight block of 128
    (W4, (3, 96), 17, 32),  # int4 asymmetric, 4-bit scale codes, K = 3 blocks
    (W4, (2, 9, 64), 40, 32),
    (W8B32, (5, 160), 31, 32),
    (W4SYM, (4, 48), 7, 16),  # K = 48: not a multiple of the vector width
    (W4SYM, (3, 64), 9, 32),  # activation block 32 over weight blocks of 16
    (W6ASYM, (6, 64), 24, 32),  # 6-bit asymmetric in int8 storage
    (W8, (2, 17, 256), 40, 128),  # segments of 128: two 64-byte K steps per AMX tile product
    (W8B12, (3, 36), 20, 12),  # segments of 12: not a multiple of 8 or 16 bytes
    (W4SB, (3, 256), 17, 32),  # superblocks: int4 widened to int8 blocks of 128
    (W4SB, (2, 9, 384), 40, 128),  # ... read with activation blocks of 128 (match_weight_blocks)
    (W4SYMSB, (5, 192), 9, 16),  # symmetric superblocks of 64 over blocks of 16
]


@pytest.mark.parametrize("fmt, shape, n, act_block", CASES)
def test_block_matmul_is_bit_exact_on_every_isa(fmt, shape, n, act_block, isas, monkeypatch):
    k = shape[-1]
    w = weights(k, n, fmt)
    bias = np.random.default_rng(2).standard_normal(n).astype(np.float32)
    x = activations(shape)
    ref = block_matmul(
        x, w.codes, w.scale_codes, block_size=fmt.block_size, frac_bits=fmt.frac_bits,
        act_block_size=act_block, w_zero_points=w.zero_points, bias=bias, out_block_size=16,
        **sb(w),
    )  # fmt: skip
    model = matmul_model(w, len(shape), x_int8=False, act_block=act_block, bias=bias, out_block=16)
    # a second input after the first on each path: a packing step that left part of its
    # (reused, per-thread) buffers unwritten would show the first input's bytes
    x2 = activations(shape, seed=11)
    ref2 = block_matmul(
        x2, w.codes, w.scale_codes, block_size=fmt.block_size, frac_bits=fmt.frac_bits,
        act_block_size=act_block, w_zero_points=w.zero_points, bias=bias, out_block_size=16,
        **sb(w),
    )  # fmt: skip
    for isa in isas:
        for xx, rr in ((x, ref), (x2, ref2)):
            out = run(model, monkeypatch, isa, {"x": xx})
            np.testing.assert_array_equal(out["seg"], rr["segment_sums"], err_msg=isa)
            np.testing.assert_array_equal(out["y"], rr["y"], err_msg=isa)
            np.testing.assert_array_equal(out["y_q"], rr["y_q"], err_msg=isa)
            np.testing.assert_array_equal(out["y_scale"], rr["y_scale"], err_msg=isa)


@pytest.mark.parametrize("fmt", [W8, W4, W4SB], ids=["w8a8", "w4a8", "w4a8-superblocks"])
@pytest.mark.parametrize("lead", [(2, 9), (3, 37)], ids=["18rows", "111rows"])
def test_block_matmul_fast_tiles_are_bit_exact(fmt, lead, isas, monkeypatch):
    """Without the debug output the AVX-512 kernel runs its assembly loops (full 4 x 48
    tiles, K loop and segment epilogue in registers); they must equal the reference too.
    111 rows: whole-row tasks (activations, product and output quantization in one task per
    32 rows, the last one partial)."""
    k, n = 384, 100  # 100 columns: two full 48-column tiles and a partial one
    w = weights(k, n, fmt)
    x = activations((*lead, k))  # 18 rows: full 4-row tiles and a remainder
    bias = np.random.default_rng(4).standard_normal(n).astype(np.float32)
    ref = block_matmul(
        x, w.codes, w.scale_codes, block_size=fmt.block_size, frac_bits=fmt.frac_bits,
        act_block_size=32, w_zero_points=w.zero_points, bias=bias, out_block_size=32, **sb(w),
    )  # fmt: skip
    model = matmul_model(w, 3, x_int8=False, act_block=32, bias=bias, out_block=32)
    model.graph.node[0].output[3] = ""  # no segment sums
    del model.graph.output[3]
    for isa in isas:
        out = run(model, monkeypatch, isa, {"x": x})
        np.testing.assert_array_equal(out["y"], ref["y"], err_msg=isa)
        np.testing.assert_array_equal(out["y_q"], ref["y_q"], err_msg=isa)


@pytest.mark.parametrize("fmt", [W4, W4SB], ids=["w4a8", "w4a8-superblocks"])
def test_block_matmul_reference_is_the_dequantized_product(fmt):
    """The spec's integer/float arithmetic is the matmul of the dequantized operands."""
    w = weights(256, 20, fmt)
    x = activations((6, 256))
    ref = block_matmul(
        x, w.codes, w.scale_codes, block_size=32, frac_bits=3, act_block_size=32,
        w_zero_points=w.zero_points, **sb(w),
    )  # fmt: skip
    qx, sx = block_quantize(x, 32)
    xq = qx.astype(np.float64) * np.repeat(sx, 32, axis=-1)
    expected = xq @ w.dequantize().astype(np.float64)
    np.testing.assert_allclose(ref["y"], expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())


@pytest.mark.parametrize("lead", [(2, 3), (3, 37)])  # 111 rows: whole-row tasks
def test_block_matmul_int8_input_multiplier_and_residual(lead, isas, monkeypatch):
    w = weights(64, 48, W8B32)
    x = activations((*lead, 64))
    qx, sx = block_quantize(x, 32)
    res_q, res_s = block_quantize(activations((*lead, 48), seed=5), 16)
    bias = np.linspace(-1, 1, 48, dtype=np.float32)
    ref = block_matmul(
        qx, w.codes, w.scale_codes, x_scale=sx, block_size=32, frac_bits=3, act_block_size=32,
        bias=bias, y_multiplier=np.float32(0.4204482), residual=res_q, residual_scale=res_s,
        residual_block_size=16, out_block_size=32,
    )  # fmt: skip
    model = matmul_model(
        w, 3, x_int8=True, act_block=32, bias=bias, y_mul=0.4204482, residual_block=16,
        out_block=32,
    )  # fmt: skip
    model.graph.node[0].output[3] = ""  # no segment sums (the debug output)
    del model.graph.output[3]
    for isa in isas:
        out = run(model, monkeypatch, isa, {"x": qx, "x_scale": sx, "res": res_q, "res_s": res_s})
        np.testing.assert_array_equal(out["y"], ref["y"], err_msg=isa)
        np.testing.assert_array_equal(out["y_q"], ref["y_q"], err_msg=isa)
        np.testing.assert_array_equal(out["y_scale"], ref["y_scale"], err_msg=isa)


def test_block_matmul_refuses_non_pow2_activation_scales(monkeypatch):
    w = weights(32, 8, W8B32)
    model = matmul_model(w, 2, x_int8=True, act_block=32)
    sess = session(model, monkeypatch, "avx512")
    x = np.ones((2, 32), np.int8)
    with pytest.raises(Exception, match="power of two"):
        sess.run(None, {"x": x, "x_scale": np.full((2, 1), 0.3, np.float32)})


def test_block_matmul_refuses_8bit_asymmetric_weights(monkeypatch):
    w = weights(32, 8, BlockFormat(bits=8, block_size=32, scale_kind="pow2", symmetric=False))
    with pytest.raises(Exception, match="asymmetric"):
        session(matmul_model(w, 2, x_int8=False, act_block=32), monkeypatch, "avx512")


def test_block_matmul_refuses_superblocks_that_do_not_widen_to_int8(monkeypatch):
    w = weights(128, 8, W4SB)
    w.multipliers[:] = 15
    w.codes[0, 0], w.zero_points[0, 0] = 7, -8  # 15 * (7 + 8) = 225
    with pytest.raises(Exception, match="outside int8"):
        session(matmul_model(w, 2, x_int8=False, act_block=32), monkeypatch, "avx512")


@pytest.mark.parametrize("shape_a, n, block", [((2, 3, 7, 32), 9, 32), ((1, 2, 33, 64), 17, 32)])
def test_block_batch_matmul_is_bit_exact_on_every_isa(shape_a, n, block, isas, monkeypatch):
    rng = np.random.default_rng(3)
    a, a_s = block_quantize(rng.standard_normal(shape_a).astype(np.float32), block)
    b, b_s = block_quantize(
        3 * rng.standard_normal((*shape_a[:-2], n, shape_a[-1])).astype(np.float32), block
    )
    mul = np.float32(0.4204482)
    ref = block_batch_matmul(a, a_s, b, b_s, block_size=block, y_multiplier=mul, out_block_size=32)
    layouts = [(False, False)]
    if len(shape_a) == 4:  # token-major operands: [b, rows, h, K] (the heads transposes fused)
        layouts += [(True, False), (False, True), (True, True)]
    for a_t, b_t in layouts:
        feeds = {"a": a, "a_s": a_s, "b": b, "b_s": b_s}
        for key, flag in (("a", a_t), ("a_s", a_t), ("b", b_t), ("b_s", b_t)):
            if flag:
                feeds[key] = np.ascontiguousarray(feeds[key].transpose(0, 2, 1, 3))
        kw = {"a_transposed": a_t, "b_transposed": b_t}
        again = block_batch_matmul(
            *feeds.values(), block_size=block, y_multiplier=mul, out_block_size=32, **kw
        )
        for key in ref:
            np.testing.assert_array_equal(again[key], ref[key])
        model = batch_model(block, int(a_t), int(b_t), mul)
        for isa in isas:
            out = run(model, monkeypatch, isa, feeds)
            for key in ("y", "y_q", "y_scale"):
                np.testing.assert_array_equal(out[key], ref[key], err_msg=f"{isa} {key} {kw}")


def batch_model(block: int, a_t: int, b_t: int, mul: np.float32) -> onnx.ModelProto:
    node = helper.make_node(
        "BlockBatchMatMul", ["a", "a_s", "b", "b_s", "mul"], ["y", "y_q", "y_scale"],
        domain="bctonnx", block_size=block, out_block_size=32, a_transposed=a_t, b_transposed=b_t,
    )  # fmt: skip
    graph = helper.make_graph(
        [node], "scores",
        [helper.make_tensor_value_info(k, t, None) for k, t in
         (("a", TensorProto.INT8), ("a_s", TensorProto.FLOAT), ("b", TensorProto.INT8),
          ("b_s", TensorProto.FLOAT))],
        [helper.make_tensor_value_info(k, t, None) for k, t in
         (("y", TensorProto.FLOAT), ("y_q", TensorProto.INT8), ("y_scale", TensorProto.FLOAT))],
        [helper.make_tensor("mul", TensorProto.FLOAT, [], [float(mul)])],
    )  # fmt: skip
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("bctonnx", 1)]
    )
    model.ir_version = 10
    return model


def test_isa_request_is_capped_and_checked():
    lib = ctypes.CDLL(require_library())
    best = lib.bctonnx_block_matmul_isa(b"")
    assert lib.bctonnx_block_matmul_isa(b"scalar") == 0
    assert lib.bctonnx_block_matmul_isa(b"amx") == best  # never above what the CPU has
    assert lib.bctonnx_block_matmul_isa(b"avx512") == min(best, 2)
    assert lib.bctonnx_block_matmul_isa(b"sse9") == -1


# ------------------------------------------------------------------------------------------
# The pass (tiny BERT, block size 16)


def _compress(
    tiny_bert_onnx, preset: str, lower_matmul: bool = True, fuse_attention: bool = True
) -> onnx.ModelProto:
    """The integer form at blocks of 16, optionally without LowerMatMul or FuseAttention."""
    from bctonnx.passes.fuse_attention import FuseAttention
    from bctonnx.passes.lower_matmul import LowerMatMul

    skipped = [
        p for p, on in ((LowerMatMul, lower_matmul), (FuseAttention, fuse_attention)) if not on
    ]
    with pytest.MonkeyPatch.context() as mp:
        for cls in skipped:
            mp.setattr(cls, "call", lambda self, model: ir.passes.PassResult(model, modified=False))
        return bctonnx.compress(tiny_bert_onnx, preset=preset, block_size=16, mode="integer")


def _run_model(model: onnx.ModelProto, seq: int) -> np.ndarray:
    require_library()
    sess = ort.InferenceSession(
        model.SerializeToString(),
        bctonnx.session_options(threads=1),
        providers=["CPUExecutionProvider"],
    )
    feeds = tiny_feeds(seq=seq, input_names=[i.name for i in sess.get_inputs()])
    return sess.run(["last_hidden_state"], feeds)[0]


@pytest.mark.parametrize("preset", ["w8a8", "w4a8"])
def test_lower_matmul_makes_every_linear_layer_integer(tiny_bert_onnx, preset):
    model = _compress(tiny_bert_onnx, preset, fuse_attention=False)  # (fused: test_block_attention)
    ops = Counter((n.domain, n.op_type) for n in model.graph.node)
    assert ops[("bctonnx", "BlockMatMul")] == 12  # 2 layers x (Q, K, V, out, FFN1, FFN2)
    assert ops[("bctonnx", "BlockBatchMatMul")] == 2  # attention scores
    assert ops[("bctonnx", "AttentionPV")] == 2  # attention context P.V
    assert ops[("", "MatMul")] == 0  # no float matmul left
    assert ops[("", "Transpose")] == 0  # the heads' transposes are read token-major in the ops
    for node in model.graph.node:
        if node.op_type == "BlockBatchMatMul":
            attrs = {a.name: a.i for a in node.attribute}
            assert attrs["a_transposed"] == 1 and attrs["b_transposed"] == 1, attrs
    for node in model.graph.node:  # the heads' Transposes (0, 2, 1, 3) are fused into P.V
        if node.op_type == "AttentionPV":
            attrs = {a.name: a.i for a in node.attribute}
            assert attrs["transpose_output"] == 1 and attrs["v_transposed"] == 1, attrs
            assert attrs["p_exponent"] == -8, attrs
    softmax_out = {n.output[0] for n in model.graph.node if n.op_type == "IntSoftmax"}
    readers = {n.op_type for n in model.graph.node if softmax_out & set(n.input)}
    assert readers == {"AttentionPV"}  # the probabilities stay uint8 codes
    # no weight is dequantized to float any more
    assert not [
        n for n in model.graph.node
        if n.op_type == "DequantizeLinear" and any(".bct_codes" in i for i in n.input)
    ]  # fmt: skip
    # what is still dequantized (embedding sums, the output) is dequantized by the library,
    # and a Shape never keeps a dequantization alive
    producers = {o: n for n in model.graph.node for o in n.output}
    for node in model.graph.node:
        if node.op_type == "DequantizeLinear":  # only int4 / zero-point embedding rows are left
            assert producers[node.input[0]].domain == "", node.name
            assert preset == "w4a8", node.name
        if node.op_type == "Shape" and node.input[0] in producers:
            assert producers[node.input[0]].op_type not in ("BlockDequantize", "DequantizeLinear")
    assert ops[("bctonnx", "BlockDequantize")] >= 1
    # activation quantization now lives in the matmuls: only the embeddings' remain
    assert ops[("bctonnx", "BlockQuantize")] <= 5


@pytest.mark.parametrize("preset, min_cosine", [("w8a8", 0.99), ("w4a8", 0.98)])
def test_lower_matmul_stays_close_to_fp32(tiny_bert_onnx, fp32_reference, preset, min_cosine):
    model = _compress(tiny_bert_onnx, preset)
    for seq in (7, 19):  # 19: partial blocks on the sequence axis
        out = _run_model(model, seq)
        assert cosine(out, fp32_reference(seq)) > min_cosine


@pytest.mark.parametrize("preset", ["w8a8", "w4a8"])
def test_lower_matmul_equals_the_integer_form_without_it(tiny_bert_onnx, preset):
    """The pass changes how, not what: same BCT semantics up to float summation order."""
    with_pass = _run_model(_compress(tiny_bert_onnx, preset), 19)
    without = _run_model(_compress(tiny_bert_onnx, preset, lower_matmul=False), 19)
    assert cosine(with_pass, without) > 0.9999


@pytest.mark.parametrize("match", [True, False])
def test_match_weight_blocks_reblocks_the_linear_inputs(tiny_bert_onnx, fp32_reference, match):
    """Weights in blocks of 32, activations in blocks of 16: with match_weight_blocks every
    BlockMatMul reads 32-blocks: the LN outputs through one BlockRequantize each (Q, K and V
    share one), the GELU output made in 32-blocks by IntGelu itself, the attention context
    (float) quantized by the kernel; without it, nothing changes."""
    model = bctonnx.compress(
        tiny_bert_onnx,
        preset="w8a8",
        block_size=16,
        weight_block_size=32,
        mode="integer",
        match_weight_blocks=match,
    )
    ops = Counter(n.op_type for n in model.graph.node)
    assert ops["BlockMatMul"] == 12
    acts = {
        a.i
        for n in model.graph.node
        if n.op_type == "BlockMatMul"
        for a in n.attribute
        if a.name == "act_block_size"
    }
    assert acts == ({32} if match else {16})
    # per layer: LN output (Q, K, V), second LN output (FFN1)
    assert ops["BlockRequantize"] == (4 if match else 0)
    gelu_out = [
        {a.name: a.i for a in n.attribute}.get("out_block_size", 0)
        for n in model.graph.node
        if n.op_type == "IntGelu"
    ]
    assert gelu_out == ([32, 32] if match else [0, 0])
    for node in model.graph.node:
        if node.op_type == "BlockRequantize":
            attrs = {a.name: a.i for a in node.attribute}
            assert attrs == {"in_block_size": 16, "block_size": 32, "bits": 8}
    for seq in (7, 19):
        assert cosine(_run_model(model, seq), fp32_reference(seq)) > 0.99


def test_lower_matmul_keeps_weights_compressed_in_the_file(tiny_bert_onnx):
    with_pass = _compress(tiny_bert_onnx, "w4a8")
    without = _compress(tiny_bert_onnx, "w4a8", lower_matmul=False)
    assert with_pass.ByteSize() <= without.ByteSize()
    codes = [t for t in with_pass.graph.initializer if t.name.endswith(".bmm_codes")]
    assert codes and all(t.data_type == TensorProto.INT4 for t in codes)


def test_lower_matmul_leaves_float_scale_weights_alone(tiny_bert_onnx, caplog):
    with caplog.at_level(logging.DEBUG, logger="bctonnx.passes.lower_matmul"):
        model = bctonnx.compress(
            tiny_bert_onnx, preset="w8a8", block_size=16, mode="integer", scale_kind="float"
        )
    ops = Counter(n.op_type for n in model.graph.node)
    assert ops["BlockMatMul"] == 0 and ops["MatMul"] >= 12
    assert any("not pow2" in r.getMessage() for r in caplog.records)


def test_w4a8_linear_layers_run_superblocks_read_in_their_blocks(tiny_bert_onnx, fp32_reference):
    """w4a8 integer: every BlockMatMul gets its weights' multipliers (input 10, UINT4) and the
    superblock that fits its K (384 does not divide the tiny model's 64 or 128: gcd), and
    match_weight_blocks re-blocks its input to that superblock (at most 128)."""
    model = _compress(tiny_bert_onnx, "w4a8")
    inits = {t.name: t for t in model.graph.initializer}
    seen = Counter()
    for node in model.graph.node:
        if node.op_type != "BlockMatMul":
            continue
        attrs = {a.name: a.i for a in node.attribute}
        k = inits[node.input[2]].dims[0]
        assert attrs["superblock"] == math.gcd(k, 384), node.name
        assert attrs["act_block_size"] == min(attrs["superblock"], 128), node.name
        assert len(node.input) == 11 and inits[node.input[10]].data_type == TensorProto.UINT4
        assert list(inits[node.input[10]].dims) == [
            k // 16,
            inits[node.input[2]].dims[1],
        ]  # blocks of 16
        seen[attrs["superblock"]] += 1
    assert seen == {64: 10, 128: 2}  # hidden 64 (Q, K, V, out, FFN1), FFN 128 (FFN2)
    for seq in (7, 19):
        assert cosine(_run_model(model, seq), fp32_reference(seq)) > 0.98


@pytest.mark.parametrize("x_int8", [False, True], ids=["float-x", "int8-x"])
def test_segments_far_below_their_block_are_requantized_exactly_as_the_reference(
    x_int8, isas, monkeypatch
):
    """ref_matmul.py step 2: a segment of 32 more than S = 9 binades below the largest of its
    weight block of 128 is re-quantized to the block's exponent E before the integer sums are
    combined. Every path must do the same (the AVX-512 assembly tile included), and the
    result stays within the quantization error of the dequantized product."""
    k, n = 384, 100
    w = weights(k, n, W8)
    x = activations((2, 9, k))
    x[..., 32:64] *= 2.0**-12  # segment 1 of block 0: ~12 binades below segment 0's outlier
    x[..., 200:224] *= 2.0**-20  # part of a segment in block 1
    x[0, 0, 256:288] = 0.0  # an all-zero segment
    qx, sx = block_quantize(x, 32)
    e = np.log2(sx).astype(int)
    assert (e[..., 1] < e[..., 0] - 9).all()  # the case under test occurs
    kw = dict(block_size=128, frac_bits=3, act_block_size=32, out_block_size=32)
    ref = (
        block_matmul(qx, w.codes, w.scale_codes, x_scale=sx, **kw)
        if x_int8
        else (block_matmul(x, w.codes, w.scale_codes, **kw))
    )
    exact = (qx.astype(np.float64) * np.repeat(sx, 32, -1)) @ w.dequantize().astype(np.float64)
    # re-quantizing a segment moves each of its codes by at most half a step of 2^E
    assert np.abs(ref["y"] - exact).max() <= 1e-4 * np.abs(exact).max()
    model = matmul_model(w, 3, x_int8=x_int8, act_block=32, out_block=32)
    model.graph.node[0].output[3] = ""  # no segment sums: the fast tiles
    del model.graph.output[3]
    feeds = {"x": qx, "x_scale": sx} if x_int8 else {"x": x}
    for isa in isas:
        out = run(model, monkeypatch, isa, feeds)
        np.testing.assert_array_equal(out["y"], ref["y"], err_msg=isa)
        np.testing.assert_array_equal(out["y_q"], ref["y_q"], err_msg=isa)

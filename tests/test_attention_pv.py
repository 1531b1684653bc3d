"""AttentionPV (integer P.V): the kernel bit-exact with its numpy reference
(bctonnx/ops/ref_attention.py) on the AVX-512, AVX2 and portable paths, the reference within its
stated error bound of exact arithmetic, and bad inputs refused."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper
from test_matmul import available_isas, session

from bctonnx.ops.ref_attention import attention_pv

PV_ISAS = [isa for isa in ("scalar", "avx2", "avx512") if isa in available_isas()]


def pv_model(
    rank: int,
    block: int,
    segment: int = 32,
    p_exp: int = -8,
    transpose: bool = False,
    v_transposed: bool = False,
):
    dims = [f"d{i}" for i in range(rank - 2)]
    node = helper.make_node(
        "AttentionPV",
        ["p", "v", "v_scale"],
        ["y"],
        domain="bctonnx",
        block_size=block,
        segment=segment,
        p_exponent=p_exp,
        transpose_output=int(transpose),
        v_transposed=int(v_transposed),
    )
    graph = helper.make_graph(
        [node],
        "pv",
        [
            helper.make_tensor_value_info("p", TensorProto.UINT8, [*dims, "m", "s"]),
            helper.make_tensor_value_info("v", TensorProto.INT8, [*dims, "s", "d"]),
            helper.make_tensor_value_info("v_scale", TensorProto.FLOAT, [*dims, "s", "nb"]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
    )
    return helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("bctonnx", 1)],
        ir_version=10,
    )


def inputs(rng, lead, m, s, d, block, spread=6, p_kind="softmax", v_kind="random"):
    nb = -(-d // block)
    if p_kind == "softmax":  # rows like IntSoftmax's: non-negative, summing to ~256
        logits = rng.normal(0, 2, (*lead, m, s))
        prob = np.exp(logits - logits.max(-1, keepdims=True))
        p = np.clip(np.round(255 * prob / prob.sum(-1, keepdims=True)), 0, 255).astype(np.uint8)
    elif p_kind == "max":
        p = np.full((*lead, m, s), 255, np.uint8)
    else:
        p = np.zeros((*lead, m, s), np.uint8)
    if v_kind == "random":
        v = rng.integers(-128, 128, (*lead, s, d)).astype(np.int8)
    else:
        v = np.full((*lead, s, d), {"min": -128, "max": 127}[v_kind], np.int8)
    exps = rng.integers(-12 - spread, -12 + 1, (*lead, s, nb))
    return p, v, np.ldexp(np.float32(1), exps).astype(np.float32)


CASES = [
    # lead dims, M, S, D, block, segment
    ((1, 12), 128, 128, 32, 32, 32),  # MiniLM
    ((2, 3), 7, 33, 32, 32, 32),  # odd sequence, batch > 1
    ((1, 2), 1, 5, 64, 32, 32),  # M = 1, S shorter than a segment
    ((3,), 9, 40, 24, 8, 16),  # D not a multiple of 16, three V blocks
    ((2, 2), 5, 17, 16, 16, 2),  # smallest segment
    ((1, 1), 6, 300, 48, 16, 256),  # largest segment, two segments
    ((), 4, 64, 80, 16, 32),  # rank 2
]


@pytest.mark.parametrize(("lead", "m", "s", "d", "block", "seg"), CASES)
@pytest.mark.parametrize("spread", [0, 6, 14])  # 14: scales more than 2^8 apart in a segment
def test_attention_pv_is_bit_exact_on_every_path(lead, m, s, d, block, seg, spread, monkeypatch):
    rng = np.random.default_rng(hash((lead, m, s, d, block, seg, spread)) % 2**32)
    p, v, vs = inputs(rng, lead, m, s, d, block, spread)
    ref = attention_pv(p, v, vs, block_size=block, segment=seg)
    model = pv_model(len(lead) + 2, block, seg)
    for isa in PV_ISAS:
        out = session(model, monkeypatch, isa).run(None, {"p": p, "v": v, "v_scale": vs})[0]
        np.testing.assert_array_equal(out, ref, err_msg=isa)


@pytest.mark.parametrize("p_kind", ["max", "zeros"])
@pytest.mark.parametrize("v_kind", ["min", "max"])
def test_attention_pv_extremes_do_not_overflow(p_kind, v_kind, monkeypatch):
    # 256 tokens of p = 255 times w = -128 * 2^8: the int32 segment sum at its largest
    rng = np.random.default_rng(1)
    p, v, vs = inputs(rng, (1, 2), 3, 256, 32, 32, spread=0, p_kind=p_kind, v_kind=v_kind)
    ref = attention_pv(p, v, vs, block_size=32, segment=256)
    exact = np.einsum("...ms,...sd->...md", p.astype(np.float64), v * vs.astype(np.float64)) / 256
    np.testing.assert_allclose(ref, exact, rtol=1e-6)
    for isa in PV_ISAS:
        out = session(pv_model(4, 32, 256), monkeypatch, isa).run(
            None, {"p": p, "v": v, "v_scale": vs}
        )[0]
        np.testing.assert_array_equal(out, ref, err_msg=isa)


def test_attention_pv_transposed_output_is_the_fused_transpose(monkeypatch):
    rng = np.random.default_rng(2)
    p, v, vs = inputs(rng, (2, 3), 11, 37, 32, 32)
    ref = attention_pv(p, v, vs, block_size=32, transpose_output=True)
    assert ref.shape == (2, 11, 3, 32)
    np.testing.assert_array_equal(ref, attention_pv(p, v, vs, block_size=32).transpose(0, 2, 1, 3))
    for isa in PV_ISAS:
        out = session(pv_model(4, 32, transpose=True), monkeypatch, isa).run(
            None, {"p": p, "v": v, "v_scale": vs}
        )[0]
        np.testing.assert_array_equal(out, ref, err_msg=isa)


@pytest.mark.parametrize("transpose", [False, True])
def test_attention_pv_reads_token_major_v(transpose, monkeypatch):
    # v_transposed: v [b, S, h, D] (the heads' Transpose(0, 2, 1, 3) before P.V fused)
    rng = np.random.default_rng(4)
    p, v, vs = inputs(rng, (2, 3), 10, 45, 64, 32, spread=10)
    v_t, vs_t = np.ascontiguousarray(v.transpose(0, 2, 1, 3)), vs.transpose(0, 2, 1, 3).copy()
    want = attention_pv(p, v, vs, block_size=32, transpose_output=transpose)
    ref = attention_pv(p, v_t, vs_t, block_size=32, transpose_output=transpose, v_transposed=True)
    np.testing.assert_array_equal(ref, want)
    model = pv_model(4, 32, transpose=transpose, v_transposed=True)
    for isa in PV_ISAS:
        out = session(model, monkeypatch, isa).run(None, {"p": p, "v": v_t, "v_scale": vs_t})[0]
        np.testing.assert_array_equal(out, ref, err_msg=isa)


@pytest.mark.parametrize("spread", [0, 6, 20])
def test_attention_pv_reference_is_within_its_error_bound(spread):
    rng = np.random.default_rng(spread)
    lead, m, s, d, block, seg = (2, 4), 16, 100, 32, 32, 32
    p, v, vs = inputs(rng, lead, m, s, d, block, spread)
    y = attention_pv(p, v, vs, block_size=block, segment=seg).astype(np.float64)
    vf = v * vs.astype(np.float64)  # block = d: one scale per token
    exact = np.einsum("...ms,...sd->...md", p.astype(np.float64), vf) / 256
    # bound (module doc): per segment 1/2 * 2^r * sum_s p / 256, r = max exponent - 8,
    # zero when the segment's scales are within 2^8; plus float32 roundings
    e = np.log2(vs[..., 0])
    bound = np.zeros_like(exact)
    for start in range(0, s, seg):
        sl = slice(start, start + seg)
        r = e[..., sl].max(-1) - 8
        spans = e[..., sl].max(-1) - e[..., sl].min(-1)
        psum = p[..., sl].sum(-1) / 256
        bound += np.where(spans > 8, 0.5 * 2.0**r, 0)[..., None, None] * psum[..., None]
    bound += 4 * 2.0**-24 * np.abs(exact) + 2.0**-24 * np.abs(vf).max()
    assert np.all(np.abs(y - exact) <= bound)
    if spread <= 8:
        np.testing.assert_allclose(y, exact, rtol=1e-6, atol=1e-12)


def test_attention_pv_refuses_scales_that_are_not_powers_of_two(monkeypatch):
    rng = np.random.default_rng(3)
    p, v, vs = inputs(rng, (1, 2), 4, 8, 32, 32)
    vs[0, 1, 3, 0] = 0.3
    with pytest.raises(ValueError, match="not a power of two"):
        attention_pv(p, v, vs, block_size=32)
    sess = session(pv_model(4, 32), monkeypatch, PV_ISAS[-1])
    with pytest.raises(Exception, match="not a power of two"):
        sess.run(None, {"p": p, "v": v, "v_scale": vs})


def test_attention_pv_refuses_an_odd_segment(monkeypatch):
    with pytest.raises(ValueError, match="even segment"):
        attention_pv(np.zeros((2, 2), np.uint8), np.zeros((2, 2), np.int8),
                     np.ones((2, 1), np.float32), block_size=2, segment=3)  # fmt: skip
    with pytest.raises(Exception, match="segment must be even"):
        session(pv_model(2, 32, segment=3), monkeypatch, PV_ISAS[-1])

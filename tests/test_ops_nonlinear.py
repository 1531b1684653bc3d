"""IntGelu, IntSoftmax, IntLayerNorm: the C++ kernels bit-exact with their numpy references
(bctonnx/ops/ref_nonlinear.py, the specification), edge values, extreme exponents, and the
documented accuracy vs float GELU / softmax / LayerNorm.

Every kernel runs three times: the default (AVX-512 paths where the CPU has them), with
``BCTONNX_ISA=avx2`` (the AVX2 kernels; on an AVX-512 CPU the cap is what selects them) and
``simd=0`` (the portable scalar kernels), so every implementation is checked against the
reference.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from test_matmul import available_isas

from bctonnx import runtime
from bctonnx.blockformat import BlockFormat, quantize
from bctonnx.ops import ref_nonlinear as R

BLOCK_SIZES = (16, 32, 64, 128)
LENGTHS = (1, 7, 33, 127)
SIMD = (1, 0)
# The kernels: default, "avx2" (simd=1 with BCTONNX_ISA=avx2), portable
AVX2_SIMD = (1, "avx2", 0)


@pytest.fixture(scope="module")
def lib() -> str:
    path = runtime.op_library_path()
    if path is None:
        if os.environ.get("CI") == "true":
            pytest.fail("the op library is not built (CI must build it with pip install)")
        pytest.skip("the op library is not built here (pip install -e . builds it)")
    return path


# ------------------------------------------------------------------------------------------
# sessions (dynamic shapes: one session per op and attributes)


def _model(op: str, inputs: list[tuple[str, int]], outputs: list[tuple[str, int]], **attrs):
    node = helper.make_node(
        op, [n for n, _ in inputs], [n for n, _ in outputs], domain="bctonnx", **attrs
    )
    graph = helper.make_graph(
        [node],
        op,
        [helper.make_tensor_value_info(n, t, None) for n, t in inputs],
        [helper.make_tensor_value_info(n, t, None) for n, t in outputs],
    )
    return helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("bctonnx", 1)],
        ir_version=10,
    )


@contextlib.contextmanager
def _isa_cap(isa: str):
    """BCTONNX_ISA=isa while a session creates its kernels (they read it then); "": as is."""
    if not isa:
        yield
        return
    old = os.environ.get("BCTONNX_ISA")
    os.environ["BCTONNX_ISA"] = isa
    try:
        yield
    finally:
        if old is None:
            del os.environ["BCTONNX_ISA"]
        else:
            os.environ["BCTONNX_ISA"] = old


def _session(lib: str, op: str, threads: int = 1, **attrs) -> ort.InferenceSession:
    if attrs.get("simd") == "avx2":  # the AVX2 kernels: simd=1 with the ISA capped
        if "avx2" not in available_isas():
            pytest.skip("this CPU has no AVX2")
        return _capped_session(lib, op, threads, "avx2", **(attrs | {"simd": 1}))
    return _capped_session(lib, op, threads, "", **attrs)


@functools.cache
def _capped_session(lib: str, op: str, threads: int, isa: str, **attrs) -> ort.InferenceSession:
    """A session of one op whose kernels were created with BCTONNX_ISA=isa ("": no cap)."""
    with _isa_cap(isa):
        return _new_session(lib, op, threads, **attrs)


def _new_session(lib: str, op: str, threads: int, **attrs) -> ort.InferenceSession:
    f32, i8, u8 = TensorProto.FLOAT, TensorProto.INT8, TensorProto.UINT8
    if op == "IntGelu":
        m = _model(op, [("x", i8), ("s", f32)], [("y", i8), ("ys", f32)], **attrs)
    elif op == "IntSoftmax":
        mask = attrs.pop("with_mask")
        ins = [("x", i8), ("s", f32)] + ([("m", f32)] if mask else [])
        m = _model(op, ins, [("y", u8)], **attrs)
    else:
        ins = [("x", i8), ("s", f32), ("g", i8), ("gs", f32), ("b", i8), ("bs", f32)]
        m = _model(op, ins, [("y", i8), ("ys", f32)], **attrs)
    so = ort.SessionOptions()
    so.register_custom_ops_library(lib)
    so.intra_op_num_threads = threads
    so.log_severity_level = 3
    return ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])


def run_gelu(lib, x, s, b, simd=1, threads=1, out_block=0, approximate=None):
    attrs = {"out_block_size": out_block} if out_block else {}
    if approximate is not None:
        attrs["approximate"] = approximate
    sess = _session(lib, "IntGelu", threads, block_size=b, simd=simd, **attrs)
    return sess.run(None, {"x": x, "s": s})


def run_softmax(lib, x, s, b, mask=None, simd=1, threads=1):
    sess = _session(lib, "IntSoftmax", threads, block_size=b, simd=simd, with_mask=mask is not None)
    feeds = {"x": x, "s": s} | ({"m": mask} if mask is not None else {})
    return sess.run(None, feeds)[0]


def run_ln(lib, x, s, g, gs, bt, bs, b, eps, simd=1, threads=1):
    sess = _session(lib, "IntLayerNorm", threads, block_size=b, epsilon=float(eps), simd=simd)
    return sess.run(None, {"x": x, "s": s, "g": g, "gs": gs, "b": bt, "bs": bs})


def scales(e) -> np.ndarray:
    return R.exponent_scales(np.asarray(e))


def nblocks(d: int, b: int) -> int:
    return -(-d // b)


def random_case(rng, shape, b, e_lo=-20, e_hi=6):
    x = rng.integers(-128, 128, shape).astype(np.int8)
    e = rng.integers(e_lo, e_hi + 1, (*shape[:-1], nblocks(shape[-1], b)))
    return x, scales(e)


def edge_cases(rng, shape, b):
    """Codes all -128 / all 127 / zeros / one huge outlier block, exponents -20..+6."""
    nb = nblocks(shape[-1], b)
    out = []
    for fill in (-128, 127, 0):
        e = rng.integers(-20, 7, (*shape[:-1], nb))
        out.append((np.full(shape, fill, np.int8), scales(e)))
    x = rng.integers(-30, 31, shape).astype(np.int8)
    e = np.full((*shape[:-1], nb), -12)
    e[..., 0] = 6  # one block 18 exponents above the rest
    x[..., 0] = 127
    out.append((x, scales(e)))
    return out


def gamma_beta(rng, h, b, e_range=(-10, 2)):
    nb = nblocks(h, b)
    g = rng.integers(-127, 128, h).astype(np.int8)
    bt = rng.integers(-127, 128, h).astype(np.int8)
    return g, scales(rng.integers(*e_range, nb)), bt, scales(rng.integers(*e_range, nb))


def assert_same(got, want):
    for a, w in zip(got, want, strict=True):
        assert a.dtype == w.dtype and a.shape == w.shape
        bad = np.argwhere(a != w)
        assert bad.size == 0, (
            f"{len(bad)} mismatches, first at {bad[0]}: {a[tuple(bad[0])]} != {w[tuple(bad[0])]}"
        )


# ------------------------------------------------------------------------------------------
# reference building blocks


@pytest.mark.parametrize("approximate", R.GELU_APPROXIMATIONS)
def test_gelu_table_is_exact_rounding_and_its_clamps_are_exact(approximate):
    t = R.gelu_table(approximate)
    q = np.arange(-128, 128)
    k, c = math.sqrt(2 / math.pi), 0.044715
    assert np.array_equal(t[0], q * 2**15)  # e = GELU_E_LO: GELU(x) = x/2 to the unit
    assert np.array_equal(t[-1], np.maximum(q, 0) * 2**16)  # e = GELU_E_HI: max(x, 0)
    assert not np.array_equal(t[1], q * 2**15) and not np.array_equal(t[-2], t[-1])  # tight
    worst = 0.0
    for i, e in enumerate(range(R.GELU_E_LO, R.GELU_E_HI + 1)):
        for qq in range(-128, 128):
            x = math.ldexp(qq, e)
            if approximate == "tanh":
                exact = qq * 65536 * 0.5 * (1 + math.tanh(k * (x + c * x**3)))
            else:
                exact = qq * 65536 * 0.5 * (1 + math.erf(x / math.sqrt(2)))
            worst = max(worst, abs(t[i, qq + 128] - exact))
    assert worst <= 0.5 + 1e-6  # table = correctly rounded GELU in units of 2^(e-16)
    assert np.abs(t).max() < 2**23
    assert (t != R.gelu_table("none" if approximate == "tanh" else "tanh")).sum() > 1000


def test_exp2_polynomial_exhaustive():
    f = np.arange(65536)
    g = R.exp2_neg_q16(f)
    assert g.min() == 32768 and g.max() == 65535  # 16-bit unsigned
    rel = np.abs(g / (65536.0 * 2.0 ** (-f / 65536.0)) - 1)
    assert rel.max() <= 5.31e-5
    # every intermediate of the Horner scheme stays in [0, 2^16): 16 x 16-bit products
    c0, c1, c2, c3, c4 = R._EXP2_C
    acc = np.full(f.shape, c4)
    for c in (c3, c2, c1):
        acc = c - ((f * acc) >> 16)
        assert acc.min() >= 0 and acc.max() < 2**16


def test_softmax_tables_are_exact_and_constant_outside_their_range():
    """A[e][j] ~ 2^-(j 2^e log2 e), B[e][k] ~ 2^-(32 k 2^e log2 e) in Q15 for the clamped
    exponents; for every other exponent the same formula (exact Python ints) gives the edge
    table, so clamping changes no bit."""
    ta, tb = R.softmax_tables()
    assert ta.max() <= 32767 and tb.max() <= 32767 and ta.min() >= 0 and tb.min() >= 0
    e = np.arange(R.SOFTMAX_E_LO, R.SOFTMAX_E_HI + 1)[:, None]
    exact_a = 32768 * 2.0 ** (-np.arange(32) * 2.0**e * math.log2(math.e))
    exact_b = 32768 * 2.0 ** (-32 * np.arange(8) * 2.0**e * math.log2(math.e))
    assert np.all(np.abs(ta - exact_a) <= 1 + 6e-5 * exact_a)  # polynomial + rounding
    assert np.all(np.abs(tb - exact_b) <= 1 + 6e-5 * exact_b)

    def table(e_b):  # the formula at any exponent, with Python ints
        def q15(u):
            if u >= 16 * 65536:
                return 0
            g = int(R.exp2_neg_q16(np.int64(u & 0xFFFF)))
            return min(R._rne_int(g, (u >> 16) + 1), 32767)

        sh = 14 - e_b
        return (
            [q15(R._rne_int(j * R._LOG2E_Q30, sh)) for j in range(32)],
            [q15(R._rne_int(32 * k * R._LOG2E_Q30, sh)) for k in range(8)],
        )

    for e_b in (*range(-149, -26, 7), -27, 5, 6, 14, 40, 127):
        a, b = table(e_b)
        i = min(max(e_b, R.SOFTMAX_E_LO), R.SOFTMAX_E_HI) - R.SOFTMAX_E_LO
        assert a == list(ta[i]) and b == list(tb[i]), e_b
    for e_b in range(R.SOFTMAX_E_LO, R.SOFTMAX_E_HI + 1):  # and the tables are that formula
        a, b = table(e_b)
        assert a == list(ta[e_b - R.SOFTMAX_E_LO]) and b == list(tb[e_b - R.SOFTMAX_E_LO])


@pytest.mark.parametrize("g", [-140, -30, 0, 40])
def test_reblock_equals_blockformat_on_float32_values(g):
    rng = np.random.default_rng(g + 200)
    v = rng.integers(-(2**23), 2**23, (64, 4, 32))
    v[:, 1] >>= rng.integers(0, 23, (64, 1))  # small blocks too
    v[:, 2] = 0
    codes, e = R.reblock(v, np.full((64, 4), g))
    fmt = BlockFormat(bits=8, block_size=32, scale_kind="pow2")
    real = np.ldexp(v.astype(np.float64), g).astype(np.float32).reshape(64, 128)
    normal = np.abs(real).max() < 2.0**127 and (g >= -100)
    if normal:  # exactly representable values and normal scales: blockformat's encoding
        bq = quantize(real, fmt)
        assert np.array_equal(bq.codes.reshape(64, 4, 32), codes)
        assert np.array_equal(bq.scale_codes.astype(np.int64), e)
    assert codes.min() >= -127 and np.all(e[:, 2] == -128) and np.all(codes[:, 2] == 0)
    # the rule itself: smallest e with max|v| 2^g <= 127 * 2^e (when not clamped)
    m = np.abs(v).max(-1)
    ok = (e > -128) & (e < 127)
    assert np.all((m << 0)[ok] * 2.0 ** (g - e[ok]) <= 127)
    assert np.all(m[ok] * 2.0 ** (g - e[ok] + 1) > 127)


# ------------------------------------------------------------------------------------------
# bit-exactness: IntGelu


@pytest.mark.parametrize("simd", AVX2_SIMD)
@pytest.mark.parametrize("b", BLOCK_SIZES)
def test_gelu_bit_exact(lib, b, simd):
    rng = np.random.default_rng(b + 10 * AVX2_SIMD.index(simd))
    cases = [random_case(rng, (3, 2, d), b) for d in (*LENGTHS, 384)]
    cases += edge_cases(rng, (2, 3, 2 * b + 5), b)
    for x, s in cases:
        assert_same(run_gelu(lib, x, s, b, simd), R.int_gelu(x, s, b))
        tanh = R.int_gelu(x, s, b, approximate="tanh")
        assert_same(run_gelu(lib, x, s, b, simd, approximate="tanh"), tanh)


def test_gelu_approximate_attribute(lib):
    """ "none" is the default (erf); anything but "none" / "tanh" is refused at session load."""
    x = np.arange(-128, 128, dtype=np.int16).astype(np.int8).reshape(1, 256)
    s = np.full((1, 8), 2.0**-5, np.float32)  # x in [-4, 4): where the two forms differ most
    assert_same(run_gelu(lib, x, s, 32, approximate="none"), run_gelu(lib, x, s, 32))
    erf, tanh = R.int_gelu(x, s, 32), R.int_gelu(x, s, 32, approximate="tanh")
    assert not np.array_equal(erf[0], tanh[0])  # this input tells the two forms apart
    assert_same(run_gelu(lib, x, s, 32, approximate="tanh"), tanh)
    with pytest.raises(Exception, match="approximate"):
        run_gelu(lib, x, s, 32, approximate="sigmoid")
    with pytest.raises(ValueError, match="approximate"):
        R.int_gelu(x, s, 32, approximate="sigmoid")


@pytest.mark.parametrize("approximate", R.GELU_APPROXIMATIONS)
@pytest.mark.parametrize("simd", AVX2_SIMD)
def test_gelu_every_code_at_every_exponent(lib, simd, approximate):
    """All 256 codes at exponents -40..+8 (the table range and beyond, both clamps)."""
    codes = np.tile(np.arange(-128, 128, dtype=np.int16), (49, 1)).astype(np.int8)
    e = np.repeat(np.arange(-40, 9)[:, None], 2, axis=1)
    for perm in (np.arange(256), np.random.default_rng(1).permutation(256)):
        x = np.ascontiguousarray(codes[:, perm])
        want = R.int_gelu(x, scales(e), 128, approximate=approximate)
        assert_same(run_gelu(lib, x, scales(e), 128, simd, approximate=approximate), want)
    # one code per block: the exact table value decides the block's scale
    x = np.zeros((49 * 256, 16), np.int8)
    x[:, 3] = np.tile(np.arange(-128, 128), 49)
    e1 = np.repeat(np.arange(-40, 9), 256)[:, None]
    want = R.int_gelu(x, scales(e1), 16, approximate=approximate)
    assert_same(run_gelu(lib, x, scales(e1), 16, simd, approximate=approximate), want)


@pytest.mark.parametrize("simd", AVX2_SIMD)
@pytest.mark.parametrize("b, per", [(32, 4), (16, 2), (16, 8), (64, 3), (32, 1)])
def test_gelu_out_blocks_bit_exact(lib, b, per, simd):
    """out_block_size = per * block_size: several input blocks quantized together (partial
    last groups, exponents far apart inside a group, all-zero blocks, extreme exponents)."""
    rng = np.random.default_rng(b * per + AVX2_SIMD.index(simd))
    cases = [random_case(rng, (3, 2, d), b) for d in (*LENGTHS, 384, b * per * 2 + b + 3)]
    cases += edge_cases(rng, (2, 3, 2 * b * per + 5), b)
    x = rng.integers(-128, 128, (8, b * per * 2)).astype(np.int8)
    x[0, :b] = 0  # an all-zero block next to others
    x[1] = -128
    e = rng.integers(-149, 128, (8, 2 * per))
    e[2] = -149
    e[3] = 127
    e[4, ::2] = -40  # far apart inside one group
    cases.append((x, scales(e)))
    for x, s in cases:
        want = R.int_gelu(x, s, b, b * per)
        got = run_gelu(lib, x, s, b, simd, out_block=b * per)
        assert got[1].shape == x.shape[:-1] + (-(-x.shape[-1] // (b * per)),)
        assert_same(got, want)
    # per = 1 is the plain op; grouped exponents are the max of the blocks' own
    x, s = random_case(rng, (4, 256), b)
    assert_same(R.int_gelu(x, s, b, b), R.int_gelu(x, s, b))
    own = R.int_gelu(x, s, b)[1]
    grouped = R.int_gelu(x, s, b, b * per)[1]
    pad = -own.shape[-1] % per
    own = np.pad(own, [(0, 0), (0, pad)], constant_values=np.float32(2.0**-128))
    assert np.array_equal(grouped, own.reshape(4, -1, per).max(axis=-1))


def test_gelu_rejects_out_blocks_that_do_not_nest(lib):
    x, s = random_case(np.random.default_rng(0), (2, 64), 32)
    with pytest.raises(ValueError, match="multiple of block_size"):
        R.int_gelu(x, s, 32, 48)
    with pytest.raises(Exception, match="multiple of block_size"):
        run_gelu(lib, x, s, 32, out_block=48)


@pytest.mark.parametrize("simd", AVX2_SIMD)
def test_gelu_extreme_exponents(lib, simd):
    rng = np.random.default_rng(7)
    for e0 in (-149, -140, -128, -31, 4, 100, 127):
        x = rng.integers(-128, 128, (4, 64)).astype(np.int8)
        x[0] = -128
        x[1] = 127
        s = scales(np.full((4, 2), e0))
        y, ys = run_gelu(lib, x, s, 32, simd)
        assert_same((y, ys), R.int_gelu(x, s, 32))
        assert y.min() >= -127 and np.all(np.isfinite(ys))


@pytest.mark.parametrize("simd", (1, "avx2"))
def test_gelu_every_block_size(lib, simd):
    """Every block size the AVX2 kernel takes (multiples of 16 up to 4096: two blocks in one
    32-code step, one block over many steps) and a few it leaves to the portable kernel, on rows
    that end inside a block: random codes and exponents, an all-zero block next to others,
    blocks whose largest |GELU| is a negative code's (the exact scan), groups of two blocks."""
    rng = np.random.default_rng(13)
    for b in (*range(16, 4097, 16), 1, 5, 8, 24, 40, 100):
        for d in (2 * b + 17, 5, b):
            x, s = random_case(rng, (4, d), b, -12, 4)
            x[1, :b] = 0
            x[2] = rng.integers(-128, 2, d)  # negatives dominate (for e around 0)
            x[3, : min(d, 3)] = [127, -128, 16][: min(d, 3)]
            assert_same(run_gelu(lib, x, s, b, simd), R.int_gelu(x, s, b))
            want = R.int_gelu(x, s, b, 2 * b, approximate="tanh")
            assert_same(run_gelu(lib, x, s, b, simd, out_block=2 * b, approximate="tanh"), want)


# ------------------------------------------------------------------------------------------
# bit-exactness: IntSoftmax


def bert_mask(rng, batch, s, p=0.3):
    keep = rng.random((batch, 1, 1, s)) >= p
    return np.where(keep, np.float32(0), np.finfo(np.float32).min).astype(np.float32)


@pytest.mark.parametrize("simd", AVX2_SIMD)
@pytest.mark.parametrize("b", BLOCK_SIZES)
def test_softmax_bit_exact(lib, b, simd):
    rng = np.random.default_rng(100 + b + AVX2_SIMD.index(simd))
    for d in (*LENGTHS, 128, 300):
        x, s = random_case(rng, (2, 3, 4, d), b)
        assert_same([run_softmax(lib, x, s, b, simd=simd)], [R.int_softmax(x, s, b)])
        m = bert_mask(rng, 2, d)
        m[1, ..., :] = -10000.0  # second sequence fully masked
        assert_same([run_softmax(lib, x, s, b, m, simd)], [R.int_softmax(x, s, b, m)])
    for x, s in edge_cases(rng, (2, 3, 2 * b + 5), b):
        m = bert_mask(rng, 2, x.shape[-1])[:, 0, 0][:, None, :]  # [2, 1, D]
        assert_same([run_softmax(lib, x, s, b, simd=simd)], [R.int_softmax(x, s, b)])
        assert_same([run_softmax(lib, x, s, b, m, simd)], [R.int_softmax(x, s, b, m)])


@pytest.mark.parametrize("simd", AVX2_SIMD)
def test_softmax_mask_shapes(lib, simd):
    rng = np.random.default_rng(5)
    x, s = random_case(rng, (2, 3, 5, 70), 32, -8, 2)
    full = np.where(rng.random(x.shape) < 0.4, np.float32(-1e9), np.float32(0)).astype(np.float32)
    full[0, 0, 0] = -1e9  # a fully masked row inside a full-shape mask
    per_row = np.where(rng.random((2, 3, 5, 1)) < 0.3, np.float32(-1e4), np.float32(0))
    for m in (full, per_row.astype(np.float32), full[0, :, :1, :], np.zeros(70, np.float32)):
        want = R.int_softmax(x, s, 32, m)
        assert_same([run_softmax(lib, x, s, 32, m, simd)], [want])
    assert np.all(R.int_softmax(x, s, 32, full)[0, 0, 0] == 0)


def test_softmax_rejects_non_attention_masks(lib):
    x, s = random_case(np.random.default_rng(0), (1, 1, 2, 16), 16)
    m = np.zeros((1, 1, 1, 16), np.float32)
    m[..., 3] = -5.0  # an additive bias, not a mask
    with pytest.raises(ValueError, match="mask values"):
        R.int_softmax(x, s, 16, m)
    with pytest.raises(Exception, match="mask values"):
        run_softmax(lib, x, s, 16, m)
    m[..., 3] = np.nan  # NaN is not a mask value either (the vectorized mask reader too)
    with pytest.raises(Exception, match="mask values"):
        run_softmax(lib, x, s, 16, m)


@pytest.mark.parametrize("simd", AVX2_SIMD)
def test_softmax_extreme_exponents(lib, simd):
    """Tiny and huge scores (the saturated branch), mixed in one row, all codes."""
    rng = np.random.default_rng(9)
    for pair in ((-149, -149), (-149, -130), (4, 5), (20, 4), (127, 127), (127, -149), (0, -30)):
        x = rng.integers(-128, 128, (6, 64)).astype(np.int8)
        x[0] = -128
        x[1] = 127
        x[2, :3] = [127, 126, -128]
        e = np.tile(np.array(pair), (6, 1))
        for m in (None, bert_mask(rng, 1, 64)[0, 0]):
            y = run_softmax(lib, x, scales(e), 32, m, simd)
            assert_same([y], [R.int_softmax(x, scales(e), 32, m)])


@pytest.mark.parametrize("simd", (1, "avx2"))
def test_softmax_every_block_size(lib, simd):
    """Every block size the vector kernels take (multiples of 16 up to 4096: whole and split
    32-element steps, one block spanning many steps), and a few they leave to the portable
    kernel, on rows that end inside a block, with a mask."""
    rng = np.random.default_rng(11)
    for b in (*range(16, 4097, 16), 1, 5, 8, 24, 40, 100):
        for d in (2 * b + 17, 5, b):
            x, s = random_case(rng, (3, d), b)
            m = np.where(rng.random((3, d)) < 0.3, np.float32(-1e4), np.float32(0))
            m[1] = -1e4  # a fully masked row
            m[2, : min(d, 40)] = -1e4  # a masked first block (and more)
            got = [run_softmax(lib, x, s, b, simd=simd), run_softmax(lib, x, s, b, m, simd)]
            assert_same(got, [R.int_softmax(x, s, b), R.int_softmax(x, s, b, m)])


# ------------------------------------------------------------------------------------------
# bit-exactness: IntLayerNorm


@pytest.mark.parametrize("simd", AVX2_SIMD)
@pytest.mark.parametrize("b", BLOCK_SIZES)
def test_layernorm_bit_exact(lib, b, simd):
    rng = np.random.default_rng(300 + b + AVX2_SIMD.index(simd))
    for d in (*LENGTHS, 384):
        g, gs, bt, bs = gamma_beta(rng, d, b)
        x, s = random_case(rng, (2, 3, d), b)
        for eps in (0.0, 1e-12, 1e-5, 3.0):
            want = R.int_layernorm(x, s, g, gs, bt, bs, b, eps)
            assert_same(run_ln(lib, x, s, g, gs, bt, bs, b, eps, simd), want)
    for x, s in edge_cases(rng, (2, 3, 2 * b + 5), b):
        g, gs, bt, bs = gamma_beta(rng, x.shape[-1], b)
        for eps in (0.0, 1e-5):
            want = R.int_layernorm(x, s, g, gs, bt, bs, b, eps)
            assert_same(run_ln(lib, x, s, g, gs, bt, bs, b, eps, simd), want)


@pytest.mark.parametrize("simd", AVX2_SIMD)
@pytest.mark.parametrize("b", [16, 32, 48, 128])
def test_layernorm_bit_exact_over_row_tiles_and_both_sum_paths(lib, b, simd):
    """Rows whose block exponents span <= 14 (the vpmaddwd sums) and wider ones (the widening
    sums), mixed, over more rows than one tile of the AVX-512 kernel (64), odd H."""
    rng = np.random.default_rng(700 + b + AVX2_SIMD.index(simd))
    for d in (3 * b, 5 * b + 7, 384):
        g, gs, bt, bs = gamma_beta(rng, d, b)
        x, s = random_case(rng, (3, 50, d), b, -9, 5)  # span <= 14: the common path
        wide = rng.random((3, 50)) < 0.25
        e = np.log2(s).astype(np.int64)
        e[wide, 0] = 9  # these rows span > 14
        s = scales(e)
        for eps in (1e-12, 1e-5):
            want = R.int_layernorm(x, s, g, gs, bt, bs, b, eps)
            assert_same(run_ln(lib, x, s, g, gs, bt, bs, b, eps, simd), want)


@pytest.mark.parametrize("simd", AVX2_SIMD)
def test_layernorm_special_paths(lib, simd):
    """Constant rows (V = 0), blocks far below the grid window, beta far above gamma (z gamma
    rounded, and dropped beyond 30 bits), subnormal parameter scales (clamped output
    exponents), epsilon hitting the 2^100 cap, extreme input exponents."""
    rng = np.random.default_rng(11)
    h, b = 96, 32
    x = rng.integers(-128, 128, (8, h)).astype(np.int8)
    x[0] = 5  # constant row
    x[1] = -128
    e = rng.integers(-6, 0, (8, 3))
    e[2] = [6, -20, -40]  # blocks 26 and 46 exponents below the max
    e[3] = [-149, -149, -149]
    e[4] = [127, 127, 120]
    e[5] = [-149, 127, 0]
    s = scales(e)
    g, gs, bt, bs = gamma_beta(rng, h, b)
    params = [
        (g, gs, bt, bs),
        (g, scales([-30, -2, -60]), bt, scales([-2, 10, -30])),  # a1 > 0 and a1 > 30
        (g, scales([-149, -140, -149]), bt, scales([-149, -149, -135])),  # tiny outputs
        (np.zeros(h, np.int8), scales([-128] * 3), bt, bs),  # gamma all zero
        (g, scales([100, 110, 90]), bt, scales([80, 100, 110])),  # huge outputs: clamp at 127
    ]
    for pg, pgs, pb, pbs in params:
        for eps in (0.0, 1e-12, 1.0, 3e38):
            want = R.int_layernorm(x, s, pg, pgs, pb, pbs, b, eps)
            got = run_ln(lib, x, s, pg, pgs, pb, pbs, b, eps, simd)
            assert_same(got, want)
            assert got[0].min() >= -127


def test_layernorm_limits(lib):
    rng = np.random.default_rng(2)
    h = R.LAYERNORM_MAX_H
    x, s = random_case(rng, (2, h), 128, -10, 6)
    x[0, ::97] = 127  # spread: the exact value of X' alpha - beta stays in int32 (checked)
    g, gs, bt, bs = gamma_beta(rng, h, 128)
    want = R.int_layernorm(x, s, g, gs, bt, bs, 128, 1e-5)
    for simd in AVX2_SIMD:
        assert_same(run_ln(lib, x, s, g, gs, bt, bs, 128, 1e-5, simd), want)
    x, s = random_case(rng, (1, h + 1), 128)
    g, gs, bt, bs = gamma_beta(rng, h + 1, 128)
    with pytest.raises(ValueError, match="4096"):
        R.int_layernorm(x, s, g, gs, bt, bs, 128, 1e-5)
    with pytest.raises(Exception, match="4096"):
        run_ln(lib, x, s, g, gs, bt, bs, 128, 1e-5)


@pytest.mark.parametrize("simd", (1, "avx2"))
def test_layernorm_every_block_size(lib, simd):
    """Every block size the vector kernels take (multiples of 16 up to H's limit 4096; AVX-512
    up to 1024, AVX2 all) and a few they leave to the portable kernel, on rows that end inside
    a block, some with a block far below the grid window."""
    rng = np.random.default_rng(12)
    for b in (*range(16, 4097, 16), 1, 5, 8, 24, 40, 100):
        for d in {min(2 * b + 17, R.LAYERNORM_MAX_H), 5, b}:
            g, gs, bt, bs = gamma_beta(rng, d, b)
            x, s = random_case(rng, (3, d), b, -9, 5)
            if s.shape[-1] > 1:
                e = np.log2(s).astype(np.int64)
                e[2, -1] = -30  # more than 16 exponents below the max
                s = scales(e)
            want = R.int_layernorm(x, s, g, gs, bt, bs, b, 1e-5)
            assert_same(run_ln(lib, x, s, g, gs, bt, bs, b, 1e-5, simd), want)


def test_layernorm_modulo_arithmetic_matches_exact_integers():
    """The kernel computes X' alpha - beta modulo 2^32; the reference checks the bound. Here:
    near-constant rows (huge slopes) against exact Python-int arithmetic."""
    rng = np.random.default_rng(4)
    x = np.full((6, 64), 40, np.int8)
    x[:, 7] = 41
    x[1] = rng.integers(-128, 128, 64)
    s = scales(np.array([[0, -16]] * 6))
    g, gs, bt, bs = gamma_beta(rng, 64, 32)
    y, ys = R.int_layernorm(x, s, g, gs, bt, bs, 32, 0.0)  # raises if the bound were violated
    xf = x.astype(np.float64) * np.repeat(s, 32, -1)
    gf = g * np.repeat(gs, 32)
    bf = bt * np.repeat(bs, 32)
    ref = (xf - xf.mean(-1, keepdims=True)) / xf.std(-1, keepdims=True) * gf + bf
    lsb = np.repeat(ys, 32, -1).astype(np.float64)
    assert np.max(np.abs(y * lsb - ref) / lsb) <= 0.51


# ------------------------------------------------------------------------------------------
# threads and errors


def test_two_threads_give_the_same_bits(lib):
    rng = np.random.default_rng(8)
    x, s = random_case(rng, (4, 128, 384), 32, -6, 2)
    assert_same(run_gelu(lib, x, s, 32, threads=2), run_gelu(lib, x, s, 32))
    g, gs, bt, bs = gamma_beta(rng, 384, 32)
    assert_same(
        run_ln(lib, x, s, g, gs, bt, bs, 32, 1e-12, threads=2),
        run_ln(lib, x, s, g, gs, bt, bs, 32, 1e-12),
    )
    x, s = random_case(rng, (2, 12, 128, 128), 32, -6, 0)
    m = bert_mask(rng, 2, 128)
    assert_same([run_softmax(lib, x, s, 32, m, threads=2)], [run_softmax(lib, x, s, 32, m)])


def test_bad_scales_and_shapes_fail(lib):
    x = np.zeros((2, 32), np.int8)
    with pytest.raises(Exception, match="power of two"):
        run_gelu(lib, x, np.full((2, 1), 0.3, np.float32), 32)
    with pytest.raises(ValueError, match="power of two"):
        R.int_gelu(x, np.full((2, 1), 0.3, np.float32), 32)
    with pytest.raises(Exception, match="x_scale shape"):
        run_softmax(lib, x, np.ones((2, 2), np.float32), 32)
    with pytest.raises(ValueError, match="scale shape"):
        R.int_softmax(x, np.ones((2, 2), np.float32), 32)
    so = ort.SessionOptions()
    so.register_custom_ops_library(lib)
    m = _model(
        "IntGelu",
        [("x", TensorProto.INT8), ("s", TensorProto.FLOAT)],
        [("y", TensorProto.INT8), ("ys", TensorProto.FLOAT)],
    )
    with pytest.raises(Exception, match="block_size"):
        ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])


def test_empty_tensors(lib):
    x = np.zeros((0, 40), np.int8)
    s = np.ones((0, 2), np.float32)
    y, ys = run_gelu(lib, x, s, 32)
    assert y.shape == (0, 40) and ys.shape == (0, 2)
    assert run_softmax(lib, x, s, 32).shape == (0, 40)
    assert R.int_softmax(x, s, 32).shape == (0, 40)


# ------------------------------------------------------------------------------------------
# accuracy vs float ops (the documented bounds)


def dequant(q, s, b):
    return q.astype(np.float64) * np.repeat(s.astype(np.float64), b, -1)[..., : q.shape[-1]]


@pytest.mark.parametrize("approximate", R.GELU_APPROXIMATIONS)
@pytest.mark.parametrize("b", BLOCK_SIZES)
def test_gelu_accuracy(b, approximate):
    rng = np.random.default_rng(20 + b)
    x = rng.normal(0.0, 2.0, (64, 1536)).astype(np.float32)
    x[rng.random(x.shape) < 0.01] *= 20
    q, s = R.quantize_pow2(x, b)
    y, ys = R.int_gelu(q, s, b, approximate=approximate)
    xd = dequant(q, s, b)
    if approximate == "tanh":
        k = math.sqrt(2 / math.pi)
        ref = 0.5 * xd * (1 + np.tanh(k * (xd + 0.044715 * xd**3)))
    else:
        ref = np.array([0.5 * v * (1 + math.erf(v / math.sqrt(2))) for v in xd.ravel()])
        ref = ref.reshape(xd.shape)
    err_lsb = np.abs(dequant(y, ys, b) - ref) / np.repeat(ys.astype(np.float64), b, -1)
    bound = 0.5 + 2.0**-17 * np.repeat(s.astype(np.float64) / ys.astype(np.float64), b, -1)
    assert np.all(err_lsb <= bound + 1e-9)
    assert err_lsb.max() <= 0.5 + 1e-3 and err_lsb.mean() < 0.26


@pytest.mark.parametrize("b", BLOCK_SIZES)
def test_softmax_accuracy_and_row_sums(b):
    rng = np.random.default_rng(40 + b)
    rows, n = 5000, 128
    x = rng.normal(0.0, 3.0, (rows, n)).astype(np.float32)
    masked_keys = rng.integers(0, 65, rows)
    mask = np.where(np.arange(n)[None] >= n - masked_keys[:, None], np.float32(-1e4), np.float32(0))
    mask = mask.astype(np.float32)
    q, s = R.quantize_pow2(x, b)
    y = R.int_softmax(q, s, b, mask).astype(np.int64)
    z = np.where(mask < -1000, -np.inf, dequant(q, s, b))
    p = np.exp(z - z.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    err = np.abs(y - 256 * p)
    assert err[y < 255].max() <= 0.55 and err.max() < 1.0 and err.mean() < 0.1
    assert np.all(y[mask < -1000] == 0)
    unmasked = n - masked_keys
    dev = np.abs(y.sum(-1) - 256)
    assert np.all(dev <= 0.56 * unmasked + 1)  # hard bound
    assert dev.max() <= 16 and dev.mean() < 5  # measured: max 14, mean 4.2


@pytest.mark.parametrize("b", BLOCK_SIZES)
def test_layernorm_accuracy(b):
    rng = np.random.default_rng(60 + b)
    h = 384
    x = rng.normal(0.0, 1.0, (256, h)) + rng.normal(0.0, 0.3, h)
    x[:, rng.choice(h, 4, replace=False)] *= 20  # BERT's outlier channels
    gamma = 1 + 0.2 * rng.standard_normal(h)
    beta = 0.1 * rng.standard_normal(h)
    q, s = R.quantize_pow2(x, b)
    gq, gs = R.quantize_pow2(gamma, b)
    bq, bs = R.quantize_pow2(beta, b)
    for eps in (1e-12, 1e-5, 0.5):
        y, ys = R.int_layernorm(q, s, gq, gs, bq, bs, b, eps)
        xd = dequant(q, s, b)
        mu = xd.mean(-1, keepdims=True)
        var = ((xd - mu) ** 2).mean(-1, keepdims=True)
        ref = (xd - mu) / np.sqrt(var + float(np.float32(eps))) * dequant(gq, gs, b) + dequant(
            bq, bs, b
        )
        err_lsb = np.abs(dequant(y, ys, b) - ref) / np.repeat(ys.astype(np.float64), b, -1)
        assert err_lsb.max() <= 0.51 and err_lsb.mean() < 0.26


@pytest.mark.parametrize("b", [20, 24, 100])
def test_block_sizes_not_multiple_of_16(lib, b):
    """Other block sizes take the portable kernels (GELU keeps its vector path)."""
    rng = np.random.default_rng(b)
    x, s = random_case(rng, (3, 2 * b + 9), b)
    assert_same(run_gelu(lib, x, s, b), R.int_gelu(x, s, b))
    m = bert_mask(rng, 1, x.shape[-1])[0, 0]
    assert_same([run_softmax(lib, x, s, b, m)], [R.int_softmax(x, s, b, m)])
    g, gs, bt, bs = gamma_beta(rng, x.shape[-1], b)
    assert_same(
        run_ln(lib, x, s, g, gs, bt, bs, b, 1e-5), R.int_layernorm(x, s, g, gs, bt, bs, b, 1e-5)
    )


def _ln_with_constants(lib, g, gs, bt, bs, b, eps, simd):
    """An IntLayerNorm session with gamma/beta and their scales as initializers (the kernel
    reads, checks and converts them once, at session creation)."""
    f32, i8 = TensorProto.FLOAT, TensorProto.INT8
    node = helper.make_node(
        "IntLayerNorm",
        ["x", "s", "g", "gs", "b", "bs"],
        ["y", "ys"],
        domain="bctonnx",
        block_size=b,
        epsilon=eps,
        simd=simd,
    )
    inits = [
        numpy_helper.from_array(a, n) for a, n in ((g, "g"), (gs, "gs"), (bt, "b"), (bs, "bs"))
    ]
    graph = helper.make_graph(
        [node],
        "ln",
        [
            helper.make_tensor_value_info("x", i8, None),
            helper.make_tensor_value_info("s", f32, None),
        ],
        [
            helper.make_tensor_value_info("y", i8, None),
            helper.make_tensor_value_info("ys", f32, None),
        ],
        inits,
    )
    m = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("bctonnx", 1)],
        ir_version=10,
    )
    so = ort.SessionOptions()
    so.register_custom_ops_library(lib)
    so.log_severity_level = 3
    return ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("simd", SIMD)
@pytest.mark.parametrize("b", [16, 32, 128])
def test_layernorm_constant_gamma_beta_path(lib, b, simd):
    """Initializer gamma/beta (converted once per session) give the reference's bits; an x of
    another H is reported at run time, a gamma scale that is not a power of two or a gamma of
    another shape when the session is created."""
    rng = np.random.default_rng(800 + b + simd)
    d = 3 * b + 7
    g, gs, bt, bs = gamma_beta(rng, d, b)
    sess = _ln_with_constants(lib, g, gs, bt, bs, b, 1e-5, simd)
    for shape in ((2, 3, d), (70, d)):
        x, s = random_case(rng, shape, b)
        want = R.int_layernorm(x, s, g, gs, bt, bs, b, 1e-5)
        assert_same(sess.run(None, {"x": x, "s": s}), want)
    x, s = random_case(rng, (2, d - 1), b)
    with pytest.raises(Exception, match="gamma and beta must have H"):
        sess.run(None, {"x": x, "s": s})
    bad = gs.copy()
    bad[0] = 0.3
    with pytest.raises(Exception, match="gamma_scale / beta_scale: .*not a power of two"):
        _ln_with_constants(lib, g, bad, bt, bs, b, 1e-5, simd)
    with pytest.raises(Exception, match=r"gamma must have shape \[H\].*got \[1,"):
        _ln_with_constants(lib, g[None], gs, bt, bs, b, 1e-5, simd)  # a leading 1
    with pytest.raises(Exception, match=r"beta_scale must have shape \[ceil\(H / block_size\)\]"):
        _ln_with_constants(lib, g, gs, bt, bs[:-1], b, 1e-5, simd)
    x, s = random_case(rng, (2, d), b)
    with pytest.raises(ValueError, match="gamma and beta must have shape"):
        R.int_layernorm(x, s, g[None], gs, bt, bs, b, 1e-5)


def test_bctonnx_isa_caps_to_the_portable_kernels(lib, monkeypatch):
    rng = np.random.default_rng(12)
    x, s = random_case(rng, (4, 96), 32, -8, 2)
    want = R.int_softmax(x, s, 32)
    monkeypatch.setenv("BCTONNX_ISA", "scalar")  # read when the session creates the kernel
    assert_same([run_softmax(lib, x, s, 32, threads=3)], [want])
    monkeypatch.setenv("BCTONNX_ISA", "sse9")
    with pytest.raises(Exception, match="BCTONNX_ISA"):
        run_softmax(lib, x, s, 32, threads=4)

"""Property tests for bctonnx.blockformat, the one source of truth of the block format."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from onnx import numpy_helper

from bctonnx.blockformat import (
    BlockFormat,
    BlockSizeError,
    block_amax,
    decode_scales,
    dequantize,
    encode_scales,
    expand_blocks,
    fake_quantize,
    pack_int4,
    quantize,
    split_scale_codes,
    unpack_int4,
    widen_superblocks,
)

settings.register_profile(
    "bctonnx", max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile("bctonnx")

# (scale_kind, scale_dtype, frac_bits): every kind of scale the format has
SCALE_KINDS = [
    ("float", "float32", 0),
    ("float", "float16", 0),
    ("pow2", "float32", 0),
    ("pow2", "float32", 3),
]
SCALE_IDS = ["fp32", "fp16", "pow2", "pow2_frac3"]


def make_fmt(kind, bits: int, block_size: int, axis: int = -1) -> BlockFormat:
    scale_kind, scale_dtype, frac_bits = kind
    return BlockFormat(
        bits=bits,
        block_size=block_size,
        axis=axis,
        scale_kind=scale_kind,
        scale_dtype=scale_dtype,
        frac_bits=frac_bits,
    )


def smallest_scale(fmt: BlockFormat) -> float:
    if fmt.scale_kind == "pow2":
        return float(2.0 ** (-128 / 2**fmt.frac_bits))
    return 2.0**-126 if fmt.scale_dtype == "float32" else 2.0**-24


@st.composite
def tensor_and_format(draw, kinds=SCALE_KINDS, partial: bool = False, min_exp: int = -40):
    """A float32 tensor (1..3 dims), a block format cutting one of its axes, and the axis.

    Without ``partial`` the block size divides the axis. Magnitudes stay within what every
    scale kind can represent at every bit width (fp16 scales need max|x|/qmax <= 65504).
    """
    kind = draw(st.sampled_from(kinds))
    bits = draw(st.integers(2, 8))
    shape = draw(hnp.array_shapes(min_dims=1, max_dims=3, min_side=1, max_side=12))
    axis = draw(st.integers(-len(shape), len(shape) - 1))
    size = shape[axis]
    if partial:
        block = draw(st.integers(1, 9))
    else:
        block = draw(st.sampled_from([d for d in range(1, size + 1) if size % d == 0]))
    base = draw(
        hnp.arrays(
            np.float32,
            shape,
            elements=st.floats(-1e4, 1e4, width=32, allow_nan=False, allow_infinity=False),
        )
    )
    exp = draw(st.integers(min_exp, 0))
    x = (base * np.float32(2.0**exp)).astype(np.float32)
    return x, make_fmt(kind, bits, block, axis)


def expanded_scales(q, size_axis_len: int) -> np.ndarray:
    fmt = q.fmt
    scales = decode_scales(q.scale_codes, fmt).astype(np.float64)
    scales = np.repeat(scales, fmt.block_size, axis=q.axis)
    return np.take(scales, np.arange(size_axis_len), axis=q.axis)


# --- error bound and code range --------------------------------------------------------------


@given(tensor_and_format())
def test_every_element_is_within_half_a_scale_of_its_block(case):
    x, fmt = case
    q = quantize(x, fmt)
    x_hat = q.dequantize().astype(np.float64)
    scales = expanded_scales(q, x.shape[fmt.axis])
    err = np.abs(x.astype(np.float64) - x_hat)
    # scale/2 exactly, plus the float32 rounding of x/scale and q*scale (a few ulps)
    assert np.all(err <= scales * (0.5 + 2e-5)), float(np.max(err / scales))


@given(tensor_and_format(partial=True))
def test_partial_last_block_keeps_the_error_bound(case):
    x, fmt = case
    q = quantize(x, fmt, allow_partial=True)
    x_hat = q.dequantize().astype(np.float64)
    scales = expanded_scales(q, x.shape[fmt.axis])
    assert x_hat.shape == x.shape
    assert np.all(np.abs(x.astype(np.float64) - x_hat) <= scales * (0.5 + 2e-5))


@given(tensor_and_format(partial=True))
def test_codes_stay_within_plus_minus_qmax_and_never_hit_the_negative_extreme(case):
    x, fmt = case
    q = quantize(x, fmt, allow_partial=True)
    assert q.codes.dtype == np.int8
    assert q.codes.shape == x.shape
    assert q.codes.min(initial=0) >= -fmt.qmax
    assert q.codes.max(initial=0) <= fmt.qmax
    assert not np.any(q.codes == -(2 ** (fmt.bits - 1)))


@pytest.mark.parametrize("kind", SCALE_KINDS, ids=SCALE_IDS)
@pytest.mark.parametrize("bits", range(2, 9))
def test_the_largest_element_maps_to_qmax(kind, bits):
    # amax/scale is within one scale step of qmax, so the max element gets +-qmax or close
    fmt = make_fmt(kind, bits, 4)
    x = np.array([[0.3, -7.25, 1.0, 2.0], [1e-3, 5.0, -0.5, 0.0]], np.float32)
    q = quantize(x, fmt)
    assert q.codes[0, 1] < 0 and q.codes[1, 1] > 0
    if fmt.scale_kind == "float":
        assert q.codes[0, 1] == -fmt.qmax and q.codes[1, 1] == fmt.qmax
    else:  # the pow2 grid puts max|x|/scale in (qmax * 2**(-1/2**f), qmax]
        low = fmt.qmax * 2 ** (-1 / 2**fmt.frac_bits)
        assert low - 0.5 <= -q.codes[0, 1] <= fmt.qmax


# --- rounding ----------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", SCALE_KINDS, ids=SCALE_IDS)
@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("exp", [-6, 0, 3])
def test_exact_ties_round_half_to_even(kind, bits, exp):
    qmax, step = 2 ** (bits - 1) - 1, 2.0**exp
    fmt = make_fmt(kind, bits, block_size=2 * qmax + 1)
    # first element pins max|x| = qmax * step, so every kind gets scale == step exactly
    ties = [n + 0.5 for n in range(-qmax, qmax)]
    values = [qmax] + ties
    x = (np.array(values, np.float64) * step).astype(np.float32)[None, :]
    q = quantize(x, fmt)
    assert decode_scales(q.scale_codes, fmt)[0, 0] == np.float32(step)
    expected = [qmax] + [n if n % 2 == 0 else n + 1 for n in range(-qmax, qmax)]
    assert q.codes[0].tolist() == expected


# --- round trip --------------------------------------------------------------------------------


@given(tensor_and_format(kinds=[SCALE_KINDS[0], SCALE_KINDS[2]], partial=True))
def test_requantizing_dequantized_values_gives_identical_codes(case):
    x, fmt = case
    q1 = quantize(x, fmt, allow_partial=True)
    q2 = quantize(q1.dequantize(), fmt, allow_partial=True)
    np.testing.assert_array_equal(q2.codes, q1.codes)
    # fp32: qmax * scale / qmax may come back one ulp off; the codes may not move
    np.testing.assert_allclose(q2.scales(), q1.scales(), rtol=2.5e-7, atol=0)


@given(tensor_and_format(kinds=[SCALE_KINDS[1]], partial=True, min_exp=0))
def test_requantizing_with_normal_fp16_scales_gives_identical_codes(case):
    x, fmt = case
    # blocks with fp16 scales in the normal range (>= 2**-14), where one fp16 step (2**-10
    # relative) is finer than 1/(2 qmax); subnormal-scale blocks: see the xfail below
    ideal = block_amax(x, fmt.axis, fmt.block_size, True) / np.float32(fmt.qmax)
    normal = expand_blocks(ideal >= 2.0**-14, fmt.axis, fmt.block_size, x.shape[fmt.axis])
    assume(normal.any())
    q1 = quantize(x, fmt, allow_partial=True)
    q2 = quantize(q1.dequantize(), fmt, allow_partial=True)
    np.testing.assert_array_equal(q2.codes[normal], q1.codes[normal])


def test_nbytes_counts_one_scale_per_block_with_partial_blocks():
    x = np.arange(1, 16, dtype=np.float32).reshape(3, 5)
    q = quantize(x, BlockFormat(bits=8, block_size=4), allow_partial=True)
    assert q.scale_codes.shape == (3, 2)
    assert q.nbytes == q.packed_codes().nbytes + q.scale_codes.nbytes  # 15 + 6*4 = 39


# --- dequantize ----------------------------------------------------------------------------------


@given(tensor_and_format(partial=True))
def test_dequantize_and_fake_quantize_are_codes_times_scales(case):
    x, fmt = case
    q = quantize(x, fmt, allow_partial=True)
    expected = q.codes.astype(np.float32) * expanded_scales(q, x.shape[fmt.axis]).astype(np.float32)
    np.testing.assert_array_equal(q.dequantize(), expected)
    np.testing.assert_array_equal(dequantize(q.codes, q.scale_codes, q.fmt), expected)
    np.testing.assert_array_equal(fake_quantize(x, fmt, allow_partial=True), expected)


# --- int4 packing ------------------------------------------------------------------------------


@given(
    hnp.arrays(
        np.int8, hnp.array_shapes(min_dims=1, max_dims=3, max_side=9), elements=st.integers(-8, 7)
    )
)
def test_int4_pack_unpack_round_trips(codes):
    packed = pack_int4(codes)
    assert packed.dtype == np.uint8 and packed.size == (codes.size + 1) // 2
    np.testing.assert_array_equal(unpack_int4(packed, codes.shape), codes)


@given(
    hnp.arrays(
        np.int8, st.tuples(st.integers(1, 7), st.integers(1, 9)), elements=st.integers(-8, 7)
    )
)
def test_int4_packing_is_onnx_int4_layout(codes):
    ref = onnx.helper.make_tensor(
        "t", onnx.TensorProto.INT4, codes.shape, codes.reshape(-1).tolist()
    )
    assert ref.raw_data == pack_int4(codes).tobytes() or (
        not ref.raw_data and bytes(np.array(ref.int32_data, np.uint8)) == pack_int4(codes).tobytes()
    )
    ours = onnx.TensorProto(name="t", data_type=onnx.TensorProto.INT4, dims=list(codes.shape))
    ours.raw_data = pack_int4(codes).tobytes()
    np.testing.assert_array_equal(numpy_helper.to_array(ours).astype(np.int8), codes)


def test_int4_packing_puts_the_first_element_in_the_low_nibble():
    assert pack_int4(np.array([1, -2], np.int8)).tolist() == [0x01 | (0x0E << 4)]
    assert pack_int4(np.array([7], np.int8)).tolist() == [0x07]  # odd count: high nibble 0


def test_int4_packing_refuses_codes_out_of_range():
    with pytest.raises(ValueError):
        pack_int4(np.array([8], np.int8))
    with pytest.raises(ValueError):
        pack_int4(np.array([-9], np.int8))


def test_codes_of_five_to_eight_bits_are_stored_one_per_byte():
    x = np.linspace(-1, 1, 64, dtype=np.float32).reshape(2, 32)
    for bits, packed in ((2, True), (4, True), (5, False), (8, False)):
        q = quantize(x, BlockFormat(bits=bits, block_size=16))
        assert q.fmt.packed is packed
        assert q.packed_codes().nbytes == (32 if packed else 64)


# --- block sizes -------------------------------------------------------------------------------


def test_block_size_that_does_not_divide_the_axis_raises():
    x = np.ones((4, 10), np.float32)
    with pytest.raises(BlockSizeError, match="does not divide axis 1 of size 10"):
        quantize(x, BlockFormat(block_size=4))
    with pytest.raises(BlockSizeError):
        quantize(x, BlockFormat(block_size=4), amax=np.ones((4, 3), np.float32))
    with pytest.raises(BlockSizeError):
        fake_quantize(x, BlockFormat(block_size=3, axis=0))


def test_partial_last_block_has_ceil_scales_and_its_own_scale():
    x = np.zeros((2, 10), np.float32)
    x[:, :8] = 100.0
    x[:, 8:] = [1.0, -0.5]
    q = quantize(x, BlockFormat(bits=8, block_size=4), allow_partial=True)
    assert q.scale_codes.shape == (2, 3)
    np.testing.assert_allclose(q.scales()[:, 2], 1.0 / 127, rtol=1e-7)  # only its 2 elements count
    np.testing.assert_allclose(q.dequantize()[:, 8:], x[:, 8:], atol=0.5 / 127)


# --- scales ------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", SCALE_KINDS, ids=SCALE_IDS)
def test_zero_blocks_get_zero_codes_and_the_smallest_scale(kind):
    fmt = make_fmt(kind, 8, 4)
    x = np.zeros((3, 8), np.float32)
    x[0, 4:] = 1.0
    q = quantize(x, fmt)
    assert (q.codes[1:] == 0).all() and (q.codes[0, :4] == 0).all()
    assert q.scales()[1, 0] == pytest.approx(smallest_scale(fmt), rel=1e-6)


@pytest.mark.parametrize("frac_bits", [0, 3])
def test_pow2_scale_codes_are_int8_and_pure_pow2_is_exact(frac_bits):
    x = np.random.default_rng(0).standard_normal((4, 64)).astype(np.float32) * 3
    q = quantize(x, BlockFormat(bits=8, block_size=16, scale_kind="pow2", frac_bits=frac_bits))
    assert q.scale_codes.dtype == np.int8
    if frac_bits == 0:
        mantissa, _ = np.frexp(q.scales())
        assert (mantissa == 0.5).all()


@given(st.floats(1e-6, 1e6), st.sampled_from([0, 1, 3]))
def test_pow2_code_is_the_smallest_that_covers_amax(amax, frac_bits):
    fmt = BlockFormat(bits=8, block_size=1, scale_kind="pow2", frac_bits=frac_bits)
    code = encode_scales(np.array([amax], np.float32), fmt)
    ideal = np.float32(amax) / np.float32(127)
    assert decode_scales(code, fmt)[0] >= ideal
    if code[0] > -128:  # the smallest code covers every tinier block
        assert decode_scales(code - 1, fmt)[0] < ideal


@given(st.floats(1e-3, 6e6))
def test_fp16_scale_is_never_below_amax_over_qmax(amax):
    fmt = BlockFormat(bits=8, block_size=1, scale_dtype="float16")
    s = encode_scales(np.array([amax], np.float32), fmt)
    ideal = np.float32(amax) / np.float32(127)
    assert s.dtype == np.float16
    assert s.astype(np.float32)[0] >= ideal
    assert (
        np.nextafter(s, np.float16(0)).astype(np.float32)[0] < ideal
    )  # rounded up one step at most


def test_scale_dtypes_follow_the_format():
    x = np.ones((2, 8), np.float32)
    assert quantize(x, BlockFormat(block_size=4)).scale_codes.dtype == np.float32
    assert (
        quantize(x, BlockFormat(block_size=4, scale_dtype="float16")).scale_codes.dtype
        == np.float16
    )
    assert quantize(x, BlockFormat(block_size=4, scale_kind="pow2")).scale_codes.dtype == np.int8


# --- storage -------------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("kind", SCALE_KINDS, ids=SCALE_IDS)
def test_bytes_for_matches_stored_codes_and_scales(bits, kind):
    x = np.random.default_rng(1).standard_normal((6, 32)).astype(np.float32)
    fmt = make_fmt(kind, bits, 8)
    q = quantize(x, fmt)
    stored = q.packed_codes().nbytes + q.scale_codes.nbytes
    assert fmt.bytes_for(x.shape) == stored
    assert q.nbytes == stored


# --- MSE clipping --------------------------------------------------------------------------------


def test_mse_clipping_never_increases_a_blocks_squared_error():
    rng = np.random.default_rng(2)
    x = rng.standard_t(3, size=(64, 128)).astype(np.float32)  # heavy tails: clipping pays
    for fmt in (
        BlockFormat(bits=4, block_size=32),
        BlockFormat(bits=4, block_size=32, scale_kind="pow2", frac_bits=3),
    ):
        plain = ((fake_quantize(x, fmt) - x) ** 2).reshape(64, 4, 32).sum(-1)
        mse = (
            ((fake_quantize(x, BlockFormat(**{**fmt.to_dict(), "clip": "mse"})) - x) ** 2)
            .reshape(64, 4, 32)
            .sum(-1)
        )
        assert (mse <= plain * (1 + 1e-6)).all()
        assert mse.sum() < 0.97 * plain.sum()


# --- validation --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [
        {"bits": 1},
        {"bits": 9},
        {"block_size": 0},
        {"scale_kind": "log"},
        {"scale_dtype": "bfloat16"},
        {"frac_bits": 5},
    ],
)
def test_block_format_rejects_invalid_parameters(kwargs):
    with pytest.raises(ValueError):
        BlockFormat(**kwargs)


def test_quantizing_a_scalar_is_refused():
    with pytest.raises(ValueError):
        quantize(np.float32(1.0), BlockFormat())


# --- asymmetric blocks and 4-bit scale codes ---------------------------------------------------


@given(tensor_and_format(kinds=SCALE_KINDS[:1] + SCALE_KINDS[2:]))
def test_asymmetric_blocks_stay_within_one_step_and_keep_zero_exact(case):
    x, fmt = case
    fmt = BlockFormat(**{**fmt.to_dict(), "symmetric": False})
    q = quantize(x, fmt)
    assert q.zero_points is not None and q.zero_points.shape == q.scale_codes.shape
    assert q.codes.min(initial=0) >= fmt.qmin and q.codes.max(initial=0) <= fmt.qmax
    assert q.zero_points.min() >= fmt.qmin and q.zero_points.max() <= fmt.qmax
    scales = expanded_scales(q, x.shape[q.axis])
    x_hat = q.dequantize().astype(np.float64)
    # half a step inside the range; a full step where an end of the range is clamped
    assert np.all(np.abs(x_hat - x) <= scales * (1 + 1e-6))
    assert np.all(x_hat[x == 0] == 0)


def test_asymmetric_blocks_use_the_whole_code_range_for_one_sided_blocks():
    x = np.linspace(0, 1, 32, dtype=np.float32)[None]  # all >= 0: symmetric wastes the sign
    sym = BlockFormat(bits=4, block_size=32)
    asym = BlockFormat(bits=4, block_size=32, symmetric=False)
    q = quantize(x, asym)
    assert q.codes.min() == -8 and q.codes.max() == 7
    err_sym = np.abs(fake_quantize(x, sym) - x).max()
    assert np.abs(q.dequantize() - x).max() < 0.6 * err_sym


def test_asymmetric_mse_clipping_never_increases_a_blocks_squared_error():
    w = np.random.default_rng(3).standard_normal((4, 256)).astype(np.float32) ** 3
    plain = BlockFormat(bits=4, block_size=32, scale_kind="pow2", frac_bits=3, symmetric=False)
    mse = BlockFormat(**{**plain.to_dict(), "clip": "mse"})
    err = {
        f.clip: ((quantize(w, f).dequantize() - w) ** 2).reshape(4, 8, 32).sum(-1)
        for f in (plain, mse)
    }
    assert np.all(err["mse"] <= err["none"] * (1 + 1e-6))
    assert err["mse"].sum() < err["none"].sum()


def test_asymmetric_nbytes_counts_half_a_byte_per_int4_zero_point():
    x = np.random.default_rng(4).standard_normal((64, 6)).astype(np.float32)
    fmt = BlockFormat(bits=4, block_size=16, axis=0, scale_kind="pow2", symmetric=False)
    q = quantize(x, fmt)
    assert q.nbytes == 64 * 6 // 2 + 4 * 6 + 4 * 6 // 2 == fmt.bytes_for(x.shape)


def test_four_bit_scale_codes_stay_within_sixteen_steps_of_the_slice_maximum():
    rng = np.random.default_rng(5)
    w = rng.standard_normal((256, 8)).astype(np.float32)
    w[:32, 3] *= 1e-4  # one block far below the rest of its column
    fmt = BlockFormat(bits=4, block_size=32, axis=0, scale_kind="pow2", frac_bits=3, scale_bits=4)
    for f in (fmt, BlockFormat(**{**fmt.to_dict(), "symmetric": False, "clip": "mse"})):
        q = quantize(w, f)
        codes = q.scale_codes.astype(int)
        assert np.all(codes.max(axis=0) - codes.min(axis=0) <= 15)
        base, offsets = split_scale_codes(q.scale_codes, 0)
        assert base.shape == (1, 8) and offsets.max() <= 15
        np.testing.assert_array_equal(base.astype(int) + offsets, codes)
        assert q.nbytes == 256 * 8 // 2 + 8 * 8 // 2 + 8 + f.zero_point_bytes(64)
    # the floored block got a coarser grid but nothing was clipped
    q = quantize(w, fmt)
    scales = expanded_scales(q, 256)
    assert np.all(np.abs(q.dequantize() - w) <= scales / 2 * (1 + 1e-6))


def test_four_bit_scale_codes_need_pow2_scales():
    with pytest.raises(ValueError, match="pow2"):
        BlockFormat(bits=4, scale_bits=4)


# --- superblocks ---------------------------------------------------------------------------------

SB = BlockFormat(  # the w4a8 weights
    bits=4, block_size=32, axis=0, scale_kind="pow2", frac_bits=3, clip="mse", symmetric=False,
    superblock=128,
)  # fmt: skip


def superblock_weights(seed: int = 6) -> np.ndarray:
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((384, 12)).astype(np.float32) * 0.05
    w[:32, 0] *= 1e-3  # a block far below its superblock: multiplier 1
    w[32:64, 1] = np.abs(w[32:64, 1])  # one-sided blocks: |q - zp| up to 15
    w[64:96, 2] = -np.abs(w[64:96, 2]) * 10
    w[96:128, 3] = 0  # a zero block
    w[130, 4] = 3.0  # an outlier that sets its superblock's scale
    return w


@pytest.mark.parametrize("symmetric", [False, True])
def test_superblock_codes_widen_to_int8_exactly(symmetric):
    fmt = BlockFormat(**{**SB.to_dict(), "symmetric": symmetric})
    w = superblock_weights()
    q = quantize(w, fmt)
    assert q.scale_codes.shape == (3, 12) and q.multipliers.shape == (12, 12)
    assert q.multipliers.min() >= 1 and q.multipliers.max() <= 15
    assert (q.zero_points is None) == symmetric
    wide, codes = widen_superblocks(q)
    assert wide.dtype == np.int8 and codes is q.scale_codes
    m = expand_blocks(q.multipliers.astype(int), 0, 32, 384)
    zp = 0 if symmetric else expand_blocks(q.zero_points.astype(int), 0, 32, 384)
    np.testing.assert_array_equal(wide.astype(int), m * (q.codes.astype(int) - zp))
    # the widened form: one rounding of the exact product instead of two (1 ulp apart at most)
    f8 = BlockFormat(bits=8, block_size=128, axis=0, scale_kind="pow2", frac_bits=3)
    np.testing.assert_allclose(dequantize(wide, codes, f8), q.dequantize(), rtol=2**-23, atol=0)
    assert np.all(q.dequantize()[96:128, 3] == 0)


def test_superblock_multipliers_are_the_best_of_their_superblock_scale():
    """Every block's multiplier (with its centred zero point) has the least squared error of
    all multipliers whose widened codes fit int8, given its superblock's scale."""
    w = superblock_weights(7)
    q = quantize(w, SB)
    s0 = np.repeat(decode_scales(q.scale_codes, SB), 4, axis=0)  # [12, 12] per block
    blocks = w.reshape(12, 32, 12).transpose(0, 2, 1)  # [block, column, 32]
    err = ((q.dequantize() - w) ** 2).reshape(12, 32, 12).sum(1)
    for m in range(1, 16):
        s = (s0 * np.float32(m)).astype(np.float32)
        lo = np.minimum(blocks.min(-1), 0)
        hi = np.maximum(blocks.max(-1), 0)
        zp = np.clip(np.rint(np.float32(-0.5) - (hi + lo) / (2 * s)), -8, 7)
        codes = np.clip(np.rint(blocks / s[..., None]) + zp[..., None], -8, 7)
        d = (codes - zp[..., None]) * m
        fits = (d.max(-1) <= 127) & (d.min(-1) >= -128)
        e = (((codes - zp[..., None]) * s[..., None] - blocks) ** 2).sum(-1)
        assert np.all(err <= np.where(fits, e, np.inf) * (1 + 1e-5))


def test_superblocks_cost_at_most_two_percent_of_squared_error_against_free_block_codes():
    """(On MiniLM's weights they are 2.5% better. Here a search with one fixed top multiplier
    is 7% (8) or 110% (15) worse.)"""
    rng = np.random.default_rng(8)
    w = (rng.standard_normal((384, 64)) * rng.gamma(2.0, 0.02, (1, 64))).astype(np.float32)
    w *= rng.gamma(4.0, 0.25, (384, 1)).astype(np.float32)  # rows of different magnitude
    plain = BlockFormat(**{**SB.to_dict(), "superblock": 0, "scale_bits": 4})
    err = {f.superblock: ((quantize(w, f).dequantize() - w) ** 2).sum() for f in (plain, SB)}
    assert err[128] <= 1.02 * err[0]


@pytest.mark.parametrize(
    "size, superblock, fitted",
    [(1536, 384, 384), (384, 384, 384), (1024, 384, 128), (64, 384, 64), (96, 384, 96),
     (48, 384, 0), (32, 384, 0)],
)  # fmt: skip
def test_superblock_fits_each_axis(size, superblock, fitted):
    fmt = BlockFormat(**{**SB.to_dict(), "superblock": superblock})
    assert fmt.superblock_for(size) == fitted
    if size % 32 == 0:
        w = np.random.default_rng(9).standard_normal((size, 3)).astype(np.float32)
        q = quantize(w, fmt)
        assert q.fmt.superblock == fitted and (q.multipliers is None) == (fitted == 0)
        assert q.nbytes == q.fmt.bytes_for(w.shape)


def test_superblock_nbytes_counts_a_code_per_superblock_and_half_a_byte_per_block():
    w = superblock_weights()
    q = quantize(w, SB)
    codes, blocks = 384 * 12 // 2, 12 * 12
    assert q.nbytes == codes + 3 * 12 + blocks // 2 + blocks // 2 == SB.bytes_for(w.shape)
    s4 = BlockFormat(**{**SB.to_dict(), "scale_bits": 4})
    q4 = quantize(w, s4)
    codes4 = q4.scale_codes.astype(int)
    assert np.all(codes4.max(axis=0) - codes4.min(axis=0) <= 15)
    assert q4.nbytes == codes + (3 * 12 // 2 + 12) + blocks // 2 + blocks // 2


@pytest.mark.parametrize(
    "kwargs",
    [{"bits": 8}, {"scale_kind": "float"}, {"superblock": 32}, {"superblock": 48}],
)
def test_superblock_formats_reject_what_cannot_widen(kwargs):
    with pytest.raises(ValueError, match="superblock"):
        BlockFormat(**{**SB.to_dict(), **kwargs})


def test_superblocks_need_whole_superblocks():
    with pytest.raises(ValueError, match="stored tensors"):
        quantize(np.ones((4, 128), np.float32), BlockFormat(**{**SB.to_dict(), "axis": -1}),
                 allow_partial=True)  # fmt: skip


def test_superblocks_along_a_middle_axis_are_the_moved_tensor_quantized():
    w = np.random.default_rng(10).standard_normal((3, 256, 4)).astype(np.float32)
    q = quantize(w, BlockFormat(**{**SB.to_dict(), "axis": 1}))
    moved = quantize(np.ascontiguousarray(np.moveaxis(w, 1, 0)), SB)
    for a, b in ((q.codes, moved.codes), (q.multipliers, moved.multipliers)):
        np.testing.assert_array_equal(a, np.moveaxis(b, 0, 1))
    np.testing.assert_array_equal(q.scale_codes, np.moveaxis(moved.scale_codes, 0, 1))
    np.testing.assert_array_equal(q.dequantize(), np.moveaxis(moved.dequantize(), 0, 1))

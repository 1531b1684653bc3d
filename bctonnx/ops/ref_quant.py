"""numpy references of the quantization ops: the specification the C++ kernels match bit for bit.

Both ops work on blocks along the LAST axis (attribute ``block_size``; the last block may be
partial). A scale tensor has the input's shape with the last axis cut to ``ceil(D / B)``; every
scale is a float32 exact power of two ``2**e`` with ``e`` in ``[-128, 127]``: the pow2 block
format with ``frac_bits=0`` of `bctonnx.blockformat` (one signed byte per block).

``BlockQuantize(x: float32) -> (y: int8, y_scale: float32)``
    attributes ``block_size`` (int in 1..65536, required), ``bits`` (int in 2..8, default 8).

    Exactly ``blockformat.quantize(x, BlockFormat(bits, block_size, axis=-1,
    scale_kind="pow2", frac_bits=0), allow_partial=True)``, i.e. per block, with
    ``qmax = 2**(bits-1) - 1`` and ``amax = max |x|`` of the block:

    - Scale choice: ``e`` = the smallest integer in ``[-128, 127]`` with
      ``2**e >= fl32(amax / qmax)`` (the float32 quotient, round to nearest even). For every
      normal scale (``e >= -126``) this is the smallest ``e`` with ``amax <= qmax * 2**e``, so
      no element is clipped. A block of zeros gets ``e = -128`` (``2**-128``, a float32
      subnormal) and codes 0.
    - Codes: ``y = clamp(round_half_even(x / 2**e), -qmax, qmax)`` (one code per int8, the code
      ``-2**(bits-1)`` is never produced). ``x / 2**e`` is exact unless it is below 2**-126,
      where it rounds to 0 anyway.
    - ``y_scale = 2**e`` (float32).
    - NaN or infinity anywhere in ``x``: error (``ValueError`` here, a failed Run in the
      kernel). A block needing ``e > 127`` (``amax / qmax > 2**127``, only reachable with
      ``bits <= 3`` since float32 stops at ~2**128): error.
    - ``x`` must have rank >= 1; a zero-length last axis gives empty outputs.

``BlockDequantize(x: int8, x_scale: float32) -> y: float32``
    attribute ``block_size`` (int in 1..65536, required). ``y = x * x_scale`` per block, one
    float32 multiplication (rounded to nearest even; exact for the pow2 scales the ops above make,
    unless the product falls below 2**-126): DequantizeLinear of int8 codes with ``axis=-1``,
    ``block_size`` and no zero point, value for value.

``BlockRequantize(x: int32 | int8, x_scale: float32) -> (y: int8, y_scale: float32)``
    attributes ``in_block_size`` (int in 0..65536, required; 0: ``x_scale`` is one scale for the
    whole tensor, any shape with one element), ``block_size`` (1..65536, required: output blocks),
    ``bits`` (int in 2..8, default 8). Every ``x_scale`` must be an exact power of two
    ``2**e_in`` (``e_in`` in ``[-149, 127]``, subnormals included), else error.

    Semantics: BlockQuantize of the real values ``v * 2**e_in`` (no float rounding of the
    product), computed in integers only:

    - Scale choice: per output block, ``e`` = the smallest integer in ``[-128, 127]`` with
      ``fl32(A / qmax) <= 2**e`` for ``A = max |v| * 2**e_in`` over the block's elements (exact
      real value; with several input blocks inside one output block the max is over the
      elements with their own ``e_in``). ``fl32`` is one rounding to float32 (nearest even,
      subnormals included), which is what BlockQuantize does with ``amax / qmax``; in
      integers: with ``g = max(e - 24, -150)`` (half a float32 ulp just above ``2**e`` is
      ``2**g``, and a tie rounds to ``2**e``), ``A / qmax`` rounds to at most ``2**e`` iff
      ``max|v| * 2**(e_in - g) <= qmax * (2**(e - g) + 1)``. A block of zeros gets ``-128``.
      No ``e <= 127`` possible: error (``ValueError`` / failed Run).
    - Codes: ``y = clamp(round_half_even(v / 2**(e - e_in)), -qmax, qmax)`` with exact integer
      shifts (`shift_round_even`), ``y_scale = 2**e``.
    - Consequence: whenever every ``v * x_scale`` is exactly a float32 number,
      ``BlockRequantize(x, x_scale) == BlockQuantize(float32(v * x_scale))`` bit for bit
      (codes and scales). If it is not (``|v| > 2**24`` with low bits, or below float32's
      subnormal range), BlockRequantize still quantizes the exact value, which the float op
      cannot even receive.

    Integer bounds (the kernel computes in int64; nothing is ever computed in int32):
    ``|v| <= 2**31`` (int32 min). The scale test shifts ``max|v|`` left by at most 31 bits
    (``<= 2**62``) or ``qmax * (2**24 + 1) < 2**31`` left by at most 31 bits (``< 2**62``);
    larger shifts are decided without shifting (the answer is then known). For a nonzero
    ``v`` the chosen ``e`` is at least ``e_in - 7``, so the code shift ``n = e - e_in >= -7``
    and ``v << 7 <= 2**38``; right shifts of more than 62 bits give 0 (``|v| / 2**63 < 1/2``).
    Zeros are never shifted. Codes are clamped before the cast to int8.

Known discrepancy (not of these ops): with numpy 2.4 on AVX-512 machines, numpy's float32
``exp2(127)`` is one ulp above ``2**127``, so `blockformat.decode_scales` returns an inexact
scale for the pow2 code 127 (reachable only with ``bits <= 3`` and ``|x| > 2**126``); the kernels
use the exact ``2**127``. `block_quantize` below reports such a block as an error instead of
returning a wrong reference.
"""

from __future__ import annotations

import numpy as np

from bctonnx.blockformat import BlockFormat, decode_scales, expand_blocks
from bctonnx.blockformat import quantize as _bf_quantize

__all__ = [
    "MAX_BLOCK_SIZE",
    "block_dequantize",
    "block_quantize",
    "block_requantize",
    "check_attribute",
    "check_flag",
    "pow2_exponents",
    "shift_round_even",
    "pow2_format",
]


def pow2_format(block_size: int, bits: int = 8) -> BlockFormat:
    """The block format both ops use: pow2 scales, ``frac_bits=0``, blocks on the last axis."""
    return BlockFormat(bits=bits, block_size=block_size, axis=-1, scale_kind="pow2", frac_bits=0)


# The largest block size of any op (common.h kMaxBlockSize): block counts cannot overflow and the
# block GEMM's int32 sums stay exact (ref_matmul.combine_span >= 0). IntGelu / IntSoftmax /
# IntLayerNorm / BlockAttention take blocks of at most 4096.
MAX_BLOCK_SIZE = 65536


def check_attribute(op: str, name: str, value, lo: int, hi: int) -> int:
    """An int attribute in ``lo..hi``, or ValueError naming the op and the attribute (the kernel
    refuses the same value when the session is created)."""
    if isinstance(value, bool | np.bool_) or int(value) != value or not lo <= int(value) <= hi:
        raise ValueError(f"{op}: {name} must be in {lo}..{hi}, got {value!r}")
    return int(value)


def check_flag(op: str, name: str, value) -> bool:
    """A boolean attribute: 0 or 1 (False / True) and nothing else -- 7 is not "true"."""
    if isinstance(value, bool | np.bool_):
        return bool(value)
    if value not in (0, 1):
        raise ValueError(f"{op}: {name} must be 0 or 1, got {value!r}")
    return bool(value)


def _check_attrs(op: str, block_size: int, bits: int) -> None:
    check_attribute(op, "block_size", block_size, 1, MAX_BLOCK_SIZE)
    check_attribute(op, "bits", bits, 2, 8)


def block_quantize(x: np.ndarray, block_size: int, bits: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """Reference of ``bctonnx.BlockQuantize``: (int8 codes, float32 pow2 scales)."""
    _check_attrs("BlockQuantize", block_size, bits)
    x = np.asarray(x, dtype=np.float32)
    if x.ndim == 0:
        raise ValueError("BlockQuantize needs rank >= 1 (blocks run along the last axis)")
    if not np.all(np.isfinite(x)):
        raise ValueError("BlockQuantize: input contains NaN or infinity")
    fmt = pow2_format(block_size, bits)
    bq = _bf_quantize(x, fmt, allow_partial=True)
    if np.any(bq.scale_codes == 127) and decode_scales(np.int8(127), fmt) != np.float32(2.0**127):
        raise ValueError(
            "BlockQuantize reference: scale code 127 hit numpy's inexact float32 exp2(127) in "
            "blockformat.decode_scales; no exact reference for this block"
        )
    return bq.codes.astype(np.int8), bq.scales().astype(np.float32)


def block_dequantize(x: np.ndarray, x_scale: np.ndarray, block_size: int) -> np.ndarray:
    """Reference of ``bctonnx.BlockDequantize``: ``x * x_scale`` per block, float32."""
    _check_attrs("BlockDequantize", block_size, 8)
    x = np.asarray(x)
    if x.dtype != np.int8 or x.ndim < 1:
        raise ValueError("BlockDequantize: x must be int8 codes of rank >= 1")
    scale = np.asarray(x_scale, np.float32)
    if scale.shape != (*x.shape[:-1], -(-x.shape[-1] // block_size)):
        raise ValueError(f"BlockDequantize: x_scale shape {scale.shape} does not fit x {x.shape}")
    s = np.repeat(scale, block_size, axis=-1)[..., : x.shape[-1]]
    return (x.astype(np.float32) * s).astype(np.float32)


def block_gather(
    table: np.ndarray,
    scale_codes: np.ndarray,
    ids: np.ndarray,
    zero_points: np.ndarray | None = None,
    *,
    bits: int,
    block_size: int,
    frac_bits: int = 0,
) -> np.ndarray:
    """Reference of ``bctonnx.BlockGather``: rows of a block-quantized embedding table, looked
    up and dequantized (the integer form's embeddings; lower_qdq writes the same values as
    Gather + DequantizeLinear)::

        BlockGather(table: int8 [V, H] (bits 8) | uint8 [V, H / 2] (bits 4: two codes a byte,
                           low nibble first, two's complement nibbles:
                           blockformat.pack_int4_rows),
                    scale_codes: int8 [V, H / B] (pow2: scale = fl32(2^(code / 2^frac_bits)),
                           correctly rounded = blockformat.decode_scales),
                    ids: int64 or int32, any shape (negative: from the end, as Gather),
                    zero_points?: int8 [V, H / B] (bits 8) | uint8 [V, ceil(H / B / 2)]
                           (bits 4, pack_int4_rows))
            -> y: float [*ids.shape, H] = float32((q - zp) * scale), one rounding per element
        attributes: bits (4 or 8), block_size (B, divides H), frac_bits (0..4)
    """
    from bctonnx.blockformat import BlockFormat, decode_scales, unpack_int4

    op = "BlockGather"
    if bits not in (4, 8):
        raise ValueError(f"{op}: bits must be 4 or 8, got {bits}")
    check_attribute(op, "block_size", block_size, 1, MAX_BLOCK_SIZE)
    check_attribute(op, "frac_bits", frac_bits, 0, 4)
    table, scale_codes = np.asarray(table), np.asarray(scale_codes)
    want = np.uint8 if bits == 4 else np.int8
    if table.dtype != want or table.ndim != 2 or scale_codes.dtype != np.int8:
        raise ValueError(f"{op}: table must be {np.dtype(want)} [V, H], scale codes int8 [V, nb]")
    vocab = table.shape[0]
    hidden = table.shape[1] * (2 if bits == 4 else 1)
    if hidden % block_size or scale_codes.shape != (vocab, hidden // block_size):
        raise ValueError(
            f"{op}: block_size {block_size} must divide H = {hidden} and scale codes be "
            f"[V, H / B] = {(vocab, hidden // block_size)}, got {scale_codes.shape}"
        )
    nb = hidden // block_size
    ids = np.asarray(ids)
    if ids.dtype not in (np.int64, np.int32):
        raise ValueError(f"{op}: ids must be int64 or int32 (as Gather's indices)")
    if ids.size and (ids.min() < -vocab or ids.max() >= vocab):
        raise ValueError(f"{op}: an id is outside [-{vocab}, {vocab})")
    rows = np.where(ids < 0, ids + vocab, ids).reshape(-1)
    codes = table[rows]
    if bits == 4:
        codes = unpack_int4(codes, (rows.size, hidden))
    q = codes.astype(np.int32).reshape(rows.size, nb, block_size)
    if zero_points is not None:
        zp = np.asarray(zero_points)
        if bits == 4:
            if zp.dtype != np.uint8 or zp.shape != (vocab, -(-nb // 2)):
                raise ValueError(f"{op}: zero points must be uint8 [V, ceil(nb / 2)]")
            zp = unpack_int4(zp[rows], (rows.size, 2 * zp.shape[1]))[:, :nb]
        else:
            if zp.dtype != np.int8 or zp.shape != (vocab, nb):
                raise ValueError(f"{op}: zero points must be int8 [V, nb]")
            zp = zp[rows]
        q = q - zp.astype(np.int32)[:, :, None]
    fmt = BlockFormat(bits=8, block_size=block_size, scale_kind="pow2", frac_bits=frac_bits)
    scale = decode_scales(scale_codes[rows], fmt)[:, :, None]
    y = (q.astype(np.float32) * scale).astype(np.float32)
    return y.reshape(*ids.shape, hidden)


def pow2_exponents(scale: np.ndarray) -> np.ndarray:
    """Integer exponents of float32 exact powers of two (subnormals included); error otherwise."""
    s = np.asarray(scale, dtype=np.float32)
    mant, exp = np.frexp(s.astype(np.float64))  # exact: s = mant * 2**exp, mant in [0.5, 1)
    if not np.all(np.isfinite(s) & (s > 0) & (mant == 0.5)):
        bad = s[~(np.isfinite(s) & (s > 0) & (mant == 0.5))].reshape(-1)[0]
        raise ValueError(
            f"scale {bad!r} is not a power of two (integer ops need pow2 block scales)"
        )
    return (exp - 1).astype(np.int64)


def shift_round_even(v: np.ndarray, n: np.ndarray) -> np.ndarray:
    """round_half_even(v / 2**n) elementwise, exact in int64 (n < 0: left shift, |v| << -n
    must fit); n > 62 gives 0 (as common.h's ``shift_round_even``)."""
    v = np.asarray(v, dtype=np.int64)
    n = np.broadcast_to(np.asarray(n, dtype=np.int64), v.shape)
    left = np.left_shift(v, np.clip(-n, 0, 62))
    k = np.clip(n, 1, 62)
    q = np.right_shift(v, k)  # floor (arithmetic shift)
    r = v - np.left_shift(q, k)
    half = np.left_shift(np.int64(1), k - 1)
    up = (r > half) | ((r == half) & (q & 1 == 1))
    right = q + up
    return np.where(n <= 0, left, np.where(n > 62, 0, right)).astype(np.int64)


def _bit_length(m: np.ndarray) -> np.ndarray:
    """Bit length of positive int64 values below 2**53 (exact via frexp)."""
    return np.frexp(m.astype(np.float64))[1].astype(np.int64)


def _fits_float32_rule(m: np.ndarray, e_in: np.ndarray, e: np.ndarray, qmax: int) -> np.ndarray:
    """fl32(m * 2**e_in / qmax) <= 2**e, for 1 <= m <= 2**31 and e in [-128, 127]."""
    g = np.maximum(e - 24, -150)
    rhs = qmax * (np.left_shift(np.int64(1), e - g) + 1)  # < 2**31
    s = e_in - g
    lhs_ok = np.left_shift(m, np.clip(s, 0, 31)) <= rhs
    rhs_ok = m <= np.left_shift(rhs, np.clip(-s, 0, 31))
    return np.where(s >= 0, (s < 32) & lhs_ok, (-s >= 32) | rhs_ok)


def _element_exponents(m: np.ndarray, e_in: np.ndarray, qmax: int) -> np.ndarray:
    """Per element (|v| = m >= 1 at exponent e_in): smallest e >= -128 with
    fl32(m * 2**e_in / qmax) <= 2**e (may exceed 127: the caller raises)."""
    d = _bit_length(m) - _bit_length(np.int64(qmax))  # d0 is d or d + 1
    exact = np.where(
        d >= 0,
        m <= np.left_shift(np.int64(qmax), np.clip(d, 0, 62)),
        np.left_shift(m, np.clip(-d, 0, 62)) <= qmax,
    )
    e = e_in + np.where(exact, d, d + 1)
    below = e - 1
    ok = (below >= -128) & (below <= 127)
    lower = ok & _fits_float32_rule(m, e_in, np.clip(below, -128, 127), qmax)
    e = np.where(lower, below, e)
    return np.maximum(e, -128)


def block_requantize(
    x: np.ndarray, x_scale: np.ndarray, in_block_size: int, block_size: int, bits: int = 8
) -> tuple[np.ndarray, np.ndarray]:
    """Reference of ``bctonnx.BlockRequantize``: (int8 codes, float32 pow2 scales)."""
    _check_attrs("BlockRequantize", block_size, bits)
    in_block_size = check_attribute("BlockRequantize", "in_block_size", in_block_size, 0,
                                    MAX_BLOCK_SIZE)  # fmt: skip
    x = np.asarray(x)
    if x.dtype not in (np.int32, np.int8):
        raise ValueError(f"BlockRequantize takes int32 or int8, got {x.dtype}")
    if x.ndim == 0:
        raise ValueError("BlockRequantize needs rank >= 1 (blocks run along the last axis)")
    x_scale = np.asarray(x_scale, dtype=np.float32)
    depth = x.shape[-1]
    if in_block_size == 0:
        if x_scale.size != 1:
            raise ValueError(f"in_block_size=0 needs a single x_scale, got shape {x_scale.shape}")
        e_in = np.full(x.shape, pow2_exponents(x_scale).reshape(()), np.int64)
    else:
        want = (*x.shape[:-1], -(-depth // in_block_size))
        if x_scale.shape != want:
            raise ValueError(
                f"x_scale shape {x_scale.shape} does not match x {x.shape} with "
                f"in_block_size {in_block_size} (expected {want})"
            )
        e_in = expand_blocks(pow2_exponents(x_scale), -1, in_block_size, depth)
    qmax = 2 ** (bits - 1) - 1
    v = x.astype(np.int64)
    m = np.abs(v)
    nonzero = m > 0
    e_elem = np.where(nonzero, _element_exponents(np.maximum(m, 1), e_in, qmax), -128)

    nb = -(-depth // block_size)
    pad = nb * block_size - depth
    padded = np.pad(e_elem, [(0, 0)] * (x.ndim - 1) + [(0, pad)], constant_values=-128)
    e_out = padded.reshape(*x.shape[:-1], nb, block_size).max(axis=-1, initial=-128)
    if np.any(e_out > 127):
        raise ValueError(
            "BlockRequantize: values too large for a pow2 scale (max |x| / qmax beyond 2**127)"
        )
    n = expand_blocks(e_out, -1, block_size, depth) - e_in
    q = np.where(nonzero, shift_round_even(v, np.where(nonzero, n, 0)), 0)
    codes = np.clip(q, -qmax, qmax).astype(np.int8)
    scales = np.ldexp(np.float32(1), e_out.astype(np.int32)).astype(np.float32)
    return codes, scales

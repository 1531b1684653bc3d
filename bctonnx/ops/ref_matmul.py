"""numpy references of ``BlockMatMul`` and ``BlockBatchMatMul``: the specification
the kernels in ``csrc/matmul/`` follow.

``BlockMatMul`` (domain ``bctonnx``, version 1) is a linear layer on block-quantized
operands: activations int8 in blocks of ``act_block_size`` along K with pow2 scales (BCT's
shift, exactly as ``BlockQuantize`` makes them), weights in the stored block format of
`bctonnx.blockformat` (blocks of ``block_size`` along K, pow2 scale codes with ``frac_bits``,
optional zero points), integer products accumulated in int32, scales applied per block in
float32. The weights are never dequantized to float.

ONNX signature (every weight input a constant initializer; ``""`` for an absent optional)::

    BlockMatMul(x, x_scale?, w_codes, w_scales, w_scale_base?, w_zero_points?, bias?,
                y_multiplier?, residual?, residual_scale?, w_multipliers?, w_nm_pattern?)
        -> (y?, y_q?, y_scale?, segment_sums?)

    x              float32 [..., K]: quantized on the fly exactly as BlockQuantize(x,
                   act_block_size, act_bits) (`ref_quant.block_quantize`), or
                   int8 [..., K]: codes already in that format (any int8), then
    x_scale        float32 [..., ceil(K / act_block_size)], exact powers of two
    w_codes        int8 [K, N] (weights of 5..8 bits) or int4 [K, N] (2..4 bits, ONNX's
                   packed INT4)
    w_scales       pow2 scale codes: int8 [K / block_size, N] (``scale = 2**(code /
                   2**frac_bits)``), or with 4-bit scale codes uint4 [K / block_size, N]
                   offsets from
    w_scale_base   int8 [1, N] (``code = base + offset``, `blockformat.split_scale_codes`)
    w_zero_points  int8 / int4 [K / block_size, N] (asymmetric weights; ``w = (q - zp) * s``)
    bias           float32 [N]
    y_multiplier   float32, one element (run time): y is multiplied by it after the bias (a
                   following Mul by a scalar, e.g. attention's 1/sqrt(sqrt(d)), folded in)
    residual       int8 [..., N] and
    residual_scale float32 [..., ceil(N / residual_block_size)]: a block-quantized residual
                   added before the output quantization (needs y_q)
    y              float32 [..., N]
    y_q, y_scale   int8 [..., N], float32 [..., ceil(N / out_block_size)]: y quantized by
                   BlockQuantize(y, out_block_size, out_bits) (output fusion); with a residual,
                   BlockQuantize(DQ(BlockQuantize(y)) + DQ(residual)) instead, where DQ is
                   ``codes * scale`` per block (exact) and the sum one float32 addition: the
                   residual add of an encoder layer with its quantized inputs and output
    w_nm_pattern   with attributes ``nm_n`` / ``nm_m`` > 0: N:M-sparse weights
                   (`blockformat` "N:M sparsity"): w_codes then holds only the kept codes,
                   [K * nm_n / nm_m, N], and this input, uint4 (at most 16 patterns) or int8
                   [K / nm_m, N], the pattern index of every group; before everything else the
                   op expands them to dense codes [K, N] (`blockformat.nm_expand`: a pruned
                   position holds its block's zero point, or 0), which are then read as below
    w_multipliers  uint4 [K / block_size, N], with attribute ``superblock`` > 0: superblock
                   weights (`blockformat` "Superblocks"): w_scales (and w_scale_base) then
                   hold one code per superblock, [K / superblock, N], and the op first widens
                   the codes to int8 ``m * (q - zp)`` (`blockformat.widen_superblocks`), which
                   are then weights of 8 bits in blocks of ``superblock`` without zero points:
                   everything below reads ``block_size`` as ``superblock``
    segment_sums   int32 [..., K / g, N]: the integer accumulators below (tests, debugging)

    attributes: block_size (1..65536), frac_bits (0..4) (weights); act_block_size
                (1..65536), act_bits (2..8, default 8); out_block_size (0..65536, default 0 =
                no y_q), out_bits (2..8, default 8), residual_block_size (0..65536, with a
                residual), superblock (default 0, else a multiple > 1 of block_size, <= 65536),
                nm_n, nm_m (default 0: dense weights; else 0 < nm_n < nm_m <= 16)

Constraints (refused when the session is created, or for x at run time): ``block_size``
divides K; one of ``block_size`` / ``act_block_size`` divides the other; the constant inputs
have exactly the shapes and element types above (the zero points the codes' type, multipliers
in 1..15 and only with ``superblock``), a constant y_multiplier holds one value; y_q comes with
y_scale and needs out_block_size; a residual comes with its scale, out_block_size,
residual_block_size and y_q. 8-bit asymmetric weights (``q - zp`` outside int8) are not
supported (the pass leaves those MatMuls in float).

Arithmetic (the kernels follow it step by step)
-----------------------------------------------
K is cut into segments of ``g = min(block_size, act_block_size)``; segment ``j`` has one
activation exponent ``e[m, j]`` (its scale ``sx = 2**e``) and lies in one weight block ``b(j)``
(scale ``sw[b, n]``, zero point ``zp[b, n]``, 0 if symmetric). Per row ``m``, weight block
``b`` and column ``n``:

1. integer: ``d[m, j, n] = sum_{k in segment j} qx[m, k] * (qw[k, n] - zp[b(j), n])``, exact.
2. one integer and one exponent per weight block, ``acc[m, b, n] * 2**E[m, b]``, exact:

   - a block of one segment (``block_size <= act_block_size``): ``acc = d``, ``E = e``;
   - a block of several segments (``block_size > act_block_size``, BCT's blocks of 32
     activations inside blocks of 128 weights): ``E = max_j e[m, j] - S`` over the block's
     segments with ``S = 16 - ceil(log2(block_size))`` (9 for blocks of 128); a segment with
     ``e < E`` is first re-quantized to ``E`` (codes ``round_half_even(q * 2**(e - E))``,
     exact integer arithmetic; only segments more than ``S`` binades below the block's largest,
     whose codes then lose bits worth at most ``2**-S`` of the block's step) and
     ``acc = sum_j d[m, j, n] * 2**(e[m, j] - E)`` over the block's segments, an exact
     integer: ``|acc| <= block_size * 2**14 * 2**S <= 2**30``.
3. float32, over the weight blocks in K order from ``y = 0``:
   ``y = y + fl(fl(acc) * sw[b, n]) * 2**E`` -- ``fl(acc)`` rounds once (``|acc| > 2**24``),
   the product by ``sw`` rounds, the product by ``2**E`` is exact, the sum rounds;
4. ``y = y + bias[n]``, then ``y = y * y_multiplier``.

Every float32 operation rounds to nearest even, one at a time. Step 2 is why the kernels are
fast: the segments of a block are combined by integer shifts and adds (the int32 sums of a
block's segments, shifted by ``e - E`` in ``0..S``), with one conversion to float per weight
block instead of one per segment, and it is more accurate than summing the segments in float.
The identities hold unless a value leaves float32's normal range (``2**E`` or a product below
``2**-126``, i.e. blocks whose max |x| is under ~``2**-110``): there the kernels may differ from
this reference in the last bits of such products.
``sw`` is ``fl32(2**(code / 2**frac_bits))``, correctly rounded (= `blockformat.decode_scales`).
"""

from __future__ import annotations

import numpy as np

from bctonnx.blockformat import (
    BlockFormat,
    BlockQuantized,
    decode_scales,
    nm_expand,
    widen_superblocks,
)
from bctonnx.ops.ref_quant import (
    MAX_BLOCK_SIZE,
    block_quantize,
    check_attribute,
    check_flag,
    pow2_exponents,
    shift_round_even,
)

__all__ = ["block_matmul", "block_batch_matmul", "combine_span", "segment_size"]


def segment_size(block_size: int, act_block_size: int) -> int:
    """``g``: the common refinement of the weight and activation blocks along K."""
    lo, hi = sorted((int(block_size), int(act_block_size)))
    if lo < 1 or hi % lo:
        raise ValueError(
            f"BlockMatMul: block_size {block_size} and act_block_size {act_block_size}: one "
            "must divide the other"
        )
    return lo


def combine_span(block_size: int) -> int:
    """``S``: how many binades below a weight block's largest activation exponent its segments
    are combined exactly (step 2 of "Arithmetic"); ``block_size * 2**14 * 2**S <= 2**30``."""
    return 16 - (int(block_size) - 1).bit_length()


def block_matmul(
    x: np.ndarray,
    w_codes: np.ndarray,
    w_scale_codes: np.ndarray,
    *,
    block_size: int,
    frac_bits: int,
    act_block_size: int,
    x_scale: np.ndarray | None = None,
    w_zero_points: np.ndarray | None = None,
    bias: np.ndarray | None = None,
    y_multiplier: np.ndarray | float | None = None,
    residual: np.ndarray | None = None,
    residual_scale: np.ndarray | None = None,
    residual_block_size: int = 0,
    act_bits: int = 8,
    out_block_size: int = 0,
    out_bits: int = 8,
    w_multipliers: np.ndarray | None = None,
    superblock: int = 0,
    w_nm_pattern: np.ndarray | None = None,
    nm_n: int = 0,
    nm_m: int = 0,
) -> dict[str, np.ndarray]:
    """Reference of ``bctonnx.BlockMatMul``.

    ``w_codes`` are the logical (unpacked) int8 codes ``[K, N]``, ``w_scale_codes`` the full
    pow2 codes ``[K / block_size, N]`` (base + offset already added; with ``superblock``,
    ``[K / superblock, N]``), ``w_zero_points`` int8 ``[K / block_size, N]`` or None,
    ``w_multipliers`` (with ``superblock``) 1..15 ``[K / block_size, N]``. Returns
    ``{"y", "segment_sums"}`` and, with ``out_block_size``, ``"y_q"`` / ``"y_scale"``.
    """
    op, big = "BlockMatMul", MAX_BLOCK_SIZE
    block_size = check_attribute(op, "block_size", block_size, 1, big)
    check_attribute(op, "frac_bits", frac_bits, 0, 4)
    act_block_size = check_attribute(op, "act_block_size", act_block_size, 1, big)
    check_attribute(op, "act_bits", act_bits, 2, 8)
    out_block_size = check_attribute(op, "out_block_size", out_block_size, 0, big)
    check_attribute(op, "out_bits", out_bits, 2, 8)
    residual_block_size = check_attribute(op, "residual_block_size", residual_block_size, 0, big)
    superblock = check_attribute(op, "superblock", superblock, 0, big)
    if superblock and (superblock <= block_size or superblock % block_size):
        raise ValueError(f"BlockMatMul: superblock must be 0 or a multiple (> 1) of block_size, "
                         f"got {superblock}")  # fmt: skip
    if w_multipliers is not None and not superblock:
        raise ValueError("BlockMatMul: w_multipliers without superblock")
    if y_multiplier is not None and np.size(y_multiplier) != 1:
        raise ValueError("BlockMatMul: y_multiplier must hold one value")
    x = np.asarray(x)
    w_codes = np.asarray(w_codes, dtype=np.int8)
    if nm_m:  # N:M storage -> dense codes, first of all
        if w_nm_pattern is None:
            raise ValueError("BlockMatMul: N:M weights need w_nm_pattern")
        nm_fmt = BlockFormat(bits=8, block_size=block_size, axis=0, nm_n=nm_n, nm_m=nm_m)
        zp = None if w_zero_points is None else np.asarray(w_zero_points)
        w_codes = nm_expand(w_codes, np.asarray(w_nm_pattern), nm_fmt, zp)
    if superblock:
        if w_multipliers is None:
            raise ValueError("BlockMatMul: superblock weights need w_multipliers")
        m = np.asarray(w_multipliers)
        if m.size and (m.min() < 1 or m.max() > 15):
            raise ValueError("BlockMatMul: w_multipliers must be in 1..15")
        fmt = BlockFormat(
            bits=4,
            block_size=block_size,
            axis=0,
            scale_kind="pow2",
            frac_bits=frac_bits,
            symmetric=w_zero_points is None,
            superblock=superblock,
        )
        wide = BlockQuantized(
            w_codes, np.asarray(w_scale_codes), fmt, w_zero_points, np.asarray(w_multipliers)
        )
        w_codes, w_scale_codes = widen_superblocks(wide)
        w_zero_points, block_size = None, superblock
    if w_codes.ndim != 2:
        raise ValueError(f"BlockMatMul: w_codes must be [K, N], got shape {w_codes.shape}")
    k_dim, n_dim = w_codes.shape
    if x.ndim < 1 or x.shape[-1] != k_dim:
        raise ValueError(f"BlockMatMul: x {x.shape} does not match K = {k_dim}")
    if block_size < 1 or k_dim % block_size:
        raise ValueError(f"BlockMatMul: block_size {block_size} does not divide K = {k_dim}")
    nblk = k_dim // block_size
    g = segment_size(block_size, act_block_size)
    nseg = k_dim // g
    if np.asarray(w_scale_codes).shape != (nblk, n_dim):
        raise ValueError(f"BlockMatMul: w_scales must be [{nblk}, {n_dim}]")

    # activations: int8 codes and pow2 scales in blocks of act_block_size
    if x.dtype == np.int8:
        if x_scale is None:
            raise ValueError("BlockMatMul: int8 x needs x_scale")
        qx = x
        sx = np.asarray(x_scale, np.float32)
        want = (*x.shape[:-1], -(-k_dim // act_block_size))
        if sx.shape != want:
            raise ValueError(f"BlockMatMul: x_scale shape {sx.shape}, expected {want}")
        pow2_exponents(sx)  # raises unless every scale is an exact power of two
    elif x.dtype == np.float32:
        if x_scale is not None:
            raise ValueError("BlockMatMul: float x is quantized by the op; x_scale must be absent")
        qx, sx = block_quantize(x, act_block_size, act_bits)
    else:
        raise ValueError(f"BlockMatMul: x must be float32 or int8, got {x.dtype}")

    lead = x.shape[:-1]
    rows = int(np.prod(lead, dtype=np.int64))
    qx2 = qx.reshape(rows, k_dim).astype(np.int64)
    sx2 = sx.reshape(rows, -1)
    seg_act = (np.arange(nseg) * g) // act_block_size  # activation block of each segment

    w = w_codes.astype(np.int64)
    if w_zero_points is not None:
        zp = np.asarray(w_zero_points, np.int64)
        if zp.shape != (nblk, n_dim):
            raise ValueError(f"BlockMatMul: w_zero_points must be [{nblk}, {n_dim}]")
        w = w - np.repeat(zp, block_size, axis=0)
    fmt = BlockFormat(bits=8, block_size=block_size, scale_kind="pow2", frac_bits=frac_bits)
    sw = decode_scales(np.asarray(w_scale_codes).astype(np.int8), fmt)  # [nblk, N] float32

    # 2. (several segments per weight block) exponents E and re-quantized codes first
    e = pow2_exponents(sx2)[:, seg_act]  # [rows, nseg]: each segment's activation exponent
    spb = block_size // g  # segments per weight block
    if spb > 1:
        span = combine_span(block_size)
        e_blk = e.reshape(rows, nblk, spb)
        big_e = e_blk.max(axis=2, keepdims=True) - span  # E per (row, block)
        low = np.repeat((e_blk < big_e).reshape(rows, nseg), g, axis=1)
        lowered = shift_round_even(qx2, np.repeat((big_e - e_blk).reshape(rows, nseg), g, axis=1))
        qx2 = np.where(low, lowered, qx2)
        e_seg = np.maximum(e_blk, big_e).reshape(rows, nseg)
        big_e = big_e[:, :, 0]
    else:
        e_seg, big_e = e, e

    # 1. exact integer segment sums
    d = np.empty((rows, nseg, n_dim), np.int64)
    for j in range(nseg):
        d[:, j, :] = qx2[:, j * g : (j + 1) * g] @ w[j * g : (j + 1) * g, :]
    if np.abs(d).max(initial=0) >= 2**31:
        raise AssertionError("segment sum outside int32")  # impossible for int8 operands

    # 2. one exact integer per weight block
    shift = (e_seg - np.repeat(big_e, spb, axis=1))[:, :, None]  # [rows, nseg, 1], 0..S
    acc = (d << shift).reshape(rows, nblk, spb, n_dim).sum(axis=2)
    if np.abs(acc).max(initial=0) >= 2**31:
        raise AssertionError("block sum outside int32")  # impossible: |acc| <= 2**30

    # 3. float32, one rounding per operation, in K order
    f32 = np.float32
    y = np.zeros((rows, n_dim), f32)
    for b in range(nblk):
        v = (acc[:, b, :].astype(f32) * sw[b][None, :]).astype(f32)
        y = (y + v * np.ldexp(f32(1), big_e[:, b])[:, None].astype(f32)).astype(f32)
    # 4. bias, multiplier
    if bias is not None:
        if np.shape(bias) != (n_dim,):
            raise ValueError(f"BlockMatMul: bias must have shape [N] = [{n_dim}]")
        y = (y + np.asarray(bias, f32).reshape(1, n_dim)).astype(f32)
    if y_multiplier is not None:
        y = (y * np.asarray(y_multiplier, f32).reshape(())).astype(f32)

    out = {
        "y": y.reshape(*lead, n_dim),
        "segment_sums": d.astype(np.int32).reshape(*lead, nseg, n_dim),
    }
    if residual is not None and not (out_block_size and residual_block_size):
        raise ValueError("BlockMatMul: a residual needs out_block_size and residual_block_size")
    if (residual is None) != (residual_scale is None):
        raise ValueError("BlockMatMul: residual and residual_scale go together")
    if out_block_size:
        q, s = block_quantize(out["y"], out_block_size, out_bits)
        if residual is not None:
            z = _dequantize(q, s, out_block_size) + _dequantize(
                np.asarray(residual), residual_scale, residual_block_size
            )
            q, s = block_quantize(z.astype(f32), out_block_size, out_bits)
        out["y_q"], out["y_scale"] = q, s
    return out


def _heads_first(q: np.ndarray, scale: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    if q.ndim != 4 or np.ndim(scale) != 4:
        raise ValueError("BlockBatchMatMul: a_transposed / b_transposed need rank-4 operands")
    return q.transpose(0, 2, 1, 3), np.asarray(scale).transpose(0, 2, 1, 3)


def _dequantize(q: np.ndarray, scale: np.ndarray, block_size: int) -> np.ndarray:
    """``codes * scale`` per block along the last axis, float32 (DequantizeLinear)."""
    s = np.repeat(np.asarray(scale, np.float32), block_size, axis=-1)[..., : q.shape[-1]]
    return (q.astype(np.float32) * s).astype(np.float32)


def block_batch_matmul(
    a: np.ndarray,
    a_scale: np.ndarray,
    b: np.ndarray,
    b_scale: np.ndarray,
    *,
    block_size: int,
    y_multiplier: np.ndarray | float | None = None,
    out_block_size: int = 0,
    out_bits: int = 8,
    a_transposed: bool = False,
    b_transposed: bool = False,
) -> dict[str, np.ndarray]:
    """Reference of ``bctonnx.BlockBatchMatMul`` (attention scores, both operands dynamic)::

        BlockBatchMatMul(a: int8 [..., M, K], a_scale: f32 [..., M, K / B],
                         b: int8 [..., N, K], b_scale: f32 [..., N, K / B], y_multiplier?)
            -> (y?: f32 [..., M, N], y_q?: int8, y_scale?: f32 [..., M, ceil(N / out_block)])
        attributes: block_size (B in 1..65536, divides K), out_block_size (0..65536,
                    default 0), out_bits (2..8, default 8), a_transposed, b_transposed (0 or
                    1, default 0; 1: that operand and its scales come token-major,
                    [b, M, h, K] / [b, N, h, K], rank 4)

    ``y = a @ b^T`` per batch (same leading dims, no broadcasting), both operands blocked
    along K with pow2 scales. Per block ``j``: ``d_j = sum_k a[m, k] * b[n, k]`` (int32,
    exact); ``y = y + d_j * a_scale[m, j] * b_scale[n, j]`` in K order from ``y = 0`` (the
    product of an integer below 2^24 and two powers of two is exact; one rounding per
    addition); then ``y = y * y_multiplier``; ``(y_q, y_scale) = BlockQuantize(y,
    out_block_size)``. (In attention: a = Q codes, b = K codes before the transpose, the
    multiplier the 1/sqrt(sqrt(d)) that scales K^T.)
    """
    op = "BlockBatchMatMul"
    block_size = check_attribute(op, "block_size", block_size, 1, MAX_BLOCK_SIZE)
    out_block_size = check_attribute(op, "out_block_size", out_block_size, 0, MAX_BLOCK_SIZE)
    check_attribute(op, "out_bits", out_bits, 2, 8)
    a_transposed = check_flag(op, "a_transposed", a_transposed)
    b_transposed = check_flag(op, "b_transposed", b_transposed)
    if y_multiplier is not None and np.size(y_multiplier) != 1:
        raise ValueError("BlockBatchMatMul: y_multiplier must hold one value")
    a, b = np.asarray(a), np.asarray(b)
    # token-major operands ([b, rows, h, K], attention's heads transpose fused): as the
    # [b, h, rows, K] tensors they stand for
    if a_transposed:
        a, a_scale = _heads_first(a, a_scale)
    if b_transposed:
        b, b_scale = _heads_first(b, b_scale)
    if a.dtype != np.int8 or b.dtype != np.int8:
        raise ValueError("BlockBatchMatMul: a and b must be int8 codes")
    if a.ndim < 2 or a.ndim != b.ndim or a.shape[:-2] != b.shape[:-2] or a.shape[-1] != b.shape[-1]:
        raise ValueError(f"BlockBatchMatMul: shapes {a.shape} and {b.shape} do not match")
    k = a.shape[-1]
    if block_size < 1 or k % block_size:
        raise ValueError(f"BlockBatchMatMul: block_size {block_size} does not divide K = {k}")
    nb = k // block_size
    sa, sb = np.asarray(a_scale, np.float32), np.asarray(b_scale, np.float32)
    if sa.shape != (*a.shape[:-1], nb) or sb.shape != (*b.shape[:-1], nb):
        raise ValueError("BlockBatchMatMul: scale shapes do not match the operands")
    pow2_exponents(sa)
    pow2_exponents(sb)
    f32 = np.float32
    y = np.zeros((*a.shape[:-1], b.shape[-2]), f32)
    for j in range(nb):
        sl = slice(j * block_size, (j + 1) * block_size)
        d = np.matmul(a[..., sl].astype(np.int64), np.swapaxes(b[..., sl].astype(np.int64), -1, -2))
        term = d.astype(f32) * sa[..., j][..., :, None] * sb[..., j][..., None, :]
        y = (y + term.astype(f32)).astype(f32)
    if y_multiplier is not None:
        y = (y * np.asarray(y_multiplier, f32).reshape(())).astype(f32)
    out = {"y": y}
    if out_block_size:
        out["y_q"], out["y_scale"] = block_quantize(y, out_block_size, out_bits)
    return out

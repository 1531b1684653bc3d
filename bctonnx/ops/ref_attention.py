"""numpy reference of ``AttentionPV``: the specification ``csrc/attention_ops.cc`` follows.

``AttentionPV`` (domain ``bctonnx``, version 1) is attention's context product ``P . V`` in
integers: the probabilities as ``IntSoftmax`` makes them (uint8 codes ``p``, value
``p * 2**p_exponent``) times V as its producer left it (int8 codes in blocks of
``block_size`` along the head dimension, pow2 scales: one per token and block). V's scales
vary along the reduction axis (tokens), so they cannot be applied after the integer sum as in
``BlockMatMul``; instead each *token segment* (``segment`` tokens, 32 by default) brings its V
rows to one common exponent first, exactly when it can:

ONNX signature::

    AttentionPV(p: uint8 [..., M, S], v: int8 [..., S, D], v_scale: f32 [..., S, ceil(D / B)])
        -> y: f32 [..., M, D], or [b, M, h, D] for rank-4 inputs [b, h, ...] when
           transpose_output = 1 (the following Transpose(0, 2, 1, 3) of attention, fused)
    attributes: block_size (B), segment (T, even, 2..256, default 32), p_exponent (default -8),
                transpose_output (default 0), v_transposed (default 0: with 1, v and v_scale
                come as [b, S, h, ...], the heads' Transpose(0, 2, 1, 3) before them fused)

Arithmetic, per batch index, V block ``c`` (columns ``j`` of that block) and segment ``g``
(tokens ``s`` in ``[g T, (g + 1) T)``, the last one possibly shorter):

1. ``e[s] = log2 v_scale[s, c]`` (exact powers of two), ``emax = max_s e[s]``,
   ``r = max(emax - 8, -149 - p_exponent)``;
2. ``w[s, j] = round_half_even(v[s, j] * 2**(e[s] - r))``: a left shift by 0..8 when
   ``e[s] >= r`` (exact, ``|w| <= 128 * 2**8``, fits int16), otherwise a rounded right shift
   (a token whose V scale is more than 2^8 below the segment's largest loses the bits below
   2^r: at most half of 2^-8 of the largest V step of the segment);
3. ``a[m, j] = sum_s p[m, s] * w[s, j]``: int32, exact (``|a| <= T * 255 * 2**15 < 2**31``);
4. float32, over the segments in token order from ``y = 0``:
   ``y = y + float32(a) * 2**(r + p_exponent)`` (``float32(a)`` rounds to nearest even when
   ``|a| > 2**24``; the product is exact; one rounding per addition).

Error bound against ``sum_s p[m, s] 2**p_exponent * v[s, j] * v_scale[s, c]`` computed
exactly: per segment, step 2 adds at most ``1/2 * 2**r * sum_s p[m, s] * 2**p_exponent``
(zero when every token of the segment is within 2^8 of the largest scale, the usual case),
and steps 3-4 add float32 roundings (relative 2^-24 per operation).
"""

from __future__ import annotations

import numpy as np

from bctonnx.ops.ref_quant import pow2_exponents, shift_round_even

__all__ = ["attention_pv"]

MAX_SEGMENT = 256


def attention_pv(
    p: np.ndarray,
    v: np.ndarray,
    v_scale: np.ndarray,
    *,
    block_size: int,
    segment: int = 32,
    p_exponent: int = -8,
    transpose_output: bool = False,
    v_transposed: bool = False,
) -> np.ndarray:
    """Reference of ``bctonnx.AttentionPV`` (see the module doc)."""
    p, v = np.asarray(p), np.asarray(v)
    if v_transposed:
        if v.ndim != 4:
            raise ValueError("AttentionPV: v_transposed needs rank-4 inputs")
        v = v.transpose(0, 2, 1, 3)
        v_scale = np.asarray(v_scale).transpose(0, 2, 1, 3)
    if p.dtype != np.uint8 or v.dtype != np.int8:
        raise ValueError("AttentionPV: p must be uint8 and v int8 codes")
    if p.ndim < 2 or v.ndim != p.ndim or p.shape[:-2] != v.shape[:-2] or p.shape[-1] != v.shape[-2]:
        raise ValueError(f"AttentionPV: shapes {p.shape} and {v.shape} do not match")
    if block_size < 1 or segment % 2 or not 2 <= segment <= MAX_SEGMENT:
        raise ValueError("AttentionPV: block_size >= 1 and an even segment in 2..256 needed")
    if not -32 <= p_exponent <= 0:
        raise ValueError("AttentionPV: p_exponent must be in -32..0")
    s_len, d = v.shape[-2:]
    nb = -(-d // block_size)
    scale = np.asarray(v_scale, np.float32)
    if scale.shape != (*v.shape[:-1], nb):
        raise ValueError(f"AttentionPV: v_scale must have shape {(*v.shape[:-1], nb)}")
    e = np.repeat(pow2_exponents(scale), block_size, axis=-1)[..., :d]  # [..., S, D]
    p64 = p.astype(np.int64)
    y = np.zeros((*p.shape[:-1], d), np.float32)
    for start in range(0, s_len, segment):
        seg = slice(start, min(start + segment, s_len))
        es = e[..., seg, :]
        r = np.maximum(es.max(axis=-2, keepdims=True) - 8, -149 - p_exponent)  # [..., 1, D]
        w = shift_round_even(v[..., seg, :].astype(np.int64), r - es)
        a = np.matmul(p64[..., seg], w)  # [..., M, D], exact
        factor = np.ldexp(np.float32(1), (r + p_exponent).astype(np.int32)).astype(np.float32)
        y = (y + (a.astype(np.float32) * factor).astype(np.float32)).astype(np.float32)
    if transpose_output:
        if y.ndim != 4:
            raise ValueError("AttentionPV: transpose_output needs rank-4 inputs")
        y = np.ascontiguousarray(y.transpose(0, 2, 1, 3))
    return y

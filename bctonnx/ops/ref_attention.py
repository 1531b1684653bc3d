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
    attributes: block_size (B, 1..65536), segment (T, even, 2..256, default 32), p_exponent
                (-32..0, default -8), transpose_output (0 or 1, default 0), v_transposed (0
                or 1, default 0: with 1, v and v_scale come as [b, S, h, ...], the heads'
                Transpose(0, 2, 1, 3) before them fused)

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

from bctonnx.ops.ref_quant import (
    MAX_BLOCK_SIZE,
    check_attribute,
    check_flag,
    pow2_exponents,
    shift_round_even,
)

__all__ = ["attention_pv", "block_attention", "key_mask"]

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
    valid: np.ndarray | None = None,
) -> np.ndarray:
    """Reference of ``bctonnx.AttentionPV`` (see the module doc).

    ``valid`` (bool, broadcastable to ``p.shape[:-2] + (S,)``; BlockAttention's key mask): only
    these tokens take part: the others get ``w = 0`` and no say in their segment's ``emax``
    (a segment without one has ``r`` at its floor and contributes 0), so neither their codes
    nor their scales can change the result.
    """
    check_attribute("AttentionPV", "block_size", block_size, 1, MAX_BLOCK_SIZE)
    transpose_output = check_flag("AttentionPV", "transpose_output", transpose_output)
    v_transposed = check_flag("AttentionPV", "v_transposed", v_transposed)
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
    if valid is not None:
        keep = np.broadcast_to(np.asarray(valid, bool), (*p.shape[:-2], s_len))[..., :, None]
        v = np.where(keep, v, 0).astype(np.int8)
        e = np.where(keep, e, np.iinfo(np.int64).min // 2)  # no say in emax
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


def key_mask(mask: np.ndarray | None, shape: tuple[int, ...]) -> np.ndarray | None:
    """The keys a BlockAttention mask keeps, bool [b, 1, S] for scores of ``shape`` [b, h, S, S]:
    the additive mask (float, broadcastable to [b, 1, S, S] with every query row the same: BERT's
    [b, 1, 1, S], which exports expand to [b, 1, S, S]) keeps a key iff its value is not below
    -1000. A mask value other than 0 or < -1000, or a mask that differs between query rows, is
    refused (ValueError)."""
    if mask is None:
        return None
    m = np.asarray(mask, np.float32)
    if m.ndim > 4:
        raise ValueError("BlockAttention: mask rank above 4")
    m = m.reshape((1,) * (4 - m.ndim) + m.shape)
    b, _, s_q, s_k = shape
    if (
        m.shape[1] != 1
        or m.shape[0] not in (1, b)
        or m.shape[2] not in (1, s_q)
        or (m.shape[3] not in (1, s_k))
    ):
        raise ValueError(f"BlockAttention: mask shape {np.shape(mask)} is not a key mask")
    if not np.array_equal(m, np.broadcast_to(m[:, :, :1, :], m.shape)):
        raise ValueError("BlockAttention: the mask differs between query rows (not a key mask)")
    if not np.all((m == 0) | (m < -1000)):
        raise ValueError("BlockAttention: mask values must be 0 or < -1000")
    return np.broadcast_to(m[:, 0, :1, :] >= -1000, (b, 1, s_k))


def split_heads(x, num_heads: int, name: str) -> np.ndarray:
    """[b, S, h * w] as [b, S, h, w] (BlockAttention's num_heads form)."""
    x = np.asarray(x)
    if x.ndim != 3 or x.shape[2] % num_heads:
        raise ValueError(
            f"BlockAttention: with num_heads {num_heads}, {name} must be [b, S, h * w], "
            f"got {x.shape}"
        )
    return x.reshape(*x.shape[:2], num_heads, -1)


def block_attention(
    q: np.ndarray,
    q_scale: np.ndarray,
    k: np.ndarray,
    k_scale: np.ndarray,
    v: np.ndarray,
    v_scale: np.ndarray,
    mask: np.ndarray | None = None,
    y_multiplier: np.ndarray | float | None = None,
    key_bias: np.ndarray | None = None,
    rows: np.ndarray | None = None,
    *,
    block_size: int,
    score_block_size: int = 32,
    segment: int = 32,
    p_exponent: int = -8,
    q_heads_first: bool = False,
    k_heads_first: bool = False,
    v_heads_first: bool = False,
    num_heads: int = 0,
) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """Reference of ``bctonnx.BlockAttention``: one attention of an encoder layer in integers,
    ``AttentionPV(IntSoftmax(BlockQuantize(BlockBatchMatMul(q, k^T))), v)``, where the keys the
    mask drops take no part at all, so a sequence's output does not depend on the padding or the
    other sequences of its batch::

        BlockAttention(q, q_scale, k, k_scale, v, v_scale: int8 / f32 [b, S, h, d] and
                       [b, S, h, ceil(d / B)] (token-major, as the projections write them),
                       mask?: f32 [b, 1, 1 or S, S] (additive: 0 keeps, < -1000 drops a key;
                       the same for every query row, see `key_mask`),
                       y_multiplier?: f32 scalar,
                       key_bias?: f32 [b or 1, 1, 1, S or 1] (added to every query row's
                       scores: token dropping's log of a merged token's weight),
                       rows?: uint8 [b, 1, 1, S] or [b, S] (query-row weights, for received))
            -> y: f32 [b, S, h, d], received?: int32 [b, S]
        attributes: block_size (B, 1..4096), score_block_size (1..4096, default 32),
                    segment (even, 2..256, default 32), p_exponent (-32..0, default -8),
                    q_heads_first, k_heads_first, v_heads_first (0 or 1, default 0; 1: that
                    operand and its scales come [b, h, S, d], as some exporters leave K),
                    num_heads (0..4096, default 0; h > 0: q, k, v come as the projections
                    write them, [b, S, h * d], their scales [b, S, h * d / B] (B must divide
                    d and the V width), and y is [b, S, h * dv]: the same bytes, no Reshape
                    nodes around the op; not with a heads_first operand)

    1. scores ``y = BlockBatchMatMul(q, k, y_multiplier)`` (ref_matmul.block_batch_matmul,
       both token-major): [b, h, S, S]; with ``key_bias``, ``y = float32(y + key_bias[key])``
       (one correctly rounded add);
    2. the scores of dropped keys are set to 0 (so they cannot raise a block's scale), then
       ``BlockQuantize(y, score_block_size)``;
    3. ``p = IntSoftmax(codes, scales, mask)`` (ref_nonlinear.int_softmax: dropped keys get 0);
    4. ``y = AttentionPV(p, v, v_scale, valid=kept keys)`` (`attention_pv`: dropped tokens'
       V neither counts nor sets a segment's exponent), heads back token-major;
    5. with ``rows`` (returned as ``(y, received)``): the attention each key received,
       ``received[b, c] = sum_h sum_r rows[b, r] * p[b, h, r, c]`` in int32, exact
       (``h * S * 255 * 255 < 2**31`` for h * S < 33025): what token dropping ranks tokens by
       (passes/token_drop.py), which the fused op's probabilities are no tensor for.
    """
    from bctonnx.ops.ref_matmul import block_batch_matmul
    from bctonnx.ops.ref_nonlinear import int_softmax
    from bctonnx.ops.ref_quant import block_quantize

    op = "BlockAttention"
    check_attribute(op, "block_size", block_size, 1, 4096)
    check_attribute(op, "score_block_size", score_block_size, 1, 4096)
    q_heads_first = check_flag(op, "q_heads_first", q_heads_first)
    k_heads_first = check_flag(op, "k_heads_first", k_heads_first)
    v_heads_first = check_flag(op, "v_heads_first", v_heads_first)
    check_attribute(op, "num_heads", num_heads, 0, 4096)
    q, k, v = np.asarray(q), np.asarray(k), np.asarray(v)
    if num_heads:
        if q_heads_first or k_heads_first or v_heads_first:
            raise ValueError("BlockAttention: num_heads > 0 takes token-major operands only")
        q, q_scale, k, k_scale, v, v_scale = (
            split_heads(x, num_heads, name)
            for x, name in (
                (q, "q"), (q_scale, "q_scale"), (k, "k"), (k_scale, "k_scale"), (v, "v"),
                (v_scale, "v_scale"),
            )
        )  # fmt: skip
        for x, s, name in ((q, q_scale, "q"), (k, k_scale, "k"), (v, v_scale, "v")):
            if x.shape[3] % block_size or s.shape[3] * block_size != x.shape[3]:
                raise ValueError(
                    f"BlockAttention: with num_heads, block_size {block_size} must divide the "
                    f"head width of {name} ({x.shape[3]}) and its scales hold one per block"
                )
    operands = []
    for x, s, heads_first in ((q, q_scale, q_heads_first), (k, k_scale, k_heads_first),
                              (v, v_scale, v_heads_first)):  # fmt: skip
        if heads_first:  # as the token-major tensors they stand for
            x, s = np.swapaxes(x, 1, 2), np.swapaxes(np.asarray(s), 1, 2)
        operands += [x, s]
    q, q_scale, k, k_scale, v, v_scale = operands
    if q.ndim != 4 or k.shape != q.shape or v.shape[:3] != q.shape[:3]:
        raise ValueError(f"BlockAttention: q {q.shape}, k {k.shape}, v {v.shape} do not match")
    scores = block_batch_matmul(
        q, q_scale, k, k_scale, block_size=block_size, y_multiplier=y_multiplier,
        a_transposed=True, b_transposed=True,
    )["y"]  # fmt: skip
    if key_bias is not None:
        bias = np.asarray(key_bias, np.float32)
        full = (1,) * (4 - bias.ndim) + bias.shape
        b, _, _, s_k = scores.shape
        if bias.ndim > 4 or full[1:3] != (1, 1) or full[0] not in (1, b) or full[3] not in (1, s_k):
            raise ValueError(f"BlockAttention: key_bias shape {bias.shape} is not one per key")
        bias = bias.reshape(full)
        scores = (scores + bias).astype(np.float32)
    keep = key_mask(mask, scores.shape)
    if keep is not None:
        scores = np.where(keep[:, :, None, :], scores, np.float32(0)).astype(np.float32)
    codes, scales = block_quantize(scores, score_block_size)
    p = int_softmax(codes, scales, score_block_size, mask)
    y = attention_pv(
        p, v, v_scale, block_size=block_size, segment=segment, p_exponent=p_exponent,
        transpose_output=True, v_transposed=True, valid=keep,
    )  # fmt: skip
    if num_heads:
        y = y.reshape(*y.shape[:2], -1)
    if rows is None:
        return y
    b, s_len = p.shape[0], p.shape[-1]
    r = np.asarray(rows)
    if r.dtype != np.uint8 or r.size != b * s_len:
        raise ValueError(f"BlockAttention: rows must be uint8 with b x S = {b * s_len} values")
    r = r.reshape(b, 1, 1, s_len).astype(np.int64)
    received = np.matmul(r, p.astype(np.int64)).sum(axis=(1, 2))  # [b, S], exact
    return y, received.astype(np.int32)

"""numpy reference of ``TokenCodes`` and ``NearestSlot``: the specification
``csrc/tokens/tokens.cc`` follows.

Token dropping (passes/token_drop.py) compares tokens by the cosine of per-token int8 codes of
their hidden states, so that the comparison is exact and the same in any batch. In the integer
form, `passes.token_drop.TokenOpsFromChains` replaces the standard-op chains that compute them
with these two ops; each gives bit for bit what its chain gives (the chain's float steps are
single correctly rounded IEEE operations, done here in the same order).

ONNX signatures (domain ``bctonnx``, version 1)::

    TokenCodes(hidden: f32 [B, S, H]) -> codes: int8 [B, S, H], norm: f32 [B, S],
                                         offset: uint8 [B, S, H] (optional, codes + 128)
    NearestSlot(codes: int8 [B, S, H], norm: f32 [B, S], index: int64 [B, T],
                valid: bool [B, T]) -> slot: int64 [B, S]
    no attributes; H in 1..1040 (so every norm and dot product is a whole number below
    2^24: exact in float32), T >= 1 (when B x S > 0), every index in 0..S-1

``TokenCodes``, per token (row ``h`` of H floats): ``step = max(max_j |h_j|, 1e-30) / 127``
(float32 division), ``codes_j = round_half_even(h_j / step)`` (float32 division; whole numbers
in -127..127), ``norm = sum_j codes_j^2`` (exact). A row holding a NaN or an infinity
gets codes 0 and norm 0 (the chain's result there is unspecified).

``NearestSlot``, per batch row ``b`` and token ``i``: the slot ``t`` of ``index[b]`` (the kept
tokens' positions) whose token is the most similar to ``i``:
``cos(i, t) = float32(dot(codes[b, i], codes[b, index[b, t]])) /
sqrt(max(norm[b, i] * norm[b, index[b, t]], 1))`` (each step float32, correctly rounded; the
dot product is exact), ``-2`` for a slot with ``valid[b, t]`` false; the first (lowest) slot of
the largest value.
"""

from __future__ import annotations

import numpy as np

__all__ = ["nearest_slot", "token_codes"]

MAX_HIDDEN = 1040  # 127^2 x 1040 < 2^24


def token_codes(hidden: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(codes int8, norm float32, offset uint8) of ``hidden`` [..., H] float32."""
    h = np.asarray(hidden, np.float32)
    if h.ndim != 3 or not 1 <= h.shape[-1] <= MAX_HIDDEN:
        raise ValueError(f"TokenCodes: hidden must be [B, S, H], H in 1..{MAX_HIDDEN}")
    finite = np.isfinite(h).all(axis=-1, keepdims=True)
    peak = np.abs(np.where(finite, h, 0)).max(axis=-1, keepdims=True)
    step = np.maximum(peak, np.float32(1e-30)) / np.float32(127)
    with np.errstate(invalid="ignore", over="ignore"):
        grid = np.where(finite, np.round(h / step), 0).astype(np.float32)
    codes = grid.astype(np.int8)
    norm = (grid.astype(np.int64) ** 2).sum(axis=-1).astype(np.float32)
    return codes, norm, (codes.astype(np.int16) + 128).astype(np.uint8)


def nearest_slot(
    codes: np.ndarray, norm: np.ndarray, index: np.ndarray, valid: np.ndarray
) -> np.ndarray:
    """[B, S] int64: each token's most similar slot (module doc)."""
    b, s, _ = codes.shape
    if norm.shape != (b, s) or index.ndim != 2 or index.shape[0] != b or valid.shape != index.shape:
        raise ValueError("NearestSlot: shapes do not match")
    if b * s and not index.shape[1]:
        raise ValueError("NearestSlot: no slots")
    if index.size and (index.min() < 0 or index.max() >= s):
        raise ValueError("NearestSlot: index out of range")
    c = codes.astype(np.int64)
    out = np.zeros((b, s), np.int64)
    for r in range(b):
        kept = c[r, index[r]]  # [T, H]
        dots = (c[r] @ kept.T).astype(np.float32)  # exact
        norms = norm[r][:, None] * norm[r, index[r]][None, :]  # float32 products
        cos = dots / np.sqrt(np.maximum(norms, np.float32(1)))
        cos = np.where(valid[r][None, :], cos, np.float32(-2))
        out[r] = np.argmax(cos, axis=1)
    return out

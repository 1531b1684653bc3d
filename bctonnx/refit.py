"""Least squares on calibration activations: what the pruning passes compute, in numpy.

A linear layer ``y = x W + b`` whose inputs lose some features (pruned FFN neurons, pruned
attention heads) or some weights (N:M sparsity) is refit so that its output stays as close as
possible to a target ``Y`` (the original model's output of that layer) on calibration tokens.
Everything is expressed through the Gram matrices of the augmented inputs ``A = [X, 1]``
(the constant column carries the bias, so bias compensation is part of the same solve):

    G = A^T A  [K+1, K+1],   C = A^T Y  [K+1, D],   E(W) = tr(W^T G W) - 2 tr(W^T C) + tr(Y^T Y)

`Gram` accumulates them over batches, keeping every `Calibration.held_out` batch apart:
the ridge strength ``alpha`` (penalty ``alpha * diag(G)`` on the weights, not on the bias) is
the grid value with the least error on the held-out tokens of a fit on the others
(`choose_alpha`); the final refit uses all tokens with it.

Which inputs go (`obs_prune`): greedy Optimal Brain Surgeon on groups (one FFN neuron; one
head's ``head_dim`` context features): removing group ``S`` from the current least-squares
solution raises the error by ``tr(W_S^T (G^-1)_SS^-1 W_S)`` and the other rows absorb what
they can (``W -= G^-1[:, S] (G^-1)_SS^-1 W_S``); the cheapest group goes, ``G^-1`` is
downdated, and so on. The ranking is the refit's own error, measured on unlabeled text.

`sparsegpt_nm` is the N:M counterpart (Frantar & Alistarh, SparseGPT, 2023): the inputs are
visited in order; at each group of M the N weights with the largest ``w^2 / (G^-1)_ii^2`` stay
(per output column), the others are zeroed and their error is pushed onto the inputs not yet
visited through the Cholesky factor of ``G^-1``. The bias is the last input: it is never
pruned and absorbs the mean error.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

ALPHAS = (1e-6, 1e-5, 1e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1)
SELECT_ALPHA = 1e-3  # ridge while choosing what to remove (only to keep G invertible)
OBS_STEPS = 96  # G^-1 updates of a greedy removal of single features


class Gram:
    """Gram matrices of augmented inputs and their cross terms with the targets, fit and
    held-out tokens apart (index 0: fit, 1: held out)."""

    def __init__(self, inputs: int, outputs: int):
        self.g = np.zeros((2, inputs + 1, inputs + 1))
        self.c = np.zeros((2, inputs + 1, outputs))
        self.yy = np.zeros(2)
        self.n = np.zeros(2, np.int64)

    def add(self, x: np.ndarray, y: np.ndarray, held_out: bool = False) -> None:
        # products of one batch in float32 (a few hundred tokens), summed in float64
        a = np.empty((x.shape[0], x.shape[1] + 1), np.float32)
        a[:, :-1] = x
        a[:, -1] = 1.0
        y = np.asarray(y, np.float32)
        i = int(held_out)
        self.g[i] += a.T @ a
        self.c[i] += a.T @ y
        self.yy[i] += float((y.astype(np.float64) ** 2).sum())
        self.n[i] += x.shape[0]

    @property
    def inputs(self) -> int:
        return self.g.shape[1] - 1

    def total(self) -> tuple[np.ndarray, np.ndarray, float]:
        return self.g.sum(0), self.c.sum(0), float(self.yy.sum())


def _rows(keep: Sequence[int], inputs: int) -> np.ndarray:
    """Indices of the kept inputs plus the bias row."""
    return np.concatenate([np.asarray(keep, np.int64), [inputs]])


def _regularized(g: np.ndarray, alpha: float) -> np.ndarray:
    """``g + alpha * diag(g)`` on the weight rows (the bias row, last, is not penalized)."""
    reg = g.copy()
    d = np.diag(g)[:-1].copy()
    d[d <= 0] = 1.0  # a feature that is always 0: any finite weight, keep G invertible
    reg[np.arange(len(d)), np.arange(len(d))] += alpha * d
    return reg


def ridge_solve(g: np.ndarray, c: np.ndarray, keep: Sequence[int], alpha: float) -> np.ndarray:
    """The ridge least-squares weights of the kept inputs: [len(keep) + 1, D], bias last."""
    rows = _rows(keep, g.shape[0] - 1)
    sub = _regularized(g[np.ix_(rows, rows)], alpha)
    return np.linalg.solve(sub, c[rows])


def error(w: np.ndarray, g: np.ndarray, c: np.ndarray, yy: float, keep: Sequence[int]) -> float:
    """Summed squared error of weights ``w`` (rows: keep + bias) on the tokens behind g, c."""
    rows = _rows(keep, g.shape[0] - 1)
    gs, cs = g[np.ix_(rows, rows)], c[rows]
    return float((w * (gs @ w)).sum() - 2 * (w * cs).sum() + yy)


def choose_alpha(gram: Gram, keep: Sequence[int], alphas: Sequence[float] = ALPHAS) -> float:
    """The ridge strength whose fit on the fit tokens has the least held-out error."""
    if gram.n[1] == 0 or gram.n[0] == 0:
        return alphas[len(alphas) // 2]
    errs = [
        error(ridge_solve(gram.g[0], gram.c[0], keep, a), gram.g[1], gram.c[1], gram.yy[1], keep)
        for a in alphas
    ]
    return float(alphas[int(np.argmin(errs))])


def refit(gram: Gram, keep: Sequence[int]) -> tuple[np.ndarray, np.ndarray, float]:
    """(weights [len(keep), D], bias [D], alpha) of the kept inputs, ridge chosen on the
    held-out tokens, solved on all tokens."""
    alpha = choose_alpha(gram, keep)
    g, c, _ = gram.total()
    w = ridge_solve(g, c, keep, alpha)
    return w[:-1], w[-1], alpha


def obs_prune(gram: Gram, groups: Sequence[Sequence[int]], remove: int) -> list[int]:
    """Indices of the ``remove`` groups greedy OBS removes, in removal order (see module)."""
    g, c, _ = gram.total()
    reg = _regularized(g, SELECT_ALPHA)
    hinv = np.linalg.inv(reg)
    w = hinv @ c  # the least-squares solution with every input
    alive = list(range(len(groups)))
    removed: list[int] = []
    # single features go a few at a time (the cheapest ``chunk`` by their own scores, then
    # the joint update): about OBS_STEPS updates of G^-1 whatever the count
    chunk = max(1, -(-remove // OBS_STEPS)) if all(len(s) == 1 for s in groups) else 1
    while len(removed) < remove:
        if chunk > 1 or all(len(groups[a]) == 1 for a in alive):
            idx = np.array([groups[a][0] for a in alive])
            scores = list((w[idx] ** 2).sum(1) / np.diag(hinv)[idx])
        else:
            scores = []
            for a in alive:
                s = list(groups[a])
                inv_ss = np.linalg.inv(hinv[np.ix_(s, s)])
                scores.append(float((w[s] * (inv_ss @ w[s])).sum()))
        take = min(chunk, remove - len(removed))
        picks = [alive[i] for i in np.argsort(scores, kind="stable")[:take]]
        s = [j for p in picks for j in groups[p]]
        inv_ss = np.linalg.inv(hinv[np.ix_(s, s)])
        w -= hinv[:, s] @ (inv_ss @ w[s])
        hinv -= (hinv[:, s] @ inv_ss) @ hinv[s, :]
        w[s] = 0.0
        hinv[s, :] = 0.0
        hinv[:, s] = 0.0
        hinv[s, s] = 1.0  # removed rows: isolated, never picked again
        for p in picks:
            alive.remove(p)
        removed.extend(picks)
    return removed


def sparsegpt_nm(
    w: np.ndarray,
    bias: np.ndarray | None,
    g: np.ndarray,
    n: int,
    m: int,
    damp: float = 0.01,
    blocksize: int = 128,
) -> tuple[np.ndarray, np.ndarray]:
    """N:M-sparse weights (groups of ``m`` consecutive inputs per output column keep ``n``)
    and a compensating bias, from ``w`` [K, D], ``bias`` [D] and the augmented Gram matrix
    ``g`` [K+1, K+1] of the layer's calibration inputs (see module)."""
    k, d = w.shape
    if k % m:
        raise ValueError(f"N:M: M = {m} does not divide K = {k}")
    # SparseGPT works on rows = outputs, columns = inputs; the bias is the last input
    wt = np.concatenate([w, (np.zeros(d) if bias is None else bias)[None, :]], 0).T.copy()
    h = g.copy()
    dead = np.diag(h) == 0
    h[dead, dead] = 1.0
    wt[:, dead] = 0.0
    h[np.diag_indices_from(h)] += damp * float(np.mean(np.diag(h)))
    hinv = np.linalg.cholesky(np.linalg.inv(h)).T  # upper Cholesky factor of H^-1
    cols = k + 1
    for i1 in range(0, k, blocksize):
        i2 = min(i1 + blocksize, k)
        w1 = wt[:, i1:i2].copy()
        err1 = np.zeros_like(w1)
        h1 = hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            if i % m == 0:
                score = w1[:, i : i + m] ** 2 / np.diag(h1)[i : i + m][None, :] ** 2
                drop = np.argsort(score, axis=1, kind="stable")[:, : m - n]
                mask = np.zeros((d, m), bool)
                np.put_along_axis(mask, drop, True, axis=1)
            col = w1[:, i]
            q = np.where(mask[:, i % m], 0.0, col)
            e = (col - q) / h1[i, i]
            w1[:, i:] -= e[:, None] * h1[i, i:][None, :]
            w1[:, i] = q
            err1[:, i] = e
        wt[:, i1:i2] = w1
        wt[:, i2:cols] -= err1 @ hinv[i1:i2, i2:cols]
    out = wt.T
    return out[:k].copy(), out[k].copy()

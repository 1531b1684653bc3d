"""Latency measurement shared by demo and bench: interleaved runs, medians."""

from __future__ import annotations

import statistics
import time

import numpy as np
import onnxruntime as ort


def fixed_inputs(session: ort.InferenceSession, batch: int, seq: int, vocab: int = 1000) -> dict:
    rng = np.random.default_rng(0)
    feeds = {}
    for inp in session.get_inputs():
        if inp.name == "input_ids":
            feeds[inp.name] = rng.integers(100, vocab, size=(batch, seq), dtype=np.int64)
        elif inp.name == "attention_mask":
            feeds[inp.name] = np.ones((batch, seq), np.int64)
        else:
            feeds[inp.name] = np.zeros((batch, seq), np.int64)
    return feeds


def interleaved_latency(
    sessions: dict[str, ort.InferenceSession],
    batch: int,
    seq: int,
    runs: int,
    warmup: int = 3,
    vocab: int = 1000,
) -> dict[str, float]:
    """Median latency (ms) per session; runs alternate between sessions to share the noise.
    Token ids are drawn below ``vocab``."""
    feeds = {k: fixed_inputs(s, batch, seq, vocab=vocab) for k, s in sessions.items()}
    for _ in range(warmup):
        for k, s in sessions.items():
            s.run(None, feeds[k])
    times: dict[str, list[float]] = {k: [] for k in sessions}
    for _ in range(runs):
        for k, s in sessions.items():
            t0 = time.perf_counter()
            s.run(None, feeds[k])
            times[k].append((time.perf_counter() - t0) * 1e3)
    return {k: statistics.median(v) for k, v in times.items()}

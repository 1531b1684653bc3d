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
    block: int = 5,
    settle: int = 2,
) -> dict[str, float]:
    """Median latency (ms) per session over ``runs`` timed runs. Token ids are drawn below
    ``vocab``.

    The sessions take turns in blocks: each turn is ``settle`` untimed runs, then up to
    ``block`` timed ones, so a slow phase of a shared machine is shared by every model.
    Blocks, not single runs: right after another session ran, onnxruntime's intra-op threads
    of that session are still spinning and this session's own threads are parked, so a
    session's first run after a switch measures the switch (on MiniLM, 2 threads, alternating
    single runs doubled every model's median); the untimed runs absorb it, and the timed ones
    are the steady state of a server that keeps one model busy.
    """
    feeds = {k: fixed_inputs(s, batch, seq, vocab=vocab) for k, s in sessions.items()}
    for _ in range(warmup):
        for k, s in sessions.items():
            s.run(None, feeds[k])
    times: dict[str, list[float]] = {k: [] for k in sessions}
    while any(len(v) < runs for v in times.values()):
        for k, s in sessions.items():
            for _ in range(settle):
                s.run(None, feeds[k])
            for _ in range(min(block, runs - len(times[k]))):
                t0 = time.perf_counter()
                s.run(None, feeds[k])
                times[k].append((time.perf_counter() - t0) * 1e3)
    return {k: statistics.median(v) for k, v in times.items()}

"""Latency measurement shared by demo and bench: interleaved runs, medians."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import numpy as np
import onnxruntime as ort


def fixed_inputs(session: ort.InferenceSession, batch: int, seq: int, vocab: int = 1000) -> dict:
    """Synthetic token ids (below ``vocab``), an all-ones mask, zero token types."""
    return synthetic_feeds([i.name for i in session.get_inputs()], batch, seq, vocab)


def synthetic_feeds(names: list[str], batch: int, seq: int, vocab: int = 1000) -> dict:
    """`fixed_inputs` for a runtime that is not onnxruntime: the same arrays by input name."""
    rng = np.random.default_rng(0)
    feeds = {}
    for name in names:
        if name == "input_ids":
            feeds[name] = rng.integers(100, vocab, size=(batch, seq), dtype=np.int64)
        elif name == "attention_mask":
            feeds[name] = np.ones((batch, seq), np.int64)
        else:
            feeds[name] = np.zeros((batch, seq), np.int64)
    return feeds


def interleaved_medians(
    runs_by_name: dict[str, Callable[[], object]],
    runs: int,
    warmup: int = 3,
    block: int = 5,
    settle: int = 2,
    settle_seconds: float = 0.1,
) -> dict[str, float]:
    """Median wall time (seconds) of each callable over ``runs`` timed calls, the callables
    taking turns in blocks: each turn is at least ``settle`` untimed calls lasting at least
    ``settle_seconds`` together, then up to ``block`` timed ones, after ``warmup`` untimed
    rounds.

    Blocks, not single calls, and a settling time: right after another onnxruntime session
    ran, that session's intra-op threads are still spinning and this session's own threads are
    parked, so the first runs after a switch measure the switch (on MiniLM, 2 threads:
    alternating single runs doubled every model's median; a single 80 us op at 2 threads
    measured as if it had one thread; at 1 x 128 tokens, two untimed runs, 14 ms, still left
    the model timed after a slow one 10-30% slower, so the table depended on the order of the
    models). The untimed calls absorb it, and the timed ones are the steady state of a server
    that keeps one model busy. Turns still share a slow phase of a shared machine.
    """
    for _ in range(warmup):
        for fn in runs_by_name.values():
            fn()
    times: dict[str, list[float]] = {k: [] for k in runs_by_name}
    while any(len(v) < runs for v in times.values()):
        for k, fn in runs_by_name.items():
            t_settle = time.perf_counter()
            done = 0
            while done < settle or time.perf_counter() - t_settle < settle_seconds:
                fn()
                done += 1
            for _ in range(min(block, runs - len(times[k]))):
                t0 = time.perf_counter()
                fn()
                times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def interleaved_latency(
    sessions: dict[str, ort.InferenceSession],
    batch: int,
    seq: int,
    runs: int,
    warmup: int = 3,
    vocab: int = 1000,
    block: int = 5,
    settle: int = 2,
    settle_seconds: float = 0.1,
) -> dict[str, float]:
    """Median latency (ms) per session over ``runs`` timed runs on fixed inputs (token ids
    below ``vocab``), the sessions taking turns as in `interleaved_medians`."""
    feeds = {k: fixed_inputs(s, batch, seq, vocab=vocab) for k, s in sessions.items()}
    fns = {k: (lambda s=s, f=feeds[k]: s.run(None, f)) for k, s in sessions.items()}
    medians = interleaved_medians(
        fns, runs, warmup=warmup, block=block, settle=settle, settle_seconds=settle_seconds
    )
    return {k: v * 1e3 for k, v in medians.items()}

"""bctonnx bench: a smoke run on the tiny BERT (no timing assertions: the numbers are noise at
this size), its JSON and plot, and its one-line errors."""

from __future__ import annotations

import importlib.util
import json

import pytest
from test_cli import assert_one_line_error, run_cli
from test_integer import require_library

from bctonnx.bench import parse_ints, vocab_size


def test_bench_smoke_json_table_and_plot(capsys, tiny_bert_dir, tmp_path):
    require_library()
    out, plot = tmp_path / "bench.json", tmp_path / "bench.png"
    rc, stdout, err = run_cli(
        capsys, "bench", tiny_bert_dir, "--runs", "2", "--warmup", "1", "--batch", "1,2",
        "--seq", "16", "--threads", "1", "--block-size", "16", "--presets", "w8a8",
        "--json", out, "--plot", plot,
    )  # fmt: skip
    assert rc == 0, err
    data = json.loads(out.read_text())
    assert data["shapes"] == ["1x16", "2x16"]
    rows = {r["model"]: r for r in data["records"]}
    assert list(rows) == ["fp32", "ort dynamic int8", "bct w8a8 integer", "bct w8a8 qdq"]
    for name, r in rows.items():
        assert r["status"] == "ok", (name, r["error"])
        assert set(r["latency_ms"]) == {"1x16", "2x16"}
        assert all(v > 0 for v in r["latency_ms"].values())
        assert r["bytes"] > 0 and r["peak_rss_bytes"] > 0
        assert r["vs_baseline"]["1x16"] > 0
    assert rows["fp32"]["ratio"] == 1.0
    assert rows["bct w8a8 integer"]["ratio"] > 2  # the tiny model's graph is a large share
    assert rows["ort dynamic int8"]["vs_baseline"]["1x16"] == 1.0
    assert data["rss_baseline_bytes"] > 0
    for name in rows:
        assert name in stdout
    if importlib.util.find_spec("matplotlib") is not None:
        assert plot.is_file() and plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    else:
        assert "--plot skipped" in err and not plot.exists()


def test_bench_json_to_stdout_without_rss(capsys, tiny_bert_dir):
    require_library()
    rc, stdout, _ = run_cli(
        capsys, "bench", tiny_bert_dir / "model.onnx", "--runs", "2", "--warmup", "0",
        "--batch", "1", "--seq", "8", "--threads", "1", "--block-size", "16",
        "--presets", "w4a8", "--modes", "integer", "--no-rss", "--json", "-",
    )  # fmt: skip
    assert rc == 0
    data = json.loads(stdout)
    assert [r["model"] for r in data["records"]] == ["fp32", "ort dynamic int8", "bct w4a8 integer"]
    assert all(r["peak_rss_bytes"] is None for r in data["records"])


def test_bench_reads_the_vocabulary_size(tiny_bert_dir):
    assert vocab_size(tiny_bert_dir / "model.onnx") == 512


@pytest.mark.parametrize(
    "argv, fragments",
    [
        (["--batch", "1,x"], ["--batch", "integers"]),
        (["--batch", "0"], ["--batch", "positive"]),
        (["--presets", "w9a9"], ["--presets", "w9a9"]),
        (["--modes", "fast"], ["--modes", "fast"]),
    ],
)
def test_bench_bad_flags_are_one_line_errors(capsys, tiny_bert_dir, argv, fragments):
    rc, _, err = run_cli(capsys, "bench", tiny_bert_dir, *argv)
    assert_one_line_error(rc, err, *fragments)


def test_bench_missing_model_is_a_one_line_error(capsys, tmp_path):
    rc, _, err = run_cli(capsys, "bench", tmp_path / "nothing", "--no-rss")
    assert_one_line_error(rc, err, "nothing")


def test_parse_ints():
    assert parse_ints("1, 8", "--batch") == [1, 8]


def test_interleaved_latency_takes_turns_in_settled_blocks():
    from types import SimpleNamespace

    from bctonnx.bench_util import interleaved_latency

    calls: list[str] = []

    class Fake:
        def __init__(self, name):
            self.name = name

        def get_inputs(self):
            return [SimpleNamespace(name="input_ids")]

        def run(self, _outputs, feeds):
            assert feeds["input_ids"].shape == (2, 8)
            calls.append(self.name)

    sessions = {"a": Fake("a"), "b": Fake("b")}
    medians = interleaved_latency(
        sessions, 2, 8, runs=7, warmup=1, block=5, settle=2, settle_seconds=0.0
    )
    assert set(medians) == {"a", "b"} and all(v >= 0 for v in medians.values())
    # warm-up a b, then turns: a x (2 + 5), b x (2 + 5), a x (2 + 2), b x (2 + 2)
    assert calls == ["a", "b"] + ["a"] * 7 + ["b"] * 7 + ["a"] * 4 + ["b"] * 4


def test_interleaved_medians_settle_for_a_minimum_time():
    """Untimed calls go on until the settling time has passed (at least ``settle`` of them)."""
    import time

    from bctonnx.bench_util import interleaved_medians

    calls: list[tuple[str, float]] = []

    def fn(name):
        calls.append((name, time.perf_counter()))
        time.sleep(0.005)

    interleaved_medians(
        {"a": lambda: fn("a"), "b": lambda: fn("b")},
        runs=2,
        warmup=0,
        block=2,
        settle=1,
        settle_seconds=0.05,
    )
    names = [n for n, _ in calls]
    # one turn each: >= 0.05 s of 5 ms calls untimed (>= 10), then 2 timed
    first_b = names.index("b")
    assert first_b >= 12 and set(names[:first_b]) == {"a"}
    assert len(names) - first_b >= 12 and set(names[first_b:]) == {"b"}

"""bctonnx bench: a smoke run on the tiny BERT (no timing assertions: the numbers are noise at
this size), its JSON and plot, and its one-line errors."""

from __future__ import annotations

import importlib.util
import json
import os

import pytest
from test_cli import assert_one_line_error, run_cli
from test_integer import require_library

from bctonnx.bench import parse_ints, vocab_size

# The sanitizer run (test_native_build.py) repeats these tests against an ASan/UBSan build of
# the op library with the sanitizer runtimes preloaded into python: OpenVINO's runtime and
# torch's exporter do not survive that (they die without a report, outside our code), so there
# the OpenVINO rows and the export are left out; the normal run covers them.
SANITIZER_CHILD = os.environ.get("BCTONNX_SANITIZER_CHILD") == "1"


def test_bench_smoke_json_table_and_plot(capsys, tiny_bert_dir, tmp_path):
    require_library()
    out, plot = tmp_path / "bench.json", tmp_path / "bench.png"
    rc, stdout, err = run_cli(
        capsys, "bench", tiny_bert_dir, "--runs", "2", "--warmup", "1", "--batch", "1,2",
        "--seq", "16", "--threads", "1", "--block-size", "16", "--presets", "w8a8",
        "--json", out, "--plot", plot, *(["--no-peers"] if SANITIZER_CHILD else []),
    )  # fmt: skip
    assert rc == 0, err
    data = json.loads(out.read_text())
    assert data["shapes"] == ["1x16", "2x16"]
    rows = {r["model"]: r for r in data["records"]}
    if SANITIZER_CHILD:
        assert list(rows) == ["fp32", "ort dynamic int8", "bct w8a8 integer", "bct w8a8 qdq"]
        return
    # the OpenVINO peers come with the test extra (bctonnx[peers])
    assert list(rows) == [
        "fp32", "ort dynamic int8", "openvino", "openvino nncf int8", "bct w8a8 integer",
        "bct w8a8 qdq",
    ]  # fmt: skip
    for name, r in rows.items():
        assert r["status"] == "ok", (name, r["error"])
        assert set(r["latency_ms"]) == {"1x16", "2x16"}
        assert all(v > 0 for v in r["latency_ms"].values())
        assert r["bytes"] > 0 and r["peak_rss_bytes"] > 0
        assert r["vs_baseline"]["1x16"] > 0 and r["vs_peer"]["2x16"] > 0
    assert rows["fp32"]["ratio"] == 1.0
    assert rows["bct w8a8 integer"]["ratio"] > 2  # the tiny model's graph is a large share
    assert rows["openvino nncf int8"]["ratio"] > 1.2  # int8 IR (its graph is a large share too)
    assert rows["ort dynamic int8"]["vs_baseline"]["1x16"] == 1.0
    assert rows["openvino nncf int8"]["vs_peer"]["1x16"] == 1.0
    assert data["rss_baseline_bytes"] > 0
    assert data["peers"].startswith("openvino ") and "nncf" in data["peers"]
    assert data["cpu_isa"] and data["bct_isa"] in ("scalar", "avx2", "avx512", "amx")
    for name in rows:
        assert name in stdout
    assert "vs OV int8" in stdout
    if importlib.util.find_spec("matplotlib") is not None:
        assert plot.is_file() and plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    else:
        assert "--plot skipped" in err and not plot.exists()


def test_bench_json_to_stdout_without_rss(capsys, tiny_bert_dir):
    require_library()
    rc, stdout, _ = run_cli(
        capsys, "bench", tiny_bert_dir / "model.onnx", "--runs", "2", "--warmup", "0",
        "--batch", "1", "--seq", "8", "--threads", "1", "--block-size", "16",
        "--presets", "w4a8", "--modes", "integer", "--no-rss", "--no-peers", "--json", "-",
    )  # fmt: skip
    assert rc == 0
    data = json.loads(stdout)
    assert [r["model"] for r in data["records"]] == ["fp32", "ort dynamic int8", "bct w4a8 integer"]
    assert all(r["peak_rss_bytes"] is None for r in data["records"])
    assert data["peers"] == ""


def test_bench_without_the_peers_extra_says_how_to_add_it(capsys, tiny_bert_dir, monkeypatch):
    require_library()
    from bctonnx import peers

    monkeypatch.setattr(peers, "missing_reason", lambda: "OpenVINO peers not installed "
                        f"(openvino): {peers.INSTALL_HINT}")  # fmt: skip
    rc, stdout, _ = run_cli(
        capsys, "bench", tiny_bert_dir, "--runs", "1", "--warmup", "0", "--batch", "1",
        "--seq", "8", "--threads", "1", "--block-size", "16", "--presets", "w8a8",
        "--modes", "integer", "--no-rss",
    )  # fmt: skip
    assert rc == 0
    assert 'pip install "bctonnx[peers]"' in stdout and "openvino" not in stdout.split("\n", 2)[2]


@pytest.mark.skipif(SANITIZER_CHILD, reason="torch's exporter under the sanitizer runtimes")
def test_random_bert_is_built_from_its_config_and_cached(tmp_path):
    import onnx

    from bctonnx.random_bert import random_bert

    out = random_bert("mini", cache=tmp_path)
    assert out == tmp_path / "random-bert-mini"
    assert (out / "tokenizer.json").is_file() and json.loads((out / "config.json").read_text())[
        "hidden_size"
    ] == 384
    model = onnx.load(str(out / "model.onnx"), load_external_data=False)
    shapes = {tuple(i.dims) for i in model.graph.initializer}
    assert (384, 1536) in shapes and (1536, 384) in shapes  # FFN weights of hidden 384
    assert sum(n.op_type == "Softmax" for n in model.graph.node) == 6  # six layers
    mtime = (out / "model.onnx").stat().st_mtime
    assert random_bert("mini", cache=tmp_path) == out  # cached: not built again
    assert (out / "model.onnx").stat().st_mtime == mtime


def test_random_bert_refuses_an_unknown_size(capsys):
    rc, _, err = run_cli(capsys, "bench", "--random-bert", "huge")
    assert rc == 2 and "huge" in err


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
    # one turn each: untimed calls for >= 0.05 s (however slow the machine makes them), then
    # the 2 timed ones
    first_b = names.index("b")
    assert set(names[:first_b]) == {"a"} and set(names[first_b:]) == {"b"}
    for turn in (calls[:first_b], calls[first_b:]):
        assert len(turn) >= 3
        untimed_span = turn[-2][1] - turn[0][1]  # start of the first timed call - first call
        assert untimed_span >= 0.049  # (the first call starts a few us after the clock)

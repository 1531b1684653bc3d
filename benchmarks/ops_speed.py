"""Speed of the integer nonlinear ops vs onnxruntime's float ops on the same shapes.

    python benchmarks/ops_speed.py [--block-size 32] [--runs 600] [--rounds 3] [--threads 1 2]
                                   [--lib PATH] [--ops Softmax LayerNorm]

Each row: one single-node model of ours (IntGelu / IntSoftmax with a BERT mask [1, 1, 1, 128]
and without / IntLayerNorm, int8 inputs in blocks) and the float32 op (Gelu opset 20 / Softmax
/ LayerNormalization; the float Softmax gets no mask Add, so it is the strict comparison) on
the same shape, in separate sessions with the same thread settings (intra_op_num_threads =
1 or 2, inter_op 1, sequential execution). The two sessions take turns in blocks of 200 timed
runs, each block after 100 untimed ones, so both share the machine's slow phases and neither is
timed while the other one's intra-op threads still spin (alternating single runs, or blocks of
20, measured that: at 2 threads our ops then looked as slow as at 1 thread and onnxruntime's
Softmax took 40 or 78 us from one block to the next). The table shows medians in microseconds and
the ratio int / float (< 1: ours is faster), measured two ways in the same turns:
``session.run`` with numpy feeds (Python's per-input and per-output conversions included: the
integer ops have one or two more of those, scales and mask, about 2 us at LayerNorm's shape)
and ``run_with_iobinding`` with inputs bound once and outputs allocated by onnxruntime (the
"bound" columns: the op as it runs inside a graph), and then, in sessions of their own with
onnxruntime's profiler on, the op's kernel time alone (the "kernel" columns: the mean of the
middle 80% of the per-node ``kernel_time`` events onnxruntime records; no Python, no per-call
session work: the op against the op). The whole measurement runs in ``--rounds``
fresh processes and the table gives each number's median over them, with every round's ratio:
onnxruntime's float times (and ours) move by up to 10% from one process to the next on this
machine, far more than within one. Writes
benchmarks/results/ops_speed.json. A script, not a test.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from bctonnx import runtime
from bctonnx.bench_util import interleaved_medians
from bctonnx.ops.ref_nonlinear import quantize_pow2

REPO = Path(__file__).resolve().parents[1]
SHAPES = {
    "Gelu": (1, 128, 1536),
    "Softmax": (1, 12, 128, 128),
    "Softmax-nomask": (1, 12, 128, 128),
    "LayerNorm": (1, 128, 384),
}


def _model(nodes, inputs, outputs, inits=(), domain: bool = False) -> bytes:
    graph = helper.make_graph(nodes, "bench", inputs, outputs, list(inits))
    opsets = [helper.make_opsetid("", 21)] + ([helper.make_opsetid("bctonnx", 1)] if domain else [])
    return helper.make_model(graph, opset_imports=opsets, ir_version=10).SerializeToString()


def _vi(name: str, dtype: int, shape) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, dtype, shape)


def cases(block: int, rng: np.random.Generator) -> dict[str, dict]:
    """name -> {int: (model bytes, feeds), float: (model bytes, feeds)}."""
    out = {}
    # GELU: FFN activations ~ N(0, 2) with 1% outliers x10
    shape = SHAPES["Gelu"]
    x = rng.normal(0.0, np.sqrt(2.0), shape).astype(np.float32)
    x[rng.random(shape) < 0.01] *= 10
    q, s = quantize_pow2(x, block)
    out["Gelu"] = {
        "int": (
            _model(
                [
                    helper.make_node(
                        "IntGelu", ["x", "s"], ["y", "ys"], domain="bctonnx", block_size=block
                    )
                ],
                [_vi("x", TensorProto.INT8, shape), _vi("s", TensorProto.FLOAT, s.shape)],
                [_vi("y", TensorProto.INT8, shape), _vi("ys", TensorProto.FLOAT, s.shape)],
                domain=True,
            ),
            {"x": q, "s": s},
        ),
        "float": (
            _model(
                [helper.make_node("Gelu", ["x"], ["y"])],
                [_vi("x", TensorProto.FLOAT, shape)],
                [_vi("y", TensorProto.FLOAT, shape)],
            ),
            {"x": x},
        ),
    }
    # Softmax: attention scores ~ N(0, 3), BERT mask [1, 1, 1, S] with the last 28 keys padded
    shape = SHAPES["Softmax"]
    x = rng.normal(0.0, 3.0, shape).astype(np.float32)
    mask = np.zeros((1, 1, 1, shape[-1]), np.float32)
    mask[..., 100:] = np.finfo(np.float32).min
    q, s = quantize_pow2(x, block)
    float_softmax = (
        _model(
            [helper.make_node("Softmax", ["x"], ["y"], axis=-1)],
            [_vi("x", TensorProto.FLOAT, shape)],
            [_vi("y", TensorProto.FLOAT, shape)],
        ),
        {"x": x},
    )
    for name, with_mask in (("Softmax", True), ("Softmax-nomask", False)):
        ins = ["x", "s", "m"] if with_mask else ["x", "s"]
        vis = [_vi("x", TensorProto.INT8, shape), _vi("s", TensorProto.FLOAT, s.shape)]
        vis += [_vi("m", TensorProto.FLOAT, mask.shape)] if with_mask else []
        feeds = {"x": q, "s": s, **({"m": mask} if with_mask else {})}
        node = helper.make_node("IntSoftmax", ins, ["y"], domain="bctonnx", block_size=block)
        out[name] = {
            "int": (_model([node], vis, [_vi("y", TensorProto.UINT8, shape)], domain=True), feeds),
            "float": float_softmax,
        }
    # LayerNorm: residual stream ~ N(0, 1) with 4 outlier channels x20
    shape = SHAPES["LayerNorm"]
    h = shape[-1]
    x = rng.normal(0.0, 1.0, shape).astype(np.float32)
    x[..., rng.choice(h, 4, replace=False)] *= 20
    gamma = (1 + 0.2 * rng.standard_normal(h)).astype(np.float32)
    beta = (0.1 * rng.standard_normal(h)).astype(np.float32)
    q, s = quantize_pow2(x, block)
    gq, gs = quantize_pow2(gamma, block)
    bq, bs = quantize_pow2(beta, block)
    params = [
        numpy_helper.from_array(gq, "g"),
        numpy_helper.from_array(gs, "gs"),
        numpy_helper.from_array(bq, "b"),
        numpy_helper.from_array(bs, "bs"),
    ]
    out["LayerNorm"] = {
        "int": (
            _model(
                [
                    helper.make_node(
                        "IntLayerNorm",
                        ["x", "s", "g", "gs", "b", "bs"],
                        ["y", "ys"],
                        domain="bctonnx",
                        block_size=block,
                        epsilon=1e-12,
                    )
                ],
                [_vi("x", TensorProto.INT8, shape), _vi("s", TensorProto.FLOAT, s.shape)],
                [_vi("y", TensorProto.INT8, shape), _vi("ys", TensorProto.FLOAT, s.shape)],
                params,
                domain=True,
            ),
            {"x": q, "s": s},
        ),
        "float": (
            _model(
                [
                    helper.make_node(
                        "LayerNormalization", ["x", "g", "b"], ["y"], axis=-1, epsilon=1e-12
                    )
                ],
                [_vi("x", TensorProto.FLOAT, shape)],
                [_vi("y", TensorProto.FLOAT, shape)],
                [numpy_helper.from_array(gamma, "g"), numpy_helper.from_array(beta, "b")],
            ),
            {"x": x},
        ),
    }
    return out


def _session(
    model: bytes, threads: int, lib: str | None, profile: str | None = None
) -> ort.InferenceSession:
    so = ort.SessionOptions()
    if profile:
        so.enable_profiling = True
        so.profile_file_prefix = profile
    if lib:
        so.register_custom_ops_library(lib)
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.log_severity_level = 3
    return ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])


def _bound(sess: ort.InferenceSession, feeds: dict) -> ort.IOBinding:
    """The session's inputs bound once as OrtValues, its outputs to CPU memory that
    onnxruntime allocates on every run (no numpy conversion on either side)."""
    binding = sess.io_binding()
    for name, value in feeds.items():
        binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(value))
    for out in sess.get_outputs():
        binding.bind_output(out.name, "cpu")
    return binding


def measure(case: dict, threads: int, runs: int, lib: str) -> dict[str, float]:
    """Median microseconds of the int and float sessions, each called two ways: ``session.run``
    with numpy feeds (``int``, ``float``) and ``run_with_iobinding`` (``int_bound``,
    ``float_bound``: what the op costs inside a graph, without the per-call numpy conversion
    of every input and output, of which the integer ops have more). All four take turns in
    blocks of 200 runs, each after 100 untimed ones (see
    `bctonnx.bench_util.interleaved_medians`)."""
    sess = {k: _session(case[k][0], threads, lib if k == "int" else None) for k in ("int", "float")}
    fns = {}
    for k, s in sess.items():
        feeds = case[k][1]
        binding = _bound(s, feeds)
        fns[k] = lambda s=s, f=feeds: s.run(None, f)
        fns[f"{k}_bound"] = lambda s=s, b=binding: s.run_with_iobinding(b)
    medians = interleaved_medians(fns, runs, warmup=50, block=200, settle=100)
    return {k: v * 1e6 for k, v in medians.items()}


def kernel_times(case: dict, threads: int, runs: int, lib: str, tmp: str) -> dict[str, float]:
    """Kernel time in microseconds of the int and float op, from onnxruntime's own profile (the
    ``kernel_time`` event of the one node) over ``runs`` runs after 100 untimed ones, the mean
    of the middle 80%; each session profiled alone (profiling costs a little per event, the
    same for both)."""
    out = {}
    for k in ("int", "float"):
        model, feeds = case[k]
        sess = _session(model, threads, lib if k == "int" else None, profile=f"{tmp}/{k}")
        for _ in range(100 + runs):
            sess.run(None, feeds)
        path = Path(sess.end_profiling())
        events = json.loads(path.read_text())
        path.unlink()
        durs = [
            e["dur"]
            for e in events
            if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time")
        ]
        # onnxruntime records whole microseconds: the mean of the middle 80% resolves finer
        # than the median, without the outliers
        d = sorted(durs[100:])
        cut = len(d) // 10
        out[k] = round(statistics.fmean(d[cut : len(d) - cut]), 2)
    return out


def _run_round(args, lib: str) -> list[dict]:
    """One round in this process: every selected op and thread count."""
    all_cases = cases(args.block_size, np.random.default_rng(0))
    rows = []
    for name, case in all_cases.items():
        if args.ops and name not in args.ops:
            continue
        for threads in args.threads:
            t = measure(case, threads, args.runs, lib)
            with tempfile.TemporaryDirectory(prefix="bctonnx-ops-profile-") as tmp:
                kern = kernel_times(case, threads, 2 * args.runs, lib, tmp)
            rows.append(
                {
                    "op": name,
                    "shape": list(SHAPES[name]),
                    "threads": threads,
                    "int_us": round(t["int"], 2),
                    "float_us": round(t["float"], 2),
                    "ratio": round(t["int"] / t["float"], 3),
                    "bound_int_us": round(t["int_bound"], 2),
                    "bound_float_us": round(t["float_bound"], 2),
                    "bound_ratio": round(t["int_bound"] / t["float_bound"], 3),
                    "kernel_int_us": kern["int"],
                    "kernel_float_us": kern["float"],
                    "kernel_ratio": round(kern["int"] / kern["float"], 3),
                }
            )
    return rows


def _combine(rounds: list[list[dict]]) -> list[dict]:
    """Per op and thread count: the median of each number over the rounds, and every round's
    ratios."""
    out = []
    for i, row in enumerate(rounds[0]):
        same = [r[i] for r in rounds]
        med = dict(row)
        for key in (
            "int_us",
            "float_us",
            "ratio",
            "bound_int_us",
            "bound_float_us",
            "bound_ratio",
            "kernel_int_us",
            "kernel_float_us",
            "kernel_ratio",
        ):
            med[key] = round(statistics.median(r[key] for r in same), 3)
        med["ratios"] = [r["ratio"] for r in same]
        med["bound_ratios"] = [r["bound_ratio"] for r in same]
        med["kernel_ratios"] = [r["kernel_ratio"] for r in same]
        out.append(med)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--block-size", type=int, default=32)
    ap.add_argument("--runs", type=int, default=600)
    ap.add_argument(
        "--rounds", type=int, default=3, help="fresh processes; the table is their median"
    )
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--ops", nargs="+", choices=list(SHAPES), help="only these rows (default: all)")
    ap.add_argument("--lib", help="op library (default: bctonnx.runtime.op_library_path())")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "ops_speed.json")
    ap.add_argument("--round-json", type=Path, help=argparse.SUPPRESS)  # one round, for the parent
    args = ap.parse_args()
    lib = args.lib or runtime.op_library_path()
    if lib is None:
        raise SystemExit(f"the op library is not built: {runtime.REBUILD_HINT}")
    if args.round_json:
        args.round_json.write_text(json.dumps(_run_round(args, lib)))
        return
    rounds = []
    with tempfile.TemporaryDirectory(prefix="bctonnx-ops-speed-") as tmp:
        for i in range(args.rounds):
            out = Path(tmp) / f"round{i}.json"
            cmd = [sys.executable, __file__, "--round-json", str(out), "--lib", lib]
            cmd += ["--block-size", str(args.block_size), "--runs", str(args.runs), "--threads"]
            cmd += [str(t) for t in args.threads] + (["--ops", *args.ops] if args.ops else [])
            subprocess.run(cmd, check=True)
            rounds.append(json.loads(out.read_text()))
            print(
                f"round {i + 1}/{args.rounds}: "
                + ", ".join(f"{r['op']}@{r['threads']} {r['ratio']:.2f}" for r in rounds[-1])
            )
    rows = _combine(rounds)
    print(
        f"{'op':<15} {'shape':<15} {'thr':>3} {'int us':>9} {'float us':>9} {'int/float':>9}"
        f" {'bound int':>9} {'bound flt':>9} {'int/float':>9} {'kern int':>9} {'kern flt':>9}"
        f" {'int/float':>9}   (medians of {args.rounds} rounds)"
    )
    for r in rows:
        shape = "x".join(map(str, r["shape"]))
        print(
            f"{r['op']:<15} {shape:<15} {r['threads']:>3} {r['int_us']:>9.1f} {r['float_us']:>9.1f}"
            f" {r['ratio']:>9.2f} {r['bound_int_us']:>9.1f} {r['bound_float_us']:>9.1f}"
            f" {r['bound_ratio']:>9.2f} {r['kernel_int_us']:>9.1f} {r['kernel_float_us']:>9.1f}"
            f" {r['kernel_ratio']:>9.2f}   rounds: {' '.join(f'{x:.2f}' for x in r['ratios'])}"
            f" | kernel {' '.join(f'{x:.2f}' for x in r['kernel_ratios'])}"
        )
    result = {
        "block_size": args.block_size,
        "runs": args.runs,
        "rounds": args.rounds,
        "onnxruntime": ort.__version__,
        "machine": platform.machine(),
        "processor": platform.processor() or platform.platform(),
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

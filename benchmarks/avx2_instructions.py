"""bctonnx vs onnxruntime's own int8 on an AVX2-only CPU, by exact instruction counts.

    python benchmarks/avx2_instructions.py [--workdir DIR] [--batch 1,8] [--seq 128]
                                           [--parts callgrind,timing]

onnxruntime cannot be capped to AVX2 on a machine with AVX-512, but under valgrind the CPU
reports no AVX-512 (valgrind's virtual CPU has AVX2 and FMA, no AVX-512, no AVX-VNNI): then
onnxruntime's MLAS takes its AVX2 kernels and bctonnx its avx2 path, on any x86-64 machine, and
callgrind counts the instructions each model executes exactly, whatever the machine's load.

Models: all-MiniLM-L6-v2 (the PyPI package, exported as the demo does) in FP32, onnxruntime
dynamic int8 (`bctonnx.baselines.quantize_dynamic_int8`) and the bctonnx presets w8a8 and w4a8
(integer form). Each runs in its own process under ``valgrind --tool=callgrind
--instr-atstart=no``, one thread, synthetic token ids (`bctonnx.bench_util.fixed_inputs`): one
inference untimed, then one between CALLGRIND_START/STOP_INSTRUMENTATION (a small C helper
built against valgrind's callgrind.h), so exactly one inference is counted. Per function
(callgrind_annotate) the count is split into kernels: bctonnx's by their names; onnxruntime's
library has no symbols, so its int8 GEMM kernel is found by its instructions (vpmaddubsw in
the disassembly of its hottest functions).

Instructions are not cycles (an AVX2 instruction does up to 32 byte operations, a scalar one
one; ports and latencies differ), so the per-kernel view is given too: one linear layer of
MiniLM's shape (128 x 384 -> 1536) per model, and its GEMM kernel's instructions per int8
multiply-accumulate (bctonnx's exact sign trick against MLAS's vpmaddubsw + vpmaddwd, which can
saturate int16). The timing part also times the models on this machine's own CPU
in one interleaved run, bctonnx capped per session with BCTONNX_ISA (avx2, and avx512 where the
CPU has it; onnxruntime uncapped). Writes benchmarks/results/avx2_instructions.json; render
the README block with render_readme.py. Needs valgrind (Debian: ``apt-get install valgrind``)
and a C compiler.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "benchmarks" / "results" / "avx2_instructions.json"
PRESETS = ("w8a8", "w4a8")
BASELINE = "ort dynamic int8"
LINEAR = (128, 384, 1536)  # rows (1 x 128 tokens), K, N: MiniLM's FFN input layer

# Counts exactly one call of a Python callback (through ctypes).
HELPER_C = r"""
#include <valgrind/callgrind.h>
void bct_count(void (*fn)(void)) {
  CALLGRIND_ZERO_STATS;
  CALLGRIND_START_INSTRUMENTATION;
  fn();
  CALLGRIND_STOP_INSTRUMENTATION;
}
"""

# bctonnx's functions by kernel (first match wins), then onnxruntime's and the rest.
BCT_KERNELS = [
    ("GEMM (BlockMatMul, attention scores)", r"bct::gemm::Gemm"),
    ("activation packing", r"bct::gemm::PackAct"),
    ("P.V (attention)", r"bct::pv::"),
    ("softmax", r"[Ss]oftmax"),
    ("GELU", r"[Gg]elu"),
    ("LayerNorm", r"[Ll]ayer[Nn]orm"),
    ("quantize, requantize", r"Quantize|Requantize|BlockExponent|Dequantize"),
]
MLAS_INT8 = "MLAS int8 GEMM kernel"
ANNOTATE_LINE = re.compile(r"^\s*([\d,]+) \(\s*[\d.]+%\)\s+(.*) \[(.*)\]\s*$")


# ---------------------------------------------------------------------------------------------
# Child: one model, one shape, counted under callgrind


def child(model: str, batch: int, seq: int, helper: str, info: str) -> None:
    import ctypes

    import numpy as np

    from bctonnx.bench import bct_kernel_isa
    from bctonnx.bench_util import fixed_inputs
    from bctonnx.runtime import make_session

    sess = make_session(model, 1)
    if batch:
        feeds = fixed_inputs(sess, batch, seq)
    else:  # the one-layer models: float activations [1, rows, K]
        rows, k, _ = LINEAR
        rng = np.random.default_rng(1)
        feeds = {sess.get_inputs()[0].name: rng.standard_normal((1, rows, k), np.float32)}
    sess.run(None, feeds)  # untimed: first-run allocations, lazy initialization
    fn = ctypes.CFUNCTYPE(None)(lambda: sess.run(None, feeds))
    ctypes.CDLL(helper).bct_count(fn)
    features = np._core._multiarray_umath.__cpu_features__
    Path(info).write_text(
        json.dumps(
            {
                "bct_isa": bct_kernel_isa(),
                "cpu": {k: features[k] for k in ("AVX2", "FMA3", "AVX512F", "AVX512VNNI")},
            }
        )
    )


# ---------------------------------------------------------------------------------------------
# Parent: build, count, split into kernels


def build_helper(workdir: Path) -> Path:
    so = workdir / "callgrind_count.so"
    if so.is_file():
        return so
    src = workdir / "callgrind_count.c"
    src.write_text(HELPER_C)
    cc = os.environ.get("CC", "cc")
    res = subprocess.run(
        [cc, "-O1", "-shared", "-fPIC", "-o", str(so), str(src)], capture_output=True, text=True
    )
    if res.returncode != 0:
        raise SystemExit(f"building the callgrind helper failed (valgrind headers?):\n{res.stderr}")
    return so


def build_models(workdir: Path) -> dict[str, Path]:
    """name -> model path: MiniLM in four forms, and one linear layer in the same four."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from bctonnx.api import compress_file
    from bctonnx.baselines import quantize_dynamic_int8
    from bctonnx.config import resolve_config
    from bctonnx.demo import extract_minilm
    from bctonnx.export import export_model
    from bctonnx.modelio import MODEL_FILENAME

    fp32 = workdir / "onnx-fp32"
    if not (fp32 / MODEL_FILENAME).is_file():
        export_model(extract_minilm(workdir), fp32, task="feature-extraction")
    rows, k, n = LINEAR
    linear = workdir / "linear-fp32.onnx"
    if not linear.is_file():
        rng = np.random.default_rng(0)
        w = numpy_helper.from_array((rng.standard_normal((k, n)) * 0.05).astype(np.float32), "w")
        b = numpy_helper.from_array((rng.standard_normal(n) * 0.1).astype(np.float32), "b")
        graph = helper.make_graph(
            [helper.make_node("MatMul", ["x", "w"], ["t"]), helper.make_node("Add", ["t", "b"], ["y"])],
            "linear",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", "S", k])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", "S", n])],
            [w, b],
        )  # fmt: skip
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
        onnx.save(model, linear)
    models = {"fp32": fp32 / MODEL_FILENAME, "linear fp32": linear}
    for prefix, src in (("", fp32 / MODEL_FILENAME), ("linear ", linear)):
        out = workdir / f"{prefix.strip() or 'minilm'}-dynamic-int8.onnx"
        if not out.is_file():
            quantize_dynamic_int8(src, out)
        models[f"{prefix}{BASELINE}"] = out
        for preset in PRESETS:
            out = workdir / f"{prefix.strip() or 'minilm'}-{preset}.onnx"
            if not out.is_file():
                compress_file(src, out, resolve_config(preset, mode="integer"))
            models[f"{prefix}bct {preset}"] = out
    return models


def count(model: Path, batch: int, seq: int, helper: Path, workdir: Path) -> tuple[Path, dict]:
    """Run one counted inference under callgrind; the profile's path and the child's info."""
    tag = re.sub(r"\W+", "_", f"{model.stem}_{batch}x{seq}")
    out, info = workdir / f"callgrind.{tag}.out", workdir / f"info.{tag}.json"
    from bctonnx.runtime import op_library_path

    inputs = [model, Path(op_library_path() or model)]
    if (
        out.is_file()
        and info.is_file()
        and all(out.stat().st_mtime > p.stat().st_mtime for p in inputs)
    ):
        return out, json.loads(info.read_text())  # counted before, same model and op library
    env = dict(os.environ, PYTHONHASHSEED="0")
    env.pop("BCTONNX_ISA", None)  # the kernels pick what valgrind's CPU has
    cmd = [
        "valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={out}",
        sys.executable, __file__, "--child", str(model), "--batch", str(batch), "--seq", str(seq),
        "--helper", str(helper), "--info", str(info),
    ]  # fmt: skip
    res = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if res.returncode != 0:
        raise SystemExit(f"valgrind run of {model} failed:\n{res.stderr[-3000:]}")
    return out, json.loads(info.read_text())


def functions(profile: Path) -> list[tuple[int, str, str]]:
    """(instructions, function, object file) per function, from callgrind_annotate."""
    res = subprocess.run(
        ["callgrind_annotate", "--threshold=100", str(profile)],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    rows = []
    for line in res.stdout.splitlines():
        m = ANNOTATE_LINE.match(line)
        if m and "PROGRAM TOTALS" not in line:
            fn = m.group(2).split(":", 1)[1] if ":" in m.group(2) else m.group(2)
            rows.append((int(m.group(1).replace(",", "")), fn, m.group(3)))
    return rows


def mnemonics(obj: str, address: str, span: int = 4096) -> set[str]:
    """Instruction mnemonics of a function of a stripped library, from its entry to its first
    ret (or `span` bytes)."""
    if shutil.which("objdump") is None:
        return set()
    start = int(address, 16)
    res = subprocess.run(
        ["objdump", "-d", "--no-show-raw-insn", f"--start-address={start:#x}",
         f"--stop-address={start + span:#x}", obj],
        capture_output=True, text=True,
    )  # fmt: skip
    seen = set()
    for line in res.stdout.splitlines():
        parts = line.split("\t")
        if len(parts) >= 2 and re.match(r"^\s*[0-9a-f]+:$", parts[0]):
            op = parts[1].split()[0] if parts[1].split() else ""
            if op == "{vex}" and len(parts[1].split()) > 1:
                op = parts[1].split()[1]
            seen.add(op)
            if op.startswith("ret"):
                break
    return seen


def kernel_of(fn: str, obj: str, total: int, cost: int, cache: dict) -> str:
    name = os.path.basename(obj)
    if "libbctonnx_ops" in name or name == os.path.basename(
        os.environ.get("BCTONNX_OP_LIBRARY", "-")
    ):
        for label, pattern in BCT_KERNELS:
            if re.search(pattern, fn):
                return label
        return "other bctonnx"
    if "onnxruntime" in name:
        if fn.startswith("0x") and cost >= 0.005 * total:
            if (obj, fn) not in cache:
                cache[(obj, fn)] = "vpmaddubsw" in mnemonics(obj, fn)
            if cache[(obj, fn)]:
                return MLAS_INT8
        return "onnxruntime, other"
    return "Python, numpy, libc"


def profile_summary(profile: Path, cache: dict) -> dict:
    rows = functions(profile)
    total = sum(c for c, _, _ in rows)
    kernels: dict[str, int] = {}
    mlas = []
    for cost, fn, obj in rows:
        label = kernel_of(fn, obj, total, cost, cache)
        kernels[label] = kernels.get(label, 0) + cost
        if label == MLAS_INT8:
            mlas.append(fn)
    return {
        "instructions": total,
        "kernels": dict(sorted(kernels.items(), key=lambda kv: -kv[1])),
        "mlas_int8_kernel_entries": mlas,  # addresses in onnxruntime's library
    }


def linear_macs(tokens: int) -> int:
    """int8 multiply-accumulates of MiniLM's 36 linear layers for `tokens` tokens."""
    hidden, ffn, layers = 384, 1536, 6
    return tokens * layers * (4 * hidden * hidden + 2 * hidden * ffn)


# ---------------------------------------------------------------------------------------------
# Wall clock on this machine (not AVX2-only: onnxruntime takes what the CPU has)


def timing(models: dict[str, Path], batches: list[int], seq: int, runs: int) -> dict:
    from bctonnx.bench import bct_kernel_isa, cpu_isa_summary, cpu_name
    from bctonnx.bench_util import interleaved_latency
    from bctonnx.runtime import make_session

    best = bct_kernel_isa()
    caps = [
        isa for isa in ("avx512", "avx2") if isa == best or (isa == "avx2" and best != "scalar")
    ]
    sessions = {BASELINE: make_session(models[BASELINE], 1)}
    saved = os.environ.get("BCTONNX_ISA")
    try:
        for preset in PRESETS:
            for isa in caps:
                os.environ["BCTONNX_ISA"] = isa  # read when the session creates its kernels
                sessions[f"bct {preset} {isa}"] = make_session(models[f"bct {preset}"], 1)
    finally:
        if saved is None:
            os.environ.pop("BCTONNX_ISA", None)
        else:
            os.environ["BCTONNX_ISA"] = saved
    result = {"cpu": cpu_name(), "cpu_isa": cpu_isa_summary(), "threads": 1, "runs": runs,
              "latency_ms": {}}  # fmt: skip
    for b in batches:
        lat = interleaved_latency(sessions, batch=b, seq=seq, runs=runs)
        result["latency_ms"][f"{b}x{seq}"] = lat
    return result


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workdir", type=Path, help="export/cache folder (default: temporary)")
    ap.add_argument("--batch", default="1,8")
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--runs", type=int, default=20, help="timed runs per model (timing part)")
    ap.add_argument(
        "--parts",
        default="callgrind,timing",
        help="callgrind (instruction counts), timing (wall clock here); a part not run keeps "
        "its previous results in --out",
    )
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--helper", help=argparse.SUPPRESS)
    ap.add_argument("--info", help=argparse.SUPPRESS)
    args = ap.parse_args()
    batches = [int(b) for b in args.batch.split(",")]
    if args.child:
        return child(args.child, batches[0], args.seq, args.helper, args.info)
    for tool in ("valgrind", "callgrind_annotate"):
        if shutil.which(tool) is None:
            raise SystemExit(
                f"{tool} not found: install valgrind (Debian: apt-get install valgrind)"
            )

    import onnxruntime

    from bctonnx.bench import cpu_isa_summary, cpu_name

    with tempfile.TemporaryDirectory() as tmp:
        work = args.workdir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        helper = build_helper(work)
        models = build_models(work)
        version = subprocess.run(["valgrind", "--version"], capture_output=True, text=True)
        data = {
            "onnxruntime": onnxruntime.__version__,
            "valgrind": version.stdout.strip(),
            "host_cpu": cpu_name(),
            "host_isa": cpu_isa_summary(),
            "threads": 1,
            "runs": [],
        }
        previous = json.loads(args.out.read_text()) if args.out.is_file() else {}
        parts = set(args.parts.split(","))
        if "callgrind" not in parts:
            data.update({k: previous[k] for k in ("runs", "linear_layer") if k in previous})
        if "timing" not in parts and "timing" in previous:
            data["timing"] = previous["timing"]
        cache: dict = {}
        for b in batches if "callgrind" in parts else []:
            for name in ("fp32", BASELINE, *(f"bct {p}" for p in PRESETS)):
                print(f"callgrind: {name} {b}x{args.seq}", flush=True)
                profile, info = count(models[name], b, args.seq, helper, work)
                rec = {"model": name, "shape": f"{b}x{args.seq}", **info}
                rec.update(profile_summary(profile, cache))
                rec["linear_macs"] = linear_macs(b * args.seq)
                data["runs"].append(rec)
        if "callgrind" in parts:
            rows, k, n = LINEAR
            data["linear_layer"] = {"rows": rows, "k": k, "n": n, "macs": rows * k * n}
            data["linear_layer"]["models"] = []
            for name in ("fp32", BASELINE, *(f"bct {p}" for p in PRESETS)):
                print(f"callgrind: one linear layer, {name}", flush=True)
                profile, info = count(models[f"linear {name}"], 0, 0, helper, work)
                rec = {"model": name, **info, **profile_summary(profile, cache)}
                data["linear_layer"]["models"].append(rec)
        if "timing" in parts:
            print("timing on this machine", flush=True)
            data["timing"] = timing(models, batches, args.seq, args.runs)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(data, indent=2) + "\n")
    print(format_summary(data))


def gemm_per_mac(rec: dict, macs: int) -> float | None:
    """Instructions per int8 multiply-accumulate of the GEMM kernel in a run."""
    kernel = rec["kernels"].get(MLAS_INT8) or rec["kernels"].get(BCT_KERNELS[0][0])
    return kernel / macs if kernel else None


def format_summary(data: dict) -> str:
    lines = ["instructions of one inference under callgrind (MiniLM, 1 thread; ratio to ort int8):"]
    base = {r["shape"]: r["instructions"] for r in data["runs"] if r["model"] == BASELINE}
    for r in data["runs"]:
        ratio = r["instructions"] / base[r["shape"]]
        lines.append(
            f"  {r['model']:<18} {r['shape']:>6} {r['instructions'] / 1e6:9.1f} M  {ratio:5.2f}x"
        )
    lin = data["linear_layer"]
    lines.append(
        f"one linear layer {lin['rows']}x{lin['k']}x{lin['n']}: GEMM kernel instructions per MAC"
    )
    for r in lin["models"]:
        per = gemm_per_mac(r, lin["macs"])
        lines.append(
            f"  {r['model']:<18} {r['instructions'] / 1e6:7.2f} M"
            + (f"  {per:.3f}/MAC" if per else "")
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()

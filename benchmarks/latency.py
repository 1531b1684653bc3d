"""MiniLM latency, size and peak memory: FP32 vs onnxruntime dynamic int8 vs the BCT presets.

    python benchmarks/latency.py [--workdir DIR] [--runs 30] [--threads 2] [--block-amx]

Exports all-MiniLM-L6-v2 from the PyPI package as the demo does, then runs ``bctonnx bench``
(`bctonnx.bench.run_bench`: one interleaved run, batch 1 x 128 and 8 x 128) and writes
benchmarks/results/latency.json; render the README block with render_readme.py.

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
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    if args.block_amx:
        block_amx()  # before onnxruntime is loaded (MLAS asks for AMX at start-up)

    from bctonnx.bench import format_table, parse_ints, run_bench, write_plot
    from bctonnx.demo import extract_minilm
    from bctonnx.export import export_model
    from bctonnx.modelio import MODEL_FILENAME

    with tempfile.TemporaryDirectory() as tmp:
        work = args.workdir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        fp32 = work / "onnx-fp32"
        if not (fp32 / MODEL_FILENAME).is_file():
            export_model(extract_minilm(work), fp32, task="feature-extraction")
        result = run_bench(
            fp32,
            batches=parse_ints(args.batch, "--batch"),
            seq=args.seq,
            threads=args.threads,
            runs=args.runs,
            progress=lambda msg: print(f"bench: {msg}", flush=True),
        )
    record = result.to_dict()
    record["model"] = "all-MiniLM-L6-v2 (optimum export)"
    record["onnxruntime_amx"] = "blocked" if args.block_amx else "as the machine has it"
    data = json.loads(args.out.read_text()) if args.out.is_file() else {}
    key = "no_amx" if args.block_amx else "main"
    data[key] = record
    if not args.block_amx:
        data.pop("no_amx", None)  # a fresh main run: an old comparison run no longer matches
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(data, indent=2) + "\n")
    print(format_table(result))
    if args.plot:
        print(write_plot(result, args.plot) or f"plot: {args.plot}")


if __name__ == "__main__":
    main()

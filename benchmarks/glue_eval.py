"""GLUE dev metrics of the fine-tuned MiniLMs: FP32 vs every preset vs onnxruntime's quantizers.

    python benchmarks/glue_eval.py [--shared ../shared] [--tasks sst2,stsb,cola] [--threads 2]
                                   [--presets w8a8,w4a8] [--modes qdq,integer]

For each task, the same run as ``bctonnx eval --model-dir ../shared/models/minilm-<task>
--task <task> --glue-dir ../shared/data/glue --baselines`` (every preset in every mode by
default, whole dev set; a config that fails to build or run is a "failed" record), one result
per task in benchmarks/results/glue.json. README's GLUE table is rendered from that JSON by
benchmarks/render_readme.py.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import time
from pathlib import Path

import onnxruntime

import bctonnx
from bctonnx.config import MODES
from bctonnx.evaluate import eval_configs, format_table, run_eval

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shared", type=Path, default=REPO.parent / "shared")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "glue.json")
    ap.add_argument("--tasks", default="sst2,stsb,cola")
    ap.add_argument("--presets", default=",".join(bctonnx.PRESETS))
    ap.add_argument("--modes", default=",".join(MODES), help="lowering modes, each preset in each")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--limit", type=int, help="first N dev examples only (smoke runs)")
    args = ap.parse_args()
    configs = [c for mode in args.modes.split(",") for c in eval_configs([args.presets], mode=mode)]
    runs = []
    for task in args.tasks.split(","):
        t0 = time.time()
        result = run_eval(
            args.shared / f"models/minilm-{task}",
            task,
            args.shared / "data/glue",
            configs,
            baselines=True,
            limit=args.limit,
            threads=args.threads,
        )
        print(format_table(result), f"\n({time.time() - t0:.0f} s)\n", flush=True)
        run = result.to_dict()
        # paths relative to the repository's parent, where ../shared lives
        for key in ("model_dir", "dev_file"):
            p = Path(run[key]).resolve()
            run[key] = str(p.relative_to(REPO.parent)) if p.is_relative_to(REPO.parent) else str(p)
        runs.append(run)
    commit = subprocess.run(
        ["git", "describe", "--always", "--dirty"], cwd=REPO, capture_output=True, text=True
    ).stdout.strip()
    out = {
        "commit": commit,  # "-dirty": measured with uncommitted changes in the working tree
        "threads": args.threads,
        "onnxruntime": onnxruntime.__version__,
        "bctonnx": bctonnx.__version__,
        "machine": platform.machine(),
        "runs": runs,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

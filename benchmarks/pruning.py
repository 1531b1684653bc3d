"""Pruning / N:M results for the README: GLUE dev metrics of the fine-tuned MiniLMs and one
`bctonnx bench` run, gathered into benchmarks/results/pruning.json (rendered by
benchmarks/render_readme.py).

    # the evals and the bench (each a plain bctonnx command; --json files)
    bctonnx eval --model-dir MINILM_SST2 --task sst2 --glue-dir GLUE --preset w8a8 \\
        --prune-ffn 0.5 --json sst2_ffn.json
    bctonnx eval --model-dir MINILM_STSB --task stsb --glue-dir GLUE --preset w8a8 \\
        --prune-ffn 0.5 --json stsb_ffn.json
    bctonnx bench MINILM_SST2 --presets w8a8 --modes integer,qdq --prune-ffn 0.5 --json bench.json
    # then
    python benchmarks/pruning.py --evals sst2_ffn.json stsb_ffn.json --bench bench.json

Several eval files of one task are merged (FP32 once, every compressed model).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

OUT = Path(__file__).resolve().parent / "results" / "pruning.json"


def merge_evals(paths: list[str]) -> list[dict]:
    runs: dict[str, dict] = {}
    for path in paths:
        data = json.loads(Path(path).read_text())
        run = runs.setdefault(data["task"], {**data, "records": []})
        seen = {r["model"] for r in run["records"]}
        run["records"] += [r for r in data["records"] if r["model"] not in seen]
    return list(runs.values())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--evals", nargs="*", default=[], help="bctonnx eval --json files")
    p.add_argument("--bench", help="a bctonnx bench --json file")
    p.add_argument("-o", "--output", default=str(OUT))
    args = p.parse_args()
    out = Path(args.output)
    data = json.loads(out.read_text()) if out.is_file() else {}
    if args.evals:
        data["runs"] = merge_evals(args.evals)
    if args.bench:
        data["bench"] = json.loads(Path(args.bench).read_text())
    out.write_text(json.dumps(data, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

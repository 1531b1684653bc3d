"""MiniLM sentence-embedding fidelity, size and latency of each preset (the demo, on SST-2 text).

    python benchmarks/embeddings.py [--shared ../shared] [--texts 256]

Writes benchmarks/results/embeddings.json; render into the README with render_readme.py.
"""

from __future__ import annotations

import argparse
import csv
import json
import tempfile
from pathlib import Path

from bctonnx.demo import run_demo

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shared", type=Path, default=REPO.parent / "shared")
    ap.add_argument("--texts", type=int, default=256)
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "embeddings.json")
    args = ap.parse_args()
    with open(args.shared / "data/glue/SST-2/dev.tsv", encoding="utf-8") as f:
        rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))[1:]
    texts = [r[0] for r in rows[: args.texts]]
    with tempfile.TemporaryDirectory() as tmp:
        rows = run_demo(workdir=Path(tmp), texts=texts, runs=args.runs)
    result = {"texts": len(texts), "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

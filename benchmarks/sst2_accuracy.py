"""SST-2 dev accuracy of the fine-tuned MiniLM: FP32 vs each preset, on onnxruntime.

    python benchmarks/sst2_accuracy.py [--shared ../shared] [--out benchmarks/results/sst2.json]

Exports ../shared/models/minilm-sst2 (text-classification, FP32), compresses it with every
preset, runs the full dev set (872 sentences) through each model and writes one JSON record
per model: accuracy, drop vs FP32, file size and compression ratio. README tables are rendered
from that JSON by benchmarks/render_readme.py.
"""

from __future__ import annotations

import argparse
import csv
import json
import tempfile
import time
from pathlib import Path

import numpy as np

import bctonnx
from bctonnx.export import export_model
from bctonnx.modelio import model_file_bytes
from bctonnx.runtime import make_session
from bctonnx.validate import load_tokenizer, make_feeds

REPO = Path(__file__).resolve().parents[1]


def read_sst2(path: Path) -> tuple[list[str], np.ndarray]:
    with open(path, encoding="utf-8") as f:
        rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    return [r[0] for r in rows[1:]], np.array([int(r[1]) for r in rows[1:]])


def accuracy(model_path: Path, batches, labels: np.ndarray, threads: int) -> float:
    sess = make_session(model_path, threads)
    preds = [sess.run(["logits"], b)[0].argmax(-1) for b in batches]
    return float((np.concatenate(preds) == labels).mean() * 100)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shared", type=Path, default=REPO.parent / "shared")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "sst2.json")
    ap.add_argument("--presets", default=",".join(bctonnx.PRESETS))
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    texts, labels = read_sst2(args.shared / "data/glue/SST-2/dev.tsv")
    with tempfile.TemporaryDirectory() as tmp:
        fp32 = export_model(
            args.shared / "models/minilm-sst2", Path(tmp) / "fp32", task="text-classification"
        )
        tok = load_tokenizer(fp32)
        sess = make_session(fp32 / "model.onnx")
        names = [i.name for i in sess.get_inputs()]
        batches = make_feeds(names, texts, tok, batch_size=32, max_length=128)
        fp32_bytes = model_file_bytes(fp32)
        records = []
        base = accuracy(fp32 / "model.onnx", batches, labels, args.threads)
        records.append(
            {"model": "fp32", "accuracy": base, "drop": 0.0, "bytes": fp32_bytes, "ratio": 1.0}
        )
        for preset in args.presets.split(","):
            out = Path(tmp) / preset
            t0 = time.time()
            bctonnx.compress_file(fp32, out, bctonnx.resolve_config(preset))
            acc = accuracy(out / "model.onnx", batches, labels, args.threads)
            size = model_file_bytes(out)
            records.append(
                {
                    "model": f"bct {preset}",
                    "config": bctonnx.resolve_config(preset).describe(),
                    "accuracy": acc,
                    "drop": acc - base,
                    "bytes": size,
                    "ratio": fp32_bytes / size,
                    "seconds": time.time() - t0,
                }
            )
            print(records[-1], flush=True)
    result = {"task": "sst2", "metric": "accuracy", "n": int(len(labels)), "records": records}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

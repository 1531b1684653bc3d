"""Render the README's results tables from benchmark JSON (never typed by hand).

    python benchmarks/render_readme.py      # rewrites the blocks between BEGIN/END markers

Each table lives between ``<!-- BEGIN name -->`` and ``<!-- END name -->`` in README.md and is
rendered from benchmarks/results/<name>.json.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from bctonnx.glue import TASKS

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"


def render_embeddings(data: dict) -> str:
    lines = [
        f"all-MiniLM-L6-v2 sentence embeddings (mean pooled), {data['texts']} SST-2 dev sentences, "
        "cosine vs FP32; latency batch 1 x 128 tokens, 2 threads, median of interleaved runs:",
        "",
        "| model | size | ratio | cosine vs FP32 | latency |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in data["rows"]:
        lines.append(
            f"| {r['model']} | {r['bytes'] / 1e6:.1f} MB | {r['ratio']:.2f}x | {r['cosine']:.4f} "
            f"| {r['latency_ms']:.1f} ms |"
        )
    return "\n".join(lines)


def render_glue(data: dict) -> str:
    """One row per task metric (primary first) and a size-ratio row; a column per model."""
    runs = data["runs"]
    models: list[str] = []
    for run in runs:
        models += [r["model"] for r in run["records"] if r["model"] not in models]
    lines = [
        "GLUE dev sets, all-MiniLM-L6 fine-tuned per task (`../shared/models/minilm-<task>`), "
        f"onnxruntime {data['onnxruntime']} CPU, {data['threads']} threads; metrics in points "
        "(x100), difference to FP32 in parentheses, ratio = FP32 file bytes / model file bytes:",
        "",
        "| task | metric | " + " | ".join(models) + " |",
        "|---|---|" + "---:|" * len(models),
    ]
    failures = []
    for run in runs:
        by_model = {r["model"]: r for r in run["records"]}
        task = f"{TASKS[run['task']].folder} ({run['n']})"
        for metric in run["metrics"]:
            cells = []
            for m in models:
                r = by_model.get(m)
                if r is None:
                    cells.append("")
                elif r["status"] != "ok":
                    cells.append("failed")
                    if (m, r["error"]) not in failures:
                        failures.append((m, r["error"]))
                elif r["kind"] == "fp32":
                    cells.append(f"{r['metrics'][metric]:.2f}")
                else:
                    cells.append(f"{r['metrics'][metric]:.2f} ({r['vs_fp32'][metric]:+.2f})")
            lines.append(f"| {task} | {metric} | " + " | ".join(cells) + " |")
            task = ""
        ratios = [
            f"{by_model[m]['ratio']:.2f}x"
            if m in by_model and by_model[m]["status"] == "ok"
            else ""
            for m in models
        ]
        lines.append("|  | ratio | " + " | ".join(ratios) + " |")
    configs = {}
    for run in runs:
        for r in run["records"]:
            if r["kind"] != "fp32":
                configs.setdefault(r["model"], r["config"])
    lines.append("")
    lines += [f"- {m}: {c}" for m, c in configs.items()]
    lines += [f"- {m} failed: {e}" for m, e in failures]
    return "\n".join(lines)


RENDERERS = {"embeddings": render_embeddings, "glue": render_glue}


def main() -> None:
    readme = REPO / "README.md"
    text = readme.read_text(encoding="utf-8")
    for name, render in RENDERERS.items():
        path = RESULTS / f"{name}.json"
        if not path.is_file():
            continue
        block = render(json.loads(path.read_text()))
        pattern = re.compile(rf"(<!-- BEGIN {name} -->\n).*?(<!-- END {name} -->)", re.S)
        text = pattern.sub(lambda m, b=block: m.group(1) + b + "\n" + m.group(2), text)
    readme.write_text(text, encoding="utf-8")


if __name__ == "__main__":
    main()

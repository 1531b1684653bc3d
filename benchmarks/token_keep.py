"""Token downsampling on MiniLM: label-free fidelity of the design choices, then speed and
accuracy of keep ratios stacked on w8a8.

    python benchmarks/token_keep.py [--shared ../shared] [--threads 2] [--runs 20]
                                    [--parts fidelity,bench,glue,embeddings]

- fidelity: the float models (no quantization) with token dropping inserted
  (`bctonnx.passes.token_drop.TokenDrop` after canonicalize), compared with FP32 on unlabeled
  text: 800 STS-B train pairs (mean |score difference|), 800 SST-2 train sentences of 8+ words
  (label agreement, logit RMS difference), all-MiniLM-L6-v2 embeddings of 800 STS-B train
  sentences (mean-pooled cosine). The defaults were chosen on these numbers, never on the dev
  sets.
- bench: one `bctonnx bench` run (`run_bench`) of the SST-2 model: FP32, onnxruntime dynamic
  int8, w8a8 and w8a8 with each schedule (integer form), batch 8 x 128 and 8 x 384 tokens.
- glue: `bctonnx eval` of w8a8 and w8a8 with each schedule on the SST-2 and STS-B dev sets
  (paired bootstrap intervals vs FP32).
- embeddings: all-MiniLM-L6-v2 (PyPI package) compressed w8a8 with each schedule, the
  package's sentences padded to 128 tokens: mean-pooled cosine vs FP32, and the encoder FLOPs
  saved per sentence (real tokens) and for the padded batch.

Writes benchmarks/results/token_keep.json (parts not run keep their previous results);
render_readme.py renders the README table from it.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
from bctonnx.passes import Canonicalize
from bctonnx.passes.token_drop import TokenDrop, encoder_flops, encoder_shape, tokens_per_layer

import bctonnx
from bctonnx.config import parse_token_keep, resolve_config
from bctonnx.runtime import session_options

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "benchmarks" / "results" / "token_keep.json"
# the README's schedules: the default stage at two ratios, plain dropping for comparison, and
# a schedule with about 40% of the encoder FLOPs, for 2x at 8 x 384 (45% measured 1.8x): the
# best label-free fidelity (STS-B mean |d| 1.28, SST-2 logit RMS 1.00) among 0.5@1,0.25@2 /
# 0.4@1,0.2@3 / 0.3@1 / 0.6@1,0.2@2 / 0.45@1,0.2@3 / 0.4@1,0.25@3 / 0.7@1,0.3@2,0.15@3
SCHEDULES = [
    ("0.7", {"token_keep": "0.7"}),
    ("0.5", {"token_keep": "0.5"}),
    ("0.5 dropped", {"token_keep": "0.5", "token_merge": False}),
    ("0.45@1,0.2@3", {"token_keep": "0.45@1,0.2@3"}),
]
FIDELITY = {
    # task: [(label, stages, TokenDrop keywords)]
    "stsb": [
        ("0.5@3 attention, merged", "0.5@3", {"score": "attention"}),
        ("0.5@3 attention, dropped", "0.5@3", {"score": "attention", "merge": False}),
        ("0.5@3 cls, merged", "0.5@3", {"score": "cls"}),
        ("0.5@3 cls, dropped", "0.5@3", {"score": "cls", "merge": False}),
        ("0.5@3 redundancy, merged", "0.5@3", {"score": "redundancy"}),
        ("0.5@2 attention, merged", "0.5@2", {"score": "attention"}),
        ("0.5@4 attention, merged", "0.5@4", {"score": "attention"}),
        ("0.7@3 attention, merged", "0.7@3", {"score": "attention"}),
        ("0.7@3 attention, dropped", "0.7@3", {"score": "attention", "merge": False}),
        ("0.45@1,0.2@3 attention, merged", "0.45@1,0.2@3", {"score": "attention"}),
        ("0.4@1,0.25@3 attention, merged", "0.4@1,0.25@3", {"score": "attention"}),
        ("0.5@1,0.25@2 attention, merged", "0.5@1,0.25@2", {"score": "attention"}),
    ],
    "emb": [
        ("0.5@3 redundancy, merged, copy", "0.5@3", {"score": "redundancy"}),
        ("0.5@3 redundancy, merged, frozen", "0.5@3", {"score": "redundancy", "output": "frozen"}),
        ("0.5@3 redundancy, dropped, copy", "0.5@3", {"score": "redundancy", "merge": False}),
        ("0.5@3 attention, merged, copy", "0.5@3", {"score": "attention"}),
        ("0.5@3 attention, dropped, copy", "0.5@3", {"score": "attention", "merge": False}),
        ("0.5@3 attention, dropped, frozen", "0.5@3",
         {"score": "attention", "merge": False, "output": "frozen"}),
        ("0.5@4 redundancy, merged, copy", "0.5@4", {"score": "redundancy"}),
        ("0.5@5 redundancy, merged, copy", "0.5@5", {"score": "redundancy"}),
        ("0.7@3 redundancy, merged, copy", "0.7@3", {"score": "redundancy"}),
        ("0.7@3 attention, merged, copy", "0.7@3", {"score": "attention"}),
        ("0.8@3 redundancy, merged, copy", "0.8@3", {"score": "redundancy"}),
    ],
}  # fmt: skip
FIDELITY["sst2"] = FIDELITY["stsb"]


def _session(model) -> ort.InferenceSession:
    data = model.SerializeToString() if hasattr(model, "SerializeToString") else str(model)
    return ort.InferenceSession(data, session_options(2))


def _float_model(path: Path, stages: str | None, special: tuple[int, ...], **kw):
    from bctonnx.modelio import load_model

    model, _ = load_model(path)
    Canonicalize()(model)
    if stages:
        TokenDrop(parse_token_keep(stages), special_ids=special, **kw)(model)
    return ir.serde.serialize_model(model)


def _batches(tokenizer, texts, size=32, padding="longest", max_length=128) -> list[dict]:
    out = []
    for i in range(0, len(texts), size):
        chunk = texts[i : i + size]
        pairs = isinstance(chunk[0], tuple)
        args = ([a for a, _ in chunk], [b for _, b in chunk]) if pairs else (chunk,)
        enc = tokenizer(
            *args, padding=padding, truncation=True, max_length=max_length, return_tensors="np"
        )
        out.append({k: enc[k].astype(np.int64) for k in enc if k != "special_tokens_mask"})
    return out


def _outputs(sess, batches) -> list[np.ndarray]:
    names = {i.name for i in sess.get_inputs()}
    return [sess.run(None, {k: v for k, v in f.items() if k in names})[0] for f in batches]


def _pooled(outs, batches) -> np.ndarray:
    rows = []
    for o, f in zip(outs, batches, strict=True):
        m = f["attention_mask"][..., None].astype(np.float64)
        rows.append((o * m).sum(1) / m.sum(1))
    return np.concatenate(rows)


def _cosines(a, b) -> np.ndarray:
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def tuning_texts(shared: Path, task: str, n: int = 800, seed: int = 0) -> list:
    """Unlabeled text: a fixed sample of the task's train split (inputs only)."""
    from bctonnx.glue import read_task

    texts = read_task(shared / "data/glue", task, "train").texts
    if task == "sst2":
        texts = [t for t in texts if len(t.split()) >= 8]  # sentences, not phrases
    pick = np.random.default_rng(seed).choice(len(texts), n, replace=False)
    return [texts[i] for i in sorted(pick)]


def run_fidelity(shared: Path, models: dict[str, Path]) -> dict:
    from bctonnx.api import special_token_ids
    from bctonnx.validate import load_tokenizer

    result = {}
    for task, variants in FIDELITY.items():
        model = models[task]
        texts = tuning_texts(shared, "sst2" if task == "sst2" else "stsb")
        if task == "emb":
            texts = [a for a, _ in texts]
        batches = _batches(load_tokenizer(model), texts)
        special = special_token_ids(model)
        ref = _outputs(_session(_float_model(model / "model.onnx", None, special)), batches)
        rows = []
        for label, stages, kw in variants:
            out = _outputs(
                _session(_float_model(model / "model.onnx", stages, special, **kw)), batches
            )
            if task == "sst2":
                a, b = np.concatenate(ref), np.concatenate(out)
                row = {
                    "agreement": float(100 * (a.argmax(1) == b.argmax(1)).mean()),
                    "logit_rms": float(np.sqrt(((a - b) ** 2).mean())),
                }
            elif task == "stsb":
                a, b = np.concatenate(ref)[:, 0], np.concatenate(out)[:, 0]
                row = {"mean_abs_diff": float(np.abs(a - b).mean())}
            else:
                c = _cosines(_pooled(ref, batches), _pooled(out, batches))
                row = {"cosine_mean": float(c.mean()), "cosine_min": float(c.min())}
            rows.append({"variant": label, **row})
            print(f"fidelity {task}: {label}: {row}", flush=True)
        result[task] = {"texts": len(texts), "rows": rows}
    return result


def run_speed(model: Path, threads: int, runs: int) -> dict:
    from bctonnx.bench import format_table, run_bench

    result = run_bench(
        model,
        batches=[8],
        seq=[128, 384],
        threads=threads,
        runs=runs,
        presets=["w8a8"],
        modes=["integer"],
        rss=False,
        tokens=[kw for _, kw in SCHEDULES],
        progress=lambda msg: print(f"bench: {msg}", flush=True),
    )
    print(format_table(result), flush=True)
    data = result.to_dict()
    rows = [r for r in data["records"] if r["kind"] == "bct"]
    for row, (name, _) in zip(rows[1:], SCHEDULES, strict=True):  # rows[0]: plain w8a8
        row["schedule"] = name
    return data


def run_glue(shared: Path, threads: int) -> list[dict]:
    from bctonnx.evaluate import format_table, run_eval

    configs = [("w8a8", resolve_config("w8a8"))]
    configs += [(f"w8a8 keep {name}", resolve_config("w8a8", **kw)) for name, kw in SCHEDULES]
    runs = []
    for task in ("sst2", "stsb"):
        result = run_eval(
            shared / f"models/minilm-{task}",
            task,
            shared / "data/glue",
            configs,
            threads=threads,
            progress=False,
        )
        print(format_table(result), flush=True)
        run = result.to_dict()
        for key in ("model_dir", "dev_file"):
            p = Path(run[key]).resolve()
            run[key] = str(p.relative_to(REPO.parent)) if p.is_relative_to(REPO.parent) else str(p)
        runs.append(run)
    return runs


def run_embeddings(minilm: Path) -> dict:
    """The package's sentences, one batch padded to 128 tokens, w8a8 with each schedule."""
    from bctonnx.modelio import load_model
    from bctonnx.validate import default_texts, load_tokenizer

    texts = default_texts()
    batches = _batches(load_tokenizer(minilm), texts, size=len(texts), padding="max_length")
    lengths = batches[0]["attention_mask"].sum(1)
    ref = _pooled(_outputs(_session(minilm / "model.onnx"), batches), batches)
    graph, _ = load_model(minilm / "model.onnx")
    Canonicalize()(graph)
    shape = encoder_shape(graph.graph)
    rows = []
    for name, kw in [("none", {}), *SCHEDULES]:
        config = resolve_config("w8a8", **kw)
        proto = bctonnx.compress(minilm, config)
        c = _cosines(ref, _pooled(_outputs(_session(proto), batches), batches))
        stages = config.token_keep
        real = [
            encoder_flops(shape, stages, int(n)) / encoder_flops(shape, (), int(n)) for n in lengths
        ]
        # the padded batch: every layer before a stage runs on 128 slots, then on the
        # batch's largest kept count
        padded = encoder_flops(shape, (), 128)
        kept = _padded_flops(shape, stages, lengths, 128)
        rows.append({
            "schedule": name,
            "config": config.describe(),
            "cosine_mean": float(c.mean()),
            "cosine_min": float(c.min()),
            "flops_saved_real": float(1 - np.mean(real)),
            "flops_saved_padded": float(1 - kept / padded),
        })  # fmt: skip
        print(f"embeddings: {rows[-1]}", flush=True)
    return {
        "texts": len(texts),
        "padded_to": 128,
        "mean_tokens": float(lengths.mean()),
        "rows": rows,
    }


def _padded_flops(shape, stages, lengths, padded: int) -> float:
    """Encoder FLOPs per sequence of a batch padded to ``padded``: every layer before the
    first stage runs on all ``padded`` slots, the later ones on the batch's largest kept
    count."""
    slots = [padded] * shape.num_layers
    if stages:
        counts = np.array([tokens_per_layer(shape, stages, int(n)) for n in lengths])
        first = stages[0].layer
        slots[first:] = list(counts.max(0)[first:])
    macs = sum(t * shape.linear_macs + 2 * t * t * shape.hidden for t in slots)
    return 2.0 * macs


def expected_work(model: Path) -> dict:
    """Per schedule: tokens per layer and encoder FLOPs / the full model's, at 128 and 384."""
    from bctonnx.modelio import load_model

    graph, _ = load_model(model / "model.onnx")
    Canonicalize()(graph)
    shape = encoder_shape(graph.graph)
    work = {}
    for name, kw in SCHEDULES:
        config = resolve_config("w8a8", **kw)
        work[name] = {
            str(seq): {
                "tokens_per_layer": tokens_per_layer(shape, config.token_keep, seq),
                "flops_ratio": encoder_flops(shape, config.token_keep, seq, config.token_merge)
                / encoder_flops(shape, (), seq),
            }
            for seq in (128, 384)
        }
    return work


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shared", type=Path, default=REPO.parent / "shared")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--parts", default="fidelity,bench,glue,embeddings")
    ap.add_argument("--workdir", type=Path, help="export folder (default: temporary)")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    from bctonnx.demo import extract_minilm
    from bctonnx.export import export_model

    parts = args.parts.split(",")
    data = json.loads(args.out.read_text()) if args.out.is_file() else {}
    with tempfile.TemporaryDirectory() as tmp:
        work = args.workdir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        models = {}
        for task in ("sst2", "stsb"):
            models[task] = work / task
            if not (models[task] / "model.onnx").is_file():
                export_model(
                    args.shared / f"models/minilm-{task}", models[task], task="text-classification"
                )
        models["emb"] = work / "minilm"
        if not (models["emb"] / "model.onnx").is_file():
            export_model(extract_minilm(work), models["emb"], task="feature-extraction")
        t0 = time.time()
        data["work"] = expected_work(models["sst2"])
        if "fidelity" in parts:
            data["fidelity"] = run_fidelity(args.shared, models)
        if "bench" in parts:
            data["bench"] = run_speed(models["sst2"], args.threads, args.runs)
        if "glue" in parts:
            data["glue"] = run_glue(args.shared, args.threads)
        if "embeddings" in parts:
            data["embeddings"] = run_embeddings(models["emb"])
    data["schedules"] = [name for name, _ in SCHEDULES]
    data["commit"] = subprocess.run(
        ["git", "describe", "--always", "--dirty"], cwd=REPO, capture_output=True, text=True
    ).stdout.strip()
    data["onnxruntime"] = ort.__version__
    data["threads"] = args.threads
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(data, indent=2) + "\n")
    print(f"wrote {args.out} ({time.time() - t0:.0f} s)")


if __name__ == "__main__":
    main()

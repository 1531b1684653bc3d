"""Render the README's results tables from benchmark JSON (never typed by hand).

    python benchmarks/render_readme.py      # rewrites the blocks between BEGIN/END markers

Each table lives between ``<!-- BEGIN name -->`` and ``<!-- END name -->`` in README.md and is
rendered from benchmarks/results/<name>.json.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from bctonnx.evaluate import format_fidelity
from bctonnx.glue import TASKS

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"


def render_embeddings(data: dict) -> str:
    lines = [
        f"all-MiniLM-L6-v2 sentence embeddings (mean pooled), {data['texts']} SST-2 dev sentences, "
        "cosine vs FP32; latency batch 1 x 128 tokens, 2 threads, median of runs taken in turns:",
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
        "(x100), difference to FP32 in parentheses (for the first metric, then its paired bootstrap "
        "95% interval: 1000 resamples of the dev set; an interval containing 0 cannot tell the "
        "model from FP32); below them how close each model's predictions are to FP32's, "
        "example by example (much less noisy than a metric difference); ratio = FP32 file "
        "bytes / model file bytes:",
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
                elif metric == run["metrics"][0] and r.get("vs_fp32_ci95"):
                    lo, hi = r["vs_fp32_ci95"][metric]
                    cells.append(
                        f"{r['metrics'][metric]:.2f} ({r['vs_fp32'][metric]:+.2f}; "
                        f"{lo:+.1f}..{hi:+.1f})"
                    )
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
        if any(r.get("fidelity") is not None for r in run["records"]):
            fid = [
                format_fidelity(
                    TASKS[run["task"]], by_model[m].get("fidelity"), by_model[m].get("changed")
                )
                if m in by_model and by_model[m]["kind"] != "fp32"
                else ""
                for m in models
            ]
            name = "mean abs score diff to FP32" if TASKS[run["task"]].is_regression else (
                "predictions equal to FP32's"
            )  # fmt: skip
            lines.append(f"|  | {name} | " + " | ".join(fid) + " |")
        lines.append("|  | ratio | " + " | ".join(ratios) + " |")
    lines += ["", *render_at_ratio(runs)]
    configs = {}
    for run in runs:
        for r in run["records"]:
            if r["kind"] != "fp32":
                configs.setdefault(r["model"], r["config"])
    lines.append("")
    lines += [f"- {m}: {c}" for m, c in configs.items()]
    lines += [f"- {m} failed: {e}" for m, e in failures]
    return "\n".join(lines)


def render_at_ratio(runs: list[dict]) -> list[str]:
    """The accuracy bar's rule, task by task (each run's ``at_ratio``, computed by
    `bctonnx.evaluate.at_ratio`): at every ratio a baseline reaches, a BCT preset at least as
    compressed and not significantly less accurate."""
    lines = [
        "At each baseline's compression ratio: the BCT model at least as compressed whose "
        "predictions are closest to FP32's (chosen by fidelity, which reads no label, never by "
        "its dev-set score), first metric's difference to FP32, and BCT minus baseline with its "
        "paired bootstrap 95% interval (an interval containing 0: the dev set cannot tell the "
        "two apart); met: BCT not significantly worse (the interval's upper end >= 0):",
        "",
        "| task | baseline | ratio | vs FP32 | BCT closest to FP32 at >= its ratio | ratio | vs FP32 "
        "| BCT - baseline | met |",
        "|---|---|---:|---:|---|---:|---:|---:|:---:|",
    ]
    for run in runs:
        metric = run["metrics"][0]
        task = TASKS[run["task"]].folder
        rec = {r["model"]: r for r in run["records"]}
        for a in run["at_ratio"]:
            base = rec[a["baseline"]]
            row = f"| {task} | {base['model']} | {base['ratio']:.2f}x | {base['vs_fp32'][metric]:+.2f} |"
            if a["bct"] is None:
                lines.append(row + " none | | | | no |")
            else:
                best = rec[a["bct"]]
                lo, hi = a["diff_ci95"]
                lines.append(
                    row + f" {best['model']} | {best['ratio']:.2f}x | "
                    f"{best['vs_fp32'][metric]:+.2f} | {a['diff']:+.2f} ({lo:+.1f}..{hi:+.1f}) | "
                    f"{'yes' if a['met'] else 'no'} |"
                )
            task = ""
    return lines


def _latency_table(run: dict) -> list[str]:
    shapes = run["shapes"]
    peer = any(r.get("vs_peer") for r in run["records"])
    lines = [
        "| model | size | ratio | peak RSS | "
        + " | ".join(f"{s} ms | vs ort int8" + (" | vs OV int8" if peer else "") for s in shapes)
        + " |",
        "|---|---:|---:|---:|" + ("---:|---:|---:|" if peer else "---:|---:|") * len(shapes),
    ]
    for r in run["records"]:
        if r["status"] != "ok":
            lines.append(f"| {r['model']} | failed: {r['error']} |")
            continue
        rss = f"{r['peak_rss_bytes'] / 2**20:.0f} MB" if r.get("peak_rss_bytes") else "-"
        cells = [f"{r['bytes'] / 1e6:.1f} MB", f"{r['ratio']:.2f}x", rss]
        for s in shapes:
            ms, vs = r["latency_ms"].get(s), r["vs_baseline"].get(s)
            cells += [f"{ms:.1f}" if ms else "-", f"{vs:.2f}x" if vs else "-"]
            if peer:
                vp = r.get("vs_peer", {}).get(s)
                cells.append(f"{vp:.2f}x" if vp else "-")
        lines.append(f"| {r['model']} | " + " | ".join(cells) + " |")
    return lines


def render_latency(data: dict) -> str:
    """benchmarks/latency.py: one bctonnx bench run per model (MiniLM, BERT-base size), and
    optionally runs without AMX."""
    run = data["main"]
    rss_base = run.get("rss_baseline_bytes")
    lines = [
        f"onnxruntime {run['onnxruntime']} CPU on {run['cpu']} "
        f"({run.get('cpu_isa') or 'instruction sets not recorded'}; bctonnx kernels: "
        f"{run.get('bct_isa') or '-'}), {run['threads']} threads, synthetic token ids, median of "
        f"{run['runs']} runs per model (the models take turns in blocks of 5 timed runs, each "
        "after at least 0.1 s of untimed ones: steady state); vs ort int8 / vs OV int8 = "
        "latency / onnxruntime dynamic int8's / OpenVINO + NNCF int8's in the same run (< 1: "
        "faster); peak RSS of a fresh process that loads the model and runs the largest batch "
        "once"
        + (f" ({rss_base / 2**20:.0f} MB of it is Python + onnxruntime)" if rss_base else "")
        + (f". {run['peers']}" if run.get("peers") else "")
        + ".",
    ]
    for key in ("main", "main_base"):
        if key in data:
            lines += ["", f"**{data[key]['model']}**", "", *_latency_table(data[key])]
    for key in ("no_amx", "no_amx_base"):
        other = data.get(key)
        if not other:
            continue
        shapes = other["shapes"]
        by = {r["model"]: r for r in other["records"] if r["status"] == "ok"}
        parts = []
        for name in ("bct w8a8 integer", "bct w4a8 integer"):
            if name in by:
                ratios = ", ".join(f"{by[name]['vs_baseline'][s]:.2f}x ({s})" for s in shapes)
                parts.append(f"{name.removeprefix('bct ')} {ratios}")
        lines += [
            "",
            f"{other['model']}, with AMX denied to the process (`--block-amx`: onnxruntime's "
            "int8 GEMM and bctonnx's BlockMatMul on AVX-512 VNNI, as on CPUs without AMX), "
            "latency / dynamic int8: " + "; ".join(parts) + ".",
        ]
    return "\n".join(lines)


OPS_NAMES = {
    "Gelu": "IntGelu",
    "Softmax": "IntSoftmax + mask",
    "Softmax-nomask": "IntSoftmax, no mask",
    "LayerNorm": "IntLayerNorm",
}


def render_avx2_instructions(data: dict) -> str:
    """benchmarks/avx2_instructions.py: instructions under valgrind's AVX2-only CPU (exact, the
    same on any machine), the GEMM kernels' instructions per MAC, and wall clock here per
    ``BCTONNX_ISA`` cap."""
    base = "ort dynamic int8"
    runs = data.get("runs", [])
    shapes = sorted({r["shape"] for r in runs}, key=lambda s: int(s.split("x")[0]))
    by = {(r["model"], r["shape"]): r for r in runs}
    models = list(dict.fromkeys(r["model"] for r in runs))
    gemm_labels = ("MLAS int8 GEMM kernel", "GEMM (BlockMatMul, attention scores)")
    lines = [
        f"Instructions of one inference of all-MiniLM-L6-v2, counted exactly by callgrind "
        f"({data['valgrind']}; its virtual CPU has AVX2 and FMA but no AVX-512 and no VNNI, so "
        f"onnxruntime {data['onnxruntime']}'s MLAS takes its AVX2 int8 kernels and bctonnx its "
        "avx2 path), 1 thread, synthetic token ids; vs ort int8 = instructions / onnxruntime "
        "dynamic int8's (`benchmarks/avx2_instructions.py`):",
        "",
        "| model | "
        + " | ".join(f"{s} instructions | vs ort int8 | in the GEMM kernel" for s in shapes)
        + " |",
        "|---|" + "---:|---:|---:|" * len(shapes),
    ]
    for m in models:
        cells = []
        for s in shapes:
            r, b = by.get((m, s)), by.get((base, s))
            if r is None or b is None:
                cells += ["", "", ""]
                continue
            gemm = next((r["kernels"][k] for k in gemm_labels if k in r["kernels"]), None)
            share = f"{gemm / r['instructions']:.0%}" if gemm else "-"
            cells += [
                f"{r['instructions'] / 1e6:.0f} M",
                f"{r['instructions'] / b['instructions']:.2f}x",
                share,
            ]
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    lin = data.get("linear_layer")
    if lin and lin.get("models"):
        lines += [
            "",
            f"One linear layer of MiniLM's FFN shape ({lin['rows']} x {lin['k']} -> {lin['n']}), "
            "the GEMM kernel's instructions per int8 multiply-accumulate (MLAS: vpmaddubsw + "
            "vpmaddwd, which can saturate int16; bctonnx: exact sums, segments combined by "
            "shifts):",
            "",
            "| model | instructions | GEMM kernel per MAC |",
            "|---|---:|---:|",
        ]
        for r in lin["models"]:
            gemm = next((r["kernels"][k] for k in gemm_labels if k in r["kernels"]), None)
            per = f"{gemm / lin['macs']:.3f}" if gemm else "-"
            lines.append(f"| {r['model']} | {r['instructions'] / 1e6:.2f} M | {per} |")
    t = data.get("timing")
    if t:
        tshapes = list(t["latency_ms"])
        names = list(dict.fromkeys(k for v in t["latency_ms"].values() for k in v))
        lines += [
            "",
            f"Wall clock on this machine ({t['cpu']}: {t['cpu_isa']}), {t['threads']} thread, "
            f"median of {t['runs']} runs taken in turns; bctonnx capped per session with "
            "`BCTONNX_ISA`, onnxruntime uncapped (it uses what the CPU has):",
            "",
            "| model | " + " | ".join(f"{s} ms | vs ort int8" for s in tshapes) + " |",
            "|---|" + "---:|---:|" * len(tshapes),
        ]
        for n in names:
            cells = []
            for s in tshapes:
                lat = t["latency_ms"][s]
                cells += [f"{lat[n]:.1f}", f"{lat[n] / lat[base]:.2f}x"] if n in lat else ["", ""]
            lines.append(f"| {n} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def render_ops_speed(data: dict) -> str:
    """benchmarks/ops_speed.py: per op, ours / onnxruntime's float op at each thread count,
    three ways (session.run, run_with_iobinding, onnxruntime's per-node kernel time)."""
    ops: dict[str, dict[int, dict]] = {}
    for r in data["rows"]:
        ops.setdefault(r["op"], {})[r["threads"]] = r
    threads = sorted({r["threads"] for r in data["rows"]})
    per = " / ".join(str(t) for t in threads)
    lines = [
        f"Integer ops / onnxruntime {data['onnxruntime']}'s float op on the same shape "
        f"(`benchmarks/ops_speed.py`, medians of {data['rounds']} rounds in fresh processes, "
        f"at {per} thread(s); < 1: ours is faster): through `session.run` with numpy feeds, "
        "through `run_with_iobinding` (inputs bound once: the op inside a graph), and "
        "onnxruntime's own per-node kernel time (the op against the op):",
        "",
        "| op | shape | session.run | bound | kernel |",
        "|---|---|---:|---:|---:|",
    ]
    for op, by_thr in ops.items():
        shape = "x".join(map(str, next(iter(by_thr.values()))["shape"]))
        cells = [
            " / ".join(f"{by_thr[t][key]:.2f}x" for t in threads if t in by_thr)
            for key in ("ratio", "bound_ratio", "kernel_ratio")
        ]
        lines.append(f"| {OPS_NAMES.get(op, op)} | {shape} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def render_pruning(data: dict) -> str:
    """benchmarks/pruning.py: GLUE dev metrics of pruned / sparse models vs FP32, and one
    bench run with each model's latency against the same preset unpruned."""
    lines = [
        "Fine-tuned MiniLMs (`../shared/models/minilm-<task>`), full dev sets, default "
        "calibration corpus; metric in points, difference to FP32 with its paired bootstrap 95% "
        "interval; fidelity: predictions equal to FP32's (SST-2) / mean |score difference| "
        "(STS-B):",
        "",
        "| task | model | metric | vs FP32 (95% CI) | fidelity | size | ratio |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for run in data.get("runs", []):
        metric = run["primary_metric"] if "primary_metric" in run else run["metrics"][0]
        for r in run["records"]:
            if r["status"] != "ok":
                lines.append(f"| {run['task']} | {r['model']} | failed: {r['error']} |")
                continue
            value = r["metrics"][metric]
            if r["kind"] == "fp32":
                vs, fid = "", ""
            else:
                lo, hi = r["vs_fp32_ci95"][metric]
                vs = f"{r['vs_fp32'][metric]:+.2f} ({lo:+.1f}..{hi:+.1f})"
                fid = format_fidelity(TASKS[run["task"]], r["fidelity"], r.get("changed"))
            lines.append(
                f"| {TASKS[run['task']].folder} ({run['n']}) | {r['model']} | "
                f"{metric} {value:.2f} | {vs} | {fid} | {r['bytes'] / 1e6:.1f} MB | "
                f"{r['ratio']:.2f}x |"
            )
    bench = data.get("bench")
    if bench:
        shapes = bench["shapes"]
        by = {r["model"]: r for r in bench["records"] if r["status"] == "ok"}
        lines += [
            "",
            f"Speed, one `bctonnx bench` run (MiniLM {Path(bench['model']).parent.name}, onnxruntime "
            f"{bench['onnxruntime']}, {bench['cpu']}, {bench['threads']} threads, median of "
            f"{bench['runs']} interleaved runs); vs plain = latency / the same preset and form "
            "unpruned:",
            "",
            "| model | size | ratio | " + " | ".join(f"{s} ms | vs plain" for s in shapes) + " |",
            "|---|---:|---:|" + "---:|---:|" * len(shapes),
        ]
        for name, r in by.items():
            plain = by.get(" ".join(name.split(" ")[:3])) if name.startswith("bct ") else None
            cells = [f"{r['bytes'] / 1e6:.1f} MB", f"{r['ratio']:.2f}x"]
            for s in shapes:
                ms = r["latency_ms"].get(s)
                rel = ms / plain["latency_ms"][s] if plain is not None and ms else None
                cells += [f"{ms:.1f}" if ms else "-", f"{rel:.2f}x" if rel else "-"]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _points(record: dict | None, metric: str) -> str:
    if record is None or record["status"] != "ok":
        return "-" if record is None else "failed"
    lo, hi = record["vs_fp32_ci95"][metric]
    return (
        f"{record['metrics'][metric]:.2f} ({record['vs_fp32'][metric]:+.2f}; {lo:+.1f}..{hi:+.1f})"
    )


def render_token_keep(data: dict) -> str:
    """benchmarks/token_keep.py: keep ratio vs speed vs accuracy, then the label-free fidelity
    the design choices were made on."""
    schedules = ["none", *data["schedules"]]
    bench = data.get("bench", {})
    rows = {r.get("schedule", "none"): r for r in bench.get("records", []) if r["kind"] == "bct"}
    shapes = bench.get("shapes", [])
    glue = {run["task"]: run for run in data.get("glue", [])}
    emb = {r["schedule"]: r for r in data.get("embeddings", {}).get("rows", [])}
    work = data.get("work", {})
    lines = [
        "MiniLM fine-tuned on SST-2 / STS-B (`../shared/models`), w8a8 integer form; tokens kept "
        "= the fraction of each input's real tokens kept from the layer after `@` on "
        "(`0.5` = `0.5@3`); encoder FLOPs of the linear layers and attention vs the full model, "
        "at 128 tokens; speed-up = w8a8's latency / the model's, one `bctonnx bench` run "
        f"(interleaved, median of {bench.get('runs', '?')}, {bench.get('threads', '?')} threads, "
        "synthetic inputs without padding); dev-set metrics with their difference to FP32 and "
        "its paired bootstrap 95% interval; all-MiniLM-L6-v2 sentence embeddings (w8a8 with the "
        "schedule): mean cosine to FP32 of the mean-pooled embeddings of the package's "
        f"{data.get('embeddings', {}).get('texts', '?')} sentences padded to 128 tokens, and the "
        "encoder FLOPs that padded batch saves:",
        "",
        "| tokens kept | tokens per layer (128) | encoder FLOPs | "
        + " | ".join(f"{s} speed-up" for s in shapes)
        + " | SST-2 accuracy | STS-B Spearman | embeddings: cosine (FLOPs saved) |",
        "|---|---|---:|" + "---:|" * len(shapes) + "---:|---:|---:|",
    ]
    base = rows.get("none")
    for name in schedules:
        w = work.get(name, {}).get("128")
        tokens = ", ".join(map(str, w["tokens_per_layer"])) if w else "128 (all layers)"
        flops = f"{100 * w['flops_ratio']:.0f}%" if w else "100%"
        cells = []
        for shape in shapes:
            r = rows.get(name)
            ok = r is not None and base is not None and shape in r.get("latency_ms", {})
            cells.append(
                f"{base['latency_ms'][shape] / r['latency_ms'][shape]:.2f}x "
                f"({r['latency_ms'][shape]:.0f} ms)"
                if ok
                else "-"
            )
        model = "bct w8a8" if name == "none" else f"bct w8a8 keep {name}"
        recs = {t: {r["model"]: r for r in run["records"]}.get(model) for t, run in glue.items()}
        e = emb.get(name)
        embedding = f"{e['cosine_mean']:.4f} ({100 * e['flops_saved_padded']:.0f}%)" if e else "-"
        lines.append(
            f"| {name} | {tokens} | {flops} | "
            + " | ".join(cells)
            + f" | {_points(recs.get('sst2'), 'accuracy')} | {_points(recs.get('stsb'), 'spearman')}"
            f" | {embedding} |"
        )
    fp32 = {t: run["records"][0]["metrics"] for t, run in glue.items()}
    if fp32:
        lines += [
            "",
            f"FP32: SST-2 {fp32['sst2']['accuracy']:.2f}, STS-B {fp32['stsb']['spearman']:.2f}.",
        ]
    fidelity = data.get("fidelity")
    if fidelity:
        lines += [
            "",
            "Label-free fidelity the defaults were chosen on (float models, no quantization, vs "
            f"FP32 on unlabeled train text: {fidelity['stsb']['texts']} STS-B pairs, "
            f"{fidelity['sst2']['texts']} SST-2 sentences, {fidelity['emb']['texts']} sentences "
            "embedded by all-MiniLM-L6-v2): ranking by attention received from all real tokens "
            "or from [CLS], or by redundancy; the tokens that leave merged or dropped:",
            "",
            "| stages, ranking, merged | STS-B mean abs score diff | SST-2 same label | SST-2 "
            "logit RMS diff |",
            "|---|---:|---:|---:|",
        ]
        sst2 = {r["variant"]: r for r in fidelity["sst2"]["rows"]}
        for r in fidelity["stsb"]["rows"]:
            o = sst2.get(r["variant"], {})
            lines.append(
                f"| {r['variant']} | {r['mean_abs_diff']:.3f} | {o.get('agreement', 0):.1f}% | "
                f"{o.get('logit_rms', 0):.3f} |"
            )
        lines += [
            "",
            "| stages, ranking, merged, full-length output | embedding cosine mean | min |",
            "|---|---:|---:|",
        ]
        for r in fidelity["emb"]["rows"]:
            lines.append(f"| {r['variant']} | {r['cosine_mean']:.4f} | {r['cosine_min']:.4f} |")
    return "\n".join(lines)


RENDERERS = {
    "avx2_instructions": render_avx2_instructions,
    "embeddings": render_embeddings,
    "glue": render_glue,
    "latency": render_latency,
    "ops_speed": render_ops_speed,
    "pruning": render_pruning,
    "token_keep": render_token_keep,
}


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

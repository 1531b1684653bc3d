"""eval: a GLUE task metric of the FP32 model, each BCT config and onnxruntime's quantizers.

One run: the FP32 model (a fine-tuned checkpoint, exported here, or an exported ONNX
directory) is compressed with each config, optionally quantized by onnxruntime's own tools
(`bctonnx.baselines`), and every model is run on onnxruntime over the same tokenized dev set.
Each model gives one `EvalRecord`: its metrics in points, the difference to FP32 in points,
its file size and compression ratio (FP32 file bytes / its file bytes). A compressed model that
fails to build or run becomes a ``failed`` record with a one-line reason; the others go on.

``--config FILE`` (`load_config_file`): a JSON object, or a list of them, each one config:

    {"name": "w4 b64",          # label in the table (default: "custom", "custom 2", ...)
     "preset": "w4a8",          # starting point (default "w8a8"), any of bctonnx.PRESETS
     "block_size": 64, "act_bits": 8, "exclude": ["*/pooler/*"]}

Every other key is a keyword of `bctonnx.config.resolve_config`, read from its signature
(weight_bits, embedding_bits, act_bits, block_size, weight_block_size, embedding_block_size,
act_block_size, scale_kind, scale_dtype, frac_bits, scale_bits, superblock, symmetric, clip,
float_dtype, mode, exclude, no_activations, match_weight_blocks at the time of writing);
integers, strings, booleans and lists of strings as the keyword takes them; unknown keys and
wrong types are refused.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import sys
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from .api import compress_file
from .baselines import BASELINES
from .config import (
    PRESETS,
    CompressionConfig,
    config_from_dict,
    distinct_configs,
    resolve_config,
)
from .errors import BctError
from .export import export_model
from .glue import (
    GlueData,
    GlueTask,
    bootstrap_indices,
    compute_metrics,
    get_task,
    label_permutation,
    paired_difference_ci,
    predictions,
    read_task,
)
from .modelio import MODEL_FILENAME, copy_sidecars, model_file_bytes, resolve_model_path
from .runtime import make_session
from .textio import Encoded, encode, load_tokenizer, make_feeds, read_model_config

log = logging.getLogger(__name__)

CALIBRATION_EXAMPLES = 128


@dataclass
class EvalRecord:
    """One model of the comparison. ``vs_fp32``: metric minus FP32's, in points;
    ``vs_fp32_ci95``: its paired bootstrap 95% interval (`glue.paired_difference_ci`).
    ``fidelity``: how close its predictions are to FP32's, example by example (much less
    noisy than a metric difference): the percentage of equal labels (classification), or the
    mean absolute difference of the scores (regression). ``changed``: of the predictions
    that differ from FP32's (classification), how many are right and how many wrong."""

    model: str
    kind: str  # "fp32", "bct" or "baseline"
    config: str
    status: str = "ok"  # "ok" or "failed"
    error: str | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    vs_fp32: dict[str, float] = field(default_factory=dict)
    vs_fp32_ci95: dict[str, tuple[float, float]] = field(default_factory=dict)
    fidelity: float | None = None
    changed: tuple[int, int] | None = None
    bytes: int | None = None
    ratio: float | None = None
    build_seconds: float | None = None
    eval_seconds: float | None = None


@dataclass
class AtRatio:
    """The accuracy bar's rule for one baseline: the BCT model at least as compressed whose
    predictions are closest to FP32's (``bct``, by `fidelity`, which reads no label: a dev-set
    score never picks the configuration; None when none is that compressed), compared on the
    task's first metric. ``diff``: BCT minus baseline in points; ``diff_ci95``: its paired
    bootstrap 95% interval; ``met``: BCT not significantly worse (the interval's upper end
    >= 0)."""

    baseline: str
    bct: str | None
    metric: str
    diff: float | None = None
    diff_ci95: tuple[float, float] | None = None
    met: bool = False


@dataclass
class EvalResult:
    task: str
    metrics: list[str]  # primary first
    n: int  # examples evaluated
    dev_size: int  # examples in the dev file
    model_dir: str
    dev_file: str
    records: list[EvalRecord] = field(default_factory=list)
    at_ratio: list[AtRatio] = field(default_factory=list)  # one per baseline that ran

    def to_dict(self) -> dict:
        d = asdict(self)
        d["primary_metric"] = self.metrics[0]
        return d


# --- configs ---------------------------------------------------------------------------------


def parse_presets(values: list[str] | None) -> list[str]:
    """``--preset`` values (repeatable, comma lists allowed) -> preset names; default: all."""
    if not values:
        return list(PRESETS)
    names: list[str] = []
    for value in values:
        for name in (v.strip() for v in value.split(",")):
            if name and name not in names:
                names.append(name)
    unknown = [n for n in names if n not in PRESETS]
    if unknown or not names:
        raise BctError(
            f"unknown preset {', '.join(map(repr, unknown)) or repr('')}; "
            f"choose from {', '.join(PRESETS)}"
        )
    return names


def load_config_file(path: str | os.PathLike) -> list[tuple[str, CompressionConfig]]:
    """Named configs from a JSON file (schema in the module docstring)."""
    p = Path(path)
    if not p.is_file():
        raise BctError(f"{p}: no such config file")
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BctError(f"{p}: not valid JSON ({exc})") from None
    entries = data if isinstance(data, list) else [data]
    if not entries:
        raise BctError(f"{p}: no configs in file")
    configs: list[tuple[str, CompressionConfig]] = []
    for i, entry in enumerate(entries, 1):
        where = f"{p}" if len(entries) == 1 else f"{p}: config {i}"
        config = config_from_dict(entry, where)
        default = "custom" if len(entries) == 1 else f"custom {i}"
        name = str(entry.get("name") or default)  # type: ignore[union-attr]
        if name in [n for n, _ in configs]:
            raise BctError(f"{where}: name {name!r} used twice")
        configs.append((name, config))
    return configs


def eval_configs(
    presets: list[str] | None = None,
    config_file: str | os.PathLike | None = None,
    mode: str | None = None,
    structure: dict | None = None,
    tokens: dict | None = None,
) -> list[tuple[str, CompressionConfig]]:
    """The (name, config) pairs to compare: from a config file, or presets (default all);
    ``mode`` overrides the lowering of each (named "<name> <mode>" where that changes it);
    ``structure``: pruning / sparsity keywords of `resolve_config` applied to each (named
    "<name> +<what>"); ``tokens``: token-downsampling keywords of `resolve_config`
    (``token_keep``, ...; None values ignored) applied to each (named "<name> keep <schedule>")."""
    if config_file is not None:
        configs = load_config_file(config_file)
    else:
        configs = [(name, resolve_config(name)) for name in parse_presets(presets)]
    if structure:
        tag = structure_tag(structure)
        try:
            configs = [(f"{n} {tag}", resolve_config(c, **structure)) for n, c in configs]
        except ValueError as exc:
            raise BctError(str(exc)) from None
    tokens = {k: v for k, v in (tokens or {}).items() if v is not None}
    if tokens:
        try:
            configs = [(n, resolve_config(c, **tokens)) for n, c in configs]
        except ValueError as exc:
            raise BctError(str(exc)) from None
        configs = [
            (f"{n} keep {','.join(s.describe() for s in c.token_keep)}", c) for n, c in configs
        ]
    if mode is not None:
        try:
            configs = [
                (n if c.mode == mode else f"{n} {mode}", resolve_config(c, mode=mode))
                for n, c in configs
            ]
        except ValueError as exc:
            raise BctError(str(exc)) from None
    # one record per distinct compression (w8a8-fast in qdq mode is w8a8's qdq form)
    named = [(n.split(" ")[0], n, c) for n, c in configs]
    return [(n, c) for _, n, c in distinct_configs(named)]


def structure_tag(structure: dict) -> str:
    """A short name for pruning / sparsity keywords: ``+ffn0.5 +heads0.25 +2:4 +r9``."""
    parts = []
    if structure.get("prune_ffn"):
        parts.append(f"+ffn{structure['prune_ffn']:g}")
    if structure.get("prune_heads"):
        parts.append(f"+heads{structure['prune_heads']:g}")
    if structure.get("sparsity"):
        parts.append(f"+{structure['sparsity']}")
    if structure.get("target_ratio"):
        parts.append(f"+r{structure['target_ratio']:g}")
    return " ".join(parts) or "+calib"


# --- models and data ---------------------------------------------------------------------------


def check_model_dir(model_dir: str | os.PathLike) -> Path:
    d = Path(model_dir)
    if not d.is_dir():
        raise BctError(f"{d}: model directory not found")
    if not _is_exported(d) and not (d / "config.json").is_file():
        raise BctError(
            f"{d}: no {MODEL_FILENAME} and no config.json (expected an exported ONNX directory "
            "or a fine-tuned Hugging Face checkpoint)"
        )
    return d


def _is_exported(d: Path) -> bool:
    """An ONNX directory: model.onnx, or another .onnx (ORTOptimizer's model_optimized.onnx;
    `modelio.resolve_model_path` picks the file)."""
    return any(f.is_file() for f in d.glob("*.onnx"))


def fp32_model_dir(model_dir: Path, workdir: Path) -> Path:
    """An exported ONNX directory as is; a Hugging Face checkpoint exported to workdir/fp32."""
    if _is_exported(model_dir):
        return model_dir
    log.info("exporting %s (text-classification)", model_dir)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's tracer warnings about the attention mask
        return export_model(model_dir, workdir / "fp32", task="text-classification")


def calibration_feeds(
    glue_dir: Path, task: GlueTask, tokenizer, input_names: list[str], max_length: int
) -> list[dict[str, np.ndarray]]:
    """128 train examples (a fixed random sample), one per batch so no padding enters the
    activation ranges."""
    train = read_task(glue_dir, task, "train")
    rng = np.random.default_rng(0)
    pick = np.sort(rng.choice(len(train), min(CALIBRATION_EXAMPLES, len(train)), replace=False))
    return make_feeds(input_names, [train.texts[i] for i in pick], tokenizer, 1, max_length)


def run_logits(
    model_path: Path,
    encoded: Encoded,
    task: GlueTask,
    threads: int | None,
    desc: str,
    progress: bool,
) -> np.ndarray:
    """The model's logits for every example, in dataset order."""
    try:
        sess = make_session(model_path, threads)
    except Exception as exc:
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise BctError(f"onnxruntime cannot load {model_path}: {msg}") from None
    outputs = [o.name for o in sess.get_outputs()]
    if "logits" not in outputs:
        raise BctError(
            f"{model_path} has no 'logits' output (outputs: {', '.join(outputs)}); export the "
            "checkpoint with --task text-classification"
        )
    n = len(encoded.order)
    chunks = []
    with tqdm(total=n, desc=desc, unit="ex", disable=not progress, leave=False) as bar:
        for feeds in encoded.batches:
            out = np.asarray(sess.run(["logits"], feeds)[0])
            if out.ndim != 2 or out.shape[1] != task.num_outputs:
                kind = "a regression task with 1 output" if task.is_regression else (
                    f"a {task.num_outputs}-class task"
                )  # fmt: skip
                raise BctError(
                    f"{model_path}: logits of shape {list(out.shape)}, but {task.name} is {kind} "
                    f"(is the checkpoint fine-tuned on {task.name}?)"
                )
            chunks.append(out)
            bar.update(len(out))
    logits = np.empty((n, task.num_outputs), np.float64)
    logits[encoded.order] = np.concatenate(chunks)
    return logits


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    first = text.splitlines()[0] if text else ""
    if isinstance(exc, BctError):
        return first
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def _prepare_workdir(keep: str | os.PathLike | None) -> tuple[Path, bool]:
    if keep is None:
        return Path(tempfile.mkdtemp(prefix="bctonnx-eval.")), True
    d = Path(keep)
    if d.exists() and (not d.is_dir() or any(d.iterdir())):
        raise BctError(f"--keep {d}: exists and is not an empty directory")
    d.mkdir(parents=True, exist_ok=True)
    return d, False


# --- the run ---------------------------------------------------------------------------------


def run_eval(
    model_dir: str | os.PathLike,
    task: str,
    glue_dir: str | os.PathLike,
    configs: list[tuple[str, CompressionConfig]],
    *,
    baselines: bool = False,
    limit: int | None = None,
    batch_size: int = 32,
    max_length: int = 128,
    threads: int | None = None,
    keep: str | os.PathLike | None = None,
    progress: bool = True,
) -> EvalResult:
    """FP32 vs each config (and onnxruntime's quantizers) on a GLUE dev set; see module doc."""
    glue_task = get_task(task)
    if limit is not None and limit < 1:
        raise BctError(f"--limit must be >= 1, got {limit}")
    if batch_size < 1:
        raise BctError(f"--batch-size must be >= 1, got {batch_size}")
    glue_dir = Path(glue_dir)
    dev: GlueData = read_task(glue_dir, glue_task, "dev")
    data = dev.head(limit)
    src = check_model_dir(model_dir)
    workdir, temporary = _prepare_workdir(keep)
    try:
        return _run(
            src, glue_task, glue_dir, dev, data, configs, baselines, batch_size,
            max_length, threads, workdir, progress,
        )  # fmt: skip
    finally:
        if temporary:
            shutil.rmtree(workdir, ignore_errors=True)


def _run(
    src: Path,
    task: GlueTask,
    glue_dir: Path,
    dev: GlueData,
    data: GlueData,
    configs: list[tuple[str, CompressionConfig]],
    baselines: bool,
    batch_size: int,
    max_length: int,
    threads: int | None,
    workdir: Path,
    progress: bool,
) -> EvalResult:
    fp32_dir = fp32_model_dir(src, workdir)
    fp32_file = resolve_model_path(fp32_dir)
    tokenizer = load_tokenizer(fp32_dir)
    perm = label_permutation(task, read_model_config(fp32_dir))
    input_names = [i.name for i in make_session(fp32_file, threads).get_inputs()]
    encoded = encode(data.texts, tokenizer, input_names, batch_size, max_length)
    result = EvalResult(
        task=task.name,
        metrics=list(task.metrics),
        n=len(data),
        dev_size=len(dev),
        model_dir=str(src),
        dev_file=str(dev.path),
    )

    resamples = bootstrap_indices(len(data))
    preds_of: dict[str, np.ndarray] = {}  # model name -> its predictions

    def evaluate(record: EvalRecord, path: Path) -> None:
        t0 = time.perf_counter()
        logits = run_logits(path, encoded, task, threads, record.model, progress)
        record.eval_seconds = time.perf_counter() - t0
        preds = predictions(task, logits, perm)
        record.metrics = compute_metrics(task, preds, data.labels)
        record.bytes = model_file_bytes(path)
        record.ratio = fp32_bytes / record.bytes
        if result.records:
            base = result.records[0]
            record.vs_fp32 = {m: v - base.metrics[m] for m, v in record.metrics.items()}
            record.vs_fp32_ci95 = paired_difference_ci(
                task, preds, preds_of[base.model], data.labels, resamples
            )
            record.fidelity = fidelity(task, preds, preds_of[base.model])
            record.changed = changed_predictions(task, preds, preds_of[base.model], data.labels)
        preds_of[record.model] = preds

    fp32_bytes = model_file_bytes(fp32_file)
    fp32 = EvalRecord("fp32", "fp32", "fp32")
    evaluate(fp32, fp32_file)
    fp32.vs_fp32 = dict.fromkeys(fp32.metrics, 0.0)
    fp32.vs_fp32_ci95 = dict.fromkeys(fp32.metrics, (0.0, 0.0))
    result.records.append(fp32)

    def attempt(record: EvalRecord, build) -> None:
        try:
            t0 = time.perf_counter()
            path = build()
            record.build_seconds = time.perf_counter() - t0
            evaluate(record, path)
        except Exception as exc:  # one compressed model failing must not end the comparison
            log.debug("%s failed", record.model, exc_info=True)
            record.status, record.error = "failed", _one_line(exc)
        result.records.append(record)

    for name, config in configs:
        out = workdir / f"bct-{_slug(name)}"

        def build_bct(config=config, out=out) -> Path:
            compress_file(fp32_dir, out, config)
            return out / MODEL_FILENAME

        attempt(EvalRecord(f"bct {name}", "bct", config.describe()), build_bct)

    if baselines:
        calib: list | None = None
        for baseline in BASELINES.values():
            out = workdir / _slug(baseline.name)

            def build_baseline(baseline=baseline, out=out) -> Path:
                nonlocal calib
                kw = {}
                if baseline.needs_calibration:
                    if calib is None:
                        calib = calibration_feeds(
                            glue_dir, task, tokenizer, input_names, max_length
                        )
                    kw["calibration_feeds"] = calib
                out.mkdir(parents=True, exist_ok=True)
                path = baseline.build(fp32_file, out / MODEL_FILENAME, **kw)
                copy_sidecars(fp32_dir, out)
                return path

            attempt(EvalRecord(baseline.name, "baseline", baseline.describe), build_baseline)
    result.at_ratio = at_ratio(task, result.records, preds_of, data.labels, resamples)
    return result


def at_ratio(
    task: GlueTask,
    records: list[EvalRecord],
    preds_of: dict[str, np.ndarray],
    labels: np.ndarray,
    resamples: np.ndarray,
) -> list[AtRatio]:
    """Per baseline that ran: the BCT model at least as compressed that is closest to FP32
    (`fidelity`; ties: the first record), and how the two compare on the first metric on the
    same resamples of the dev set (`AtRatio`)."""
    metric = task.metrics[0]
    ok = [r for r in records if r.status == "ok"]
    out = []

    def closeness(r: EvalRecord) -> float:  # larger: closer to FP32
        if r.fidelity is None:
            return -math.inf
        return -r.fidelity if task.is_regression else r.fidelity

    for base in (r for r in ok if r.kind == "baseline"):
        rivals = [r for r in ok if r.kind == "bct" and r.ratio >= base.ratio]
        best = max(rivals, key=closeness, default=None)
        if best is None:
            out.append(AtRatio(base.model, None, metric))
            continue
        ci = paired_difference_ci(
            task, preds_of[best.model], preds_of[base.model], labels, resamples
        )[metric]
        diff = float(best.metrics[metric] - base.metrics[metric])  # metrics may be numpy's
        out.append(AtRatio(base.model, best.model, metric, diff, ci, ci[1] >= 0))
    return out


def fidelity(task: GlueTask, preds: np.ndarray, reference: np.ndarray) -> float:
    """Predictions against the reference's, example by example: % equal labels
    (classification) or the mean absolute score difference (regression)."""
    if task.is_regression:
        return float(np.abs(np.asarray(preds, np.float64) - reference).mean())
    return 100.0 * float((np.asarray(preds) == reference).mean())


def changed_predictions(
    task: GlueTask, preds: np.ndarray, reference: np.ndarray, labels: np.ndarray
) -> tuple[int, int] | None:
    """Of the predictions that differ from the reference's: (now right, now wrong); None for
    regression. Where they split evenly, the metric difference is chance."""
    if task.is_regression:
        return None
    differ = np.asarray(preds) != reference
    right = int((differ & (np.asarray(preds) == labels)).sum())
    return right, int(differ.sum()) - right


# --- report ------------------------------------------------------------------------------------


def format_table(result: EvalResult) -> str:
    """The comparison as a text table; configs spelled out below it."""
    task = get_task(result.task)
    primary = result.metrics[0]
    subset = f"first {result.n} of {result.dev_size}" if result.n < result.dev_size else (
        f"{result.n}"
    )  # fmt: skip
    head = [f"GLUE {task.folder} dev ({subset} examples), {result.model_dir}", ""]
    width = max(len("model"), *(len(r.model) for r in result.records))
    cols = [f"{m:>9}" for m in result.metrics]
    fid = "|d score|" if task.is_regression else "same pred"
    fid_width = 9 if task.is_regression else 16
    lines = [
        f"{'model':<{width}}  {'  '.join(cols)}  {'vs FP32':>8}  {'95% CI':>15}  {fid:>{fid_width}}  "
        f"{'size':>9}  {'ratio':>6}",
    ]
    for r in result.records:
        if r.status != "ok":
            lines.append(f"{r.model:<{width}}  failed: {r.error}")
            continue
        vals = "  ".join(f"{r.metrics[m]:>9.2f}" for m in result.metrics)
        lo, hi = r.vs_fp32_ci95.get(primary, (0.0, 0.0))
        lines.append(
            f"{r.model:<{width}}  {vals}  {r.vs_fp32.get(primary, 0.0):>+8.2f}  "
            f"{f'[{lo:+.2f}, {hi:+.2f}]':>15}  {format_fidelity(task, r.fidelity, r.changed):>{fid_width}}  "
            f"{(r.bytes or 0) / 1e6:>6.1f} MB  {r.ratio or 0:>5.2f}x"
        )
    notes = [
        "",
        f"metrics in points (x100); vs FP32 = {primary} difference in points, 95% CI its paired "
        "bootstrap interval (1000 resamples of the dev set; contains 0: not distinguishable); "
        + (
            "|d score| = mean absolute difference of the predicted scores from FP32's"
            if task.is_regression
            else "same pred = % of examples predicted as FP32 predicts them, then how many of "
            "the others are now right (+) and wrong (-)"
        ),
    ]
    notes += [f"  {r.model}: {r.config}" for r in result.records if r.kind != "fp32"]
    return "\n".join(head + lines + notes + format_at_ratio(result))


def format_at_ratio(result: EvalResult) -> list[str]:
    """`EvalResult.at_ratio` as text lines (none without baselines)."""
    if not result.at_ratio:
        return []
    ratio = {r.model: r.ratio for r in result.records}
    lines = [
        "",
        "at each baseline's ratio, the BCT model at least as compressed closest to FP32 "
        f"({result.metrics[0]}, BCT minus baseline, paired 95% CI; met: not significantly "
        "worse):",
    ]
    for a in result.at_ratio:
        where = f"  {a.baseline} ({ratio[a.baseline]:.2f}x): "
        if a.bct is None:
            lines.append(where + "no BCT model this compressed  not met")
            continue
        lo, hi = a.diff_ci95
        lines.append(
            where
            + f"{a.bct} ({ratio[a.bct]:.2f}x) {a.diff:+.2f} [{lo:+.2f}, {hi:+.2f}]  "
            + ("met" if a.met else "not met")
        )
    return lines


def format_fidelity(
    task: GlueTask, value: float | None, changed: tuple[int, int] | None = None
) -> str:
    if value is None:
        return "-"
    if task.is_regression:
        return f"{value:.4f}"
    return f"{value:.1f}%" + (f" +{changed[0]}/-{changed[1]}" if changed else "")


def write_json(result: EvalResult, dest: str) -> None:
    text = json.dumps(result.to_dict(), indent=2) + "\n"
    if dest == "-":
        sys.stdout.write(text)
        return
    Path(dest).write_text(text, encoding="utf-8")

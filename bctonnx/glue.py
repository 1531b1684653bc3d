"""GLUE tasks: the task table, readers for the original GLUE TSV files, and the metrics.

The readers take the layout of ``download_glue_data.py`` (``<glue dir>/<Task>/dev.tsv``):
tab-separated, no quoting (quote characters are text), UTF-8 with or without a BOM. CoLA has
no header (source, label, original label, sentence); the other tasks have one and columns are
found by name. Labels become GLUE's integer ids as in Hugging Face ``datasets``' ``glue``
(QNLI/RTE: entailment -> 0, not_entailment -> 1); STS-B scores stay floats in 0..5.

Metrics are numpy only and reported in points (x100), as GLUE tables do: accuracy, binary F1
(positive class 1), Matthews correlation, Pearson, Spearman (average ranks for ties).
"""

from __future__ import annotations

import csv
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import BctError

# --- metrics ---------------------------------------------------------------------------------


def accuracy(preds: np.ndarray, labels: np.ndarray) -> float:
    """Fraction of predictions equal to their label."""
    preds, labels = np.asarray(preds), np.asarray(labels)
    return float((preds == labels).mean()) if labels.size else float("nan")


def f1_binary(preds: np.ndarray, labels: np.ndarray, positive: int = 1) -> float:
    """F1 of the positive class: 2 TP / (2 TP + FP + FN); 0 when there is no positive at all."""
    p, y = np.asarray(preds) == positive, np.asarray(labels) == positive
    tp = int((p & y).sum())
    denom = 2 * tp + int((p & ~y).sum()) + int((~p & y).sum())
    return 2 * tp / denom if denom else 0.0


def matthews_corrcoef(preds: np.ndarray, labels: np.ndarray) -> float:
    """Matthews correlation of two binary label vectors; 0 when a margin is empty (as sklearn)."""
    p, y = np.asarray(preds) == 1, np.asarray(labels) == 1
    tp, tn = float((p & y).sum()), float((~p & ~y).sum())
    fp, fn = float((p & ~y).sum()), float((~p & y).sum())
    denom = (tp + fp) * (tp + fn) * (tn + fp) * (tn + fn)
    return (tp * tn - fp * fn) / np.sqrt(denom) if denom else 0.0


def pearson(x: np.ndarray, y: np.ndarray) -> float:
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    xc, yc = x - x.mean(), y - y.mean()
    denom = np.sqrt((xc * xc).sum() * (yc * yc).sum())
    return float((xc * yc).sum() / denom) if denom else float("nan")


def average_ranks(x: np.ndarray) -> np.ndarray:
    """Ranks 1..n; tied values all get the mean of the ranks they span."""
    x = np.asarray(x)
    order = np.argsort(x, kind="mergesort")
    sorted_x = x[order]
    # start index of each run of equal values, and the run each sorted element belongs to
    starts = np.flatnonzero(np.r_[True, sorted_x[1:] != sorted_x[:-1]])
    ends = np.r_[starts[1:], len(x)]
    run_rank = (starts + 1 + ends) / 2.0  # mean of ranks starts+1 .. ends
    ranks = np.empty(len(x), np.float64)
    ranks[order] = np.repeat(run_rank, ends - starts)
    return ranks


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Pearson correlation of the average ranks."""
    return pearson(average_ranks(x), average_ranks(y))


# --- tasks -----------------------------------------------------------------------------------


def _int_label(value: str) -> int:
    label = int(value)
    if label not in (0, 1):
        raise ValueError(f"label {value!r} is not 0 or 1")
    return label


def _nli_label(value: str) -> int:
    names = {"entailment": 0, "not_entailment": 1}
    if value not in names:
        raise ValueError(f"label {value!r} is not entailment or not_entailment")
    return names[value]


def _score(value: str) -> float:
    score = float(value)
    if not 0.0 <= score <= 5.0:
        raise ValueError(f"score {value!r} is outside 0..5")
    return score


@dataclass(frozen=True)
class GlueTask:
    """One GLUE task: where its files are, how to read them, how to score predictions.

    ``text_columns`` / ``label_column`` are header names, or column numbers for a file without
    a header (``header=False``). ``label_names`` are the ids' names in Hugging Face's glue
    dataset (used to line up a checkpoint's ``id2label``); empty for regression.
    """

    name: str
    folder: str
    metrics: tuple[str, ...]  # the first is the primary metric
    text_columns: tuple[str | int, ...]
    label_column: str | int
    parse_label: Callable[[str], float]
    header: bool = True
    num_columns: int | None = None  # exact column count, checked when there is no header
    label_names: tuple[str, ...] = ()
    label_aliases: dict[str, int] = field(default_factory=dict)

    @property
    def is_regression(self) -> bool:
        return not self.label_names

    @property
    def primary_metric(self) -> str:
        return self.metrics[0]

    @property
    def num_outputs(self) -> int:
        """Width of the model's logits: 1 for regression, else the number of classes."""
        return len(self.label_names) or 1


TASKS: dict[str, GlueTask] = {
    "sst2": GlueTask(
        "sst2",
        "SST-2",
        ("accuracy",),
        ("sentence",),
        "label",
        _int_label,
        label_names=("negative", "positive"),
        label_aliases={"neg": 0, "pos": 1},
    ),
    "mrpc": GlueTask(
        "mrpc",
        "MRPC",
        ("f1", "accuracy"),
        ("#1 String", "#2 String"),
        "Quality",
        _int_label,
        label_names=("not_equivalent", "equivalent"),
        label_aliases={"not_paraphrase": 0, "paraphrase": 1},
    ),
    "stsb": GlueTask(
        "stsb", "STS-B", ("spearman", "pearson"), ("sentence1", "sentence2"), "score", _score
    ),
    "rte": GlueTask(
        "rte",
        "RTE",
        ("accuracy",),
        ("sentence1", "sentence2"),
        "label",
        _nli_label,
        label_names=("entailment", "not_entailment"),
    ),
    "cola": GlueTask(
        "cola",
        "CoLA",
        ("matthews",),
        (3,),
        1,
        _int_label,
        header=False,
        num_columns=4,
        label_names=("unacceptable", "acceptable"),
    ),
    "qnli": GlueTask(
        "qnli",
        "QNLI",
        ("accuracy",),
        ("question", "sentence"),
        "label",
        _nli_label,
        label_names=("entailment", "not_entailment"),
    ),
}

METRIC_FUNCTIONS: dict[str, Callable[[np.ndarray, np.ndarray], float]] = {
    "accuracy": accuracy,
    "f1": f1_binary,
    "matthews": matthews_corrcoef,
    "pearson": pearson,
    "spearman": spearman,
}


def get_task(name: str) -> GlueTask:
    if name not in TASKS:
        raise BctError(f"unknown GLUE task {name!r}; choose one of {', '.join(TASKS)}")
    return TASKS[name]


def compute_metrics(task: GlueTask, preds: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """The task's metrics in points (x100), primary metric first."""
    return {m: 100.0 * METRIC_FUNCTIONS[m](preds, labels) for m in task.metrics}


BOOTSTRAP_SAMPLES = 1000


def bootstrap_indices(n: int, samples: int = BOOTSTRAP_SAMPLES, seed: int = 0) -> np.ndarray:
    """``samples`` resamples (with replacement) of ``n`` dev examples, fixed by ``seed``, so
    every model of a comparison is judged on the same resamples."""
    return np.random.default_rng(seed).integers(0, n, size=(samples, n))


def paired_difference_ci(
    task: GlueTask,
    preds: np.ndarray,
    base_preds: np.ndarray,
    labels: np.ndarray,
    indices: np.ndarray,
    level: float = 95.0,
) -> dict[str, tuple[float, float]]:
    """Paired bootstrap confidence interval of ``metric(preds) - metric(base_preds)`` in points,
    per metric: both models scored on the same resampled dev sets (``indices``), the central
    ``level`` percent of the differences. An interval that contains 0 means the dev set cannot
    tell the two models apart at that level."""
    tail = (100.0 - level) / 2
    out = {}
    for m in task.metrics:
        fn = METRIC_FUNCTIONS[m]
        diffs = [100.0 * (fn(preds[i], labels[i]) - fn(base_preds[i], labels[i])) for i in indices]
        lo, hi = np.percentile(diffs, [tail, 100.0 - tail])
        out[m] = (float(lo), float(hi))
    return out


# --- reading ---------------------------------------------------------------------------------


@dataclass
class GlueData:
    """One split: texts (a string, or a (first, second) pair for pair tasks) and labels."""

    texts: list[str] | list[tuple[str, str]]
    labels: np.ndarray
    path: Path

    def __len__(self) -> int:
        return len(self.labels)

    def head(self, n: int | None) -> GlueData:
        if n is None:
            return self
        return GlueData(self.texts[:n], self.labels[:n], self.path)


def task_file(glue_dir: str | os.PathLike, task: GlueTask, split: str = "dev") -> Path:
    """``<glue_dir>/<Task>/<split>.tsv``; ``glue_dir`` may also be the task folder itself."""
    root = Path(glue_dir)
    if not root.is_dir():
        raise BctError(f"{root}: GLUE directory not found")
    for folder in (root / task.folder, root):
        if (folder / f"{split}.tsv").is_file():
            return folder / f"{split}.tsv"
    raise BctError(
        f"{root / task.folder / f'{split}.tsv'}: no such file (expected the GLUE layout "
        f"<glue dir>/{task.folder}/{split}.tsv)"
    )


def read_split(path: str | os.PathLike, task: GlueTask) -> GlueData:
    """Read one GLUE TSV of ``task``; a wrong layout is a one-line BctError naming the line."""
    path = Path(path)
    if not path.is_file():
        raise BctError(f"{path}: no such file")
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    except UnicodeDecodeError as exc:
        raise BctError(f"{path}: not UTF-8 text (byte {exc.start})") from None
    except csv.Error as exc:
        raise BctError(f"{path}: not a GLUE TSV file ({exc})") from None
    rows = [r for r in rows if r and any(cell.strip() for cell in r)]
    layout = f"not the GLUE {task.folder} layout"
    if not rows:
        raise BctError(f"{path}: empty file")
    first_line = 1
    if task.header:
        header = [h.strip() for h in rows[0]]
        wanted = [*task.text_columns, task.label_column]
        missing = [c for c in wanted if c not in header]
        if missing:
            raise BctError(
                f"{path}: {layout}: header lacks column(s) {', '.join(map(repr, missing))} "
                f"(found {', '.join(map(repr, header[:12]))})"
            )
        text_idx = [header.index(c) for c in task.text_columns]
        label_idx = header.index(task.label_column)
        width = len(header)
        rows, first_line = rows[1:], 2
    else:
        text_idx = [int(c) for c in task.text_columns]
        label_idx = int(task.label_column)
        width = task.num_columns or max(text_idx + [label_idx]) + 1
    texts, labels = [], []
    for lineno, row in enumerate(rows, start=first_line):
        if len(row) != width:
            raise BctError(
                f"{path}: line {lineno}: {layout}: {len(row)} tab-separated columns, "
                f"expected {width}"
            )
        try:
            labels.append(task.parse_label(row[label_idx].strip()))
        except ValueError as exc:
            hint = " (a header? this file has none)" if not task.header and lineno == 1 else ""
            raise BctError(f"{path}: line {lineno}: {layout}: {exc}{hint}") from None
        cells = [row[i] for i in text_idx]
        texts.append(cells[0] if len(cells) == 1 else (cells[0], cells[1]))
    if not labels:
        raise BctError(f"{path}: no examples")
    dtype = np.float64 if task.is_regression else np.int64
    return GlueData(texts, np.asarray(labels, dtype), path)


def read_task(glue_dir: str | os.PathLike, task: GlueTask | str, split: str = "dev") -> GlueData:
    task = get_task(task) if isinstance(task, str) else task
    return read_split(task_file(glue_dir, task, split), task)


# --- model outputs -> GLUE labels -----------------------------------------------------------


def label_permutation(task: GlueTask, model_config: dict | None) -> np.ndarray | None:
    """For each model output index, the GLUE label id it means (None for regression).

    Read from the checkpoint's ``id2label``: names that are GLUE's (``entailment``,
    ``positive``, ...) are lined up with GLUE ids; generic names (``LABEL_0``) keep the index.
    """
    if task.is_regression:
        return None
    n = len(task.label_names)
    id2label = (model_config or {}).get("id2label") or {}
    try:
        names = {int(k): str(v).strip().lower() for k, v in id2label.items()}
    except (TypeError, ValueError):
        raise BctError(f"config.json id2label has non-integer ids: {list(id2label)}") from None
    lookup = {name: i for i, name in enumerate(task.label_names)} | task.label_aliases
    if names and set(names) != set(range(n)):
        raise BctError(
            f"the model has {len(names)} output label(s) ({', '.join(names.values())}), GLUE "
            f"{task.name} has {n} ({', '.join(task.label_names)}); is it fine-tuned on {task.name}?"
        )
    if names and all(name in lookup for name in names.values()):
        perm = np.array([lookup[names[i]] for i in range(n)])
        if sorted(perm.tolist()) != list(range(n)):
            raise BctError(f"config.json id2label maps two outputs to one GLUE label: {names}")
        return perm
    return np.arange(n)


def predictions(task: GlueTask, logits: np.ndarray, perm: np.ndarray | None) -> np.ndarray:
    """Model outputs -> GLUE predictions: argmax mapped through ``perm``, or the raw score."""
    logits = np.asarray(logits)
    if task.is_regression:
        return logits.reshape(len(logits), -1)[:, 0].astype(np.float64)
    idx = logits.argmax(-1)
    return perm[idx] if perm is not None else idx

"""GLUE evaluation: metrics on hand-checked cases, the TSV readers on every task's layout (small
temp files and the real dev sets in ../shared), `bctonnx eval` end to end on MiniLM slices
(with onnxruntime's baselines), and bad input: one line, exit 2."""

from __future__ import annotations

import contextlib
import io
import json
import shutil
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
from shared_assets import require_shared

from bctonnx.baselines import Baseline
from bctonnx.cli import main
from bctonnx.config import resolve_config
from bctonnx.errors import BctError
from bctonnx.evaluate import (
    EvalRecord,
    at_ratio,
    changed_predictions,
    eval_configs,
    fidelity,
    format_fidelity,
    load_config_file,
    parse_presets,
    run_eval,
)
from bctonnx.glue import (
    TASKS,
    accuracy,
    average_ranks,
    bootstrap_indices,
    compute_metrics,
    f1_binary,
    label_permutation,
    matthews_corrcoef,
    paired_difference_ci,
    pearson,
    predictions,
    read_split,
    read_task,
    spearman,
    task_file,
)

# --- metrics -----------------------------------------------------------------------------------


def test_accuracy_counts_equal_predictions():
    # matches at positions 0 and 2 of 4 -> 0.5
    assert accuracy(np.array([1, 0, 1, 1]), np.array([1, 1, 1, 0])) == 0.5


def test_f1_of_the_positive_class():
    # preds 1 1 0 0 1 / labels 1 0 0 1 1: TP = 2 (pos 0, 4), FP = 1 (pos 1), FN = 1 (pos 3)
    # F1 = 2 TP / (2 TP + FP + FN) = 4 / 6
    assert f1_binary(np.array([1, 1, 0, 0, 1]), np.array([1, 0, 0, 1, 1])) == pytest.approx(4 / 6)
    # no positive predicted and none in the labels: 0 by convention (as sklearn's zero_division)
    assert f1_binary(np.zeros(3, int), np.zeros(3, int)) == 0.0


def test_matthews_correlation_of_a_2x2_confusion_matrix():
    # labels 1 1 1 1 0 0 0 / preds 1 1 1 0 0 0 1: TP = 3, FN = 1, TN = 2, FP = 1
    # MCC = (TP TN - FP FN) / sqrt((TP+FP)(TP+FN)(TN+FP)(TN+FN)) = (6 - 1) / sqrt(4*4*3*3) = 5/12
    labels = np.array([1, 1, 1, 1, 0, 0, 0])
    preds = np.array([1, 1, 1, 0, 0, 0, 1])
    assert matthews_corrcoef(preds, labels) == pytest.approx(5 / 12)
    assert matthews_corrcoef(labels, labels) == pytest.approx(1.0)
    assert matthews_corrcoef(1 - labels, labels) == pytest.approx(-1.0)
    # a constant prediction has an empty margin: 0 (sklearn's convention)
    assert matthews_corrcoef(np.ones(7, int), labels) == 0.0


def test_pearson_by_hand():
    # x = 1 2 3 (centred -1 0 1), y = 2 4 7 (mean 13/3, centred -7/3 -1/3 8/3)
    # sum xc*yc = 7/3 + 8/3 = 5; sum xc^2 = 2; sum yc^2 = 114/9 -> r = 5 / sqrt(2 * 114/9)
    assert pearson([1, 2, 3], [2, 4, 7]) == pytest.approx(5 / np.sqrt(2 * 114 / 9))


def test_average_ranks_share_tied_ranks():
    # 10 -> 1; the two 20s span ranks 2 and 3 -> 2.5 each; 30 -> 4
    np.testing.assert_array_equal(average_ranks(np.array([10, 20, 20, 30])), [1, 2.5, 2.5, 4])
    # 1 -> 1, 2 -> 2, the three 3s span ranks 3..5 -> 4
    np.testing.assert_array_equal(average_ranks(np.array([3, 1, 3, 3, 2])), [4, 1, 4, 4, 2])


def test_spearman_with_ties():
    # ranks x = 1 2.5 2.5 4, ranks y = 1 3 2 4; both mean 2.5
    # centred: x -1.5 0 0 1.5, y -1.5 .5 -.5 1.5; sum xy = 4.5, sum x^2 = 4.5, sum y^2 = 5
    # rho = 4.5 / sqrt(4.5 * 5) = sqrt(0.9)
    assert spearman([1, 2, 2, 3], [1, 3, 2, 4]) == pytest.approx(np.sqrt(0.9))
    # monotone but not linear: Spearman 1, Pearson below 1
    x = np.array([1.0, 2, 3, 4])
    assert spearman(x, x**3) == pytest.approx(1.0)
    assert pearson(x, x**3) < 0.99


def test_rank_metrics_agree_with_scipy_on_random_ties():
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(1)
    x = rng.integers(0, 6, 200).astype(float)  # many ties, like STS-B's 0..5 scores
    y = x + rng.normal(0, 1.5, 200)
    assert spearman(x, y) == pytest.approx(stats.spearmanr(x, y).statistic, abs=1e-12)
    assert pearson(x, y) == pytest.approx(stats.pearsonr(x, y).statistic, abs=1e-12)


def test_paired_bootstrap_interval_of_identical_models_is_zero():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 300)
    preds = np.where(rng.random(300) < 0.8, labels, 1 - labels)
    idx = bootstrap_indices(300, samples=200)
    assert idx.shape == (200, 300) and np.array_equal(idx, bootstrap_indices(300, samples=200))
    ci = paired_difference_ci(TASKS["cola"], preds, preds, labels, idx)
    assert ci == {"matthews": (0.0, 0.0)}


def test_paired_bootstrap_interval_brackets_the_difference_and_separates_clear_gaps():
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 2, 800)
    good = np.where(rng.random(800) < 0.9, labels, 1 - labels)
    idx = bootstrap_indices(800, samples=400)
    # a few flips: the interval contains the observed difference
    near = good.copy()
    near[:6] = 1 - near[:6]
    diff = compute_metrics(TASKS["sst2"], near, labels)["accuracy"] - 100 * accuracy(good, labels)
    lo, hi = paired_difference_ci(TASKS["sst2"], near, good, labels, idx)["accuracy"]
    assert lo <= diff <= hi and hi - lo < 3
    # a model 20 points worse: clearly separated
    bad = np.where(rng.random(800) < 0.7, labels, 1 - labels)
    lo, hi = paired_difference_ci(TASKS["sst2"], bad, good, labels, idx)["accuracy"]
    assert hi < 0 and lo > -35


def test_at_ratio_picks_the_bct_model_closest_to_fp32_at_least_as_compressed():
    rng = np.random.default_rng(2)
    labels = rng.integers(0, 2, 400)
    task = TASKS["sst2"]

    def flip(k):  # the labels with the first k wrong
        p = labels.copy()
        p[:k] = 1 - p[:k]
        return p

    preds_of = {
        "fp32": flip(40),
        "bct a": flip(44),  # 3.9x, 89.0
        "bct b": flip(42),  # 3.8x, 89.5: more accurate, less compressed than dyn
        "bct c": flip(80),  # 7.5x, 80.0
        "bct d": flip(30),  # 3.95x, 92.5: the most accurate, but 10 predictions off FP32's
        "bct broken": flip(0),
        "dyn": flip(48),  # 3.85x, 88.0
        "nbits": flip(36),  # 1.6x, 91.0
        "tiny": flip(60),  # 9x: no BCT model reaches it
        "near": flip(79),  # 5x: only c (7.5x), one example behind it
    }
    ratios = {"fp32": 1.0, "bct a": 3.9, "bct b": 3.8, "bct c": 7.5, "bct broken": 20.0}
    ratios["bct d"] = 3.95
    ratios |= {"dyn": 3.85, "nbits": 1.6, "tiny": 9.0, "near": 5.0}

    def rec(name):
        kind = "fp32" if name == "fp32" else ("bct" if name.startswith("bct") else "baseline")
        r = EvalRecord(name, kind, "", ratio=ratios[name])
        r.metrics = compute_metrics(task, preds_of[name], labels)
        r.status = "failed" if name == "bct broken" else "ok"
        if kind != "fp32":
            r.fidelity = fidelity(task, preds_of[name], preds_of["fp32"])
        return r

    records = [rec(n) for n in preds_of]
    idx = bootstrap_indices(400, samples=300)
    got = {a.baseline: a for a in at_ratio(task, records, preds_of, labels, idx)}
    assert list(got) == ["dyn", "nbits", "tiny", "near"]  # a failed record is no rival
    dyn, nbits, tiny = got["dyn"], got["nbits"], got["tiny"]
    # one example worse, which the dev set cannot tell from chance: not significantly worse
    near = got["near"]
    assert near.bct == "bct c" and near.diff == pytest.approx(-0.25) and near.met
    assert near.diff_ci95[0] < 0 <= near.diff_ci95[1]
    # a (4 predictions off FP32's), not the more accurate d (10 off): labels never choose
    assert (dyn.bct, dyn.metric, dyn.met) == ("bct a", "accuracy", True)
    assert dyn.diff == pytest.approx(1.0)  # 4 examples of 400
    # the same 4 examples differ in every resample's favour: the interval never goes below 0
    assert 0 <= dyn.diff_ci95[0] <= 1.0 <= dyn.diff_ci95[1]
    # at 1.6x every BCT model qualifies: b is the closest to FP32 (2 off), 6 examples behind,
    # all 6 the baseline's way: significantly worse, not met
    assert (nbits.bct, nbits.met) == ("bct b", False) and nbits.diff == pytest.approx(-1.5)
    assert nbits.diff_ci95[1] < 0
    assert (tiny.bct, tiny.diff, tiny.diff_ci95, tiny.met) == (None, None, None, False)
    # plain JSON types, whatever the metric function returns (matthews: numpy floats)
    for r in records:
        r.metrics = compute_metrics(TASKS["cola"], preds_of[r.model], labels)
    cola = at_ratio(TASKS["cola"], records, preds_of, labels, idx)
    assert json.loads(json.dumps([asdict(a) for a in cola]))[0]["met"] is True


def test_fidelity_compares_predictions_example_by_example():
    sst2, stsb = TASKS["sst2"], TASKS["stsb"]
    ref = np.array([0, 1, 1, 0, 1, 0, 0, 1])
    # accuracy-neutral swaps still count: 2 of 8 predictions differ from the reference
    assert fidelity(sst2, np.array([1, 0, 1, 0, 1, 0, 0, 1]), ref) == 75.0
    assert fidelity(sst2, ref.copy(), ref) == 100.0
    scores = np.array([0.5, 2.0, 4.75])
    assert fidelity(stsb, np.array([1.0, 2.0, 4.5]), scores) == pytest.approx(0.25)
    assert format_fidelity(sst2, 75.0) == "75.0%" and format_fidelity(stsb, 0.25) == "0.2500"
    assert format_fidelity(sst2, None) == "-"
    # the two changed predictions: one now right, one now wrong
    labels = np.array([1, 1, 1, 0, 1, 0, 0, 1])
    assert changed_predictions(sst2, np.array([1, 0, 1, 0, 1, 0, 0, 1]), ref, labels) == (1, 1)
    assert changed_predictions(sst2, ref.copy(), ref, labels) == (0, 0)
    assert changed_predictions(stsb, scores, scores, scores) is None
    assert format_fidelity(sst2, 75.0, (1, 1)) == "75.0% +1/-1"


def test_compute_metrics_reports_points_primary_first():
    m = compute_metrics(TASKS["mrpc"], np.array([1, 1, 0, 0, 1]), np.array([1, 0, 0, 1, 1]))
    assert list(m) == ["f1", "accuracy"]
    assert m["f1"] == pytest.approx(100 * 4 / 6)
    assert m["accuracy"] == pytest.approx(60.0)
    assert list(compute_metrics(TASKS["stsb"], np.arange(4.0), np.arange(4.0))) == [
        "spearman",
        "pearson",
    ]


# --- TSV readers on small files -------------------------------------------------------------


def write(path: Path, text: str, bom: bool = False) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + text.encode("utf-8"))
    return path


def test_sst2_header_and_quote_characters(tmp_path):
    f = write(tmp_path / "dev.tsv", 'sentence\tlabel\n" a "quoted\' film . \t1\nbleak \t0\n')
    data = read_split(f, TASKS["sst2"])
    assert data.texts == ['" a "quoted\' film . ', "bleak "]  # quotes are text (QUOTE_NONE)
    assert data.labels.tolist() == [1, 0]


def test_cola_without_header_with_bom_and_no_final_newline(tmp_path):
    f = write(tmp_path / "dev.tsv", 'gj04\t1\t\tThe doll "wriggled".\ngj04\t0\t*\tHim ran.', True)
    data = read_split(f, TASKS["cola"])
    assert data.texts == ['The doll "wriggled".', "Him ran."]
    assert data.labels.tolist() == [1, 0]


def test_cola_file_with_a_header_is_refused_naming_line_1(tmp_path):
    f = write(tmp_path / "dev.tsv", "source\tlabel\torig\tsentence\ngj04\t1\t\tOk.\n")
    with pytest.raises(BctError, match="line 1.*header"):
        read_split(f, TASKS["cola"])


def test_mrpc_bom_header_pairs(tmp_path):
    f = write(
        tmp_path / "dev.tsv",
        'Quality\t#1 ID\t#2 ID\t#1 String\t#2 String\n1\t11\t12\tHe said " no " .\tHe said no .\n'
        "0\t21\t22\tA b .\tC d .\n",
        bom=True,
    )
    data = read_split(f, TASKS["mrpc"])
    assert data.texts == [('He said " no " .', "He said no ."), ("A b .", "C d .")]
    assert data.labels.tolist() == [1, 0]


def test_stsb_score_is_the_last_of_ten_columns(tmp_path):
    header = (
        "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore"
    )
    f = write(
        tmp_path / "dev.tsv",
        f"{header}\n0\tmain-captions\tMSRvid\t2012test\t0000\tnone\tnone\tA man.\tA guy.\t4.750\n",
    )
    data = read_split(f, TASKS["stsb"])
    assert data.texts == [("A man.", "A guy.")]
    assert data.labels.dtype == np.float64 and data.labels.tolist() == [4.75]


@pytest.mark.parametrize(
    ("task", "cols"), [("rte", "sentence1\tsentence2"), ("qnli", "question\tsentence")]
)
def test_nli_string_labels_map_like_hf_glue(tmp_path, task, cols):
    f = write(
        tmp_path / "dev.tsv",
        f'index\t{cols}\tlabel\n0\tWho "won"?\tBob won.\tentailment\n1\tA?\tB.\tnot_entailment\n',
    )
    data = read_split(f, TASKS[task])
    assert data.labels.tolist() == [0, 1]  # entailment -> 0, not_entailment -> 1
    assert data.texts[0] == ('Who "won"?', "Bob won.")


def test_wrong_header_is_one_line_naming_the_missing_column(tmp_path):
    f = write(tmp_path / "dev.tsv", "text\tlabel\nfine\t1\n")
    with pytest.raises(BctError, match="header lacks column.*'sentence'") as exc:
        read_split(f, TASKS["sst2"])
    assert "\n" not in str(exc.value)


def test_wrong_column_count_names_the_line(tmp_path):
    f = write(tmp_path / "dev.tsv", "sentence\tlabel\nok\t1\nstray\ttab\t0\n")
    with pytest.raises(BctError, match="line 3.*3 tab-separated columns, expected 2"):
        read_split(f, TASKS["sst2"])


@pytest.mark.parametrize(("task", "bad"), [("sst2", "2"), ("rte", "neutral"), ("stsb", "7.5")])
def test_bad_label_is_refused(tmp_path, task, bad):
    rows = {
        "sst2": f"sentence\tlabel\nx\t{bad}\n",
        "rte": f"index\tsentence1\tsentence2\tlabel\n0\ta\tb\t{bad}\n",
        "stsb": "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2"
        f"\tscore\n0\tg\tf\ty\to\ts\ts\ta\tb\t{bad}\n",
    }
    with pytest.raises(BctError, match="line 2"):
        read_split(write(tmp_path / "dev.tsv", rows[task]), TASKS[task])


def test_missing_files_are_one_line_errors(tmp_path):
    with pytest.raises(BctError, match="GLUE directory not found"):
        task_file(tmp_path / "nope", TASKS["sst2"])
    with pytest.raises(BctError, match=r"SST-2/dev\.tsv: no such file"):
        task_file(tmp_path, TASKS["sst2"])
    # the task folder itself is accepted as --glue-dir
    write(tmp_path / "SST-2" / "dev.tsv", "sentence\tlabel\nx\t1\n")
    assert task_file(tmp_path / "SST-2", TASKS["sst2"]) == tmp_path / "SST-2" / "dev.tsv"


# --- the real GLUE files ---------------------------------------------------------------------

# data rows and label counts from ../shared/data/glue/SOURCES.md
REAL_DEV = {
    "sst2": (872, {0: 428, 1: 444}),
    "mrpc": (408, {0: 129, 1: 279}),
    "stsb": (1500, None),
    "rte": (277, {0: 146, 1: 131}),
    "cola": (1043, {0: 322, 1: 721}),
    "qnli": (5463, {0: 2702, 1: 2761}),
}
REAL_TRAIN = {"sst2": 67349, "mrpc": 3668, "stsb": 5749, "rte": 2490, "cola": 8551}


@pytest.mark.shared
@pytest.mark.parametrize("task", list(REAL_DEV))
def test_real_dev_sets_row_and_label_counts(task):
    glue = require_shared("data/glue")
    data = read_task(glue, task)
    rows, counts = REAL_DEV[task]
    assert len(data) == rows
    if counts is None:
        assert data.labels.min() >= 0 and data.labels.max() <= 5
        assert all(isinstance(t, tuple) and all(t) for t in data.texts)
    else:
        assert dict(zip(*np.unique(data.labels, return_counts=True), strict=True)) == counts
    if task in REAL_TRAIN:
        assert len(read_task(glue, task, "train")) == REAL_TRAIN[task]


# --- labels of a checkpoint -------------------------------------------------------------------


def test_generic_label_names_keep_the_output_order():
    assert label_permutation(TASKS["sst2"], None).tolist() == [0, 1]
    cfg = {"id2label": {"0": "LABEL_0", "1": "LABEL_1"}}
    assert label_permutation(TASKS["sst2"], cfg).tolist() == [0, 1]


def test_glue_label_names_are_lined_up_with_glue_ids():
    cfg = {"id2label": {"0": "not_entailment", "1": "entailment"}}
    perm = label_permutation(TASKS["rte"], cfg)
    assert perm.tolist() == [1, 0]
    # output 0 wins in row 0 -> not_entailment (GLUE id 1); output 1 wins in row 1 -> 0
    assert predictions(TASKS["rte"], np.array([[2.0, 1.0], [0.0, 3.0]]), perm).tolist() == [1, 0]


def test_label_count_mismatch_is_refused_and_regression_reads_the_score():
    with pytest.raises(BctError, match="3 output label"):
        label_permutation(TASKS["sst2"], {"id2label": {"0": "a", "1": "b", "2": "c"}})
    assert label_permutation(TASKS["stsb"], {"id2label": {"0": "LABEL_0"}}) is None
    assert predictions(TASKS["stsb"], np.array([[4.5], [1.0]]), None).tolist() == [4.5, 1.0]


# --- configs ---------------------------------------------------------------------------------


def test_presets_repeatable_and_comma_separated():
    assert parse_presets(None) == list(__import__("bctonnx").PRESETS)
    assert parse_presets(["w8a8,w4a8", "w8a8"]) == ["w8a8", "w4a8"]
    with pytest.raises(BctError, match="unknown preset 'w2a2'"):
        parse_presets(["w2a2"])


def test_config_file_schema(tmp_path):
    f = tmp_path / "c.json"
    f.write_text(
        json.dumps(
            [
                {"name": "w4 b64", "preset": "w4a8", "block_size": 64, "exclude": ["*pooler*"]},
                {"act_bits": 6},
            ]
        )
    )
    (n1, c1), (n2, c2) = load_config_file(f)
    assert (n1, n2) == ("w4 b64", "custom 2")
    assert c1.weights.bits == 4 and c1.weights.block_size == 64 and c1.exclude == ("*pooler*",)
    assert c2.weights.bits == 8 and c2.activations.bits == 6
    assert [n for n, _ in eval_configs(config_file=f, mode="integer")] == ["w4 b64", "custom 2"]
    assert [n for n, _ in eval_configs(config_file=f, mode="qdq")] == ["w4 b64 qdq", "custom 2 qdq"]


def test_mode_goes_through_resolve_config():
    from bctonnx.config import MODES

    for mode in MODES:
        configs = eval_configs(["w8a8"], mode=mode)
        assert [c.mode for _, c in configs] == [mode]
        assert configs[0][0] == ("w8a8" if mode == "integer" else f"w8a8 {mode}")


def test_distinct_configs_keeps_the_preset_in_its_own_mode():
    from bctonnx.config import distinct_configs

    combos = [
        (p, m, resolve_config(p, mode=m)) for p in ("w8a8-fast", "w8a8") for m in ("qdq", "integer")
    ]
    kept = [(p, m) for p, m, _ in distinct_configs(combos)]
    # w8a8-fast's qdq form comes first but is w8a8's without its own re-blocking: w8a8 stays
    assert kept == [("w8a8-fast", "integer"), ("w8a8", "qdq"), ("w8a8", "integer")]


def test_w8a8_fast_is_w8a8_integer_with_reblocked_linear_inputs_and_no_duplicate_in_qdq():
    names = lambda mode: [n for n, _ in eval_configs(["w8a8", "w8a8-fast"], mode=mode)]  # noqa: E731
    assert names("integer") == ["w8a8", "w8a8-fast"]
    assert names("qdq") == ["w8a8 qdq"]  # the flag only changes the integer form
    ((_, fast),) = eval_configs(["w8a8-fast"])
    assert fast.mode == "integer" and fast.match_weight_blocks
    assert "linear inputs in weight blocks" in fast.describe()


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"weight_bitz": 4}', "unknown key.*weight_bitz"),
        ('{"block_size": "64"}', "block_size must be int"),
        ('{"no_activations": 1}', "no_activations must be bool"),
        ('{"preset": "w9"}', "unknown preset"),
        ('{"weight_bits": 12}', "bits must be in 2..8"),
        ("[1, 2", "not valid JSON"),
    ],
)
def test_bad_config_file_is_one_line(tmp_path, content, message):
    f = tmp_path / "c.json"
    f.write_text(content)
    with pytest.raises(BctError, match=message):
        load_config_file(f)


# --- end to end on a tiny classifier (fast) ------------------------------------------------------

_TINY_SENTENCES = [
    "the water was hot",
    "you can see the people",
    "he said no",
    "this is the way",
    "they had time to write",
    "what a long day",
    "she will come now",
    "the first number",
]


@pytest.fixture(scope="module")
def tiny_classifier(tiny_bert_dir, tmp_path_factory) -> Path:
    """The conftest tiny BERT with a random 2-class head, exported for text-classification."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    from bctonnx.export import export_model

    root = tmp_path_factory.mktemp("tiny_cls")
    ckpt = root / "checkpoint"
    torch.manual_seed(1)
    config = BertConfig.from_pretrained(tiny_bert_dir, num_labels=2)
    BertForSequenceClassification(config).eval().save_pretrained(ckpt)
    for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (tiny_bert_dir / name).is_file():
            shutil.copy(tiny_bert_dir / name, ckpt / name)
    return export_model(ckpt, root / "onnx", task="text-classification")


@pytest.fixture(scope="module")
def tiny_glue(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("glue")
    lines = "".join(f"{s}\t{i % 2}\n" for i, s in enumerate(_TINY_SENTENCES))
    write(root / "SST-2" / "dev.tsv", "sentence\tlabel\n" + lines)
    write(root / "SST-2" / "train.tsv", "sentence\tlabel\n" + lines)
    return root


def run_cli(capsys, *argv):
    rc = main([str(a) for a in argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


def assert_one_line_error(rc, err, fragment):
    assert rc == 2
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("bctonnx: error: ") and fragment in lines[0], err


def test_swapped_id2label_mirrors_accuracy(tiny_classifier, tiny_glue, tmp_path):
    # the same logits read through the opposite label order: every prediction flips
    swapped = tmp_path / "swapped"
    shutil.copytree(tiny_classifier, swapped)
    cfg = json.loads((swapped / "config.json").read_text())
    cfg["id2label"] = {"0": "positive", "1": "negative"}
    cfg["label2id"] = {"positive": 0, "negative": 1}
    (swapped / "config.json").write_text(json.dumps(cfg))
    plain = run_eval(tiny_classifier, "sst2", tiny_glue, [], progress=False)
    mirrored = run_eval(swapped, "sst2", tiny_glue, [], progress=False)
    acc, acc_swapped = plain.records[0].metrics["accuracy"], mirrored.records[0].metrics["accuracy"]
    assert acc + acc_swapped == pytest.approx(100.0)


def test_eval_takes_an_ortoptimizer_directory(tiny_classifier, tiny_glue, tmp_path):
    """optimum's ORTOptimizer writes model_optimized.onnx (fused ops) beside the config: eval
    runs it as the FP32 model, as it is, and compresses it."""
    from conftest import ort_optimized

    optimized = ort_optimized(tiny_classifier, tmp_path / "optimized")
    config = [("w8a8", resolve_config("w8a8", block_size=16))]
    plain = run_eval(tiny_classifier, "sst2", tiny_glue, [], progress=False)
    fused = run_eval(optimized, "sst2", tiny_glue, config, progress=False)
    assert fused.model_dir == str(optimized)
    assert fused.records[0].metrics == pytest.approx(plain.records[0].metrics)
    w8a8 = fused.records[1]
    assert w8a8.status == "ok" and w8a8.ratio > 2.0 and w8a8.fidelity >= 75.0


def test_config_file_and_failures_become_rows(
    capsys, tiny_classifier, tiny_glue, tmp_path, monkeypatch
):
    import bctonnx.evaluate as evaluate

    def broken(src, dst, **kw):
        raise RuntimeError("quantizer exploded\nsecond line")

    monkeypatch.setattr(evaluate, "BASELINES", {"broken": Baseline("broken", broken, "always")})
    cfg = tmp_path / "c.json"
    cfg.write_text(
        json.dumps(
            [
                {"name": "b16", "block_size": 16},
                {"name": "bad", "block_size": 16, "weight_block_size": 48},
            ]
        )
    )
    out = tmp_path / "r.json"
    keep = tmp_path / "keep"
    rc, stdout, _ = run_cli(
        capsys, "eval", "--model-dir", tiny_classifier, "--task", "sst2", "--glue-dir", tiny_glue,
        "--config", cfg, "--baselines", "--json", out, "--keep", keep,
    )  # fmt: skip
    assert rc == 0
    records = {r["model"]: r for r in json.loads(out.read_text())["records"]}
    assert list(records) == ["fp32", "bct b16", "bct bad", "broken"]
    assert records["bct b16"]["status"] == "ok" and records["bct b16"]["ratio"] > 2
    assert records["bct bad"]["status"] == "failed" and "48" in records["bct bad"]["error"]
    assert records["broken"]["error"] == "RuntimeError: quantizer exploded"
    assert "bct bad" in stdout and "failed:" in stdout and "ratio" in stdout
    assert (keep / "bct-b16" / "model.onnx").is_file()


def test_missing_task_file_and_nonempty_keep_write_nothing(
    capsys, tiny_classifier, tiny_glue, tmp_path
):
    out = tmp_path / "r.json"
    rc, _, err = run_cli(
        capsys, "eval", "--model-dir", tiny_classifier, "--task", "cola", "--glue-dir", tiny_glue,
        "--json", out,
    )  # fmt: skip
    assert_one_line_error(rc, err, "CoLA/dev.tsv: no such file")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    rc, _, err = run_cli(
        capsys, "eval", "--model-dir", tiny_classifier, "--task", "sst2", "--glue-dir", tiny_glue,
        "--keep", tmp_path / "full", "--json", out,
    )  # fmt: skip
    assert_one_line_error(rc, err, "not an empty directory")
    assert not out.exists()


def test_feature_extraction_model_is_refused(capsys, tiny_bert_dir, tiny_glue):
    rc, _, err = run_cli(
        capsys, "eval", "--model-dir", tiny_bert_dir, "--task", "sst2", "--glue-dir", tiny_glue,
    )  # fmt: skip
    assert_one_line_error(rc, err, "no 'logits' output")


# --- bad input ---------------------------------------------------------------------------------


def test_unknown_task(capsys, tmp_path):
    rc, _, err = run_cli(
        capsys, "eval", "--model-dir", tmp_path, "--task", "mnli", "--glue-dir", tmp_path
    )
    assert_one_line_error(rc, err, "unknown GLUE task 'mnli'")


def test_missing_glue_dir(capsys, tmp_path):
    rc, _, err = run_cli(
        capsys, "eval", "--model-dir", tmp_path, "--task", "sst2", "--glue-dir", tmp_path / "nope"
    )
    assert_one_line_error(rc, err, "GLUE directory not found")


def test_model_dir_without_model(capsys, tmp_path, tiny_glue):
    (tmp_path / "empty").mkdir()
    rc, _, err = run_cli(
        capsys, "eval", "--model-dir", tmp_path / "empty", "--task", "sst2", "--glue-dir", tiny_glue
    )
    assert_one_line_error(rc, err, "no model.onnx and no config.json")
    rc, _, err = run_cli(
        capsys, "eval", "--model-dir", tmp_path / "nope", "--task", "sst2", "--glue-dir", tiny_glue
    )
    assert_one_line_error(rc, err, "model directory not found")


@pytest.mark.parametrize(
    ("extra", "fragment"),
    [(["--limit", "0"], "--limit must be >= 1"), (["--preset", "w9"], "unknown preset")],
)
def test_bad_flags(capsys, tmp_path, tiny_glue, extra, fragment):
    rc, _, err = run_cli(
        capsys, "eval", "--model-dir", tmp_path, "--task", "sst2", "--glue-dir", tiny_glue, *extra
    )
    assert_one_line_error(rc, err, fragment)


# --- end to end on the fine-tuned MiniLMs in ../shared (slices) ---------------------------------


def _eval_json(*argv) -> dict:
    """Run ``bctonnx eval ... --json -`` and parse stdout (module fixtures cannot use capsys)."""
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = main(["eval", *map(str, argv), "--json", "-"])
    assert rc == 0
    return json.loads(buf.getvalue())


@pytest.fixture(scope="module")
def sst2_with_baselines() -> dict:
    """SST-2, first 16 dev sentences: FP32, w8a8 and the three onnxruntime baselines."""
    model = require_shared("models/minilm-sst2")
    glue = require_shared("data/glue")
    return _eval_json(
        "--model-dir", model, "--task", "sst2", "--glue-dir", glue, "--preset", "w8a8",
        "--limit", 16, "--baselines", "--threads", 2,
    )  # fmt: skip


@pytest.mark.shared
def test_sst2_slice_fp32_and_w8a8(sst2_with_baselines):
    r = sst2_with_baselines
    assert (r["task"], r["n"], r["dev_size"], r["primary_metric"]) == ("sst2", 16, 872, "accuracy")
    fp32, w8a8 = r["records"][:2]
    assert fp32["model"] == "fp32" and 50 <= fp32["metrics"]["accuracy"] <= 100
    assert w8a8["model"] == "bct w8a8" and w8a8["status"] == "ok"
    assert w8a8["ratio"] > 3
    assert w8a8["vs_fp32"]["accuracy"] == pytest.approx(
        w8a8["metrics"]["accuracy"] - fp32["metrics"]["accuracy"]
    )
    assert fp32["fidelity"] is None and 80 <= w8a8["fidelity"] <= 100
    right, wrong = w8a8["changed"]  # the predictions unlike FP32's, and what they changed
    assert right + wrong == round(16 * (100 - w8a8["fidelity"]) / 100)
    assert w8a8["metrics"]["accuracy"] - fp32["metrics"]["accuracy"] == pytest.approx(
        100 * (right - wrong) / 16
    )


@pytest.mark.shared
def test_sst2_slice_every_baseline_row_has_a_size(sst2_with_baselines):
    rows = {r["model"]: r for r in sst2_with_baselines["records"] if r["kind"] == "baseline"}
    assert set(rows) == {"ort dynamic int8", "ort static qdq int8", "ort matmulnbits 4bit"}
    for name, row in rows.items():
        assert row["status"] == "ok", (name, row["error"])
        assert row["bytes"] > 0 and row["ratio"] > 1.2
        assert 0 <= row["metrics"]["accuracy"] <= 100


@pytest.mark.shared
def test_sst2_slice_at_ratio_compares_w8a8_with_each_baseline(sst2_with_baselines):
    r = sst2_with_baselines
    acc = {x["model"]: x["metrics"]["accuracy"] for x in r["records"]}
    by_base = {a["baseline"]: a for a in r["at_ratio"]}
    assert set(by_base) == {"ort dynamic int8", "ort static qdq int8", "ort matmulnbits 4bit"}
    for base, a in by_base.items():
        # w8a8 (3.97x) is at least as compressed as every baseline (<= 3.96x)
        assert a["bct"] == "bct w8a8" and a["metric"] == "accuracy"
        assert a["diff"] == pytest.approx(acc["bct w8a8"] - acc[base])
        assert a["met"] == (a["diff_ci95"][1] >= 0)  # not significantly worse
        lo, hi = a["diff_ci95"]
        assert lo <= a["diff"] <= hi


@pytest.mark.shared
def test_stsb_slice_regression_metrics():
    model = require_shared("models/minilm-stsb")
    glue = require_shared("data/glue")
    r = _eval_json(
        "--model-dir", model, "--task", "stsb", "--glue-dir", glue, "--preset", "w8a8",
        "--limit", 16, "--threads", 2,
    )  # fmt: skip
    fp32, w8a8 = r["records"]
    assert r["metrics"] == ["spearman", "pearson"]
    # the fine-tuned model tracks the scores (85.9 Spearman on the full dev set)
    assert fp32["metrics"]["spearman"] > 60 and fp32["metrics"]["pearson"] > 60
    assert w8a8["status"] == "ok" and w8a8["ratio"] > 3
    assert abs(w8a8["vs_fp32"]["spearman"]) < 10
    assert 0 < w8a8["fidelity"] < 0.5  # mean |score difference|, scores 0..5

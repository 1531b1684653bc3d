"""Structured pruning (passes/prune_ffn.py, passes/prune_heads.py) and its least squares
(bctonnx/refit.py), calibration text (bctonnx/calibration.py) and their user-facing errors."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from bctonnx.passes.canonicalize import Canonicalize
from bctonnx.passes.encoder_layers import attention_blocks, ffn_blocks
from bctonnx.passes.prune_ffn import PruneFFN
from bctonnx.passes.prune_heads import PruneHeads
from bctonnx.passes.pruning import PruneContext, kept_count
from conftest import run_onnx, tiny_feeds

import bctonnx
from bctonnx.calibration import (
    Calibration,
    calibration_set,
    default_corpus,
    parse_texts,
    tokens_needed,
)
from bctonnx.cli import main
from bctonnx.errors import BctError
from bctonnx.modelio import load_model
from bctonnx.refit import Gram, error, obs_prune, refit, ridge_solve

INPUTS = ["input_ids", "attention_mask", "token_type_ids"]


@pytest.fixture(scope="module")
def calib(tiny_bert_dir) -> Calibration:
    """6,000 tokens of the package's corpus, tokenized for the tiny BERT."""
    return calibration_set(tiny_bert_dir, INPUTS, max_tokens=6000)


def canonical(model_dir) -> ir.Model:
    model, _ = load_model(model_dir)
    Canonicalize()(model)
    return model


def outputs(model: ir.Model, feeds: dict) -> np.ndarray:
    return run_onnx(ir.serde.serialize_model(model), feeds)["last_hidden_state"]


# --- least squares -----------------------------------------------------------------------------


def _gram(x: np.ndarray, y: np.ndarray) -> Gram:
    gram = Gram(x.shape[1], y.shape[1])
    for i, start in enumerate(range(0, len(x), 20)):
        gram.add(x[start : start + 20], y[start : start + 20], held_out=i % 5 == 4)
    return gram


def test_refit_of_every_input_is_the_least_squares_solution():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2000, 12))
    w, b = rng.standard_normal((12, 3)), rng.standard_normal(3)
    gram = _gram(x, x @ w + b)
    w2, b2, _ = refit(gram, np.arange(12))
    np.testing.assert_allclose(w2, w, atol=1e-3)
    np.testing.assert_allclose(b2, b, atol=1e-3)


def test_obs_removes_what_the_others_can_make_up_for_and_refit_beats_dropping():
    rng = np.random.default_rng(1)
    base = rng.standard_normal((3000, 8))
    # inputs 8..11 copy inputs 0..3 (plus a little noise): removing them costs ~nothing once
    # the copies' weights move to the originals; inputs 12, 13 carry little weight
    x = np.concatenate([base, base[:, :4] + 0.01 * rng.standard_normal((3000, 4)),
                        rng.standard_normal((3000, 2))], 1)  # fmt: skip
    w = rng.standard_normal((14, 4))
    w[12:] *= 0.01
    y = x @ w + 0.5
    gram = _gram(x, y)
    removed = obs_prune(gram, [[j] for j in range(14)], 6)
    assert sorted(removed) in ([0, 1, 2, 3, 12, 13], [8, 9, 10, 11, 12, 13]) or set(removed) >= {
        12,
        13,
    }
    kept = np.setdiff1d(np.arange(14), removed)
    wk, bk, _ = refit(gram, kept)
    g, c, yy = gram.total()
    refit_err = error(np.concatenate([wk, bk[None]]), g, c, yy, kept)
    dropped = np.concatenate([w[kept], np.full((1, 4), 0.5)])
    assert refit_err < 0.01 * error(dropped, g, c, yy, kept)


def test_ridge_is_chosen_on_held_out_tokens():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((400, 60))  # few tokens per input: the fit overfits without ridge
    y = x[:, :1] + rng.standard_normal((400, 1))
    gram = _gram(x, y)
    _, _, alpha = refit(gram, np.arange(60))
    assert alpha > 1e-4
    no_ridge = ridge_solve(gram.g[0], gram.c[0], np.arange(60), 0.0)
    chosen = ridge_solve(gram.g[0], gram.c[0], np.arange(60), alpha)
    held = (gram.g[1], gram.c[1], gram.yy[1], np.arange(60))
    assert error(chosen, *held) < error(no_ridge, *held)


# --- calibration text -------------------------------------------------------------------------


def test_default_corpus_has_tens_of_thousands_of_tokens_pairs_and_a_licence():
    from importlib import resources

    texts = default_corpus()
    assert len(texts) == 4000
    assert sum(isinstance(t, tuple) for t in texts) > 500  # pairs (token type 1 seen too)
    notice = resources.files("bctonnx.data").joinpath("CALIBRATION.md").read_text()
    assert "WordNet 3.0 Copyright 2006 by Princeton University" in notice
    assert parse_texts(["a b\tc d", "", "e"]) == [("a b", "c d"), "e"]


def test_calibration_batches_pairs_and_counts_real_tokens(calib):
    assert 6000 <= calib.tokens < 6200
    pairs = [b for b in calib.batches if b["token_type_ids"].any()]
    assert pairs and len(pairs) < len(calib.batches)
    assert calib.tokens == sum(int(b["attention_mask"].sum()) for b in calib.batches)


def test_too_few_tokens_is_one_line_saying_how_many(tiny_bert_dir, tmp_path, capsys):
    texts = tmp_path / "few.txt"
    texts.write_text("the people of the water\nhe was for one day\n")
    out = tmp_path / "out"
    code = main(["compress", str(tiny_bert_dir), "-o", str(out), "--block-size", "16",
                 "--prune-ffn", "0.5", "--calib-texts", str(texts)])  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert code == 2 and not out.exists()
    assert len(err.splitlines()) == 1
    assert f"needs at least {tokens_needed(128)}" in err and "has 14 tokens" in err


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--prune-ffn", "1.5"], "prune_ffn must be in [0, 1)"),
        (["--prune-heads", "-0.1"], "prune_heads must be in [0, 1)"),
        (["--sparsity", "3:4"], "sparsity 3:4 is not supported"),
        (["--sparsity", "two"], "sparsity must be N:M"),
        (["--target-ratio", "0.5"], "target ratio must be > 1"),
        (["--prune-ffn", "0.5", "--calib-texts", "/nonexistent/t.txt"], "no such file"),
    ],
)
def test_bad_structure_flags_are_one_line_errors(tiny_bert_dir, tmp_path, capsys, flags, message):
    out = tmp_path / "out"
    code = main(["compress", str(tiny_bert_dir), "-o", str(out), "--block-size", "16", *flags])
    err = capsys.readouterr().err.strip()
    assert code == 2 and not out.exists()
    assert err.startswith("bctonnx: error:") and message in err and len(err.splitlines()) == 1


def test_pruning_a_bare_onnx_file_without_tokenizer_says_what_to_pass(tiny_bert_onnx, tmp_path):
    bare = tmp_path / "model.onnx"
    bare.write_bytes(tiny_bert_onnx.read_bytes())
    with pytest.raises(BctError, match="needs the model's tokenizer"):
        bctonnx.compress_model(bare, "w8a8", block_size=16, prune_ffn=0.5)


# --- the passes -----------------------------------------------------------------------------


def test_pruning_nothing_is_exact(tiny_bert_dir, calib):
    model = canonical(tiny_bert_dir)
    before = outputs(model, tiny_feeds())
    ctx = PruneContext(calib)
    # fractions that remove nothing (0, or less than half a quantum of 16 out of 128)
    assert kept_count(128, 0.05, 16) == 128
    assert not PruneFFN(0.05, ctx, weight_block=16, act_block=16)(model).modified
    assert not PruneHeads(0.0, ctx, weight_block=16, act_block=16)(model).modified
    np.testing.assert_array_equal(outputs(model, tiny_feeds()), before)
    assert ctx.records == [] and ctx.reference is None  # nothing read, nothing refit


def test_prune_ffn_makes_smaller_matrices_and_its_refit_beats_dropping(tiny_bert_dir, calib):
    model = canonical(tiny_bert_dir)
    ref = outputs(model, tiny_feeds())
    ctx = PruneContext(calib)
    assert PruneFFN(0.5, ctx, weight_block=16, act_block=16)(model).modified
    for block in ffn_blocks(model.graph):
        assert block.up.weight.shape == (64, 64) and block.down.weight.shape == (64, 64)
        assert block.up.bias.shape == (64,)
        assert block.act.outputs[0].shape[-1] == 64
    assert [r["kept"] for r in ctx.records] == [64, 64]
    for r in ctx.records:  # the refit's error is below that of the pruned layer as it was
        assert r["rel_error_after"] < 0.5
    out = outputs(model, tiny_feeds())
    cos = (out * ref).sum(-1) / np.linalg.norm(out, axis=-1) / np.linalg.norm(ref, axis=-1)
    assert cos.mean() > 0.95


def test_refit_error_is_below_dropping_the_neurons(tiny_bert_dir, calib):
    """The pass's least squares against the same neurons removed without any refit."""
    model = canonical(tiny_bert_dir)
    block = ffn_blocks(model.graph)[0]
    from bctonnx.calibration import Runner, token_rows

    proto = ir.serde.serialize_model(model)
    runner = Runner(proto, [block.act.outputs[0].name, block.down.output.name])
    gram = Gram(128, 64)
    for i, batch in enumerate(calib.batches):
        out = runner.run(batch)
        gram.add(token_rows(out[block.act.outputs[0].name], batch),
                 token_rows(out[block.down.output.name], batch), held_out=i % 5 == 4)  # fmt: skip
    removed = obs_prune(gram, [[j] for j in range(128)], 64)
    kept = np.setdiff1d(np.arange(128), removed)
    w, b, _ = refit(gram, kept)
    g, c, yy = gram.total()
    after = error(np.concatenate([w, b[None]]), g, c, yy, kept)
    dropped = np.concatenate([block.down.weight[kept], block.down.bias[None]])
    assert after < 0.5 * error(dropped, g, c, yy, kept)


def test_prune_heads_removes_them_from_the_graph(tiny_bert_dir, calib):
    model = canonical(tiny_bert_dir)
    ctx = PruneContext(calib)
    assert PruneHeads(0.5, ctx, weight_block=16, act_block=16)(model).modified
    blocks = attention_blocks(model.graph)
    assert [b.heads for b in blocks] == [2, 2] and blocks[0].head_dim == 16
    for b in blocks:
        assert b.q.weight.shape == (64, 32) and b.o.weight.shape == (32, 64)
        for split in b.splits:
            assert ir.convenience.get_const_tensor(split.inputs[1]).numpy().tolist() == [
                0, -1, 2, 16,
            ]  # fmt: skip
    assert all(len(r["kept_heads"]) == 2 for r in ctx.records)
    out = outputs(model, tiny_feeds(batch=3, seq=9))
    assert out.shape == (3, 9, 64) and np.isfinite(out).all()


@pytest.mark.parametrize("mode", ["integer", "qdq"])
def test_pruned_model_compresses_and_runs_in_both_forms(tiny_bert_dir, tmp_path, mode):
    texts = tmp_path / "calib.txt"
    lines = bctonnx.__path__[0] + "/data/calibration.txt"
    texts.write_text("\n".join(open(lines, encoding="utf-8").read().splitlines()[:400]) + "\n")
    plain = bctonnx.compress_model(tiny_bert_dir, "w8a8", block_size=16, mode=mode)
    pruned = bctonnx.compress_model(
        tiny_bert_dir, "w8a8", block_size=16, mode=mode, prune_ffn=0.5, prune_heads=0.5,
        calib_texts=str(texts),
    )  # fmt: skip
    assert pruned.report.output_bytes < 0.8 * plain.report.output_bytes
    assert {r["kind"] for r in pruned.report.pruning} == {"ffn", "heads"}
    a = run_onnx(plain.model, tiny_feeds())["last_hidden_state"]
    b = run_onnx(pruned.model, tiny_feeds())["last_hidden_state"]
    cos = (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)
    assert cos.mean() > 0.9
    shapes = {t.name: list(t.dims) for t in pruned.model.graph.initializer if len(t.dims) == 2}
    assert not any(64 * 2 in s for s in shapes.values())  # no 128-wide FFN matrix left
    onnx.checker.check_model(pruned.model)


# --- the ratio search, inspect, CLI -------------------------------------------------------------


@pytest.fixture(scope="module")
def small_texts(tmp_path_factory):
    """The first 600 lines of the package's corpus (~11k tokens): enough for the tiny BERT."""
    from importlib import resources

    lines = resources.files("bctonnx.data").joinpath("calibration.txt").read_text().splitlines()
    path = tmp_path_factory.mktemp("calib") / "calib.txt"
    path.write_text("\n".join(lines[:600]) + "\n")
    return str(path)


def test_target_ratio_search_reaches_the_ratio_and_says_what_it_chose(
    tiny_bert_dir, tmp_path, small_texts, capsys
):
    plain = bctonnx.compress_model(tiny_bert_dir, "w8a8", block_size=16)
    target = round(plain.report.ratio * 1.12, 2)
    out = tmp_path / "searched"
    code = main(["compress", str(tiny_bert_dir), "-o", str(out), "--block-size", "16",
                 "--target-ratio", str(target), "--calib-texts", small_texts])  # fmt: skip
    text = capsys.readouterr().out
    assert code == 0
    assert f"target ratio {target:g} reached" in text
    ratio = float(text.split("compression ratio ")[1].split("x")[0])
    assert ratio >= target
    assert "chosen configuration (per layer):" in text
    # every linear layer has a line, every block a pruning choice
    assert text.count("/encoder/layer.") >= 12 + 4
    a = run_onnx(out / "model.onnx", tiny_feeds())["last_hidden_state"]
    b = run_onnx(plain.model, tiny_feeds())["last_hidden_state"]
    cos = (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)
    assert cos.mean() > 0.95


def test_inspect_runs_the_pruning_and_shows_it(tiny_bert_dir, small_texts, capsys):
    code = main(["inspect", str(tiny_bert_dir), "--block-size", "16", "--prune-ffn", "0.5",
                 "--sparsity", "2:4", "--calib-texts", small_texts])  # fmt: skip
    text = capsys.readouterr().out
    assert code == 0
    assert "FFN neurons 128 -> 64" in text and "2:4 /encoder/layer.0/output/dense/MatMul" in text
    # the pruned FFN matrices are listed at their new shapes, in the 2:4 format
    rows = [line.split() for line in text.splitlines() if ".nm " in line]
    assert len(rows) == 12 and all(r[1] == "[64," for r in rows[:1])
    assert all("2:4" in r for r in rows)
    ffn = [r for r in rows if r[1:3] in (["[64,", "64]"],)]
    assert len(ffn) >= 4  # FFN matrices 64 wide: W1 [64, 64] and W2 [64, 64] of both layers


def test_eval_config_file_takes_the_new_keywords(tmp_path):
    from bctonnx.evaluate import load_config_file

    path = tmp_path / "c.json"
    path.write_text('{"name": "p", "preset": "w8a8", "prune_ffn": 0.5, "sparsity": "2:4"}')
    [(name, config)] = load_config_file(path)
    assert config.prune_ffn == 0.5 and config.weights.nm == (2, 4)
    path.write_text('{"prune_ffn": "half"}')
    with pytest.raises(BctError, match="prune_ffn must be float"):
        load_config_file(path)

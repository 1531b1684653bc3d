"""Token downsampling (passes/token_drop.py): the schedule parser, the pass on the tiny BERT
(keep=1.0 is exact, which tokens are kept, a classifier's output, bad input), a sequence alone
vs in a padded batch (bit-identical in float and in both compressed forms, also on the real
MiniLM), every preset and mode (integer: every layer still one BlockAttention), and the command
line."""

from __future__ import annotations

import json
import math

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from bctonnx.passes import Canonicalize, PassError
from bctonnx.passes.token_drop import (
    TokenDrop,
    encoder_flops,
    encoder_shape,
    needs_full_length,
    tokens_per_layer,
)
from conftest import HIDDEN, NUM_LAYERS, canonicalized, run_onnx, tiny_feeds
from test_cli import assert_one_line_error, run_cli
from test_integer import require_library

import bctonnx
from bctonnx.config import PRESETS, TokenStage, parse_token_keep, resolve_config
from bctonnx.errors import BctError
from bctonnx.modelio import load_model

CLS, SEP = 2, 3  # the tiny BERT's vocabulary (conftest._SPECIAL)


# --- the schedule ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "default_layer", "stages"),
    [
        ("0.5", None, [(0.5, 3)]),
        (0.5, None, [(0.5, 3)]),
        ("0.5", 2, [(0.5, 2)]),
        ("0.7@2,0.5@4", None, [(0.7, 2), (0.5, 4)]),
        (" 0.7@2 , 0.5@4 ", None, [(0.7, 2), (0.5, 4)]),
        ("1@1", None, [(1.0, 1)]),
        (None, None, []),
        ("", None, []),
    ],
)
def test_parse_token_keep(spec, default_layer, stages):
    assert parse_token_keep(spec, default_layer) == tuple(TokenStage(k, n) for k, n in stages)


@pytest.mark.parametrize(
    ("spec", "default_layer", "fragment"),
    [
        ("abc", None, "expected K or K@L"),
        ("0.5@x", None, "expected K or K@L"),
        ("1.5", None, "not in (0, 1]"),
        ("0", None, "not in (0, 1]"),
        ("-0.5", None, "not in (0, 1]"),
        ("nan", None, "not in (0, 1]"),
        ("0.3333", None, "at most 3 decimals"),
        ("0.5@0", None, "after layer 1 on"),
        ("0.5,0.3", None, "each needs @L"),
        ("0.5@4,0.7@5", None, "keep no more"),
        ("0.5@3,0.4@3", None, "go deeper"),
        ("0.5@2", 3, "--token-keep-from"),
    ],
)
def test_parse_token_keep_refuses(spec, default_layer, fragment):
    with pytest.raises(ValueError, match="token keep") as info:
        parse_token_keep(spec, default_layer)
    assert fragment in str(info.value)


def test_token_settings_in_resolve_config():
    config = resolve_config("w8a8", token_keep="0.7@2,0.5@4", token_score="cls")
    assert config.token_keep == (TokenStage(0.7, 2), TokenStage(0.5, 4))
    assert "tokens kept 0.7@2,0.5@4 merged by cls" in config.describe()
    assert resolve_config(config, mode="qdq").token_keep == config.token_keep  # kept through
    assert resolve_config("w8a8", token_keep="0.5", token_keep_from=2).token_keep == (
        TokenStage(0.5, 2),
    )
    assert "dropped" in resolve_config("w8a8", token_keep="0.5", token_merge=False).describe()
    assert not resolve_config("w8a8").token_keep
    for flag, kw in [
        ("--token-score", {"token_score": "cls"}),
        ("--token-keep-from", {"token_keep_from": 2}),
        ("--token-merge", {"token_merge": False}),
        ("--token-output", {"token_output": "frozen"}),
    ]:
        with pytest.raises(ValueError, match=f"{flag} needs --token-keep"):
            resolve_config("w8a8", **kw)
    with pytest.raises(ValueError, match="token score"):
        resolve_config("w8a8", token_keep="0.5", token_score="loudest")


# --- the pass on the tiny BERT -----------------------------------------------------------------


def dropped_model(path, stages, **kw) -> onnx.ModelProto:
    """The float model (canonicalized) with token dropping inserted: FP32 everywhere else."""
    model, _ = load_model(path)
    Canonicalize()(model)
    TokenDrop([TokenStage(k, n) for k, n in stages], **kw)(model)
    return ir.serde.serialize_model(model)


def with_outputs(proto: onnx.ModelProto, *names: str) -> onnx.ModelProto:
    """The model with inner tensors as extra graph outputs (their types inferred by ORT)."""
    proto = onnx.ModelProto.FromString(proto.SerializeToString())
    for name in names:
        proto.graph.output.append(onnx.ValueInfoProto(name=name))
    return proto


def run(proto: onnx.ModelProto, feeds: dict, optimize: bool = True) -> dict[str, np.ndarray]:
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.intra_op_num_threads = 1
    if not optimize:
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(proto.SerializeToString(), so)
    names = [i.name for i in sess.get_inputs()]
    out = sess.run(None, {n: feeds[n] for n in names})
    return {o.name: v for o, v in zip(sess.get_outputs(), out, strict=True)}


@pytest.mark.parametrize(
    "kw", [{}, {"merge": False, "output": "frozen"}, {"score": "attention"}, {"score": "cls"}]
)
def test_keep_one_is_exact(tiny_bert_onnx, kw):
    """keep 1.0 keeps every real token in order and merges nothing: on the real tokens,
    bit-identical to the model without the pass where onnxruntime runs the graph as written
    (its optimizer fuses one LayerNorm fewer here, a float-rounding difference only); padding
    positions hold no meaning in either."""
    feeds = tiny_feeds(batch=3, seq=9)
    real = feeds["attention_mask"].astype(bool)
    base = canonicalized(tiny_bert_onnx)
    proto = dropped_model(tiny_bert_onnx, [(1.0, 1)], **kw)
    exact = run(proto, feeds, optimize=False)["last_hidden_state"]
    assert np.array_equal(exact[real], run(base, feeds, optimize=False)["last_hidden_state"][real])
    close = run(proto, feeds)["last_hidden_state"]
    np.testing.assert_allclose(close[real], run(base, feeds)["last_hidden_state"][real], atol=1e-5)


def test_kept_tokens_count_order_specials_and_padding(tiny_bert_onnx):
    feeds = tiny_feeds(batch=4, seq=12)
    feeds["input_ids"][0, 4] = SEP  # a special id mid-sentence is kept too
    proto = dropped_model(
        tiny_bert_onnx, [(0.2, 1)], score="attention", merge=False, special_ids=[CLS, SEP]
    )
    out = run(with_outputs(proto, "token_drop/keep@1", "token_drop/kept@1"), feeds)
    keep, kept = out["token_drop/keep@1"], out["token_drop/kept@1"]
    mask, types = feeds["attention_mask"].astype(bool), feeds["token_type_ids"]
    assert keep.dtype == bool and keep.shape == mask.shape
    assert kept.shape[1] == keep.sum(1).max()
    for row in range(4):
        n = int(mask[row].sum())
        special = {0, n - 1} | {j for j in range(n - 1) if types[row, j] != types[row, j + 1]}
        if row == 0:
            special.add(4)
        assert not keep[row, n:].any(), "padding is never kept"
        assert all(keep[row, j] for j in special), "special tokens are always kept"
        assert keep[row].sum() == max(math.ceil(0.2 * n), len(special))
        count = int(keep[row].sum())
        assert list(kept[row, :count]) == list(np.flatnonzero(keep[row])), "original order"
        assert len(set(kept[row])) == kept.shape[1]


def test_selection_ranks_by_attention_received(tiny_bert_onnx):
    """With [CLS] as the only special token, the tokens kept are those the previous layer's
    attention (summed over heads and real query rows) points at most."""
    feeds = tiny_feeds(batch=1, seq=10)
    feeds["token_type_ids"][:] = 0  # no pair boundary: the specials are the first and last
    base, _ = load_model(tiny_bert_onnx)
    Canonicalize()(base)
    softmax = next(n for n in base.graph if n.op_type == "Softmax").outputs[0].name
    probs = run(with_outputs(ir.serde.serialize_model(base), softmax), feeds)[softmax]
    received = np.round(probs * 256).clip(0, 255).sum(axis=(1, 2))[0]
    proto = dropped_model(tiny_bert_onnx, [(0.5, 1)], score="attention", merge=False)
    keep = run(with_outputs(proto, "token_drop/keep@1"), feeds)["token_drop/keep@1"][0]
    inner = np.argsort(-received[1:9], kind="stable")[: math.ceil(0.5 * 10) - 2] + 1
    assert set(np.flatnonzero(keep)) == {0, 9, *inner}


def test_classifier_reading_cls_loses_dropped_tokens(tiny_bert_onnx):
    """An output made of position 0 only (a pooler's Gather) is not restored: the dropped
    tokens leave, and [CLS] (slot 0) is read as it is."""
    proto = onnx.load(tiny_bert_onnx)
    graph = proto.graph
    hidden = graph.output[0].name
    graph.initializer.append(onnx.numpy_helper.from_array(np.array(0, np.int64), "zero"))
    graph.node.append(onnx.helper.make_node("Gather", [hidden, "zero"], ["cls"], axis=1))
    del graph.output[:]
    graph.output.append(onnx.helper.make_tensor_value_info("cls", onnx.TensorProto.FLOAT, None))
    model = ir.serde.deserialize_model(proto)
    Canonicalize()(model)
    final = next(n for n in model.graph if n.op_type == "Gather" and n.outputs[0].name == "cls")
    assert not needs_full_length(model.graph, final.inputs[0])
    TokenDrop([TokenStage(0.5, 1)])(model)
    assert not [n for n in model.graph if n.op_type == "GatherND" and n.inputs[0] is final]
    feeds = tiny_feeds(batch=2, seq=9)
    out = run(ir.serde.serialize_model(model), feeds)["cls"]
    assert out.shape == (2, HIDDEN) and np.isfinite(out).all()


def test_full_length_output_restored(tiny_bert_onnx, fp32_reference):
    feeds = tiny_feeds(batch=2, seq=7)
    for output in ("copy", "frozen"):
        proto = dropped_model(tiny_bert_onnx, [(0.5, 1)], output=output)
        out = run(proto, feeds)["last_hidden_state"]
        assert out.shape == fp32_reference(7).shape
        assert [o.name for o in proto.graph.output] == ["last_hidden_state"]


def test_pass_refuses_what_it_cannot_do(tiny_bert_onnx):
    model, _ = load_model(tiny_bert_onnx)
    Canonicalize()(model)
    with pytest.raises(PassError, match=f"the model has {NUM_LAYERS} encoder layers"):
        TokenDrop([TokenStage(0.5, NUM_LAYERS)])(model)
    with pytest.raises(ValueError, match="token output"):
        TokenDrop([TokenStage(0.5, 1)], output="scatter")
    # not an encoder: a plain MatMul
    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 4])
    y = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)
    w = onnx.numpy_helper.from_array(np.ones((4, 4), np.float32), "w")
    graph = onnx.helper.make_graph([onnx.helper.make_node("MatMul", ["x", "w"], ["y"])], "g", [x], [y], [w])  # fmt: skip
    model = ir.serde.deserialize_model(
        onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 21)])
    )
    Canonicalize()(model)
    with pytest.raises(PassError, match="no encoder attention layer"):
        TokenDrop([TokenStage(0.5, 1)])(model)
    with pytest.raises(BctError, match="tokens can leave after layer 1..1"):
        bctonnx.compress(tiny_bert_onnx, block_size=16, token_keep="0.5@2")


def test_expected_flops(tiny_bert_onnx):
    model, _ = load_model(tiny_bert_onnx)
    Canonicalize()(model)
    shape = encoder_shape(model.graph)
    per_layer = 4 * HIDDEN * HIDDEN + 2 * HIDDEN * 128  # Q, K, V, O + the FFN (128)
    assert (shape.num_layers, shape.hidden, shape.linear_macs) == (NUM_LAYERS, HIDDEN, per_layer)
    assert tokens_per_layer(shape, [TokenStage(0.5, 1)], 9) == [9, 5]
    full = encoder_flops(shape, (), 9)
    assert full == 2 * NUM_LAYERS * (9 * per_layer + 2 * 81 * HIDDEN)
    dropped = encoder_flops(shape, [TokenStage(0.5, 1)], 9, merge=False)
    assert dropped == 2 * ((9 * per_layer + 2 * 81 * HIDDEN) + (5 * per_layer + 2 * 25 * HIDDEN))
    assert encoder_flops(shape, [TokenStage(0.5, 1)], 9) == dropped + 2 * 2 * 9 * 5 * HIDDEN


# --- alone vs in a padded batch ---------------------------------------------------------------


def alone_and_batched(proto, feeds, session=None):
    """Each row run alone (cut to its real length) and the padded batch: per row, the real
    tokens' hidden states of both."""
    sess = session or (lambda p, f: run_onnx(p, f)["last_hidden_state"])
    batch = sess(proto, feeds)
    pairs = []
    for row in range(len(feeds["input_ids"])):
        n = int(feeds["attention_mask"][row].sum())
        one = {k: v[row : row + 1, :n] for k, v in feeds.items()}
        pairs.append((sess(proto, one)[0], batch[row, :n]))
    return pairs


def test_float_model_alone_equals_padded_batch(tiny_bert_onnx):
    feeds = tiny_feeds(batch=4, seq=12)
    for kw in ({}, {"score": "attention"}, {"merge": False, "output": "frozen"}):
        proto = dropped_model(tiny_bert_onnx, [(0.5, 1)], **kw)
        for alone, batched in alone_and_batched(proto, feeds):
            assert np.array_equal(alone, batched), kw


@pytest.fixture(scope="module")
def minilm(tmp_path_factory):
    from bctonnx.demo import extract_minilm
    from bctonnx.export import export_model

    work = tmp_path_factory.mktemp("minilm")
    return export_model(extract_minilm(work), work / "onnx-fp32")


def minilm_feeds(minilm, n: int = 12, length: int = 128) -> dict:
    from bctonnx.validate import default_texts, load_tokenizer

    tokenizer = load_tokenizer(minilm)
    enc = tokenizer(
        default_texts()[:n], padding="max_length", max_length=length, return_tensors="np"
    )
    return {k: enc[k].astype(np.int64) for k in ("input_ids", "attention_mask", "token_type_ids")}


@pytest.mark.slow
def test_minilm_alone_equals_padded_batch(minilm):
    """all-MiniLM-L6-v2, the package's sentences padded to 128: each sentence's output with
    token dropping is bit-identical alone and in the batch, in float (two stages, both scores)
    and compressed (w8a8, both forms, ranking by redundancy and by attention): the fused
    BlockAttention (and the QDQ form) leave the masked keys out, and the attention received
    that ranks the tokens is BlockAttention's own integer sum."""
    feeds = minilm_feeds(minilm)
    special = bctonnx.api.special_token_ids(minilm)
    for kw in ({}, {"score": "attention"}):
        proto = dropped_model(
            minilm / "model.onnx", [(0.7, 2), (0.5, 4)], special_ids=special, **kw
        )
        for alone, batched in alone_and_batched(proto, feeds):
            assert np.array_equal(alone, batched), kw
    require_library()
    for mode in ("integer", "qdq"):
        for score in ("auto", "attention"):
            proto = with_outputs(
                bctonnx.compress(minilm, "w8a8", mode=mode, token_keep="0.5", token_score=score),
                "token_drop/keep@3",
            )
            batch = run_onnx(proto, feeds)
            for row in range(len(feeds["input_ids"])):
                n = int(feeds["attention_mask"][row].sum())
                one = run_onnx(proto, {k: v[row : row + 1, :n] for k, v in feeds.items()})
                for name in ("last_hidden_state", "token_drop/keep@3"):
                    assert np.array_equal(one[name][0], batch[name][row, :n]), (mode, score, row)


def test_minilm_gives_the_same_bits_run_after_run_on_two_threads(minilm):
    """Same input, same answer: the merge's scatter-adds run in token order on one thread
    (onnxruntime's ScatterND ran its updates on two, racing on shared slots: one run in ~5
    differed at 2 threads), in both forms."""
    require_library()
    feeds = minilm_feeds(minilm)
    for mode in ("integer", "qdq"):
        proto = bctonnx.compress(minilm, "w8a8", mode=mode, token_keep="0.5")
        assert not [n for n in proto.graph.node if n.op_type == "ScatterND"]
        sess = ort.InferenceSession(
            proto.SerializeToString(),
            bctonnx.session_options(threads=2),
            providers=["CPUExecutionProvider"],
        )
        first = sess.run(None, feeds)[0]
        for run in range(24 if mode == "integer" else 6):
            assert np.array_equal(sess.run(None, feeds)[0], first), (mode, run)


# --- compressed forms and the command line ----------------------------------------------------


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_every_preset_and_mode_takes_a_schedule(tiny_bert_onnx, preset):
    require_library()
    feeds = tiny_feeds(batch=3, seq=10)
    for mode in ("integer", "qdq"):
        plain = bctonnx.compress(tiny_bert_onnx, preset, mode=mode, block_size=16)
        for score in ("auto", "attention"):
            proto = bctonnx.compress(
                tiny_bert_onnx, preset, mode=mode, block_size=16, token_keep="0.5@1",
                token_score=score,
            )  # fmt: skip
            out = run_onnx(proto, feeds)["last_hidden_state"]
            ref = run_onnx(plain, feeds)["last_hidden_state"]
            assert out.shape == ref.shape and np.isfinite(out).all()
            ops = [n.op_type for n in proto.graph.node]
            assert {"TopK", "GatherND"} <= set(ops)
            if mode == "integer":
                # every layer stays one BlockAttention: the merged tokens' log weights are its
                # key_bias, and ranking by attention reads its received output (the ReduceSum
                # of MatMulInteger over the probabilities fused away)
                fused = [n for n in proto.graph.node if n.op_type == "BlockAttention"]
                assert len(fused) == NUM_LAYERS and "IntSoftmax" not in ops, preset
                assert len([n for n in fused if len(n.input) > 8 and n.input[8]]) == 1  # merge
                ranked = [n for n in fused if len(n.output) > 1 and n.output[1]]
                assert len(ranked) == (score == "attention"), preset


def test_cli_compress_and_inspect_with_token_keep(capsys, tiny_bert_dir, tmp_path):
    out = tmp_path / "tiny-keep"
    rc, stdout, err = run_cli(
        capsys, "compress", tiny_bert_dir, "-o", out, "--block-size", "16",
        "--token-keep", "0.5", "--token-keep-from", "1", "--mode", "qdq",
    )  # fmt: skip
    assert rc == 0, err
    assert "tokens kept 0.5@1 merged" in stdout
    feeds = tiny_feeds(batch=2, seq=8)
    assert run_onnx(out / "model.onnx", feeds)["last_hidden_state"].shape == (2, 8, HIDDEN)
    rc, stdout, _ = run_cli(
        capsys, "inspect", tiny_bert_dir, "--block-size", "16", "--token-keep", "0.5@1"
    )
    assert rc == 0
    assert "token schedule: after layer 1 keep 0.5" in stdout
    assert "128 tokens:" in stdout and "% fewer; tokens per layer 128, 64)" in stdout
    rc, stdout, _ = run_cli(capsys, "inspect", tiny_bert_dir, "--block-size", "16", "--json")
    data = json.loads(stdout)
    assert data["token_schedule"] == [] and data["work"][0]["flops"] > 0
    assert "token schedule: none" in run_cli(capsys, "inspect", tiny_bert_dir, "--block-size", "16")[1]  # fmt: skip


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--token-keep", "1.5"], "not in (0, 1]"),
        (["--token-keep", "0.5@2"], "tokens can leave after layer 1..1"),
        (["--token-keep", "0.5,0.3"], "each needs @L"),
        (["--token-score", "cls"], "--token-score needs --token-keep"),
    ],
)
def test_cli_refuses_bad_token_flags(capsys, tiny_bert_dir, tmp_path, args, fragment):
    out = tmp_path / "never"
    rc, _, err = run_cli(capsys, "compress", tiny_bert_dir, "-o", out, "--block-size", "16", *args)
    assert_one_line_error(rc, err, fragment)
    assert not out.exists()


def test_bench_several_lengths_and_schedules(capsys, tiny_bert_dir, tmp_path):
    require_library()
    out = tmp_path / "bench.json"
    rc, _, err = run_cli(
        capsys, "bench", tiny_bert_dir, "--runs", "2", "--warmup", "0", "--batch", "2",
        "--seq", "16,32", "--threads", "1", "--block-size", "16", "--presets", "w8a8",
        "--modes", "integer", "--token-keep", "0.5@1", "--no-rss", "--json", out,
    )  # fmt: skip
    assert rc == 0, err
    data = json.loads(out.read_text())
    assert data["shapes"] == ["2x16", "2x32"]
    rows = {r["model"]: r for r in data["records"]}
    assert "bct w8a8 integer" in rows and "bct w8a8 integer keep 0.5@1" in rows
    keep = rows["bct w8a8 integer keep 0.5@1"]
    assert keep["status"] == "ok" and set(keep["latency_ms"]) == {"2x16", "2x32"}
    assert "tokens kept 0.5@1" in keep["config"]
    rc, _, err = run_cli(capsys, "bench", tiny_bert_dir, "--seq", "16,x")
    assert_one_line_error(rc, err, "--seq")


def test_eval_configs_take_the_token_flags(tmp_path):
    from bctonnx.evaluate import eval_configs

    configs = eval_configs(["w8a8,w4a8"], tokens={"token_keep": "0.5", "token_score": None})
    assert [n for n, _ in configs] == ["w8a8 keep 0.5@3", "w4a8 keep 0.5@3"]
    assert all(c.token_keep == (TokenStage(0.5, 3),) for _, c in configs)
    assert [n for n, _ in eval_configs(["w8a8"], tokens={"token_keep": None})] == ["w8a8"]
    with pytest.raises(BctError, match="not in \\(0, 1\\]"):
        eval_configs(["w8a8"], tokens={"token_keep": "2"})
    f = tmp_path / "configs.json"
    f.write_text(json.dumps([{"name": "half", "token_keep": "0.7@2,0.5@4", "token_merge": False}]))
    ((name, config),) = eval_configs(config_file=f)
    assert name == "half" and config.token_keep == (TokenStage(0.7, 2), TokenStage(0.5, 4))
    assert not config.token_merge
    f.write_text(json.dumps({"token_keep": 0.5}))  # a number is a fraction from the default layer
    ((_, config),) = eval_configs(config_file=f)
    assert config.token_keep == (TokenStage(0.5, 3),)
    f.write_text(json.dumps({"token_keep": [0.5]}))
    with pytest.raises(BctError, match="token_keep must be str or float"):
        eval_configs(config_file=f)

"""Graphs from other exporters and optimizers: tiny random-weight models exported by optimum
(BERT, RoBERTa, DistilBERT), by torch.onnx (TorchScript and dynamo exporters), and rewritten by
onnxruntime's transformer optimizer (fused com.microsoft ops); each is compressed, run and
validated. Bad inputs: one line, exit 2, nothing written."""

from __future__ import annotations

import logging
import shutil
import subprocess
import sys
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import (
    HIDDEN,
    NUM_LAYERS,
    VOCAB_SIZE,
    _write_vocab,
    canonicalized,
    run_onnx,
    tiny_feeds,
)
from test_cli import assert_one_line_error, run_cli

import bctonnx
from bctonnx.errors import BctError
from bctonnx.validate import validate

TEXTS = [
    "the water was hot and the day was long",
    "people call my number but no one came",
    "he said that she would write more about it",
    "what a day",
]
INPUTS = ["input_ids", "attention_mask", "token_type_ids"]
CONFIG = dict(preset="w8a8", block_size=16)


def tiny_checkpoint(root: Path, kind: str) -> Path:
    """A random tiny checkpoint of ``kind`` (bert, roberta, distilbert) with a word-piece
    vocabulary; biases and norms perturbed so no two parameters are equal (see conftest)."""
    import torch
    import transformers as tf

    d = root / f"{kind}_checkpoint"
    d.mkdir()
    _write_vocab(d / "vocab.txt")
    tf.BertTokenizerFast(vocab_file=str(d / "vocab.txt")).save_pretrained(str(d))
    torch.manual_seed(0)
    common = dict(vocab_size=VOCAB_SIZE, max_position_embeddings=66)
    bert_like = dict(
        hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128
    )
    if kind == "bert":
        model = tf.BertModel(tf.BertConfig(**bert_like, **common))
    elif kind == "roberta":
        model = tf.RobertaModel(tf.RobertaConfig(pad_token_id=0, **bert_like, **common))
    else:
        model = tf.DistilBertModel(
            tf.DistilBertConfig(dim=HIDDEN, n_layers=2, n_heads=4, hidden_dim=128, **common)
        )
    model.eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias") or "norm" in name.lower():
                param.add_(0.05 * torch.randn_like(param))
    model.save_pretrained(str(d))
    return d


def optimum_export(checkpoint: Path, out: Path) -> Path:
    from bctonnx.export import export_model

    return export_model(checkpoint, out, task="feature-extraction")


def torch_export(checkpoint: Path, out: Path, dynamo: bool) -> Path:
    import torch
    import transformers as tf

    model = tf.BertModel.from_pretrained(str(checkpoint)).eval()
    feeds = tiny_feeds(seq=7)
    args = tuple(torch.from_numpy(feeds[k]) for k in INPUTS)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if dynamo:
            dim = {0: torch.export.Dim("batch"), 1: torch.export.Dim("sequence")}
            torch.onnx.export(
                model,
                args,
                str(out),
                input_names=INPUTS,
                output_names=["last_hidden_state", "pooler_output"],
                dynamo=True,
                dynamic_shapes=(dim, dim, dim),
                verbose=False,
            )
        else:
            axes = {k: {0: "batch", 1: "sequence"} for k in INPUTS}
            torch.onnx.export(
                model,
                args,
                str(out),
                input_names=INPUTS,
                output_names=["last_hidden_state", "pooler_output"],
                dynamic_axes={**axes, "last_hidden_state": {0: "batch", 1: "sequence"}},
                opset_version=17,
                dynamo=False,
            )
    return out


def fused_model(src: Path, out: Path, fast_gelu: bool = False, raw_mask: bool = False) -> Path:
    """onnxruntime.transformers.optimizer on an optimum BERT export: fused Attention,
    SkipLayerNormalization, BiasGelu (or FastGelu), EmbedLayerNormalization. Attention reads
    EmbedLayerNormalization's mask index (lengths), or with ``raw_mask`` the 0/1 mask."""
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    options = FusionOptions("bert")
    options.enable_gelu_approximation = fast_gelu
    if raw_mask:
        options.use_raw_attention_mask(True)
    optimized = optimize_model(
        str(src), model_type="bert", num_heads=4, hidden_size=HIDDEN, optimization_options=options
    )
    optimized.save_model_to_file(str(out))
    return out


def with_causal_attention(src: Path, out: Path) -> Path:
    """``src`` with its first fused Attention made causal (unidirectional), which bctonnx does
    not unfuse: a graph with one fused op left alone."""
    proto = onnx.load(str(src))
    (causal,) = [n for n in proto.graph.node if n.name == "Attention_0"]
    causal.attribute.append(onnx.helper.make_attribute("unidirectional", 1))
    onnx.save(proto, str(out))
    return out


@pytest.fixture(scope="module")
def exports(tmp_path_factory, tiny_bert_dir):
    """name -> (model path, tokenizer dir): one graph per exporter."""
    root = tmp_path_factory.mktemp("exporters")
    out: dict[str, tuple[Path, Path]] = {}
    for kind in ("bert", "roberta", "distilbert"):
        ckpt = tiny_checkpoint(root, kind)
        out[f"optimum-{kind}"] = (optimum_export(ckpt, root / f"{kind}_onnx") / "model.onnx", ckpt)
    bert = root / "bert_checkpoint"
    out["torchscript"] = (torch_export(bert, root / "torchscript.onnx", dynamo=False), bert)
    out["dynamo"] = (torch_export(bert, root / "dynamo.onnx", dynamo=True), bert)
    src = out["optimum-bert"][0]
    out["ort-fused"] = (fused_model(src, root / "fused.onnx"), bert)
    out["ort-fused-fastgelu"] = (fused_model(src, root / "fused_fast.onnx", fast_gelu=True), bert)
    out["ort-fused-rawmask"] = (fused_model(src, root / "fused_raw.onnx", raw_mask=True), bert)
    # DistilBERT through the BERT fusions: EmbedLayerNormalization with position ids and no
    # token types, and the exporter's word-embedding Gather kept beside it (for a Shape)
    distil = out["optimum-distilbert"]
    out["ort-fused-distilbert"] = (fused_model(distil[0], root / "fused_distil.onnx"), distil[1])
    return out


def test_the_exports_are_what_the_exporters_make(exports):
    ops = {
        name: Counter((n.domain, n.op_type) for n in onnx.load(str(p)).graph.node)
        for name, (p, _) in exports.items()
    }
    assert ops["ort-fused"][("com.microsoft", "Attention")] == 2
    assert ops["ort-fused"][("com.microsoft", "SkipLayerNormalization")] == 4
    assert ops["ort-fused"][("com.microsoft", "BiasGelu")] == 2
    assert ops["ort-fused"][("com.microsoft", "EmbedLayerNormalization")] == 1
    assert ops["ort-fused-fastgelu"][("com.microsoft", "FastGelu")] == 2
    # Attention's mask: EmbedLayerNormalization's lengths, or the raw mask cast to int32
    masks = {
        name: {n.input[3] for n in onnx.load(str(exports[name][0])).graph.node
               if n.op_type == "Attention"}
        for name in ("ort-fused", "ort-fused-rawmask")
    }  # fmt: skip
    assert masks["ort-fused"] == {"EmbedLayerNormalization_0_dummy_mask_index"}
    assert len(masks["ort-fused-rawmask"]) == 1
    assert "EmbedLayerNormalization" not in masks["ort-fused-rawmask"].pop()
    distil = onnx.load(str(exports["ort-fused-distilbert"][0])).graph
    (embed,) = [n for n in distil.node if n.op_type == "EmbedLayerNormalization"]
    assert embed.input[1] == "" and embed.input[8]  # no token types; position ids
    words = [n for n in distil.node if n.op_type == "Gather" and n.input[0] == embed.input[2]]
    assert len(words) == 1  # the exporter's lookup of the same table, still there
    # the dynamo exporter keeps its weights in external data by default
    assert (exports["dynamo"][0].parent / "dynamo.onnx.data").is_file()
    assert ops["torchscript"][("", "Erf")] == 2  # GELU decomposed


@pytest.mark.parametrize(
    "name",
    [
        "optimum-bert",
        "optimum-roberta",
        "optimum-distilbert",
        "torchscript",
        "dynamo",
        "ort-fused",
        "ort-fused-fastgelu",
        "ort-fused-rawmask",
        "ort-fused-distilbert",
    ],
)
def test_each_export_compresses_runs_and_validates(exports, tmp_path, name):
    model, tokenizer = exports[name]
    out = tmp_path / "c.onnx"
    report = bctonnx.compress_file(model, out, bctonnx.resolve_config(**CONFIG))
    assert report.ratio > 2.0
    v = validate(model, out, tokenizer_dir=tokenizer, texts=TEXTS, progress=False)
    assert v.num_inputs == len(TEXTS)
    assert all(o.cosine > 0.99 for o in v.outputs), [(o.name, o.cosine) for o in v.outputs]
    proto = onnx.load(str(out))
    ops = Counter((n.domain, n.op_type) for n in proto.graph.node)
    # the integer form: every linear layer one BlockMatMul, every LayerNorm an IntLayerNorm
    # (onnxruntime's fused Attention and EmbedLayerNormalization too, unfused first)
    assert ops[("bctonnx", "BlockMatMul")] >= 6 * NUM_LAYERS
    assert ops[("bctonnx", "IntLayerNorm")] == 2 * NUM_LAYERS + 1  # + the embeddings' one
    gelus = [n for n in proto.graph.node if n.op_type == "IntGelu"]
    assert len(gelus) == NUM_LAYERS  # FastGelu too: IntGelu(approximate="tanh")
    tanh = [a.s == b"tanh" for n in gelus for a in n.attribute if a.name == "approximate"]
    assert tanh == ([True] * NUM_LAYERS if name.endswith("fastgelu") else [])
    gelu_err = [o.max_err_lsb for o in v.int_ops if o.op_type == "IntGelu"]
    # vs its own float form (erf or tanh): half an output LSB plus the table rounding
    assert len(gelu_err) == NUM_LAYERS and max(gelu_err) <= 0.5005
    # attention in integer ops, on every exporter's graph: one fused BlockAttention per layer
    # (every exporter's mask is recognized as a key mask)
    assert ops[("bctonnx", "BlockAttention")] == NUM_LAYERS
    assert ops[("bctonnx", "BlockBatchMatMul")] == ops[("bctonnx", "AttentionPV")] == 0
    assert ops[("", "MatMul")] == 0 and not [d for d, _ in ops if d == "com.microsoft"]
    # every weight and table compressed: no float matrix bigger than a bias is left
    floats = [t for t in proto.graph.initializer if t.data_type == onnx.TensorProto.FLOAT]
    assert max(int(np.prod(t.dims)) for t in floats) < HIDDEN * HIDDEN


def test_a_fused_op_it_cannot_unfuse_is_left_alone_with_a_warning(exports, tmp_path, caplog):
    """A causal (unidirectional) Attention has no BERT-encoder form here: it stays fused, with
    its weights exactly as they were, and one warning names it; the rest is unfused and
    compressed."""
    path = with_causal_attention(exports["ort-fused"][0], tmp_path / "causal.onnx")
    original = onnx.load(str(path))
    with caplog.at_level(logging.WARNING, logger="bctonnx"):
        result = bctonnx.compress_model(path, **CONFIG)
    warning = [r.getMessage() for r in caplog.records if "left uncompressed" in r.getMessage()]
    assert len(warning) == 1
    assert "Attention 'Attention_0'" in warning[0] and "Attention_1" not in warning[0]
    ops = Counter((n.domain, n.op_type) for n in result.model.graph.node)
    assert ops[("com.microsoft", "Attention")] == 1
    assert sum(n for (domain, _), n in ops.items() if domain == "com.microsoft") == 1
    assert ops[("bctonnx", "BlockAttention")] == 1
    assert ops[("bctonnx", "IntLayerNorm")] == 5 and ops[("bctonnx", "IntGelu")] == 2
    # the fused op's weights are exactly the original ones
    before = {t.name: t.raw_data for t in original.graph.initializer}
    after = {t.name: t.raw_data for t in result.model.graph.initializer}
    for node in result.model.graph.node:
        if node.domain == "com.microsoft":
            for name in node.input:
                if name in before:
                    assert after[name] == before[name], name


@pytest.mark.parametrize(
    "name", ["ort-fused", "ort-fused-fastgelu", "ort-fused-rawmask", "ort-fused-distilbert"]
)
def test_unfusing_contrib_ops_is_exact(exports, name):
    """Canonicalize alone (no quantization): the unfused graph computes what the fused one does."""
    model, _ = exports[name]
    unfused = canonicalized(model)
    # Attention, EmbedLayerNormalization, SkipLayerNormalization, BiasGelu / FastGelu: none left
    assert not [n.op_type for n in unfused.graph.node if n.domain == "com.microsoft"]
    if name.endswith("fastgelu"):
        gelus = [n for n in unfused.graph.node if n.op_type == "Gelu"]
        assert all(a.s == b"tanh" for n in gelus for a in n.attribute if a.name == "approximate")
    for seq in (5, 9):
        feeds = tiny_feeds(seq=seq)
        np.testing.assert_allclose(
            run_onnx(unfused, feeds)["last_hidden_state"],
            run_onnx(model, feeds)["last_hidden_state"],
            rtol=1e-4,
            atol=2e-5,
        )


def test_integer_mode_on_other_exporters(exports, tmp_path):
    from test_deploy import integer_ops_available

    if not integer_ops_available():
        pytest.skip("the op library does not register the integer ops (yet)")
    for name in ("optimum-roberta", "optimum-distilbert", "dynamo", "ort-fused"):
        model, tokenizer = exports[name]
        out = tmp_path / f"{name}.onnx"
        bctonnx.compress_file(model, out, bctonnx.resolve_config(**CONFIG, mode="integer"))
        v = validate(model, out, tokenizer_dir=tokenizer, texts=TEXTS, progress=False)
        assert all(o.cosine > 0.98 for o in v.outputs), (name, v.outputs)


def test_initializers_listed_as_inputs_become_constants(exports, tmp_path, caplog):
    """torch.onnx.export(..., keep_initializers_as_inputs=True): every weight is also a graph
    input. They are compressed as constants (a warning says so), and the inputs go."""
    import torch
    import transformers as tf

    ckpt = exports["torchscript"][1]
    model = tf.BertModel.from_pretrained(str(ckpt)).eval()
    feeds = tiny_feeds(seq=7)
    path = tmp_path / "kin.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            tuple(torch.from_numpy(feeds[k]) for k in INPUTS),
            str(path),
            input_names=INPUTS,
            output_names=["last_hidden_state", "pooler_output"],
            dynamic_axes={k: {0: "b", 1: "s"} for k in INPUTS},
            opset_version=17,
            dynamo=False,
            keep_initializers_as_inputs=True,
        )
    assert len(onnx.load(str(path)).graph.input) > 20
    with caplog.at_level(logging.WARNING, logger="bctonnx"):
        result = bctonnx.compress_model(path, **CONFIG)
    assert any("also graph inputs" in r.getMessage() for r in caplog.records)
    assert [i.name for i in result.model.graph.input] == INPUTS
    assert result.report.ratio > 2.0
    ref = run_onnx(path, feeds)["last_hidden_state"]
    got = run_onnx(result.model, feeds)["last_hidden_state"]
    cos = (ref * got).sum(-1) / np.linalg.norm(ref, axis=-1) / np.linalg.norm(got, axis=-1)
    assert cos.min() > 0.99


# --- bad inputs: one line, exit 2, nothing written -------------------------------------------


def _weights_as_inputs(src: Path, dst: Path) -> Path:
    """Every 2-D weight is a graph input without a value (fed at run time)."""
    proto = onnx.load(str(src))
    matrices = {t.name for t in proto.graph.initializer if len(t.dims) == 2}
    for t in [t for t in proto.graph.initializer if t.name in matrices]:
        proto.graph.input.append(
            onnx.helper.make_tensor_value_info(t.name, onnx.TensorProto.FLOAT, list(t.dims))
        )
        proto.graph.initializer.remove(t)
    onnx.save(proto, str(dst))
    return dst


def _external_outside(src: Path, d: Path, location: str) -> Path:
    d.mkdir()
    proto = onnx.load(str(src))
    onnx.save(proto, str(d / "model.onnx"), save_as_external_data=True, location="w.bin")
    proto = onnx.load(str(d / "model.onnx"), load_external_data=False)
    for t in proto.graph.initializer:
        for e in t.external_data:
            if e.key == "location":
                e.value = location
    onnx.save(proto, str(d / "model.onnx"))
    return d / "model.onnx"


def _nothing_to_compress(d: Path) -> Path:
    h = onnx.helper
    graph = h.make_graph(
        [h.make_node("Add", ["x", "x"], ["y"], name="add")],
        "g",
        [h.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 3])],
        [h.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2, 3])],
    )
    path = d / "add.onnx"
    onnx.save(h.make_model(graph, opset_imports=[h.make_opsetid("", 17)]), str(path))
    return path


def bad_input(kind: str, tiny_bert_dir: Path, tmp_path: Path) -> tuple[Path, str]:
    """(model path, a fragment of the expected error line)."""
    onnx_file = tiny_bert_dir / "model.onnx"
    if kind == "unsupported-architecture":
        d = tmp_path / "gpt2"
        d.mkdir()
        shutil.copy(onnx_file, d / "model.onnx")
        (d / "config.json").write_text('{"model_type": "gpt2"}')
        return d, "unsupported architecture 'gpt2'"
    if kind == "weights-as-graph-inputs":
        return _weights_as_inputs(onnx_file, tmp_path / "dyn.onnx"), "from a graph input"
    if kind == "empty-file":
        (tmp_path / "empty.onnx").write_bytes(b"")
        return tmp_path / "empty.onnx", "empty"
    if kind == "directory-without-model":
        (tmp_path / "nomodel").mkdir()
        (tmp_path / "nomodel" / "config.json").write_text('{"model_type": "bert"}')
        return tmp_path / "nomodel", "no model.onnx"
    if kind == "external-data-outside-folder":
        secret = tmp_path / "secret.bin"
        secret.write_bytes(b"\0" * 1024)
        return _external_outside(onnx_file, tmp_path / "m", "../secret.bin"), "outside"
    if kind == "external-data-absolute":
        secret = tmp_path / "abs.bin"
        secret.write_bytes(b"\0" * 1024)
        return _external_outside(onnx_file, tmp_path / "m", str(secret)), "outside"
    if kind == "nothing-to-compress":
        return _nothing_to_compress(tmp_path), "nothing to compress"
    if kind == "float16-weights":
        from onnxruntime.transformers.float16 import convert_float_to_float16

        half = convert_float_to_float16(onnx.load(str(onnx_file)), keep_io_types=True)
        onnx.save(half, str(tmp_path / "fp16.onnx"))
        return tmp_path / "fp16.onnx", "float16 / bfloat16: compress its float32 export"
    raise AssertionError(kind)


BAD = [
    "unsupported-architecture",
    "weights-as-graph-inputs",
    "empty-file",
    "directory-without-model",
    "external-data-outside-folder",
    "external-data-absolute",
    "nothing-to-compress",
    "float16-weights",
]


@pytest.mark.parametrize("kind", BAD)
def test_bad_input_is_refused_in_one_line_with_nothing_written(
    capsys, tiny_bert_dir, tmp_path, kind
):
    model, fragment = bad_input(kind, tiny_bert_dir, tmp_path)
    out = tmp_path / "out"
    before = sorted(p.name for p in tmp_path.iterdir())
    for argv in (
        ["compress", model, "-o", out],
        ["inspect", model],
    ):
        rc, _, err = run_cli(capsys, *argv)
        assert_one_line_error(rc, err, fragment)
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no output, no temp file
    with pytest.raises(BctError, match=fragment.replace("'", ".")):
        bctonnx.compress_model(model, **CONFIG)


def test_bad_input_from_the_console_script_is_one_line(tiny_bert_dir, tmp_path):
    model, _ = bad_input("weights-as-graph-inputs", tiny_bert_dir, tmp_path)
    proc = subprocess.run(
        [sys.executable, "-m", "bctonnx.cli", "compress", str(model), "-o", str(tmp_path / "o")],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("bctonnx: error: ")
    assert not (tmp_path / "o").exists()


def test_failed_shape_inference_leaves_weights_as_constants(tiny_bert_onnx):
    """onnx_ir turns initializers into inputs around ONNX's C calls and does not undo it when
    serializing fails (a value typed Tensor(None) is enough): canonicalize puts them back."""
    import onnx_ir as ir
    from bctonnx.passes.canonicalize import infer_shapes

    from bctonnx.modelio import load_model

    model, _ = load_model(tiny_bert_onnx)
    node = next(n for n in model.graph if n.op_type == "Add")
    node.outputs[0].type = ir.TensorType(ir.DataType.UNDEFINED)
    node.outputs[0].dtype = None
    inputs = [v.name for v in model.graph.inputs]
    initializers = set(model.graph.initializers)
    infer_shapes(model)
    assert [v.name for v in model.graph.inputs] == inputs
    assert set(model.graph.initializers) == initializers
    assert all(v.const_value is not None for v in model.graph.initializers.values())


def test_validate_a_fused_graph_without_a_tokenizer(exports, tmp_path):
    """Random token ids stay inside the vocabulary that the fused EmbedLayerNormalization
    reads (not a default of 1000 rows): validate runs and reports."""
    from bctonnx.validate import validate, vocab_size

    model, _ = exports["ort-fused"]
    original = onnx.load(str(model))
    assert vocab_size(original) < 1000  # the tiny vocabulary, found through the fused op
    out = tmp_path / "fused.bct.onnx"
    bctonnx.compress_file(model, out, bctonnx.resolve_config(**CONFIG))
    report = validate(model, out, per_layer=False, progress=False)
    assert report.num_inputs > 0 and report.outputs[0].cosine > 0.9

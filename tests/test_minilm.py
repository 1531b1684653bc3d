"""The whole pipeline on the real all-MiniLM-L6-v2 (from the PyPI package), on onnxruntime."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from shared_assets import sst2_dev_sentences

import bctonnx
from bctonnx.modelio import model_file_bytes
from bctonnx.validate import validate

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def sentences():
    return sst2_dev_sentences(256)


def _compress_and_validate(minilm_dir, tmp_path, preset, sentences, mode="qdq"):
    out = tmp_path / f"{preset}-{mode}"
    report = bctonnx.compress_file(minilm_dir, out, bctonnx.resolve_config(preset, mode=mode))
    measured = model_file_bytes(minilm_dir) / model_file_bytes(out)
    assert report.ratio == pytest.approx(measured)
    v = validate(minilm_dir / "model.onnx", out / "model.onnx", texts=sentences, progress=False)
    return out, report, v


def test_export_gives_the_expected_bert_graph(minilm_dir):
    model = onnx.load(minilm_dir / "model.onnx", load_external_data=False)
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("MatMul") == 48
    assert ops.count("LayerNormalization") == 13
    assert ops.count("Softmax") == 6
    assert {i.name for i in model.graph.input} >= {"input_ids", "attention_mask"}
    for name in ("config.json", "tokenizer.json"):
        assert (minilm_dir / name).is_file()


def test_w8a8_reaches_ratio_and_embedding_cosine(minilm_dir, tmp_path, sentences):
    out, report, v = _compress_and_validate(minilm_dir, tmp_path, "w8a8", sentences)
    assert v.num_inputs == 256
    assert report.ratio >= 3.9
    assert v.embedding_cosine >= 0.995
    # every encoder layer is compared, and each stays close
    assert len([s for s in v.layers if s.label.startswith("layer")]) >= 11
    assert all(s.cosine > 0.99 for s in v.layers)
    # the directory is complete: config and tokenizer copied next to the model
    assert (out / "tokenizer.json").is_file() and (out / "config.json").is_file()


def test_w4a8_reaches_ratio_and_embedding_cosine(minilm_dir, tmp_path, sentences):
    _, report, v = _compress_and_validate(minilm_dir, tmp_path, "w4a8", sentences)
    assert report.ratio >= 7.5
    assert v.embedding_cosine >= 0.96


def test_compressed_model_runs_on_stock_onnxruntime_without_library(minilm_dir, tmp_path):
    import numpy as np
    import onnxruntime as ort

    proto = bctonnx.compress(minilm_dir / "model.onnx", preset="w4a8", mode="qdq")
    ops = {(n.domain, n.op_type) for n in proto.graph.node}
    assert all(domain in ("", "ai.onnx") for domain, _ in ops)
    assert ("", "DequantizeLinear") in ops and ("", "QuantizeLinear") in ops
    assert not any(op in ("Erf",) for _, op in ops)
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    feeds = {i.name: np.ones((2, 9), np.int64) for i in sess.get_inputs()}
    out = sess.run(None, feeds)[0]
    assert out.shape == (2, 9, 384) and np.isfinite(out).all()


FLOAT_NONLINEAR = {"Gelu", "Erf", "Tanh", "Softmax", "LayerNormalization"}


@pytest.mark.parametrize(
    ("preset", "min_ratio", "min_cosine"), [("w8a8", 3.9, 0.99), ("w4a8", 7.5, 0.96)]
)
def test_integer_form_has_no_float_nonlinearity_and_keeps_the_embeddings(
    minilm_dir, tmp_path, sentences, preset, min_ratio, min_cosine
):
    out, report, v = _compress_and_validate(minilm_dir, tmp_path, preset, sentences, "integer")
    graph = onnx.load(out / "model.onnx", load_external_data=False).graph
    assert not [n.name for n in graph.node if n.domain == "" and n.op_type in FLOAT_NONLINEAR]
    ops = {(n.domain, n.op_type) for n in graph.node}
    assert {("bctonnx", "IntGelu"), ("bctonnx", "IntSoftmax"), ("bctonnx", "IntLayerNorm")} <= ops
    assert report.ratio >= min_ratio
    assert v.embedding_cosine >= min_cosine
    # every integer op is compared with its float original, and none is far off
    assert {o.op_type for o in v.int_ops} == {"IntGelu", "IntSoftmax", "IntLayerNorm"}
    assert all(o.rel_err < 0.1 for o in v.int_ops)
    # IntGelu's bound (ref_nonlinear.int_gelu): half an output LSB plus the table's rounding,
    # in blocks of 128 too (w8a8: FFN2 reads them)
    assert all(o.max_err_lsb < 0.6 for o in v.int_ops if o.op_type == "IntGelu")
    # the per-layer table reads every LayerNorm's integer replacement (13: embeddings + 2 x 6;
    # the last one's output is the graph output, compared above)
    assert len(v.layers) == 12 and all(layer.cosine > 0.98 for layer in v.layers)


def test_onnxruntime_optimized_graph_is_unfused_exactly_and_compressed_like_the_export(
    minilm_dir, tmp_path, sentences
):
    """MiniLM through onnxruntime's transformer optimizer (fused Attention with the lengths
    mask of EmbedLayerNormalization, SkipLayerNormalization, BiasGelu): canonicalize unfuses
    all of it with the same math (real attention scores, so the mask and the scale matter),
    and w8a8 compresses it as it does the plain export."""
    from conftest import canonicalized, run_onnx
    from onnxruntime.transformers.optimizer import optimize_model

    from bctonnx.validate import load_tokenizer, make_feeds

    fused = tmp_path / "fused.onnx"
    optimize_model(
        str(minilm_dir / "model.onnx"), model_type="bert", num_heads=12, hidden_size=384
    ).save_model_to_file(str(fused))
    ops = [n.op_type for n in onnx.load(fused).graph.node if n.domain == "com.microsoft"]
    assert ops.count("Attention") == 6 and ops.count("EmbedLayerNormalization") == 1
    unfused = canonicalized(fused)
    assert not [n.op_type for n in unfused.graph.node if n.domain == "com.microsoft"]
    names = [i.name for i in unfused.graph.input]
    tokenizer = load_tokenizer(minilm_dir)
    for feeds in make_feeds(names, sentences[:32], tokenizer, 16, 128):  # padded batches
        assert feeds["attention_mask"].min() == 0
        got = run_onnx(unfused, feeds)["last_hidden_state"]
        want = run_onnx(fused, feeds)["last_hidden_state"]
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)

    out = tmp_path / "fused-w8a8.onnx"
    report = bctonnx.compress_file(fused, out, bctonnx.resolve_config("w8a8"))
    assert report.ratio >= 3.9
    graph = onnx.load(out, load_external_data=False).graph
    assert not [n.op_type for n in graph.node if n.domain == "com.microsoft"]
    v = validate(fused, out, tokenizer_dir=minilm_dir, texts=sentences, progress=False)
    assert v.embedding_cosine >= 0.995
    # the per-layer table reads the fused LayerNorms' integer replacements, as for the export
    labels = [layer.label for layer in v.layers]
    assert labels[0] == "embeddings" and labels[1:3] == ["layer 0 attention", "layer 0 output"]
    assert len(labels) == 12 and all(layer.cosine > 0.98 for layer in v.layers)

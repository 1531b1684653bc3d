"""bctonnx.textio (text in, answers out) and the import paths it and bctonnx.integrations
replaced."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from conftest import run_onnx

from bctonnx import textio
from bctonnx.errors import BctError
from bctonnx.textio import TextModel


def test_earlier_import_paths_give_the_same_objects():
    import bctonnx.integrations.triton as triton
    import bctonnx.package as package
    from bctonnx import evaluate, validate

    for name in ("default_texts", "read_texts", "load_tokenizer", "find_tokenizer_dir"):
        assert getattr(validate, name) is getattr(textio, name)
    for name in ("make_feeds", "vocab_size", "mean_pool"):
        assert getattr(validate, name) is getattr(textio, name)
    assert evaluate.encode is textio.encode and evaluate.Encoded is textio.Encoded
    assert package is triton
    from bctonnx.package import load_repository_model, parse_pbtxt, write_triton_repository

    assert load_repository_model is triton.load_repository_model
    assert parse_pbtxt is triton.parse_pbtxt
    assert write_triton_repository is triton.write_triton_repository


def test_text_model_classifies_with_the_config_s_labels(tiny_cls_dir):
    model = TextModel(tiny_cls_dir, batch_size=2)
    assert model.task == "text-classification" and model.labels == ["NEGATIVE", "POSITIVE"]
    texts = ["the water was hot", "what a day", "he said that she would write more"]
    got = model.predict(texts)
    feeds = textio.make_feeds(model.input_names, texts, model.tokenizer, 8, 128)[0]
    logits = run_onnx(tiny_cls_dir / "model.onnx", feeds)["logits"]
    assert got["label"] == [model.labels[i] for i in logits.argmax(-1)]
    np.testing.assert_allclose(got["score"], textio.softmax(logits).max(-1), atol=1e-6)
    # batches of 2 (the last one shorter) answer as one batch of 3 does
    np.testing.assert_allclose(TextModel(tiny_cls_dir).predict(texts)["score"], got["score"])


def test_text_model_embeds_mean_pooled_and_normalized(tiny_bert_dir):
    texts = ["the water was hot", "look at the sound of the water today"]
    unit = TextModel(tiny_bert_dir).predict(texts)["embedding"]
    raw = TextModel(tiny_bert_dir, normalize=False).predict(texts)["embedding"]
    feeds = textio.make_feeds(["input_ids", "attention_mask", "token_type_ids"], texts,
                              textio.load_tokenizer(tiny_bert_dir), 8, 128)[0]  # fmt: skip
    hidden = run_onnx(tiny_bert_dir / "model.onnx", feeds)["last_hidden_state"]
    pooled = textio.mean_pool(hidden, feeds["attention_mask"])
    np.testing.assert_allclose(raw, pooled, atol=1e-5)
    np.testing.assert_allclose(
        unit, pooled / np.linalg.norm(pooled, axis=-1, keepdims=True), atol=1e-5
    )
    assert unit.dtype == np.float32 and unit.shape == (2, 64)


def test_text_model_refusals(tiny_bert_dir, tmp_path):
    with pytest.raises(BctError, match="no texts"):
        TextModel(tiny_bert_dir).predict([])
    bare = tmp_path / "no-tokenizer"
    bare.mkdir()
    shutil.copy2(tiny_bert_dir / "model.onnx", bare / "model.onnx")
    with pytest.raises(BctError, match="cannot load a tokenizer"):
        TextModel(bare)

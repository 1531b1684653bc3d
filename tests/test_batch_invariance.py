"""Same input, same answer: a sequence's outputs are bit-identical whether it runs alone or in a
padded batch, for every preset in both forms, at 1, 2 and 4 threads and on every
instruction-set path (issue 20). all-MiniLM-L6-v2 from the PyPI package, the package's first
32 sentences, last_hidden_state of each real token (so the mean-pooled embedding too)."""

from __future__ import annotations

import numpy as np
import pytest
from test_integer import require_library
from test_matmul import available_isas, session

import bctonnx
from bctonnx.textio import default_texts, load_tokenizer

pytestmark = pytest.mark.slow

FORMS = [
    ("w8a8", "integer"),
    ("w8a8-fast", "integer"),
    ("w4a8", "integer"),
    ("w8a8", "qdq"),
    ("w4a8", "qdq"),
]


@pytest.fixture(scope="module")
def compressed(minilm_dir, tmp_path_factory) -> dict[tuple[str, str], str]:
    out = tmp_path_factory.mktemp("invariance")
    paths = {}
    for preset, mode in FORMS:
        path = out / f"{preset}-{mode}.onnx"
        bctonnx.compress_file(
            minilm_dir / "model.onnx", path, bctonnx.resolve_config(preset, mode=mode)
        )
        paths[(preset, mode)] = str(path)
    return paths


@pytest.fixture(scope="module")
def tokenizer(minilm_dir):
    return load_tokenizer(minilm_dir)


def hidden_states(sess, tokenizer, texts, pad_to: int | None) -> list[np.ndarray]:
    """Each text's last_hidden_state rows of its real tokens: alone (pad_to None) or from one
    batch padded to pad_to tokens."""
    if pad_to is None:
        out = []
        for t in texts:
            enc = tokenizer([t], return_tensors="np")
            out.append(sess.run(None, {k: v.astype(np.int64) for k, v in enc.items()})[0][0])
        return out
    enc = tokenizer(texts, padding="max_length", max_length=pad_to, return_tensors="np")
    hidden = sess.run(None, {k: v.astype(np.int64) for k, v in enc.items()})[0]
    return [hidden[i, : int(n)] for i, n in enumerate(enc["attention_mask"].sum(1))]


def assert_identical(a: list[np.ndarray], b: list[np.ndarray], what: str) -> None:
    differ = [i for i, (x, y) in enumerate(zip(a, b, strict=True)) if not np.array_equal(x, y)]
    worst = max((float(np.abs(a[i] - b[i]).max()) for i in differ), default=0.0)
    assert not differ, f"{what}: {len(differ)} of {len(a)} differ (max |diff| {worst})"


@pytest.mark.parametrize("preset, mode", FORMS, ids=[f"{p}-{m}" for p, m in FORMS])
def test_32_sentences_alone_and_in_a_batch_padded_to_128(
    preset, mode, compressed, tokenizer, monkeypatch
):
    require_library()
    texts = default_texts()[:32]
    sess = session(compressed[(preset, mode)], monkeypatch)
    alone = hidden_states(sess, tokenizer, texts, None)
    batched = hidden_states(sess, tokenizer, texts, 128)
    assert_identical(alone, batched, f"{preset} {mode}")
    # so the mean-pooled sentence embeddings are identical too
    for a, b in zip(alone, batched, strict=True):
        assert np.array_equal(a.mean(0), b.mean(0))


@pytest.mark.parametrize("preset", ["w8a8", "w8a8-fast", "w4a8"])
def test_every_thread_count_and_instruction_set_gives_the_same_bits(
    preset, compressed, tokenizer, monkeypatch
):
    """8 sentences alone and padded to 48 tokens, at 1, 2 and 4 threads on the default path
    and at 2 threads on every instruction-set path the CPU has: all identical to each other."""
    require_library()
    texts = default_texts()[32:40]
    path = compressed[(preset, "integer")]
    reference = hidden_states(session(path, monkeypatch), tokenizer, texts, None)
    runs = [(threads, "") for threads in (1, 2, 4)] + [(2, isa) for isa in available_isas()]
    for threads, isa in runs:
        sess = session(path, monkeypatch, isa, threads)
        what = f"{preset} {threads} threads {isa or 'default'}"
        assert_identical(hidden_states(sess, tokenizer, texts, 48), reference, what + " batch")
        assert_identical(hidden_states(sess, tokenizer, texts, None), reference, what + " alone")


def test_the_qdq_form_at_1_and_4_threads(compressed, tokenizer, monkeypatch):
    texts = default_texts()[40:48]
    path = compressed[("w8a8", "qdq")]
    reference = hidden_states(session(path, monkeypatch), tokenizer, texts, None)
    for threads in (1, 4):
        sess = session(path, monkeypatch, threads=threads)
        assert_identical(hidden_states(sess, tokenizer, texts, 48), reference, f"{threads} threads")

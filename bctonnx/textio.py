"""textio: text in, answers out.

One place for what turns text into model inputs and model outputs into answers, shared by
`validate`, `eval`, `bench` (vocabulary size), the sensitivity search and the MLflow model (the
Olive pass takes and returns ONNX models: it reads no text):

- texts: the package's own sentences (`default_texts`), a text file (`read_texts`);
- the tokenizer of a model directory (`find_tokenizer_dir`, `load_tokenizer`);
- feeds: tokenized batches named as the model's inputs, or random token ids below the model's
  vocabulary when there is no tokenizer (`make_feeds`, `vocab_size`); sorted by length for less
  padding (`encode`);
- answers: mean-pooled sentence embeddings (`mean_pool`), softmax scores, and `TextModel`, an
  exported or compressed model directory that takes strings (or pairs of strings) and returns
  labels and scores (text classification) or sentence embeddings (feature extraction).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import onnx

from .errors import BctError

# --- texts -----------------------------------------------------------------------------------


def default_texts() -> list[str]:
    """English sentences shipped with the package (written for bctonnx, public domain)."""
    text = resources.files("bctonnx.data").joinpath("sentences.txt").read_text(encoding="utf-8")
    return [line.strip() for line in text.splitlines() if line.strip()]


def read_texts(path: str | os.PathLike) -> list[str]:
    p = Path(path)
    if not p.is_file():
        raise BctError(f"{p}: no such text file")
    texts = [line.strip() for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not texts:
        raise BctError(f"{p}: no texts in file (one text per line)")
    return texts


# --- tokenizer -------------------------------------------------------------------------------


def load_tokenizer(directory: str | os.PathLike):
    from transformers import AutoTokenizer

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        return AutoTokenizer.from_pretrained(str(directory))
    except Exception as exc:  # transformers raises many kinds for a bad folder
        raise BctError(f"{directory}: cannot load a tokenizer ({type(exc).__name__})") from None


def find_tokenizer_dir(*model_paths: str | os.PathLike) -> Path | None:
    for p in model_paths:
        d = Path(p)
        d = d if d.is_dir() else d.parent
        if (d / "tokenizer.json").is_file() or (d / "vocab.txt").is_file():
            return d
    return None


# --- feeds -----------------------------------------------------------------------------------


def make_feeds(
    input_names: list[str],
    texts: list[str] | None,
    tokenizer,
    batch_size: int,
    max_length: int,
    vocab_size: int = 1000,
    num_random: int = 32,
) -> list[dict[str, np.ndarray]]:
    """Batches of model inputs: tokenized texts, or random token ids without a tokenizer."""
    batches = []
    if tokenizer is not None and texts:
        for i in range(0, len(texts), batch_size):
            enc = tokenizer(
                texts[i : i + batch_size],
                padding=True,
                truncation=True,
                max_length=max_length,
                return_tensors="np",
            )
            batches.append({k: enc[k].astype(np.int64) for k in input_names if k in enc})
    else:
        rng = np.random.default_rng(0)
        for i in range(0, num_random, batch_size):
            b = min(batch_size, num_random - i)
            ids = rng.integers(5, vocab_size, size=(b, 32), dtype=np.int64)
            mask = np.ones_like(ids)
            mask[:, 24:] = 0  # some padding
            batches.append({"input_ids": ids, "attention_mask": mask, "token_type_ids": 0 * ids})
    for batch in batches:
        missing = [n for n in input_names if n not in batch]
        if missing == ["token_type_ids"]:
            batch["token_type_ids"] = np.zeros_like(batch["input_ids"])
        elif missing:
            raise BctError(f"cannot make inputs named {missing} (only text encoders are supported)")
        for k in list(batch):
            if k not in input_names:
                del batch[k]
    return batches


def vocab_size(proto: onnx.ModelProto, default: int = 1000) -> int:
    """Rows of the word-embedding table that ``input_ids`` index (a Gather, the integer form's
    BlockGather, or onnxruntime's fused EmbedLayerNormalization), else ``default``. Random token
    ids stay below it."""
    inits = {t.name: t for t in proto.graph.initializer}
    for node in proto.graph.node:
        table = None
        if node.op_type == "Gather" and "input_ids" in node.input[1:]:
            table = inits.get(node.input[0])
        elif node.op_type == "BlockGather" and node.input[2:3] == ["input_ids"]:  # integer form
            table = inits.get(node.input[0])  # [V, H] or packed [V, H / 2]
        elif node.op_type == "EmbedLayerNormalization":  # inputs: ids, segments, words, ...
            table = inits.get(node.input[2]) if len(node.input) > 2 else None
        if table is not None and table.dims:
            return int(table.dims[0])
    return default


@dataclass
class Encoded:
    """Tokenized batches, shortest first (less padding); ``order[i]`` is the dataset index of
    the i-th example in batch order."""

    batches: list[dict[str, np.ndarray]]
    order: np.ndarray


def encode(
    texts: list, tokenizer, input_names: list[str], batch_size: int, max_length: int
) -> Encoded:
    lengths = [
        len(ids) for ids in tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]
    ]
    order = np.argsort(np.asarray(lengths), kind="stable")
    batches = make_feeds(input_names, [texts[i] for i in order], tokenizer, batch_size, max_length)
    return Encoded(batches, order)


# --- answers ---------------------------------------------------------------------------------


def mean_pool(hidden: np.ndarray, mask: np.ndarray) -> np.ndarray:
    m = mask[..., None].astype(np.float64)
    return (hidden * m).sum(1) / np.maximum(m.sum(1), 1e-9)


def softmax(logits: np.ndarray) -> np.ndarray:
    z = np.asarray(logits, np.float64)
    z = np.exp(z - z.max(axis=-1, keepdims=True))
    return z / z.sum(axis=-1, keepdims=True)


CLASSIFICATION = "text-classification"
FEATURE_EXTRACTION = "feature-extraction"


class TextModel:
    """A model directory (exported, or compressed by bctonnx: ``model.onnx`` with its
    ``config.json`` and tokenizer) that takes texts and returns answers.

    The task follows from the graph's outputs: ``logits`` -> text classification (the label
    of the largest logit, named by ``config.json``'s ``id2label``, and its softmax score; a
    single logit is a regression score, returned as it is); a token-level output
    (``last_hidden_state``) -> feature extraction, one sentence embedding per text: the mean of
    the real tokens' vectors (attention mask), L2-normalized when ``normalize`` (as
    sentence-transformers' all-MiniLM-L6-v2 does). The session registers bctonnx's op library
    (integer-form models). Texts are strings, or (text, text_pair) tuples for pair tasks;
    they run in batches of ``batch_size``, each padded to its longest text.
    """

    def __init__(
        self,
        model_dir: str | os.PathLike,
        *,
        threads: int | None = None,
        batch_size: int = 32,
        max_length: int = 128,
        normalize: bool = True,
    ):
        from .modelio import resolve_model_path
        from .runtime import make_session

        self.model_path = resolve_model_path(model_dir)
        self.directory = self.model_path.parent
        self.session = make_session(self.model_path, threads)
        self.tokenizer = load_tokenizer(self.directory)
        self.config = read_model_config(self.directory)
        self.batch_size, self.max_length, self.normalize = batch_size, max_length, normalize
        self.input_names = [i.name for i in self.session.get_inputs()]
        outputs = {o.name: o for o in self.session.get_outputs()}
        if "logits" in outputs:
            self.task, self.output = CLASSIFICATION, "logits"
        else:
            token_level = [n for n, o in outputs.items() if len(o.shape) == 3]
            if not token_level:
                raise BctError(
                    f"{self.model_path}: no 'logits' and no token-level output "
                    f"(outputs: {', '.join(outputs)}); expected a text-classification or "
                    "feature-extraction export"
                )
            self.task, self.output = FEATURE_EXTRACTION, token_level[0]

    @property
    def labels(self) -> list[str] | None:
        """Class names by id (``config.json``'s id2label; LABEL_i where it has none); None
        for feature extraction and for a single-output (regression) head."""
        if self.task != CLASSIFICATION:
            return None
        n = self.num_outputs or 0
        if n <= 1:
            return None
        id2label = {int(k): str(v) for k, v in (self.config.get("id2label") or {}).items()}
        return [id2label.get(i, f"LABEL_{i}") for i in range(n)]

    @property
    def num_outputs(self) -> int | None:
        """Logits per text (classification; None when the graph leaves it dynamic)."""
        shape = next(o.shape for o in self.session.get_outputs() if o.name == self.output)
        return shape[-1] if isinstance(shape[-1], int) else None

    def raw(self, texts: list) -> np.ndarray:
        """The model's output for ``texts``, in their order: logits (n, classes) or pooled
        sentence embeddings (n, hidden), float32."""
        if not texts:
            raise BctError("no texts to run")
        chunks = []
        for feeds in make_feeds(
            self.input_names, list(texts), self.tokenizer, self.batch_size, self.max_length
        ):
            out = np.asarray(self.session.run([self.output], feeds)[0])
            if self.task == FEATURE_EXTRACTION:
                out = mean_pool(out, feeds["attention_mask"])
            chunks.append(out.astype(np.float32))
        return np.concatenate(chunks)

    def predict(self, texts: list) -> dict[str, object]:
        """Answers for ``texts``: ``{"label": [str], "score": float64 array}`` (classification;
        a regression head gives only ``score``) or ``{"embedding": float32 (n, hidden)}``."""
        out = self.raw(texts)
        if self.task == FEATURE_EXTRACTION:
            if self.normalize:
                norms = np.linalg.norm(out, axis=-1, keepdims=True)
                out = out / np.maximum(norms, 1e-12)
            return {"embedding": out.astype(np.float32)}
        if out.shape[-1] == 1:
            return {"score": out[:, 0].astype(np.float64)}
        labels = self.labels or [f"LABEL_{i}" for i in range(out.shape[-1])]
        probs = softmax(out)
        best = probs.argmax(-1)
        return {"label": [labels[i] for i in best], "score": probs.max(-1)}


def read_model_config(directory: str | os.PathLike) -> dict:
    """A model directory's ``config.json`` (labels, architecture); {} when it has none."""
    path = Path(directory) / "config.json"
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise BctError(f"{path}: not valid JSON") from None

"""Calibration text: the unlabeled sentences that structured pruning and N:M sparsity refit on.

Quantization in bctonnx needs no data; pruning is the one step that reads text. The texts are
the user's (``--calib-texts FILE``: one text per line, a tab separating the two sentences of a
pair, which then get token types 0 and 1 as in pair tasks) or the package's own corpus,
``bctonnx/data/calibration.txt`` (WordNet 3.0's example sentences; source, licence and how it
was made: ``bctonnx/data/CALIBRATION.md``).

`Calibration` holds the tokenized batches (singles and pairs in separate batches, each sorted
by length so little is padding) and counts the real tokens: the refits are least-squares
problems with one unknown per input feature, so a layer of K inputs needs several times K
tokens (`tokens_needed`); fewer is a one-line error saying how many. `collect` runs a model on
the batches with extra graph outputs and hands each batch's activations, one row per real
token (padding dropped), to a callback that accumulates what it needs (Gram matrices).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import numpy as np
import onnx

from .errors import BctError

Text = str | tuple[str, str]

CORPUS_FILE = "calibration.txt"
MAX_LENGTH = 128
BATCH_SIZE = 32
# tokens per unknown of a refit: a layer with K inputs (plus a bias) needs TOKENS_PER_INPUT *
# (K + 1) tokens. The float probes (FACTS.md) overfit badly with ~0.6 tokens per unknown
# (900 tokens for 1536 inputs) and were fine with 17-28.
TOKENS_PER_INPUT = 8
# every HELD_OUT-th batch is held out: the ridge term of a refit is chosen on it
HELD_OUT = 5


def parse_texts(lines: Sequence[str]) -> list[Text]:
    """Texts from lines: a tab separates a pair; blank lines are skipped."""
    texts: list[Text] = []
    for line in lines:
        line = line.strip("\r\n")
        if not line.strip():
            continue
        if "\t" in line:
            a, b = line.split("\t", 1)
            texts.append((a.strip(), b.strip().replace("\t", " ")))
        else:
            texts.append(line.strip())
    return texts


def default_corpus() -> list[Text]:
    """The package's calibration corpus (bctonnx/data/calibration.txt)."""
    text = resources.files("bctonnx.data").joinpath(CORPUS_FILE).read_text(encoding="utf-8")
    return parse_texts(text.splitlines())


def read_calibration_texts(path: str | os.PathLike) -> list[Text]:
    p = Path(path)
    if not p.is_file():
        raise BctError(f"--calib-texts {p}: no such file")
    try:
        texts = parse_texts(p.read_text(encoding="utf-8").splitlines())
    except UnicodeDecodeError:
        raise BctError(f"--calib-texts {p}: not UTF-8 text") from None
    if not texts:
        raise BctError(f"--calib-texts {p}: no texts (one text per line, a tab between a pair)")
    return texts


def tokens_needed(inputs: int) -> int:
    """Calibration tokens a refit of a layer with ``inputs`` input features needs."""
    return TOKENS_PER_INPUT * (inputs + 1)


@dataclass
class Calibration:
    """Tokenized calibration batches and their real-token count."""

    batches: list[dict[str, np.ndarray]]
    source: str
    tokens: int = field(init=False)

    def __post_init__(self) -> None:
        self.tokens = int(sum(int(b["attention_mask"].sum()) for b in self.batches))

    def require(self, inputs: int, what: str) -> None:
        """`BctError` unless there are enough tokens to refit a layer of ``inputs`` inputs."""
        needed = tokens_needed(inputs)
        if self.tokens < needed:
            raise BctError(
                f"calibration text {self.source} has {self.tokens} tokens; {what} needs at "
                f"least {needed} ({TOKENS_PER_INPUT} per input of its widest refit, {inputs} "
                "inputs): give more text with --calib-texts (one text per line)"
            )

    @staticmethod
    def held_out(index: int) -> bool:
        return index % HELD_OUT == HELD_OUT - 1


def calibration_set(
    tokenizer_dir: str | os.PathLike | None,
    input_names: Sequence[str],
    texts: Sequence[Text] | None = None,
    *,
    source: str | None = None,
    max_length: int = MAX_LENGTH,
    batch_size: int = BATCH_SIZE,
    max_tokens: int | None = None,
) -> Calibration:
    """Tokenize ``texts`` (default: the package's corpus) for a model with these inputs.

    ``max_tokens`` stops adding texts once that many real tokens are in (the texts' order is
    kept, so a shorter budget is a prefix of a longer one)."""
    from .validate import load_tokenizer

    if tokenizer_dir is None:
        raise BctError(
            "pruning and N:M sparsity read calibration text, which needs the model's tokenizer: "
            "compress the exported model directory (model.onnx beside tokenizer.json / "
            "vocab.txt)"
        )
    if "input_ids" not in input_names or "attention_mask" not in input_names:
        raise BctError(
            "pruning and N:M sparsity need a text encoder with input_ids and attention_mask "
            f"inputs; this model's inputs are {', '.join(input_names)}"
        )
    if texts is None:
        texts, source = default_corpus(), source or f"bctonnx/data/{CORPUS_FILE}"
    tokenizer = load_tokenizer(tokenizer_dir)
    max_length = min(max_length, _max_positions(Path(tokenizer_dir), tokenizer))
    lengths = []
    chosen: list[Text] = []
    total = 0
    for text in texts:
        pair = (text,) if isinstance(text, str) else tuple(text)
        n = len(tokenizer(*pair, truncation=True, max_length=max_length)["input_ids"])
        if max_tokens is not None and total >= max_tokens:
            break
        chosen.append(text)
        lengths.append(n)
        total += n
    batches = []
    for is_pair in (False, True):
        idx = [i for i, t in enumerate(chosen) if (not isinstance(t, str)) == is_pair]
        idx.sort(key=lambda i: lengths[i])
        for start in range(0, len(idx), batch_size):
            part = [chosen[i] for i in idx[start : start + batch_size]]
            if is_pair:
                enc = tokenizer(
                    [a for a, _ in part],
                    [b for _, b in part],
                    padding=True,
                    truncation=True,
                    max_length=max_length,
                    return_tensors="np",
                )
            else:
                enc = tokenizer(
                    part, padding=True, truncation=True, max_length=max_length, return_tensors="np"
                )
            feed = {k: enc[k].astype(np.int64) for k in input_names if k in enc}
            if "token_type_ids" in input_names and "token_type_ids" not in feed:
                feed["token_type_ids"] = np.zeros_like(feed["input_ids"])
            batches.append(feed)
    # interleave short and long batches so the held-out ones are a fair sample
    order = np.argsort([(i * 7919) % max(len(batches), 1) for i in range(len(batches))])
    return Calibration([batches[i] for i in order], source or "(texts)")


def _max_positions(model_dir: Path, tokenizer) -> int:
    """The longest sequence the model takes: its config's position count (RoBERTa's two
    offset positions left out), else the tokenizer's limit."""
    import json

    limit = int(min(getattr(tokenizer, "model_max_length", 1 << 30) or (1 << 30), 1 << 30))
    config = model_dir / "config.json"
    if config.is_file():
        try:
            data = json.loads(config.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError):
            return limit
        positions = data.get("max_position_embeddings")
        if isinstance(positions, int) and positions > 2:
            offset = 2 if data.get("model_type") in ("roberta", "xlm-roberta", "camembert") else 0
            limit = min(limit, positions - offset)
    return limit


def subgraph(
    proto: onnx.ModelProto, outputs: Sequence[str], cuts: Sequence[str] = ()
) -> onnx.ModelProto:
    """A copy of ``proto`` computing only ``outputs``, with the tensors named in ``cuts`` fed
    as graph inputs instead of computed (float32, any shape): onnxruntime then runs only the
    nodes between them."""
    p = onnx.ModelProto()
    p.CopyFrom(proto)
    del p.graph.output[:]
    for name in outputs:
        p.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
    cut = set(cuts)
    needed = set(outputs)
    keep = []
    for node in reversed(p.graph.node):
        if any(o in needed and o not in cut for o in node.output):
            keep.append(node)
            needed.update(i for i in node.input if i)
    del p.graph.node[:]
    p.graph.node.extend(reversed(keep))
    inits = [t for t in p.graph.initializer if t.name in needed]
    del p.graph.initializer[:]
    p.graph.initializer.extend(inits)
    inputs = [i for i in p.graph.input if i.name in needed and i.name not in cut]
    del p.graph.input[:]
    p.graph.input.extend(inputs)
    for name in cuts:
        p.graph.input.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    del p.graph.value_info[:]  # widths may have changed since shapes were inferred
    return p


class Runner:
    """One onnxruntime session of a subgraph, run batch by batch on calibration batches."""

    def __init__(
        self,
        proto: onnx.ModelProto,
        outputs: Sequence[str],
        cuts: Sequence[str] = (),
        threads: int | None = None,
    ):
        from .runtime import make_session

        self.outputs = list(outputs)
        self.cuts = list(cuts)
        self.session = make_session(subgraph(proto, outputs, cuts).SerializeToString(), threads)
        self.inputs = [i.name for i in self.session.get_inputs() if i.name not in self.cuts]

    def run(self, batch: dict[str, np.ndarray], fed: dict[str, np.ndarray] | None = None):
        feeds = {n: batch[n] for n in self.inputs}
        feeds.update(fed or {})
        return dict(zip(self.outputs, self.session.run(self.outputs, feeds), strict=True))


def token_rows(value: np.ndarray, batch: dict[str, np.ndarray]) -> np.ndarray:
    """[batch, seq, features] -> [real tokens, features] (padding dropped)."""
    keep = batch["attention_mask"].astype(bool)
    if value.ndim != 3 or value.shape[:2] != keep.shape:
        raise ValueError(f"expected a [batch, seq, features] activation, got {value.shape}")
    return value[keep]

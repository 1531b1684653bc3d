"""Model-family knowledge (installed as ``bctonnx.models``).

Which Hugging Face architectures bctonnx handles, what their exported graphs look like, and how
to export them. The passes recognise structure, not names; this module only answers "is this a
family we know" before an export starts, so an unsupported checkpoint gets one clear sentence.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Family:
    model_type: str  # config.json "model_type"
    embeddings: tuple[str, ...]  # embedding tables the exporter emits as Gather
    note: str = ""


FAMILIES: dict[str, Family] = {
    "bert": Family(
        "bert", ("word", "position", "token_type"), "BERT, MiniLM, sentence-transformers"
    ),
    "roberta": Family("roberta", ("word", "position", "token_type")),
    "xlm-roberta": Family("xlm-roberta", ("word", "position", "token_type")),
    "distilbert": Family("distilbert", ("word", "position")),
    "electra": Family("electra", ("word", "position", "token_type")),
    "camembert": Family("camembert", ("word", "position", "token_type")),
    "mpnet": Family("mpnet", ("word", "position")),
}


class UnsupportedModel(ValueError):
    pass


def family_of(model_dir: str | Path) -> Family:
    """The family of a checkpoint directory, from its config.json."""
    config = Path(model_dir) / "config.json"
    try:
        model_type = json.loads(config.read_text(encoding="utf-8")).get("model_type", "")
    except (OSError, ValueError) as exc:
        raise UnsupportedModel(
            f"{config}: cannot read config.json ({type(exc).__name__})"
        ) from None
    if model_type not in FAMILIES:
        raise UnsupportedModel(
            f"unsupported architecture {model_type!r}; bctonnx handles encoder families: "
            + ", ".join(sorted(FAMILIES))
        )
    return FAMILIES[model_type]

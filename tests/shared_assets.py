"""Where the tests find ../shared (GLUE data, fine-tuned checkpoints).

Absent on a user's machine: the tests that need it skip, saying why. In CI (CI=true) it must
be there: a missing asset fails the test instead of skipping it silently.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("BCTONNX_SHARED", REPO.parent / "shared"))


def require_shared(relative: str) -> Path:
    path = SHARED / relative
    if not path.exists():
        if os.environ.get("CI") == "true":
            pytest.fail(f"{path} is missing, and CI must run this test")
        pytest.skip(f"needs {path} (the project's shared assets)")
    return path


def sst2_dev_sentences(n: int | None = None) -> list[str]:
    path = require_shared("data/glue/SST-2/dev.tsv")
    with open(path, encoding="utf-8") as f:
        rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    sentences = [r[0] for r in rows[1:]]
    return sentences[:n] if n else sentences

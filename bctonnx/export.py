"""export: a Hugging Face checkpoint directory -> ONNX directory (optimum, offline).

The checkpoint is always exported in FP32 (fine-tuned checkpoints stored in fp16 are loaded in
fp32). The output directory receives model.onnx plus config and tokenizer files; it is built
under a temporary name and renamed into place.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import shutil
import tempfile
from pathlib import Path

from bctonnx.models import UnsupportedModel, family_of

from .errors import BctError
from .modelio import MODEL_FILENAME, copy_sidecars

TASKS = ("feature-extraction", "text-classification")
log = logging.getLogger(__name__)


def export_model(
    model_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    task: str = "feature-extraction",
    library: str | None = "transformers",
    quiet: bool = True,
) -> Path:
    """Export ``model_dir`` to ``out_dir`` (which must not exist or be an empty folder)."""
    src, dst = Path(model_dir), Path(out_dir)
    if task not in TASKS:
        raise BctError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")
    if not src.is_dir():
        raise BctError(f"{src}: not a model directory")
    if not (src / "config.json").is_file():
        raise BctError(f"{src}: no config.json (expected a Hugging Face checkpoint directory)")
    try:
        family_of(src)
    except UnsupportedModel as exc:
        raise BctError(str(exc)) from None
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())):
        raise BctError(f"output {dst} already exists and is not an empty directory")
    if dst.resolve() == src.resolve():
        raise BctError("output directory is the model directory; choose another")
    dst.parent.mkdir(parents=True, exist_ok=True)
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    from optimum.exporters.onnx import main_export

    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", dir=dst.parent))
    try:
        sink = io.StringIO()
        with contextlib.redirect_stdout(sink) if quiet else contextlib.nullcontext():
            main_export(
                str(src),
                output=str(tmp),
                task=task,
                dtype="fp32",
                device="cpu",
                local_files_only=True,
                do_validation=False,
                library_name=library,
                model_kwargs=None,
            )
        if not (tmp / MODEL_FILENAME).is_file():
            raise BctError(f"export of {src} produced no {MODEL_FILENAME}")
        log.debug("copied %s", copy_sidecars(src, tmp, overwrite=False))
        if dst.exists():
            dst.rmdir()
        os.replace(tmp, dst)
    except BctError:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    except Exception as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise BctError(f"export of {src} failed: {msg}") from None
    return dst

"""OpenVINO as a peer in ``bctonnx bench``: the runtime a user could pick instead of onnxruntime.

Two models per benchmark, built from the same FP32 ONNX file as everything else:

- ``openvino``: the FP32 model read by OpenVINO (``Core.read_model``) and compiled for the CPU
  at its default inference precision (bf16 where the CPU has AMX-BF16 or AVX-512 BF16, else
  fp32);
- ``openvino nncf int8``: NNCF's post-training quantization (``nncf.quantize``,
  ``ModelType.TRANSFORMER``) calibrated on unlabeled text (the package's calibration sentences,
  tokenized with the model's tokenizer; synthetic token ids without one), saved as OpenVINO IR.

Both are compiled with ``INFERENCE_NUM_THREADS`` = the benchmark's threads and the latency hint,
and timed in the same interleaved run as the onnxruntime sessions. They need the optional
extra: ``pip install "bctonnx[peers]"`` (openvino, nncf); without it `missing_reason` says so.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np

INSTALL_HINT = 'pip install "bctonnx[peers]"  (openvino, nncf)'
OPENVINO = "openvino"
OPENVINO_INT8 = "openvino nncf int8"
CALIBRATION_SENTENCES = 300
log = logging.getLogger(__name__)


def missing_reason() -> str | None:
    """None when openvino and nncf import, else a one-line reason with the install command."""
    try:
        import nncf  # noqa: F401
        import openvino  # noqa: F401
    except ImportError as exc:
        return f"OpenVINO peers not installed ({exc.name}): {INSTALL_HINT}"
    return None


def versions() -> str:
    import nncf
    import openvino

    return f"openvino {openvino.get_version().split('-')[0]}, nncf {nncf.__version__}"


def _input_names(onnx_path: Path) -> list[str]:
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    inits = {i.name for i in model.graph.initializer}
    return [i.name for i in model.graph.input if i.name not in inits]


def calibration_feeds(
    onnx_path: Path,
    texts: list[str],
    tokenizer_dir: Path | None,
    vocab: int,
    seq: int = 128,
) -> list[dict[str, np.ndarray]]:
    """One feed per calibration text (batch 1): tokenized with the model's tokenizer when there
    is one, else random token ids of the texts' word counts (below ``vocab``)."""
    names = _input_names(onnx_path)
    feeds = []
    tok = None
    if tokenizer_dir is not None:
        from .textio import load_tokenizer

        try:
            tok = load_tokenizer(tokenizer_dir)
        except Exception:  # noqa: BLE001 - fall back to synthetic ids
            tok = None
    rng = np.random.default_rng(0)
    for text in texts:
        if tok is not None:
            enc = tok(text, truncation=True, max_length=seq, return_tensors="np")
            arrays = {k: np.asarray(v, np.int64) for k, v in enc.items()}
        else:
            n = min(seq, max(4, len(text.split()) + 2))
            ids = rng.integers(100, max(vocab, 101), size=(1, n), dtype=np.int64)
            arrays = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
        length = arrays["input_ids"].shape[1]
        feed = {}
        for name in names:
            if name in arrays:
                feed[name] = arrays[name]
            else:  # token_type_ids and the like
                feed[name] = np.zeros((1, length), np.int64)
        feeds.append(feed)
    return feeds


def compile_model(path: str | os.PathLike, threads: int):
    """An OpenVINO compiled model for the CPU (ONNX or IR), ``threads`` inference threads."""
    import openvino as ov

    core = ov.Core()
    config = {"INFERENCE_NUM_THREADS": int(threads), "PERFORMANCE_HINT": "LATENCY"}
    return core.compile_model(core.read_model(str(path)), "CPU", config)


def runner(compiled, feeds: dict[str, np.ndarray]) -> Callable[[], object]:
    """A callable that runs one inference of ``feeds`` (only the model's inputs are passed)."""
    request = compiled.create_infer_request()
    names = {i.get_any_name() for i in compiled.inputs}
    inputs = {k: v for k, v in feeds.items() if k in names}
    return lambda: request.infer(inputs)


def quantize_nncf_int8(onnx_path: Path, out_xml: Path, feeds: list[dict[str, np.ndarray]]) -> Path:
    """NNCF post-training int8 quantization of the FP32 model, saved as OpenVINO IR."""
    import nncf
    import openvino as ov

    model = ov.Core().read_model(str(onnx_path))
    sink = io.StringIO()
    with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
        quantized = nncf.quantize(
            model,
            nncf.Dataset(feeds),
            model_type=nncf.ModelType.TRANSFORMER,
            subset_size=len(feeds),
        )
    ov.save_model(quantized, str(out_xml))
    return out_xml


def ir_bytes(xml: Path) -> int:
    """Bytes of an OpenVINO IR on disk (.xml + .bin)."""
    return xml.stat().st_size + xml.with_suffix(".bin").stat().st_size

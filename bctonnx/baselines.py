"""onnxruntime's own quantizers, as baselines for bctonnx on the same model and data.

Each builder is ``(src_onnx, dst_onnx, **kw) -> Path``: it reads the FP32 model ``src_onnx``
and writes the quantized model to ``dst_onnx`` (never touching the input). ``BASELINES`` names
them for ``bctonnx eval --baselines``; ``needs_calibration`` marks the one that wants
``calibration_feeds`` (a list of onnxruntime input dicts).
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .modelio import EXTERNAL_DATA_THRESHOLD, model_file_bytes


@contextlib.contextmanager
def _quiet_ort_quantization() -> Iterator[None]:
    """onnxruntime's quantization tool logs advice through the root logger; keep it quiet
    unless bctonnx runs verbose."""
    root = logging.getLogger()
    level = root.level
    if level >= logging.WARNING:
        root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


@contextlib.contextmanager
def _in_directory(path: Path) -> Iterator[None]:
    # onnxruntime's symbolic shape inference drops a debug model into the working directory
    # when it gives up; keep that out of the user's folder
    old = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(old)


def _large(src: Path) -> bool:
    return model_file_bytes(src) > EXTERNAL_DATA_THRESHOLD


def preprocess(src: str | os.PathLike, dst: str | os.PathLike) -> Path:
    """onnxruntime's ``quant_pre_process``: symbolic shape inference (dims merged where they
    conflict), basic graph optimization, ONNX shape inference. Where the symbolic inference
    gives up, it is skipped (ONNX shape inference alone)."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    src, dst = Path(src).resolve(), Path(dst).resolve()
    with tempfile.TemporaryDirectory(prefix="bct-preprocess.") as tmp, _in_directory(Path(tmp)):
        kw = {"save_as_external_data": _large(src), "all_tensors_to_one_file": True}
        try:
            quant_pre_process(src, dst, auto_merge=True, **kw)
        except Exception:
            quant_pre_process(src, dst, skip_symbolic_shape=True, **kw)
    return dst


def quantize_dynamic_int8(
    src: str | os.PathLike, dst: str | os.PathLike, *, per_channel: bool = False, **_: object
) -> Path:
    """``quantize_dynamic``: int8 (QInt8) weights, activations quantized per tensor at run
    time (integer MatMul kernels); on the preprocessed FP32 model."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    src, dst = Path(src), Path(dst)
    with tempfile.TemporaryDirectory(prefix="bct-dynamic.") as tmp, _quiet_ort_quantization():
        pre = preprocess(src, Path(tmp) / "pre.onnx")
        quantize_dynamic(
            pre,
            dst,
            weight_type=QuantType.QInt8,
            per_channel=per_channel,
            use_external_data_format=_large(src),
        )
    return dst


class _FeedReader:
    """A ``CalibrationDataReader`` over a list of input dicts."""

    def __init__(self, feeds: list[dict[str, np.ndarray]]):
        self._feeds = iter(feeds)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._feeds, None)


def quantize_static_qdq_int8(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    *,
    calibration_feeds: list[dict[str, np.ndarray]],
    per_channel: bool = False,
    **_: object,
) -> Path:
    """``quantize_static`` in QDQ format: int8 weights and int8 activations with one scale per
    tensor, calibrated MinMax on ``calibration_feeds``; on the preprocessed FP32 model."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    if not calibration_feeds:
        raise ValueError("static quantization needs calibration data")

    class Reader(_FeedReader, CalibrationDataReader):
        pass

    src, dst = Path(src), Path(dst)
    with tempfile.TemporaryDirectory(prefix="bct-static.") as tmp, _quiet_ort_quantization():
        pre = preprocess(src, Path(tmp) / "pre.onnx")
        quantize_static(
            pre,
            dst,
            Reader(calibration_feeds),
            quant_format=QuantFormat.QDQ,
            activation_type=QuantType.QInt8,
            weight_type=QuantType.QInt8,
            per_channel=per_channel,
            calibrate_method=CalibrationMethod.MinMax,
            use_external_data_format=_large(src),
        )
    return dst


def matmul_nbits_4bit(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    *,
    block_size: int = 32,
    is_symmetric: bool = True,
    accuracy_level: int | None = 4,
    **_: object,
) -> Path:
    """``MatMulNBitsQuantizer``: MatMul weights to 4-bit blocks (``com.microsoft.MatMulNBits``),
    everything else (embedding tables included) left FP32. ``accuracy_level=4`` lets the kernel
    quantize activations to int8 on the fly."""
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    src, dst = Path(src), Path(dst)
    with _quiet_ort_quantization():
        quantizer = MatMulNBitsQuantizer(
            onnx.load(str(src)),
            bits=4,
            block_size=block_size,
            is_symmetric=is_symmetric,
            accuracy_level=accuracy_level,
        )
        quantizer.process()
        quantizer.model.save_model_to_file(str(dst), use_external_data_format=_large(src))
    return dst


@dataclass(frozen=True)
class Baseline:
    name: str
    build: Callable[..., Path]
    describe: str
    needs_calibration: bool = False


BASELINES: dict[str, Baseline] = {
    "ort dynamic int8": Baseline(
        "ort dynamic int8",
        quantize_dynamic_int8,
        "quantize_dynamic: int8 weights per tensor, int8 activations per tensor at run time",
    ),
    "ort static qdq int8": Baseline(
        "ort static qdq int8",
        quantize_static_qdq_int8,
        "quantize_static QDQ: int8 weights per tensor, int8 activations per tensor, "
        "MinMax on 128 train examples",
        needs_calibration=True,
    ),
    "ort matmulnbits 4bit": Baseline(
        "ort matmulnbits 4bit",
        matmul_nbits_4bit,
        "MatMulNBits: 4-bit symmetric weights, blocks of 32, accuracy_level 4; embeddings fp32",
    ),
}

"""MLflow: a compressed model directory as an MLflow model (pyfunc flavour), for
``mlflow.pyfunc.load_model`` and ``mlflow models serve``.

MLflow's ONNX flavour builds the onnxruntime session from a dict of ``SessionOptions``
attributes and cannot register a custom-op library, so the integer form would not load there.
This flavour is a pyfunc model with a loader module (``loader_module`` =
``bctonnx.integrations.mlflow``): MLflow calls `_load_pyfunc` on the model's data folder, which
builds a `bctonnx.textio.TextModel` (session with the op library registered, the tokenizer and
``config.json`` carried in the folder). Nothing is pickled.

Input: a column of strings ``text`` (a DataFrame, or a list / Series / array of strings), and
for pair tasks a second column ``text_pair``. Output, by the graph's outputs: a DataFrame with
``label`` and ``score`` (text classification: the label of the largest logit and its softmax
probability; ``score`` alone for a one-output regression head), or an array of sentence
embeddings, one row per text (feature extraction: mean pooled, L2-normalized unless
``normalize=False``). The model carries that signature, an input example and pinned
requirements (bctonnx, onnxruntime, transformers, tokenizers, numpy, pandas and mlflow at the
versions that saved it).

    import bctonnx.mlflow
    info = bctonnx.mlflow.log_model("sst2-w8a8", name="model")
    mlflow.pyfunc.load_model(info.model_uri).predict(["a gripping film"])

``bctonnx.mlflow`` is this module under a shorter name. ``mlflow`` is the ``bctonnx[mlflow]``
extra: without it, `save_model` / `log_model` fail with one line saying so.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import BctError
from ..modelio import copy_sidecars, external_data_files, load_proto
from ..textio import CLASSIFICATION, FEATURE_EXTRACTION, TextModel
from . import require_extra

TEXT, TEXT_PAIR = "text", "text_pair"
DATA_DIR = "bctonnx_model"  # the model folder's name inside the MLflow model's data
EXAMPLE = ["a gripping, beautifully shot film", "the plot never comes together"]


def _mlflow(what: str):
    return require_extra("mlflow", "mlflow", what)


# --- loading (what MLflow calls) ---------------------------------------------------------------


class BctPyfuncModel:
    """What ``mlflow.pyfunc.load_model`` wraps: ``predict(model_input, params=None)``."""

    def __init__(self, model_dir: str | os.PathLike, normalize: bool = True):
        self.model = TextModel(model_dir, normalize=normalize)

    def predict(self, model_input: Any, params: dict[str, Any] | None = None):
        import pandas as pd

        texts = _texts(model_input)
        try:
            answers = self.model.predict(texts)
        except BctError as exc:
            raise _bad_request(str(exc)) from None
        if self.model.task == FEATURE_EXTRACTION:
            return answers["embedding"]
        return pd.DataFrame(answers)


def _load_pyfunc(data_path: str, model_config: dict | None = None) -> BctPyfuncModel:
    """MLflow's pyfunc loader entry point: ``data_path`` is the model folder saved here."""
    normalize = True
    if model_config and "normalize" in model_config:
        normalize = bool(model_config["normalize"])
    return BctPyfuncModel(data_path, normalize=normalize)


def _bad_request(message: str):
    """An error MLflow's scoring server answers with 400 (the caller's input), not 500."""
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

    return MlflowException(message, error_code=INVALID_PARAMETER_VALUE)


def _texts(model_input: Any) -> list:
    """Strings (or (text, text_pair) tuples) from what MLflow hands over: a DataFrame with a
    ``text`` column (and ``text_pair``) or a single column, a Series, a list or an array."""
    import pandas as pd

    if isinstance(model_input, dict):
        model_input = pd.DataFrame(model_input)
    if isinstance(model_input, str):
        model_input = [model_input]
    if isinstance(model_input, pd.DataFrame):
        columns = list(model_input.columns)
        if TEXT in columns:
            first = model_input[TEXT]
        elif len(columns) == 1:
            first = model_input[columns[0]]
        else:
            raise _bad_request(f"expected a column '{TEXT}' (and '{TEXT_PAIR}'), got {columns}")
        second = model_input[TEXT_PAIR] if TEXT_PAIR in columns else None
        if second is not None and second.isna().all():
            second = None
        firsts, seconds = list(first), None if second is None else list(second)
        # {"text": [...]} (a dict, or {"inputs": {...}} over HTTP) is one row holding a list
        if len(firsts) == 1 and isinstance(firsts[0], list | np.ndarray):
            firsts = list(firsts[0])
            seconds = None if seconds is None else list(seconds[0])
    elif isinstance(model_input, pd.Series | np.ndarray | list | tuple):
        firsts, seconds = list(np.asarray(model_input, dtype=object).reshape(-1)), None
    else:
        raise _bad_request(f"expected strings, got {type(model_input).__name__}")
    if not firsts:
        raise _bad_request("no texts")
    bad = [i for i, t in enumerate(firsts) if not isinstance(t, str)]
    if seconds is not None:
        bad += [i for i, t in enumerate(seconds) if not isinstance(t, str)]
    if bad:
        raise _bad_request(f"text {bad[0]} is not a string")
    return firsts if seconds is None else list(zip(firsts, seconds, strict=True))


# --- saving --------------------------------------------------------------------------------------


def signature(model: TextModel):
    """Input: ``text`` (and optional ``text_pair``) strings; output: ``label``/``score`` or
    the embeddings' tensor."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema, TensorSpec

    inputs = Schema([ColSpec("string", TEXT), ColSpec("string", TEXT_PAIR, required=False)])
    if model.task == CLASSIFICATION:
        cols = [ColSpec("double", "score")]
        if model.labels:
            cols.insert(0, ColSpec("string", "label"))
        outputs = Schema(cols)
    else:
        width = model.raw(EXAMPLE[:1]).shape[-1]
        outputs = Schema([TensorSpec(np.dtype(np.float32), (-1, int(width)))])
    return ModelSignature(inputs=inputs, outputs=outputs)


def requirements() -> list[str]:
    """What the model needs to load, pinned to the versions that saved it."""
    from importlib.metadata import PackageNotFoundError, version

    reqs = []
    for name in ("bctonnx", "onnxruntime", "transformers", "tokenizers", "numpy", "pandas"):
        try:
            reqs.append(f"{name}=={version(name)}")
        except PackageNotFoundError:
            continue
    return reqs


def _stage(model_dir: str | os.PathLike, target: Path) -> Path:
    """The model (+ external data), config and tokenizer files of ``model_dir``, copied into
    ``target/DATA_DIR`` (nothing else the folder may hold)."""
    proto, model_path = load_proto(model_dir)
    dst = target / DATA_DIR
    dst.mkdir(parents=True)
    shutil.copy2(model_path, dst / "model.onnx")
    for location in external_data_files(proto):  # load_proto checked they stay inside
        (dst / location).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(model_path.parent / location, dst / location)
    copy_sidecars(model_path.parent, dst)
    return dst


def _pyfunc_kwargs(model_dir, tmp: Path, normalize: bool, kwargs: dict) -> dict:
    staged = _stage(model_dir, tmp)
    model = TextModel(staged, normalize=normalize)  # loads: the tokenizer and library are fine
    example = {TEXT: EXAMPLE}
    from .. import __version__

    out = {
        "loader_module": __name__,
        "data_path": str(staged),
        "signature": signature(model),
        "input_example": example,
        "metadata": {
            "bctonnx_version": __version__,
            "task": model.task,
            **({"labels": model.labels} if model.labels else {}),
        },
        "model_config": {"normalize": normalize},
    }
    if "pip_requirements" not in kwargs and "conda_env" not in kwargs:
        out["pip_requirements"] = requirements()
    out.update(kwargs)
    return out


def save_model(
    model_dir: str | os.PathLike, path: str | os.PathLike, *, normalize: bool = True, **kwargs
) -> None:
    """Save the compressed (or FP32) model directory ``model_dir`` as an MLflow model at
    ``path``. Other keywords go to ``mlflow.pyfunc.save_model`` (``pip_requirements``,
    ``extra_pip_requirements``, ``metadata``, ...)."""
    mlflow = _mlflow("bctonnx.mlflow.save_model")
    if Path(path).exists():
        raise BctError(f"{path} already exists")
    with tempfile.TemporaryDirectory(prefix="bctonnx-mlflow.") as tmp:
        mlflow.pyfunc.save_model(
            path=str(path), **_pyfunc_kwargs(model_dir, Path(tmp), normalize, kwargs)
        )


def log_model(
    model_dir: str | os.PathLike, name: str = "model", *, normalize: bool = True, **kwargs
):
    """Log ``model_dir`` to the active MLflow run (one is started if none is) as model
    ``name``; returns MLflow's ``ModelInfo`` (``.model_uri``). Other keywords go to
    ``mlflow.pyfunc.log_model`` (``registered_model_name``, ``pip_requirements``, ...)."""
    mlflow = _mlflow("bctonnx.mlflow.log_model")
    with tempfile.TemporaryDirectory(prefix="bctonnx-mlflow.") as tmp:
        return mlflow.pyfunc.log_model(
            name=name, **_pyfunc_kwargs(model_dir, Path(tmp), normalize, kwargs)
        )

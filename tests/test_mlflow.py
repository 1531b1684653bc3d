"""The MLflow model: README "MLflow" run against a local folder store, ``mlflow.pyfunc.load_model``
against the local model, ``mlflow models serve`` answering 100 requests (SST-2 classifier and
all-MiniLM-L6-v2 embeddings), text pairs, the signature and requirements, and the one-line
error without the extra."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from conftest import readme_blocks, require_module, scripts_env
from shared_assets import sst2_dev_sentences

import bctonnx
import bctonnx.mlflow
from bctonnx.errors import BctError
from bctonnx.textio import TextModel, default_texts


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A local folder tracking store for this module (MLflow 3 wants the opt-in for it)."""
    require_module("mlflow", "mlflow")
    import mlflow

    root = tmp_path_factory.mktemp("mlflow")
    env = {
        "MLFLOW_TRACKING_URI": (root / "mlruns").as_uri(),
        "MLFLOW_ALLOW_FILE_STORE": "true",
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "DO_NOT_TRACK": "true",
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])
    yield env
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    mlflow.set_tracking_uri(None)


@pytest.fixture(scope="module")
def readme_sst2(sst2_w8a8_dir, store, tmp_path_factory):
    """README "MLflow"'s Python block, run as it is in a folder where ``sst2-w8a8`` is the
    compressed SST-2 classifier; returns the model URI it printed."""
    code = next(c for lang, c in readme_blocks("MLflow") if lang == "python")
    work = tmp_path_factory.mktemp("readme_mlflow")
    (work / "sst2-w8a8").symlink_to(sst2_w8a8_dir, target_is_directory=True)
    (work / "example.py").write_text(code, encoding="utf-8")
    proc = subprocess.run(
        [sys.executable, "example.py"], cwd=work, env=scripts_env(**store), capture_output=True,
        text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    uris = re.findall(r"^(models:/\S+)$", proc.stdout, flags=re.M)
    assert len(uris) == 1, proc.stdout
    assert "label" in proc.stdout and "score" in proc.stdout  # the predict() it prints
    return uris[0]


def test_load_model_predicts_like_the_local_model_and_the_pipeline(readme_sst2, sst2_w8a8_dir):
    import mlflow
    import pandas as pd

    texts = sst2_dev_sentences(64)
    model = mlflow.pyfunc.load_model(readme_sst2)
    got = model.predict(pd.DataFrame({"text": texts}))
    assert list(got.columns) == ["label", "score"] and len(got) == 64
    local = TextModel(sst2_w8a8_dir).predict(texts)
    assert list(got["label"]) == local["label"]
    np.testing.assert_allclose(got["score"], local["score"], rtol=0, atol=1e-6)
    assert len(set(local["label"])) == 2  # both classes occur: the comparison can fail
    # an independent reader of the same directory: optimum's ORTModel + transformers' pipeline
    from optimum.onnxruntime import ORTModelForSequenceClassification
    from transformers import AutoTokenizer, pipeline

    ort_model = ORTModelForSequenceClassification.from_pretrained(
        sst2_w8a8_dir, session_options=bctonnx.session_options()
    )
    classify = pipeline(
        "text-classification",
        model=ort_model,
        tokenizer=AutoTokenizer.from_pretrained(sst2_w8a8_dir),
    )
    want = classify(texts, batch_size=32, truncation=True)
    assert list(got["label"]) == [r["label"] for r in want]
    np.testing.assert_allclose(got["score"], [r["score"] for r in want], rtol=0, atol=1e-5)


def test_the_logged_model_carries_signature_requirements_tokenizer_and_config(readme_sst2):
    import mlflow
    import onnxruntime

    path = Path(mlflow.artifacts.download_artifacts(readme_sst2))
    info = mlflow.models.get_model_info(readme_sst2)
    sig = info.signature.to_dict()
    assert [c["name"] for c in json.loads(sig["inputs"])] == ["text", "text_pair"]
    assert [c["name"] for c in json.loads(sig["outputs"])] == ["label", "score"]
    reqs = (path / "requirements.txt").read_text().split()
    assert all(re.fullmatch(r"[A-Za-z0-9_.-]+==[^=\s]+", r) for r in reqs), reqs
    assert f"bctonnx=={bctonnx.__version__}" in reqs
    assert f"onnxruntime=={onnxruntime.__version__}" in reqs
    assert f"mlflow=={mlflow.__version__}" in reqs
    data = path / "data" / "bctonnx_model"
    for name in ("model.onnx", "config.json", "tokenizer.json", "vocab.txt"):
        assert (data / name).is_file(), name
    flavor = info.flavors["python_function"]
    assert flavor["loader_module"] == "bctonnx.integrations.mlflow"
    assert info.metadata["task"] == "text-classification"


# --- serving --------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(url: str, body: bytes, timeout: float = 60) -> tuple[int, dict]:
    request = urllib.request.Request(
        url, data=body, headers={"Content-Type": "application/json"}, method="POST"
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"{}")


@contextmanager
def served(model_uri: str, env: dict, log: Path):
    """README's ``mlflow models serve`` line for ``model_uri`` on a free port of 127.0.0.1,
    until the block ends; then the server (its process group) is stopped."""
    bash = next(c for lang, c in readme_blocks("MLflow") if "mlflow models serve" in c)
    line = next(x for x in bash.splitlines() if x.startswith("mlflow models serve"))
    port = free_port()
    command = line.replace("models:/m-...", model_uri).replace("5001", str(port))
    with open(log, "w") as out:
        # from a folder of its own, as a user serves: not the source checkout, whose bctonnx
        # (without the built library, in CI) would shadow the installed one
        proc = subprocess.Popen(
            command, shell=True, env=scripts_env(**env), stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True, cwd=log.parent,
        )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            if proc.poll() is not None:
                pytest.fail(
                    f"mlflow models serve exited ({proc.returncode}):\n{log.read_text()[-3000:]}"
                )
            try:
                with urllib.request.urlopen(url + "/ping", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(
                    f"mlflow models serve did not answer in 180 s:\n{log.read_text()[-3000:]}"
                )
            time.sleep(0.5)
        yield url
    finally:
        stop_group(proc)
    with socket.socket() as s:  # stopped: nothing listens there any more
        assert s.connect_ex(("127.0.0.1", port)) != 0


def stop_group(proc: subprocess.Popen, timeout: float = 30) -> None:
    """SIGTERM to the server's process group (the shell, mlflow, uvicorn), SIGKILL to what is
    left after ``timeout``; returns when none of them is left."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:  # it had exited already
        return
    deadline = time.monotonic() + timeout
    while True:
        proc.poll()
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            return
        if time.monotonic() > deadline:
            os.killpg(proc.pid, signal.SIGKILL)
            deadline = time.monotonic() + timeout
        time.sleep(0.2)


def request_bodies(texts: list[str]) -> list[tuple[list[str], bytes]]:
    """100 requests: one batch of 32 texts, one malformed (texts None), 98 of one text each in
    MLflow's three JSON forms."""
    forms = [
        lambda t: {"dataframe_split": {"columns": ["text"], "data": [[x] for x in t]}},
        lambda t: {"dataframe_records": [{"text": x} for x in t]},
        lambda t: {"inputs": {"text": t}},
    ]
    bodies = [(texts[:32], json.dumps(forms[0](texts[:32])).encode())]
    for i in range(98):
        one = [texts[32 + i % (len(texts) - 32)]]
        bodies.append((one, json.dumps(forms[i % 3](one)).encode()))
    bodies.insert(50, (None, b'{"dataframe_split": {"columns": ["sentence"], "data": [["x"]]'))
    assert len(bodies) == 100
    return bodies


def serve_and_check(model_uri, env, log, texts, check) -> None:
    with served(model_uri, env, log) as url:
        answered = 0
        for sent, body in request_bodies(texts):
            status, answer = post(url + "/invocations", body)
            if sent is None:
                assert 400 <= status < 500, (status, answer)
                continue
            assert status == 200, (status, answer)
            check(sent, answer["predictions"])
            answered += 1
        assert answered == 99  # every request after the malformed one was answered too


def test_served_classifier_labels_equal_the_local_model_s(
    readme_sst2, sst2_w8a8_dir, store, tmp_path
):
    local = TextModel(sst2_w8a8_dir)
    texts = sst2_dev_sentences(100)
    labels_seen = set()

    def check(sent, predictions):
        want = local.predict(sent)
        assert [p["label"] for p in predictions] == want["label"]
        np.testing.assert_allclose([p["score"] for p in predictions], want["score"], atol=1e-6)
        labels_seen.update(want["label"])

    serve_and_check(readme_sst2, store, tmp_path / "serve.log", texts, check)
    assert len(labels_seen) == 2


def test_served_embeddings_equal_the_local_model_s(minilm_dir, store, tmp_path):
    import mlflow

    out = tmp_path / "minilm-w8a8"
    bctonnx.compress_file(minilm_dir, out, bctonnx.resolve_config("w8a8"))
    with mlflow.start_run():
        info = bctonnx.mlflow.log_model(out, name="embedder")
    sig = mlflow.models.get_model_info(info.model_uri).signature.to_dict()
    assert json.loads(sig["outputs"])[0]["tensor-spec"]["shape"] == [-1, 384]
    local = TextModel(out)
    fp32 = TextModel(minilm_dir)
    texts = sst2_dev_sentences(60) + default_texts()[:40]

    def check(sent, predictions):
        got = np.asarray(predictions, np.float32)
        assert got.shape == (len(sent), 384)
        np.testing.assert_allclose(got, local.predict(sent)["embedding"], rtol=0, atol=1e-5)
        np.testing.assert_allclose(np.linalg.norm(got, axis=-1), 1.0, atol=1e-5)
        cos = (got * fp32.predict(sent)["embedding"]).sum(-1)  # unit vectors
        assert cos.min() > 0.98

    serve_and_check(info.model_uri, store, tmp_path / "serve.log", texts, check)


# --- pairs, input forms, errors --------------------------------------------------------------------


def test_text_pairs_and_the_input_forms(tiny_cls_dir, store, tmp_path):
    import mlflow
    import pandas as pd
    from conftest import run_onnx
    from mlflow.exceptions import MlflowException

    path = tmp_path / "tiny-mlflow"
    bctonnx.mlflow.save_model(tiny_cls_dir, path)
    model = mlflow.pyfunc.load_model(str(path))
    firsts = ["the water was hot", "what a day", "he said that", "look at the sound"]
    seconds = ["call my number", "the day was long", "she would write more", "of the water"]
    got = model.predict(pd.DataFrame({"text": firsts, "text_pair": seconds}))
    # the reference: the tokenizer's pair encoding run on onnxruntime directly
    from transformers import AutoTokenizer

    enc = AutoTokenizer.from_pretrained(tiny_cls_dir)(
        firsts, seconds, padding=True, return_tensors="np"
    )
    feeds = {k: v.astype(np.int64) for k, v in enc.items()}
    logits = run_onnx(tiny_cls_dir / "model.onnx", feeds)["logits"]
    names = ["NEGATIVE", "POSITIVE"]
    assert list(got["label"]) == [names[i] for i in logits.argmax(-1)]
    # pairs are not the first texts alone
    alone = model.predict(pd.DataFrame({"text": firsts}))
    assert not np.allclose(alone["score"], got["score"])
    # {"text": [...]} (a dict, as {"inputs": ...} over HTTP) and one string per row agree
    np.testing.assert_allclose(model.predict({"text": firsts})["score"], alone["score"])
    with pytest.raises(MlflowException):
        model.predict(pd.DataFrame({"sentence": firsts}))
    with pytest.raises(MlflowException):
        model.predict(pd.DataFrame({"text": ["fine", None]}))
    with pytest.raises(BctError, match="already exists"):
        bctonnx.mlflow.save_model(tiny_cls_dir, path)


def test_without_mlflow_the_error_names_the_extra(tiny_cls_dir, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "mlflow", None)  # import mlflow -> ImportError
    for call in (
        lambda: bctonnx.mlflow.log_model(tiny_cls_dir),
        lambda: bctonnx.mlflow.save_model(tiny_cls_dir, tmp_path / "m"),
    ):
        with pytest.raises(BctError) as err:
            call()
        assert "\n" not in str(err.value)
        assert "pip install 'bctonnx[mlflow]'" in str(err.value)
    assert not (tmp_path / "m").exists()

"""Deploying compressed models: optimum's ORTModel + transformers pipelines, the Python API
(inputs, results, external data), Triton model repositories, inspect, validate reports, the
logging flags and the C++ sample."""

from __future__ import annotations

import copy
import json
import os
import shutil
import stat
import subprocess
import sys
from functools import cache
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import (
    VOCAB_SIZE,
    canonicalized,
    ort_optimized,
    run_onnx,
    tiny_feeds,
)
from shared_assets import sst2_dev_sentences
from test_cli import assert_one_line_error, run_cli

import bctonnx
from bctonnx.errors import BctError
from bctonnx.package import load_repository_model, parse_pbtxt, write_triton_repository
from bctonnx.runtime import op_library_path

REPO_ROOT = Path(__file__).resolve().parents[1]


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1])
    return float(((a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)).min())


@cache
def integer_ops_available() -> bool:
    """Whether the op library is built and registers the integer ops (IntGelu, IntSoftmax,
    IntLayerNorm): a one-node session of each decides."""
    if op_library_path() is None:
        return False
    from onnx import TensorProto, helper

    for op, n_out in (("IntGelu", 2), ("IntSoftmax", 1), ("IntLayerNorm", 2)):
        node = helper.make_node(op, ["q", "s"], [f"y{i}" for i in range(n_out)], domain="bctonnx")
        graph = helper.make_graph(
            [node],
            "probe",
            [
                helper.make_tensor_value_info("q", TensorProto.INT8, [1, 32]),
                helper.make_tensor_value_info("s", TensorProto.FLOAT, [1, 1]),
            ],
            [helper.make_empty_tensor_value_info(f"y{i}") for i in range(n_out)],
        )
        model = helper.make_model(
            graph,
            opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("bctonnx", 1)],
            ir_version=10,
        )
        options = bctonnx.session_options()
        options.log_severity_level = 4  # the probe's arity errors are expected: stay quiet
        try:
            ort.InferenceSession(model.SerializeToString(), options)
        except Exception as exc:  # noqa: BLE001 - onnxruntime's own words decide
            if "not a registered function/op" in str(exc):
                return False
    return True


def require_integer_ops() -> None:
    if not integer_ops_available():
        pytest.skip("the op library does not register the integer ops (yet)")


# --- a tiny text-classification checkpoint, exported -------------------------------------------


TEXTS = [
    "the water was hot and the day was long",
    "people call my number but no one came",
    "look at the sound of the water",
    "what a day",
    "he said that she would write more",
    "could you find the other side",
]


def ort_pipeline(model_dir: Path, task: str = "text-classification"):
    from optimum.onnxruntime import ORTModelForFeatureExtraction, ORTModelForSequenceClassification
    from transformers import AutoTokenizer, pipeline

    cls = (
        ORTModelForSequenceClassification
        if task == "text-classification"
        else ORTModelForFeatureExtraction
    )
    model = cls.from_pretrained(model_dir, session_options=bctonnx.session_options(threads=2))
    return model, pipeline(task, model=model, tokenizer=AutoTokenizer.from_pretrained(model_dir))


def test_compressed_directory_loads_in_optimum_and_a_pipeline_gives_labels(tiny_cls_dir, tmp_path):
    out = tmp_path / "w8a8"
    bctonnx.compress_file(tiny_cls_dir, out, bctonnx.resolve_config("w8a8", block_size=16))
    # what optimum needs is there: model.onnx, config.json (labels), the tokenizer
    for name in ("model.onnx", "config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (out / name).is_file()
    _, fp32 = ort_pipeline(tiny_cls_dir)
    model, compressed = ort_pipeline(out)
    assert "BlockMatMul" in {n.op_type for n in onnx.load(str(out / "model.onnx")).graph.node}
    got, want = compressed(TEXTS), fp32(TEXTS)
    assert {r["label"] for r in got} <= {"NEGATIVE", "POSITIVE"}
    assert [r["label"] for r in got] == [r["label"] for r in want]
    assert max(abs(a["score"] - b["score"]) for a, b in zip(got, want, strict=True)) < 0.05


def test_an_ortoptimizer_directory_compresses_and_runs_in_a_pipeline(tiny_cls_dir, tmp_path):
    """optimum's ORTOptimizer (O2: fused Attention, SkipLayerNormalization, ...) writes
    model_optimized.onnx beside the config; bctonnx compress takes that directory as it is,
    unfuses and compresses everything, and the pipeline gives FP32's labels."""
    optimized = ort_optimized(tiny_cls_dir, tmp_path / "optimized")
    assert not (optimized / "model.onnx").exists()
    fused = {n.op_type for n in onnx.load(optimized / "model_optimized.onnx").graph.node}
    assert {"Attention", "SkipLayerNormalization"} <= fused
    # its mask index is the optimizer's own ReduceSum(Cast(mask)): lengths, unfused exactly
    unfused = canonicalized(optimized / "model_optimized.onnx")
    assert not [n for n in unfused.graph.node if n.domain == "com.microsoft"]
    feeds = tiny_feeds(batch=3, seq=9)
    np.testing.assert_allclose(
        run_onnx(unfused, feeds)["logits"],
        run_onnx(optimized / "model_optimized.onnx", feeds)["logits"],
        rtol=1e-4,
        atol=1e-4,
    )
    out = tmp_path / "w8a8"
    report = bctonnx.compress_file(optimized, out, bctonnx.resolve_config("w8a8", block_size=16))
    assert report.ratio > 2.0
    ops = {(n.domain, n.op_type) for n in onnx.load(out / "model.onnx").graph.node}
    assert ("bctonnx", "BlockAttention") in ops
    assert not [op for domain, op in ops if domain == "com.microsoft"]
    _, fp32 = ort_pipeline(tiny_cls_dir)
    _, compressed = ort_pipeline(out)
    assert [r["label"] for r in compressed(TEXTS)] == [r["label"] for r in fp32(TEXTS)]


def test_feature_extraction_model_loads_in_optimum(tiny_bert_dir, tmp_path):
    out = tmp_path / "w8a8"
    bctonnx.compress_file(tiny_bert_dir, out, bctonnx.resolve_config("w8a8", block_size=16))
    ref_model, _ = ort_pipeline(tiny_bert_dir, "feature-extraction")
    model, extract = ort_pipeline(out, "feature-extraction")
    feeds = tiny_feeds(seq=7)
    import torch

    with torch.no_grad():
        got = model(**{k: torch.from_numpy(v) for k, v in feeds.items()}).last_hidden_state
        want = ref_model(**{k: torch.from_numpy(v) for k, v in feeds.items()}).last_hidden_state
    assert cosine(got.numpy(), want.numpy()) > 0.99
    assert np.asarray(extract("the water was hot")).shape[-1] == 64


@pytest.mark.slow
@pytest.mark.shared
@pytest.mark.parametrize("mode", ["qdq", "integer"])
def test_sst2_pipeline_labels_agree_with_fp32(sst2_dir, tmp_path_factory, mode):
    """minilm-sst2 exported, compressed w8a8, run through transformers' pipeline on the whole
    SST-2 dev set (872 sentences): >= 99% of the labels equal the FP32 model's."""
    sentences = sst2_dev_sentences()
    assert len(sentences) == 872
    if mode == "integer":
        require_integer_ops()
    fp32_dir = sst2_dir
    out = tmp_path_factory.mktemp(f"sst2_{mode}") / mode
    report = bctonnx.compress_file(fp32_dir, out, bctonnx.resolve_config("w8a8", mode=mode))
    assert report.ratio > 3.5
    labels = {}
    for name, d in (("fp32", fp32_dir), (mode, out)):
        _, pipe = ort_pipeline(d)
        labels[name] = [r["label"] for r in pipe(sentences, batch_size=32, truncation=True)]
    agree = np.mean([a == b for a, b in zip(labels["fp32"], labels[mode], strict=True)])
    assert agree >= 0.99, f"{mode}: labels agree on {agree:.4f} of SST-2 dev"


# --- the Python API ----------------------------------------------------------------------------


def test_compress_model_takes_a_file_a_directory_and_a_proto(tiny_bert_dir, tiny_bert_onnx):
    proto = onnx.load(str(tiny_bert_onnx))
    before = copy.deepcopy(proto)
    results = [
        bctonnx.compress_model(x, "w8a8", block_size=16)
        for x in (tiny_bert_onnx, tiny_bert_dir, proto)
    ]
    assert proto == before  # the caller's ModelProto is never modified
    feeds = tiny_feeds(seq=6)
    outs = [run_onnx(r.model, feeds)["last_hidden_state"] for r in results]
    np.testing.assert_array_equal(outs[0], outs[1])
    np.testing.assert_array_equal(outs[0], outs[2])
    for r in results:
        assert isinstance(r, bctonnx.CompressResult)
        assert isinstance(r.model, onnx.ModelProto)
        assert r.report.output_bytes == r.model.ByteSize()
        assert 2.0 < r.report.ratio < 4.5
        assert [p.name for p in r.report.passes][:2] == ["Canonicalize", "QuantizeWeights"]
        assert r.report.to_dict()["ratio"] == r.report.ratio
    # compress() is compress_model(...).model, as it always returned a ModelProto
    legacy = bctonnx.compress(proto, "w8a8", block_size=16)
    assert isinstance(legacy, onnx.ModelProto)
    np.testing.assert_array_equal(run_onnx(legacy, feeds)["last_hidden_state"], outs[0])


@pytest.fixture
def external_model(tiny_bert_onnx, tmp_path) -> Path:
    """The tiny BERT saved with every tensor in external data (model.onnx + weights.bin)."""
    d = tmp_path / "ext"
    d.mkdir()
    onnx.save(
        onnx.load(str(tiny_bert_onnx)),
        str(d / "model.onnx"),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location="weights.bin",
        size_threshold=0,
    )
    assert (d / "model.onnx").stat().st_size < 100_000
    return d / "model.onnx"


def test_external_data_in_and_out(external_model, tiny_bert_onnx, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # nothing may depend on the working directory
    config = bctonnx.resolve_config("w8a8", block_size=16)
    inline = bctonnx.compress(tiny_bert_onnx, config)
    feeds = tiny_feeds(seq=5)
    want = run_onnx(inline, feeds)["last_hidden_state"]

    # in: external data read from the model's folder; out (in memory): every tensor inline
    result = bctonnx.compress_model(external_model, config)
    assert not [
        t.name
        for t in result.model.graph.initializer
        if t.data_location == onnx.TensorProto.EXTERNAL
    ]
    np.testing.assert_array_equal(run_onnx(result.model, feeds)["last_hidden_state"], want)

    # out to disk with external data on request, and without
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    report = bctonnx.compress_file(external_model, out_dir / "m.onnx", config, external_data=True)
    assert (out_dir / "m.onnx.data").is_file()
    assert (
        report.output_bytes
        == (out_dir / "m.onnx").stat().st_size + (out_dir / "m.onnx.data").stat().st_size
    )
    np.testing.assert_array_equal(run_onnx(out_dir / "m.onnx", feeds)["last_hidden_state"], want)
    bctonnx.compress_file(external_model, out_dir / "inline.onnx", config, external_data=False)
    assert not (out_dir / "inline.onnx.data").exists()
    # the input's data file is copied in, never referenced from the output
    shutil.move(str(external_model.parent), str(tmp_path / "moved"))
    np.testing.assert_array_equal(
        run_onnx(out_dir / "inline.onnx", feeds)["last_hidden_state"], want
    )


def test_a_proto_with_external_data_needs_its_folder(external_model, tiny_bert_onnx):
    proto = onnx.load(str(external_model), load_external_data=False)
    with pytest.raises(BctError, match="base_dir"):
        bctonnx.compress_model(proto, "w8a8", block_size=16)
    result = bctonnx.compress_model(proto, "w8a8", block_size=16, base_dir=external_model.parent)
    feeds = tiny_feeds(seq=5)
    want = run_onnx(bctonnx.compress(tiny_bert_onnx, "w8a8", block_size=16), feeds)
    np.testing.assert_array_equal(
        run_onnx(result.model, feeds)["last_hidden_state"], want["last_hidden_state"]
    )
    assert result.report.input_bytes > 400_000  # external tensors counted


def test_written_files_get_the_usual_mode_not_0600(tiny_bert_onnx, tmp_path):
    """Servers (Triton) often read models as another user: outputs get the mode a plain
    open() would give, not mkstemp's 0600."""
    out = tmp_path / "m.onnx"
    bctonnx.compress_file(tiny_bert_onnx, out, bctonnx.resolve_config("w8a8", block_size=16))
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(out.stat().st_mode) == 0o666 & ~umask
    repo = write_triton_repository(out, tmp_path / "repo", name="m").model_dir
    for path in [repo, *repo.rglob("*")]:
        assert stat.S_IMODE(path.stat().st_mode) & 0o444 == 0o444 & ~umask, path


# --- Triton model repository ---------------------------------------------------------------------


def model_config_message():
    """ModelConfig for protobuf's strict text-format parser: the fields bctonnx writes, with the
    names, numbers and types of Triton's model_config.proto (triton-inference-server/common,
    protobuf/model_config.proto). An unknown field or a wrong type fails the parse."""
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

    F = descriptor_pb2.FieldDescriptorProto
    fd = descriptor_pb2.FileDescriptorProto(name="bct_model_config.proto", package="inference")
    fd.syntax = "proto3"
    dtype = fd.enum_type.add(name="DataType")
    for i, n in enumerate(
        "INVALID BOOL UINT8 UINT16 UINT32 UINT64 INT8 INT16 INT32 INT64 FP16 FP32 FP64 "
        "STRING BF16".split()
    ):
        dtype.value.add(name=f"TYPE_{n}", number=i)

    def message(name, *fields, enums=()):
        m = fd.message_type.add(name=name)
        for enum_name, values in enums:
            e = m.enum_type.add(name=enum_name)
            for i, v in enumerate(values):
                e.value.add(name=v, number=i)
        for fname, number, ftype, label, type_name in fields:
            f = m.field.add(name=fname, number=number, type=ftype, label=label)
            if type_name:
                f.type_name = type_name
        return m

    opt, rep = F.LABEL_OPTIONAL, F.LABEL_REPEATED
    message("ModelTensorReshape", ("shape", 1, F.TYPE_INT64, rep, None))
    io_fields = [
        ("name", 1, F.TYPE_STRING, opt, None),
        ("data_type", 2, F.TYPE_ENUM, opt, ".inference.DataType"),
        ("reshape", 5, F.TYPE_MESSAGE, opt, ".inference.ModelTensorReshape"),
    ]
    message("ModelInput", *io_fields, ("dims", 4, F.TYPE_INT64, rep, None))
    message("ModelOutput", *io_fields, ("dims", 3, F.TYPE_INT64, rep, None))
    message(
        "ModelInstanceGroup",
        ("name", 1, F.TYPE_STRING, opt, None),
        ("count", 2, F.TYPE_INT32, opt, None),
        ("kind", 4, F.TYPE_ENUM, opt, ".inference.ModelInstanceGroup.Kind"),
        enums=[("Kind", ["KIND_AUTO", "KIND_GPU", "KIND_CPU", "KIND_MODEL"])],
    )
    message("ModelDynamicBatching")
    message("ModelOperations", ("op_library_filename", 1, F.TYPE_STRING, rep, None))
    message(
        "ModelConfig",
        ("name", 1, F.TYPE_STRING, opt, None),
        ("platform", 2, F.TYPE_STRING, opt, None),
        ("max_batch_size", 4, F.TYPE_INT32, opt, None),
        ("input", 5, F.TYPE_MESSAGE, rep, ".inference.ModelInput"),
        ("output", 6, F.TYPE_MESSAGE, rep, ".inference.ModelOutput"),
        ("instance_group", 7, F.TYPE_MESSAGE, rep, ".inference.ModelInstanceGroup"),
        ("default_model_filename", 8, F.TYPE_STRING, opt, None),
        ("dynamic_batching", 11, F.TYPE_MESSAGE, opt, ".inference.ModelDynamicBatching"),
        ("backend", 17, F.TYPE_STRING, opt, None),
        ("model_operations", 18, F.TYPE_MESSAGE, opt, ".inference.ModelOperations"),
    )
    pool = descriptor_pool.DescriptorPool()
    pool.Add(fd)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("inference.ModelConfig"))


def parse_with_protobuf(text: str):
    from google.protobuf import text_format

    return text_format.Parse(text, model_config_message()())


def check_repository(repo: Path, name: str, feeds: dict, reference: dict) -> dict:
    """config.pbtxt parses (strict protobuf and our reader agree), names the model's I/O, and
    the model runs in a session set up exactly as the config says, matching ``reference``."""
    text = (repo / name / "config.pbtxt").read_text()
    strict = parse_with_protobuf(text)
    config = parse_pbtxt(text)
    assert strict.name == config["name"][0] == name
    assert strict.platform == "onnxruntime_onnx"
    assert [i.name for i in strict.input] == [i["name"][0] for i in config["input"]]
    session, parsed = load_repository_model(repo, name)  # checks names, types and dims
    assert parsed == config
    got = session.run(None, {i.name: feeds[i.name] for i in session.get_inputs()})
    for out, value in zip(session.get_outputs(), got, strict=True):
        np.testing.assert_array_equal(value, reference[out.name])
    return config


def test_package_writes_a_triton_repository_for_the_onnxruntime_backend(tiny_bert_dir, tmp_path):
    out = tmp_path / "tiny-w8a8"
    config = bctonnx.resolve_config("w8a8", block_size=16, mode="qdq")  # stock onnxruntime
    bctonnx.compress_file(tiny_bert_dir, out, config)
    repo = tmp_path / "repo"
    result = write_triton_repository(out, repo, name="tiny", max_batch_size=4)
    assert (repo / "tiny" / "1" / "model.onnx").read_bytes() == (out / "model.onnx").read_bytes()
    assert result.op_library is None and not (repo / "tiny" / "libbctonnx_ops.so").exists()
    feeds = tiny_feeds(seq=7)
    config = check_repository(repo, "tiny", feeds, run_onnx(out / "model.onnx", feeds))
    assert config["max_batch_size"] == [4]
    by_name = {i["name"][0]: i for i in config["input"] + config["output"]}
    assert by_name["input_ids"]["data_type"] == ["TYPE_INT64"]
    assert by_name["input_ids"]["dims"] == [-1]  # batch axis left out, sequence dynamic
    assert by_name["last_hidden_state"]["data_type"] == ["TYPE_FP32"]
    assert by_name["last_hidden_state"]["dims"] == [-1, 64]
    assert config["instance_group"][0]["kind"] == ["KIND_CPU"]
    assert "model_operations" not in config

    # no batching by Triton: full shapes
    result = write_triton_repository(out, repo, name="tiny0", max_batch_size=0)
    config = check_repository(repo, "tiny0", feeds, run_onnx(out / "model.onnx", feeds))
    assert config["input"][0]["dims"] == [-1, -1] and "dynamic_batching" not in config


def test_package_registers_the_op_library_by_an_absolute_path(tiny_bert_onnx, tmp_path):
    if op_library_path() is None:
        pytest.skip("the op library is not built here")
    config = bctonnx.resolve_config("w8a8", block_size=16)
    integer = integer_ops_available()
    if integer:
        config = bctonnx.resolve_config("w8a8", block_size=16, mode="integer")
    model = tmp_path / "m.onnx"
    bctonnx.compress_file(tiny_bert_onnx, model, config)
    repo = tmp_path / "repo"
    result = write_triton_repository(model, repo, name="m", include_op_library=True)
    lib = repo / "m" / "libbctonnx_ops.so"
    assert lib.read_bytes() == Path(op_library_path()).read_bytes()
    text = (repo / "m" / "config.pbtxt").read_text()
    strict = parse_with_protobuf(text)
    assert list(strict.model_operations.op_library_filename) == [str(lib.resolve())]
    assert result.op_library == str(lib.resolve())
    feeds = tiny_feeds(seq=7)
    if integer:
        want = dict(
            zip(
                ["last_hidden_state"],
                ort.InferenceSession(str(model), bctonnx.session_options()).run(None, feeds),
                strict=True,
            )
        )
        check_repository(repo, "m", feeds, want)
    else:
        check_repository(repo, "m", feeds, run_onnx(model, feeds))
    # where the server mounts the repository (a container's /models)
    write_triton_repository(model, repo, name="m2", include_op_library=True, server_repo="/models")
    strict = parse_with_protobuf((repo / "m2" / "config.pbtxt").read_text())
    assert list(strict.model_operations.op_library_filename) == ["/models/m2/libbctonnx_ops.so"]


def test_package_copies_external_data(external_model, tmp_path):
    bctonnx.compress_file(
        external_model,
        tmp_path / "c.onnx",
        bctonnx.resolve_config("w8a8", block_size=16),
        external_data=True,
    )
    repo = tmp_path / "repo"
    write_triton_repository(tmp_path / "c.onnx", repo, name="c")
    assert (repo / "c" / "1" / "c.onnx.data").is_file()
    feeds = tiny_feeds(seq=4)
    check_repository(repo, "c", feeds, run_onnx(tmp_path / "c.onnx", feeds))


def test_package_cli_and_its_refusals(capsys, tiny_bert_dir, tmp_path):
    out = tmp_path / "c"
    bctonnx.compress_file(tiny_bert_dir, out, bctonnx.resolve_config("w8a8", block_size=16))
    repo = tmp_path / "repo"
    rc, stdout, _ = run_cli(capsys, "package", out, "-o", repo, "--json")
    assert rc == 0
    info = json.loads(stdout)
    assert info["name"] == "c" and (repo / "c" / "config.pbtxt").is_file()
    # the same name again: refused, the first one untouched
    before = (repo / "c" / "config.pbtxt").read_text()
    rc, _, err = run_cli(capsys, "package", out, "-o", repo)
    assert_one_line_error(rc, err, "already exists")
    assert (repo / "c" / "config.pbtxt").read_text() == before
    rc, _, err = run_cli(capsys, "package", out, "-o", repo, "--name", "x", "--server-repo", "m")
    assert_one_line_error(rc, err, "must be absolute")
    assert not (repo / "x").exists()
    rc, _, err = run_cli(capsys, "package", tmp_path / "nope", "-o", repo)
    assert_one_line_error(rc, err, "no such file")
    assert sorted(p.name for p in repo.iterdir()) == ["c"]  # no temporary folder left


def test_parse_pbtxt_reads_the_text_format():
    text = """
    # comment
    name: "m"  max_batch_size: 0
    input [ { name: "a" dims: [ 1, -1 ] reshape: { shape: [ ] } }, { name: "b", dims: 3 } ]
    parameters { key: "k" value: { string_value: "v\\"q" } }
    flag: true
    """
    c = parse_pbtxt(text)
    assert c["name"] == ["m"] and c["max_batch_size"] == [0] and c["flag"] == [True]
    assert c["input"][0]["dims"] == [1, -1] and c["input"][0]["reshape"] == [{"shape": []}]
    assert c["input"][1]["dims"] == [3]
    assert c["parameters"][0]["value"][0]["string_value"] == ['v"q']


# --- inspect --------------------------------------------------------------------------------------


def test_inspect_lists_what_compress_quantizes(capsys, tiny_bert_dir, tmp_path):
    excl = "*layer.1/output/dense/*"
    rc, stdout, _ = run_cli(
        capsys, "inspect", tiny_bert_dir, "--block-size", "16", "--exclude", excl, "--json"
    )
    assert rc == 0
    plan = json.loads(stdout)
    weights = [t for t in plan["tensors"] if t["kind"] == "weight"]
    tables = [t for t in plan["tensors"] if t["kind"] == "embedding"]
    acts = [t for t in plan["tensors"] if t["kind"] == "activation"]
    assert len(weights) == 11 and len(tables) == 3 and len(acts) > 20
    w = next(t for t in weights if t["shape"] == [64, 128])
    assert (w["axis"], w["block_size"], w["num_blocks"], w["bits"]) == (0, 16, 512, 8)
    assert w["bytes_before"] == 64 * 128 * 4 and w["bytes_after"] == 64 * 128 + 512
    word = max(tables, key=lambda t: t["shape"][0])
    assert word["shape"] == [VOCAB_SIZE, 64] and word["axis"] == 1
    assert all(a["scale"] == "fp32 at run time" and a["readers"] for a in acts)
    assert [(n["op_type"], n["reason"]) for n in plan["left_alone"]] == [
        ("MatMul", "excluded (--exclude)")
    ]
    # the estimate leaves out the lowering's own graph: an upper bound of the QDQ form's ratio
    # (activation quantization spelled out in standard nodes), close to the integer form's
    est = plan["expected_ratio"]
    ratio = {
        mode: bctonnx.compress_model(
            tiny_bert_dir, "w8a8", block_size=16, exclude=[excl], mode=mode
        ).report.ratio
        for mode in ("qdq", "integer")
    }
    assert ratio["qdq"] <= est < 1.3 * ratio["qdq"]
    assert 0.9 * ratio["integer"] < est < 1.1 * ratio["integer"]


def test_inspect_text_output_and_bad_input(capsys, tiny_bert_onnx, tmp_path):
    rc, stdout, _ = run_cli(
        capsys, "inspect", tiny_bert_onnx, "--preset", "w4a8", "--block-size", "32"
    )
    assert rc == 0
    assert "weights (12):" in stdout and "expected:" in stdout
    # w4a8 weights: superblocks (the tiny model's K = 64: superblocks of 64, not 384)
    assert "pow2/8 sb64 x m" in stdout
    rc, _, err = run_cli(capsys, "inspect", tiny_bert_onnx, "--block-size", "24")
    assert_one_line_error(rc, err, "does not divide")


# --- validate --report ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def compressed_pair(tiny_bert_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("pair") / "c"
    bctonnx.compress_file(tiny_bert_dir, out, bctonnx.resolve_config("w8a8", block_size=16))
    return tiny_bert_dir / "model.onnx", out / "model.onnx"


@pytest.mark.parametrize("suffix", [".md", ".html"])
def test_validate_writes_a_report_with_a_per_layer_chart(capsys, compressed_pair, tmp_path, suffix):
    ref, cand = compressed_pair
    report = tmp_path / f"report{suffix}"
    rc, stdout, _ = run_cli(capsys, "validate", ref, cand, "--limit", "8", "--report", report)
    assert rc == 0 and "largest relative error" in stdout
    text = report.read_text()
    assert "layer 1 attention" in text and "last_hidden_state" in text
    if suffix == ".md":
        assert "| layer | tensor |" in text
        charts = list(tmp_path.glob("report_layers.*"))
        assert len(charts) == 1 and f"]({charts[0].name})" in text
    else:
        assert text.startswith("<!doctype html>")
        assert "data:image/png;base64," in text or "<svg" in text  # self-contained
        assert not list(tmp_path.glob("report_layers.*"))


def test_report_chart_without_matplotlib_is_an_inline_svg(compressed_pair, tmp_path):
    from bctonnx.report import write_validation_report
    from bctonnx.validate import validate

    v = validate(*compressed_pair, texts=TEXTS, progress=False)
    files = write_validation_report(v, tmp_path / "r.md", use_matplotlib=False)
    assert [f.name for f in files] == ["r.md", "r_layers.svg"]
    svg = (tmp_path / "r_layers.svg").read_text()
    assert svg.startswith("<svg") and svg.count("<rect") == len(v.layers)
    write_validation_report(v, tmp_path / "r.html", use_matplotlib=False)
    assert "<svg" in (tmp_path / "r.html").read_text()


def test_validate_report_with_a_bad_name_is_refused_before_running(
    capsys, compressed_pair, tmp_path
):
    rc, _, err = run_cli(capsys, "validate", *compressed_pair, "--report", tmp_path / "report.txt")
    assert_one_line_error(rc, err, ".md")
    rc, _, err = run_cli(capsys, "validate", *compressed_pair, "--report", tmp_path / "no" / "r.md")
    assert_one_line_error(rc, err, "does not exist")
    assert list(tmp_path.iterdir()) == []


# --- logging flags ------------------------------------------------------------------------------


def test_log_level_flag(tiny_bert_onnx, tmp_path):
    """Warnings (here: a fused op left alone) show by default, not with --log-level error."""
    from test_exporters import fused_model, with_causal_attention

    model = with_causal_attention(
        fused_model(tiny_bert_onnx, tmp_path / "fused.onnx"), tmp_path / "causal.onnx"
    )

    def stderr(*flags):
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "bctonnx.cli",
                *flags,
                "inspect",
                str(model),
                "--block-size",
                "16",
            ],
            capture_output=True,
            text=True,
        )
        assert proc.returncode == 0, proc.stderr
        return proc.stderr

    default = stderr()
    assert "WARNING" in default and "Attention 'Attention_0'" in default
    assert "version_converter" not in default  # third-party chatter stays quiet
    assert "WARNING" not in stderr("--log-level", "error")
    assert "INFO" in stderr("-v")


# --- the C++ sample ---------------------------------------------------------------------------------


def test_cpp_sample_builds_and_matches_python(tiny_bert_onnx, tmp_path):
    """examples/cpp: built with CMake against the onnxruntime of the Python wheel and the C++
    headers the op library's build found; it registers the op library and prints the model's
    first output, which must match onnxruntime in Python."""
    if shutil.which("cmake") is None or shutil.which("c++") is None:
        pytest.skip("needs cmake and a C++ compiler")
    lib = op_library_path()
    if lib is None:
        pytest.skip("the op library is not built here")
    from bctonnx.ops.build_support import find_ort_include_dir

    def no_download(_cache):
        raise RuntimeError("not fetched in tests")

    try:
        include = find_ort_include_dir(fetch=no_download, log=lambda _: None)
    except Exception as exc:  # noqa: BLE001 - no headers: nothing to build against
        pytest.skip(f"no onnxruntime C++ headers: {str(exc).splitlines()[0]}")
    ort_lib = next(Path(ort.__file__).parent.joinpath("capi").glob("libonnxruntime.so*"))
    build = tmp_path / "build"
    subprocess.run(
        [
            "cmake",
            "-S",
            str(REPO_ROOT / "examples" / "cpp"),
            "-B",
            str(build),
            f"-DORT_INCLUDE_DIR={include}",
            f"-DORT_LIBRARY={ort_lib}",
            "-DCMAKE_BUILD_TYPE=Release",
        ],
        check=True,
        capture_output=True,
    )
    subprocess.run(["cmake", "--build", str(build)], check=True, capture_output=True)
    mode = "integer" if integer_ops_available() else "qdq"
    model = tmp_path / "m.onnx"
    bctonnx.compress_file(
        tiny_bert_onnx, model, bctonnx.resolve_config("w8a8", block_size=16, mode=mode)
    )
    ids = [2, 40, 17, 99, 3]
    proc = subprocess.run(
        [str(build / "bct_run"), str(model), lib, *map(str, ids)],
        check=True,
        capture_output=True,
        text=True,
    )
    lines = dict(line.split(": ", 1) for line in proc.stdout.strip().splitlines())
    assert lines["output"].startswith("last_hidden_state")
    values = np.array([float(x) for x in lines["values"].split()], np.float32)
    feeds = {
        "input_ids": np.array([ids], np.int64),
        "attention_mask": np.ones((1, len(ids)), np.int64),
        "token_type_ids": np.zeros((1, len(ids)), np.int64),
    }
    sess = ort.InferenceSession(str(model), bctonnx.session_options())
    want = sess.run(None, feeds)[0].reshape(-1)[: len(values)]
    np.testing.assert_allclose(values, want, rtol=1e-5, atol=1e-5)

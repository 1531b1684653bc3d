"""The Olive pass: README "Olive" run with the real olive-ai (OrtTransformersOptimization then
BCTCompression on all-MiniLM-L6-v2), the pass's config, and the one-line error without the
extra."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import readme_blocks, require_module, run_onnx, scripts_env, tiny_feeds

import bctonnx
from bctonnx.cli import main as cli_main
from bctonnx.config import config_keywords
from bctonnx.errors import BctError
from bctonnx.textio import default_texts, load_tokenizer, make_feeds, mean_pool, read_texts


@pytest.fixture(scope="module")
def readme_workflow(minilm_dir, tmp_path_factory):
    """README "Olive"'s workflow.json and commands, run in a folder where ``minilm-onnx`` is
    the exported MiniLM (what the README's ``bctonnx export`` line makes). Returns the folder
    and the workflow."""
    require_module("olive", "olive")
    blocks = readme_blocks("Olive")
    workflow = json.loads(next(code for lang, code in blocks if lang == "json"))
    bash = next(code for lang, code in blocks if lang == "bash")
    commands = [c for c in bash.splitlines() if c.startswith(("python -m ", "olive run "))]
    assert len(commands) == 2, bash
    work = tmp_path_factory.mktemp("olive")
    (work / "minilm-onnx").symlink_to(minilm_dir, target_is_directory=True)
    (work / "workflow.json").write_text(json.dumps(workflow), encoding="utf-8")
    for command in commands:
        proc = subprocess.run(
            command, shell=True, cwd=work, env=scripts_env(OLIVE_DISABLE_TELEMETRY="1"),
            capture_output=True, text=True, timeout=900,
        )  # fmt: skip
        assert proc.returncode == 0, f"{command}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return work, workflow


def test_readme_workflow_output_is_bctonnx_compress_of_the_optimized_graph(
    readme_workflow, tmp_path
):
    work, workflow = readme_workflow
    out = work / workflow["output_dir"] / "model.onnx"
    assert out.is_file(), f"olive run wrote no model: {sorted(out.parent.iterdir())}"
    # the optimizer ran first: its graph (Olive's footprint names it) has the fused ops
    footprint = json.loads((out.parent / "footprint.json").read_text(encoding="utf-8"))
    by_pass = {n["from_pass"]: n for n in footprint.values() if n["from_pass"]}
    assert set(by_pass) == {"orttransformersoptimization", "bctcompression"}
    optimized = Path(
        by_pass["orttransformersoptimization"]["model_config_data"]["config"]["model_path"]
    )
    fused = {n.op_type for n in onnx.load(optimized, load_external_data=False).graph.node}
    assert {"Attention", "SkipLayerNormalization", "EmbedLayerNormalization"} <= fused
    # the same bytes as `bctonnx compress` of that graph with the same preset
    ref = tmp_path / "ref.onnx"
    assert cli_main(["compress", str(optimized), "-o", str(ref), "--preset", "w8a8"]) == 0
    assert out.read_bytes() == ref.read_bytes()
    # and it runs: the integer form, close to the FP32 export on real sentences
    model = onnx.load(out)
    assert {"BlockMatMul", "BlockAttention", "IntLayerNorm"} <= {
        n.op_type for n in model.graph.node if n.domain == "bctonnx"
    }
    names = [i.name for i in model.graph.input]
    tokenizer = load_tokenizer(work / "minilm-onnx")
    feeds = make_feeds(names, default_texts()[:16], tokenizer, 16, 128)[0]
    got = run_onnx(out, feeds)["last_hidden_state"]
    want = run_onnx(work / "minilm-onnx" / "model.onnx", feeds)["last_hidden_state"]
    pooled = [mean_pool(x, feeds["attention_mask"]) for x in (got, want)]
    cos = (pooled[0] * pooled[1]).sum(-1) / np.linalg.norm(pooled[0], axis=-1)
    cos /= np.linalg.norm(pooled[1], axis=-1)
    assert cos.min() > 0.99


def run_pass(config: dict, model: Path, out: Path) -> onnx.ModelProto:
    """BCTCompression run through Olive's own pass machinery (config class, defaults, run);
    the model it wrote, without the version stamp Olive puts on every model it saves."""
    require_module("olive", "olive")
    from olive import __version__ as olive_version
    from olive.hardware.accelerator import DEFAULT_CPU_ACCELERATOR
    from olive.model import ONNXModelHandler
    from olive.passes.olive_pass import create_pass_from_dict

    from bctonnx.integrations.olive.bct_pass import BCTCompression

    the_pass = create_pass_from_dict(
        BCTCompression, config, disable_search=True, accelerator_spec=DEFAULT_CPU_ACCELERATOR
    )
    result = the_pass.run(ONNXModelHandler(str(model)), str(out))
    got = onnx.load(result.model_path)
    assert [(p.key, p.value) for p in got.metadata_props] == [("olive_version", olive_version)]
    del got.metadata_props[:]
    return got


def test_pass_takes_the_preset_and_every_compression_option_in_both_forms(tiny_bert_onnx, tmp_path):
    """Every resolve_config keyword is a config key; qdq and integer outputs equal
    bctonnx.compress_model's for the same config."""
    require_module("olive", "olive")
    from olive.hardware.accelerator import DEFAULT_CPU_ACCELERATOR

    from bctonnx.integrations.olive.bct_pass import BCTCompression

    keys = set(BCTCompression.default_config(DEFAULT_CPU_ACCELERATOR))
    assert {"preset", *config_keywords(), "target_cosine", "probe_texts"} <= keys
    options = {"block_size": 16, "weight_bits": 4, "exclude": ["*pooler*"], "clip": "mse"}
    for mode in ("qdq", "integer"):
        got = run_pass({"preset": "w8a8", "mode": mode, **options}, tiny_bert_onnx, tmp_path / mode)
        want = bctonnx.compress_model(
            tiny_bert_onnx, bctonnx.resolve_config("w8a8", mode=mode, **options)
        ).model
        assert got.SerializeToString() == want.SerializeToString()
        assert any(o.domain == "bctonnx" for o in got.opset_import) == (mode == "integer")
        feeds = tiny_feeds(seq=9)
        assert np.isfinite(run_onnx(got, feeds)["last_hidden_state"]).all()


def test_pass_target_cosine_is_compress_s_mixed_precision(tiny_bert_dir, tiny_bert_onnx, tmp_path):
    from bctonnx.sensitivity import plan

    texts = tmp_path / "probe.txt"
    texts.write_text("the water was hot\nwhat a day it was\nlook at the sound\n")
    base = {"preset": "w4a8", "block_size": 16, "mode": "qdq"}
    extra = {"target_cosine": 0.999, "probe_texts": str(texts), "tokenizer_dir": str(tiny_bert_dir)}
    got = run_pass({**base, **extra}, tiny_bert_onnx, tmp_path / "mixed")
    config = bctonnx.resolve_config("w4a8", block_size=16, mode="qdq")
    chosen = plan(
        tiny_bert_onnx, config, 0.999, texts=read_texts(texts), tokenizer_dir=tiny_bert_dir
    )
    assert chosen.promoted  # some weights kept at int8: the option did something
    want = bctonnx.compress_model(tiny_bert_onnx, chosen.config).model
    assert got.SerializeToString() == want.SerializeToString()
    plain = bctonnx.compress_model(tiny_bert_onnx, config).model
    assert got.SerializeToString() != plain.SerializeToString()


def test_pass_refuses_a_wrong_option_with_bctonnx_s_message(tiny_bert_onnx, tmp_path):
    with pytest.raises(BctError, match="scale"):
        run_pass({"preset": "w4a8", "scale_kind": "log"}, tiny_bert_onnx, tmp_path / "bad")
    bare = tmp_path / "bare" / "model.onnx"  # a model file with no tokenizer beside it
    bare.parent.mkdir()
    shutil.copy2(tiny_bert_onnx, bare)
    with pytest.raises(BctError, match="tokenizer_dir"):
        run_pass({"target_cosine": 0.99, "probe_texts": __file__}, bare, tmp_path / "bad")
    assert not (tmp_path / "bad").exists() and not (tmp_path / "bad.onnx").exists()


def test_package_config_is_olive_s_own_plus_bct(tmp_path):
    require_module("olive", "olive")
    from olive.package_config import OlivePackageConfig

    from bctonnx.integrations.olive import package_config, write_package_config

    olive_own = OlivePackageConfig.load_default_config()
    path = write_package_config(tmp_path / "bct-olive.json")
    loaded = OlivePackageConfig.parse_file_or_obj(str(path))
    assert set(loaded.passes) == set(olive_own.passes) | {"bctcompression"}
    assert loaded.import_pass_module("BCTCompression").__name__ == "BCTCompression"
    assert json.loads(path.read_text()) == package_config()
    # a directory is refused in one line, nothing written
    code = subprocess.run(
        [sys.executable, "-m", "bctonnx.integrations.olive", "-o", str(tmp_path)],
        capture_output=True, text=True,
    )  # fmt: skip
    assert code.returncode == 2 and code.stderr.count("\n") == 1
    assert code.stderr.startswith("bctonnx: error: ") and "directory" in code.stderr


def test_without_olive_the_error_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "olive", None)  # import olive -> ImportError
    from bctonnx.integrations.olive import package_config

    with pytest.raises(BctError) as err:
        package_config()
    assert str(err.value).count("\n") == 0
    assert "pip install 'bctonnx[olive]'" in str(err.value)

"""The command line: happy paths on the tiny BERT, and bad input: one line, exit 2, no output."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import onnx
import pytest

from bctonnx.cli import main


def run_cli(capsys, *argv):
    rc = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def assert_one_line_error(rc, err, *fragments):
    assert rc == 2
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("bctonnx: error: ")
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0]


@pytest.fixture
def tiny_copy(tiny_bert_dir, tmp_path):
    d = tmp_path / "tiny"
    shutil.copytree(tiny_bert_dir, d)
    return d


def test_compress_file_writes_model_and_reports_ratio(capsys, tiny_copy, tmp_path):
    out = tmp_path / "tiny.bct.onnx"
    rc, stdout, _ = run_cli(
        capsys, "compress", tiny_copy / "model.onnx", "-o", out, "--block-size", "16"
    )
    assert rc == 0
    assert out.is_file()
    assert "compression ratio" in stdout
    assert "mode=integer" in stdout and "bctonnx.session_options()" in stdout  # the default
    rc, stdout, _ = run_cli(
        capsys,
        "compress",
        tiny_copy / "model.onnx",
        "-o",
        out,
        "--block-size",
        "16",
        "--mode",
        "qdq",
    )
    assert rc == 0 and "mode=qdq" in stdout and "session_options" not in stdout


def test_compress_directory_copies_config_and_tokenizer(capsys, tiny_copy, tmp_path):
    out = tmp_path / "outdir"
    rc, _, _ = run_cli(
        capsys, "compress", tiny_copy, "-o", out, "--preset", "w4a8", "--block-size", "16", "--json"
    )
    assert rc == 0
    assert (out / "model.onnx").is_file()
    assert (out / "config.json").is_file()
    assert (out / "tokenizer_config.json").is_file()


def test_compress_json_report_has_ratio_and_passes(capsys, tiny_copy, tmp_path):
    out = tmp_path / "t.onnx"
    rc, stdout, _ = run_cli(
        capsys, "compress", tiny_copy / "model.onnx", "-o", out, "--block-size", "16", "--json"
    )
    assert rc == 0
    report = json.loads(stdout)
    assert report["ratio"] == pytest.approx(report["input_bytes"] / report["output_bytes"])
    assert [p["name"] for p in report["passes"]][0] == "Canonicalize"


@pytest.mark.parametrize(
    "preset, flag, on",
    [
        ("w8a8", None, False),
        ("w8a8", "--match-weight-blocks", True),
        ("w8a8-fast", None, True),
        ("w8a8-fast", "--no-match-weight-blocks", False),
    ],
)
def test_match_weight_blocks_flag_reaches_the_config(capsys, tiny_copy, tmp_path, preset, flag, on):
    out = tmp_path / "t.onnx"
    argv = ["compress", tiny_copy / "model.onnx", "-o", out, "--block-size", "16"]
    argv += ["--weight-block-size", "32", "--preset", preset, "--mode", "integer", "--json"]
    rc, stdout, _ = run_cli(capsys, *argv, *([flag] if flag else []))
    assert rc == 0
    report = json.loads(stdout)
    assert report["config"]["match_weight_blocks"] is on
    ops = {n.op_type for n in onnx.load(out).graph.node}
    assert ("BlockRequantize" in ops) is on


@pytest.mark.parametrize(
    "flags, superblock",
    [
        ([], 384),  # w4a8's own
        (["--superblock", "0"], 0),
        (["--superblock", "64"], 64),
        (["--weight-bits", "8"], 0),  # 8-bit weights cannot widen: the preset's is dropped
        (["--scale-kind", "float"], 0),
    ],
)
def test_superblock_flag_and_overrides_reach_the_config(
    capsys, tiny_copy, tmp_path, flags, superblock
):
    out = tmp_path / "t.onnx"
    argv = ["compress", tiny_copy / "model.onnx", "-o", out, "--preset", "w4a8", "--json"]
    rc, stdout, err = run_cli(capsys, *argv, "--block-size", "16", *flags)
    assert rc == 0, err
    assert json.loads(stdout)["config"]["weights"]["superblock"] == superblock


@pytest.mark.parametrize("block, kept", [(32, 384), (128, 384), (256, 0), (384, 0)])
def test_preset_superblock_is_dropped_where_the_block_size_does_not_fit(block, kept):
    from bctonnx.config import resolve_config

    assert resolve_config("w4a8", weight_block_size=block).weights.superblock == kept


def test_bad_superblock_is_a_one_line_error(capsys, tiny_copy, tmp_path):
    out = tmp_path / "t.onnx"
    argv = ["compress", tiny_copy / "model.onnx", "-o", out, "--preset", "w4a8"]
    rc, _, err = run_cli(capsys, *argv, "--superblock", "48")
    assert_one_line_error(rc, err, "superblock 48")
    assert not out.exists()


def test_validate_prints_outputs_and_layer_table(capsys, tiny_copy, tmp_path):
    out = tmp_path / "t.onnx"
    assert (
        run_cli(capsys, "compress", tiny_copy / "model.onnx", "-o", out, "--block-size", "16")[0]
        == 0
    )
    rc, stdout, _ = run_cli(
        capsys, "validate", tiny_copy / "model.onnx", out, "--tokenizer", tiny_copy, "--json"
    )
    assert rc == 0
    report = json.loads(stdout)
    assert report["num_inputs"] > 0
    assert report["outputs"][0]["cosine"] > 0.95
    assert any(layer["label"].startswith("layer 1") for layer in report["layers"])


def test_not_onnx_is_refused(capsys, tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_text("this is not a model")
    out = tmp_path / "o.onnx"
    rc, _, err = run_cli(capsys, "compress", bad, "-o", out)
    assert_one_line_error(rc, err, "not an ONNX model")
    assert not out.exists()


def test_truncated_file_is_refused(capsys, tiny_copy, tmp_path):
    data = (tiny_copy / "model.onnx").read_bytes()
    bad = tmp_path / "trunc.onnx"
    bad.write_bytes(data[: len(data) // 2])
    out = tmp_path / "o.onnx"
    rc, _, err = run_cli(capsys, "compress", bad, "-o", out)
    assert_one_line_error(rc, err, "trunc.onnx")
    assert not out.exists()


def test_missing_file_is_refused(capsys, tmp_path):
    rc, _, err = run_cli(capsys, "compress", tmp_path / "nope.onnx", "-o", tmp_path / "o.onnx")
    assert_one_line_error(rc, err, "no such file")


def test_empty_file_is_refused(capsys, tmp_path):
    empty = tmp_path / "empty.onnx"
    empty.write_bytes(b"")
    rc, _, err = run_cli(capsys, "compress", empty, "-o", tmp_path / "o.onnx")
    assert_one_line_error(rc, err, "empty")


def test_directory_without_model_is_refused(capsys, tmp_path):
    (tmp_path / "d").mkdir()
    rc, _, err = run_cli(capsys, "compress", tmp_path / "d", "-o", tmp_path / "out")
    assert_one_line_error(rc, err, "no model.onnx")
    assert not (tmp_path / "out").exists()


def test_directory_with_several_onnx_files_and_no_model_onnx_is_refused(
    capsys, tmp_path, tiny_bert_onnx
):
    d = tmp_path / "d"
    d.mkdir()
    for name in ("model_optimized.onnx", "model_quantized.onnx"):
        shutil.copy(tiny_bert_onnx, d / name)
    rc, _, err = run_cli(capsys, "compress", d, "-o", tmp_path / "out")
    assert_one_line_error(rc, err, "model_optimized.onnx, model_quantized.onnx")
    assert not (tmp_path / "out").exists()


def test_output_equal_to_input_is_refused_and_input_untouched(capsys, tiny_copy):
    model = tiny_copy / "model.onnx"
    before = model.read_bytes()
    rc, _, err = run_cli(capsys, "compress", model, "-o", model)
    assert_one_line_error(rc, err, "is the input")
    assert model.read_bytes() == before


def test_block_size_that_does_not_divide_is_refused(capsys, tiny_copy, tmp_path):
    out = tmp_path / "o.onnx"
    rc, _, err = run_cli(
        capsys, "compress", tiny_copy / "model.onnx", "-o", out, "--block-size", "24"
    )
    assert_one_line_error(rc, err, "block size 24 does not divide")
    assert not out.exists()
    assert not list(tmp_path.glob(".o.onnx*"))  # no temporary file left behind


def test_bad_bits_are_refused(capsys, tiny_copy, tmp_path):
    rc, _, err = run_cli(
        capsys,
        "compress",
        tiny_copy / "model.onnx",
        "-o",
        tmp_path / "o.onnx",
        "--weight-bits",
        "9",
    )
    assert_one_line_error(rc, err, "bits")


def test_console_script_error_has_no_traceback(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_text("nope")
    proc = subprocess.run(
        [sys.executable, "-m", "bctonnx.cli", "compress", str(bad), "-o", str(tmp_path / "o.onnx")],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.startswith("bctonnx: error:")


def test_help_lists_the_commands(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for command in ("export", "compress", "validate", "demo"):
        assert command in out


def test_export_of_unsupported_architecture_is_refused(capsys, tmp_path):
    model = tmp_path / "gpt"
    model.mkdir()
    (model / "config.json").write_text('{"model_type": "gpt2"}')
    rc, _, err = run_cli(capsys, "export", model, "-o", tmp_path / "out")
    assert_one_line_error(rc, err, "unsupported architecture 'gpt2'")
    assert not (tmp_path / "out").exists()


def test_export_writes_model_config_and_tokenizer(capsys, tiny_bert_dir, tmp_path):
    hf = tiny_bert_dir.parent / "checkpoint"
    rc, _, _ = run_cli(capsys, "export", hf, "-o", tmp_path / "exp")
    assert rc == 0
    assert (tmp_path / "exp" / "model.onnx").is_file()
    assert (tmp_path / "exp" / "tokenizer_config.json").is_file()

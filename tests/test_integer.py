"""The integer form (mode="integer"): graph shape, and runs on onnxruntime with our library."""

from __future__ import annotations

import logging
import os
from collections import Counter

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import tiny_feeds
from test_passes import cosine

import bctonnx
from bctonnx.runtime import op_library_path

FLOAT_NONLINEAR = {"Gelu", "Erf", "Softmax", "LayerNormalization", "Tanh"}


def require_library() -> str:
    path = op_library_path()
    if path is None:
        if os.environ.get("CI") == "true":
            pytest.fail("the op library is not built (CI must build it with pip install)")
        pytest.skip("the op library is not built here (pip install . builds it)")
    return path


def run_integer(model: onnx.ModelProto, feeds: dict) -> dict[str, np.ndarray]:
    require_library()
    sess = ort.InferenceSession(
        model.SerializeToString(),
        bctonnx.session_options(threads=1),
        providers=["CPUExecutionProvider"],
    )
    names = [i.name for i in sess.get_inputs()]
    outs = sess.run(None, {n: feeds[n] for n in names})
    return {o.name: v for o, v in zip(sess.get_outputs(), outs, strict=True)}


@pytest.fixture(scope="module")
def integer_tiny(tiny_bert_onnx) -> onnx.ModelProto:
    return bctonnx.compress(tiny_bert_onnx, preset="w8a8", block_size=16, mode="integer")


def test_integer_form_has_no_float_gelu_softmax_or_layernorm(integer_tiny):
    ops = Counter((n.domain, n.op_type) for n in integer_tiny.graph.node)
    assert not [op for (domain, op) in ops if domain == "" and op in FLOAT_NONLINEAR]
    assert ops[("bctonnx", "IntGelu")] == 2  # tiny BERT: 2 layers
    assert ops[("bctonnx", "BlockAttention")] == 2  # softmax inside the fused attention
    assert ops[("bctonnx", "IntLayerNorm")] == 5  # embeddings + 2 per layer
    # every activation is quantized by the native op, none by the QDQ dynamic-scale graph
    assert ops[("", "QuantizeLinear")] == 0 and ops[("bctonnx", "BlockQuantize")] > 0
    assert {(o.domain, o.version) for o in integer_tiny.opset_import} == {("", 21), ("bctonnx", 1)}
    assert not [n for n in integer_tiny.graph.node if n.domain == "bctonnx.mid"]


def test_attention_reads_the_projections_as_they_write_them(
    tiny_bert_onnx, integer_tiny, monkeypatch
):
    """fuse_attention's num_heads form and the unexpanded key mask: every BlockAttention reads
    its projections' outputs directly (no Reshape around it, no Expand of the mask), and the
    outputs are bit-identical to the graph without those two rewrites, on a padded batch."""
    import bctonnx.passes.fuse_attention as fuse

    producers = {o: n for n in integer_tiny.graph.node for o in n.output}
    attention = [n for n in integer_tiny.graph.node if n.op_type == "BlockAttention"]
    assert attention
    for node in attention:
        assert {a.name: a.i for a in node.attribute}.get("num_heads") == 4  # tiny BERT's heads
        assert {producers[node.input[i]].op_type for i in range(6)} == {"BlockMatMul"}
    assert not [n for n in integer_tiny.graph.node if n.op_type in ("Expand", "Reshape")]
    monkeypatch.setattr(fuse, "_heads_as_written", lambda *a: False)
    monkeypatch.setattr(fuse, "_unexpand_mask", lambda *a: False)
    plain = bctonnx.compress(tiny_bert_onnx, preset="w8a8", block_size=16, mode="integer")
    kinds = Counter(n.op_type for n in plain.graph.node)
    assert kinds["Expand"] == 1 and kinds["Reshape"] >= 7 * len(attention)
    feeds = tiny_feeds(batch=3, seq=19)
    want, got = run_integer(plain, feeds), run_integer(integer_tiny, feeds)
    for name, value in want.items():
        np.testing.assert_array_equal(got[name], value, err_msg=name)


@pytest.mark.parametrize("preset", ["w8a8", "w4a8"])
def test_embedding_lookups_are_one_library_op_each(tiny_bert_onnx, preset, monkeypatch):
    """lower_gather: each table lookup is one bctonnx.BlockGather (w4a8: packed int4 tables
    with packed zero points) and the outputs are bit-identical to the standard-op lookups
    (Gather, Pow, DequantizeLinear) it replaces, on a padded batch."""
    import bctonnx.passes.lower_gather as lower_gather

    model = bctonnx.compress(tiny_bert_onnx, preset=preset, block_size=16, mode="integer")
    kinds = Counter(n.op_type for n in model.graph.node)
    assert kinds["BlockGather"] == 3 and not kinds["Pow"] and not kinds["DequantizeLinear"]
    gathers = [n for n in model.graph.node if n.op_type == "BlockGather"]
    assert {len(n.input) for n in gathers} == ({3} if preset == "w8a8" else {4})  # zero points
    monkeypatch.setattr(lower_gather, "native_format", lambda *a: False)
    plain = bctonnx.compress(tiny_bert_onnx, preset=preset, block_size=16, mode="integer")
    assert not [n for n in plain.graph.node if n.op_type == "BlockGather"]
    feeds = tiny_feeds(batch=3, seq=19)
    want, got = run_integer(plain, feeds), run_integer(model, feeds)
    for name, value in want.items():
        np.testing.assert_array_equal(got[name], value, err_msg=name)


def test_a_classifier_head_weight_is_dequantized_by_the_library(tiny_cls_dir, monkeypatch):
    """The pooler's and classifier's Gemm weights (blocks along K, the last axis of a transB
    weight): BlockDequantize, not onnxruntime's blocked DequantizeLinear (~0.3 ms a run on
    MiniLM's 384 x 384 pooler, 1 thread); the logits are bit-identical."""
    import bctonnx.passes.lower_dequantize as lower_dequantize

    model = bctonnx.compress(tiny_cls_dir / "model.onnx", "w8a8", block_size=16, mode="integer")
    assert not [n for n in model.graph.node if n.op_type == "DequantizeLinear"]
    gemm_weights = {n.input[1] for n in model.graph.node if n.op_type == "Gemm"}
    producers = {o: n.op_type for n in model.graph.node for o in n.output}
    assert gemm_weights and {producers[w] for w in gemm_weights} == {"BlockDequantize"}
    original = lower_dequantize._int8_blocked
    monkeypatch.setattr(  # as before: blocks on axis -1 only
        lower_dequantize,
        "_int8_blocked",
        lambda dq: original(dq) if dq.attributes["axis"].as_int() == -1 else None,
    )
    plain = bctonnx.compress(tiny_cls_dir / "model.onnx", "w8a8", block_size=16, mode="integer")
    assert [n for n in plain.graph.node if n.op_type == "DequantizeLinear"]
    feeds = tiny_feeds(batch=3, seq=19)
    np.testing.assert_array_equal(
        run_integer(model, feeds)["logits"], run_integer(plain, feeds)["logits"]
    )


def test_integer_form_runs_with_the_library_close_to_fp32(integer_tiny, fp32_reference):
    for seq in (7, 19):  # 19: a partial last block of 16 on the sequence axis
        out = run_integer(integer_tiny, tiny_feeds(seq=seq))["last_hidden_state"]
        assert out.shape == fp32_reference(seq).shape
        assert cosine(out, fp32_reference(seq)) > 0.98


def test_integer_form_needs_the_library_and_says_so(integer_tiny, monkeypatch, tmp_path):
    from bctonnx import runtime
    from bctonnx.errors import BctError

    monkeypatch.setattr(runtime, "op_library_path", lambda: None)
    path = tmp_path / "int.onnx"
    onnx.save(integer_tiny, path)
    with pytest.raises(BctError, match="op library"):
        runtime.make_session(path)


def test_integer_form_leaves_an_unrecognised_softmax_float_with_a_warning(tiny_bert_onnx, caplog):
    import onnx_ir as ir
    from bctonnx.passes.pipeline import run_pipeline

    from bctonnx.config import resolve_config
    from bctonnx.modelio import load_model

    model, _ = load_model(tiny_bert_onnx)
    softmax = next(n for n in model.graph if n.op_type == "Softmax")
    softmax.attributes["axis"] = ir.AttrInt64("axis", 1)  # not the last axis any more
    with caplog.at_level(logging.WARNING):
        run_pipeline(model, resolve_config("w8a8", block_size=16, mode="integer"))
    assert any(
        softmax.name in r.getMessage() and "stays float" in r.getMessage() for r in caplog.records
    )
    ops = Counter(n.op_type for n in model.graph)
    assert ops["Softmax"] == 1 and ops["BlockAttention"] == 1


def test_integer_mode_needs_quantized_activations(tiny_bert_onnx):
    with pytest.raises(ValueError, match="activations"):
        bctonnx.compress(tiny_bert_onnx, preset="w8a8", mode="integer", no_activations=True)


def test_no_matmul_mixes_a_per_tensor_and_a_blocked_dequantize(integer_tiny):
    """onnxruntime 1.31 fuses DQ(per-tensor) + DQ(blocked) -> MatMul into MatMulIntegerToFloat,
    ignoring block_size (wrong results or a broadcast error): our graphs must never offer it."""
    producers = {o: n for n in integer_tiny.graph.node for o in n.output}

    def dq_kind(name):
        n = producers.get(name)
        if n is None or n.op_type != "DequantizeLinear":
            return None
        return "blocked" if any(a.name == "block_size" for a in n.attribute) else "per-tensor"

    for node in integer_tiny.graph.node:
        if node.op_type == "MatMul":
            kinds = {dq_kind(i) for i in node.input}
            assert kinds != {"blocked", "per-tensor"}, node.name

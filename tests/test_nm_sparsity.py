"""N:M sparsity: the storage format (bctonnx/blockformat.py), the BlockMatMul kernel's
expansion of it at load (bit-exact with ref_matmul), its QDQ form in standard ops, and the
SparseGPT-style reconstruction (bctonnx/refit.py)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from test_matmul import W4, W4SB, W8, activations, matmul_model, run
from test_matmul import isas as isas  # a fixture

import bctonnx
from bctonnx.blockformat import (
    BlockFormat,
    nm_compress,
    nm_expand,
    nm_keep_mask,
    nm_patterns,
    quantize,
)
from bctonnx.ops.ref_matmul import block_matmul
from bctonnx.refit import sparsegpt_nm

NM_FORMATS = [
    replace(W8, nm_n=2, nm_m=4),
    replace(W4, nm_n=2, nm_m=4),
    replace(W4SB, nm_n=4, nm_m=8),
    BlockFormat(bits=4, block_size=32, axis=1, symmetric=False, nm_n=2, nm_m=4),
]


def _groups_nonzero(x: np.ndarray, axis: int, m: int) -> np.ndarray:
    x = np.moveaxis(x, axis, 0)
    return (x.reshape(x.shape[0] // m, m, -1) != 0).sum(axis=1)


@pytest.mark.parametrize("fmt", NM_FORMATS, ids=lambda f: f.describe())
def test_nm_storage_round_trips_and_saves_bytes(fmt):
    rng = np.random.default_rng(0)
    shape = (256, 24) if fmt.axis % 2 == 0 else (24, 256)
    x = rng.standard_normal(shape).astype(np.float32)
    q = quantize(x, fmt)
    n, m = fmt.nm
    # at most N nonzero values per group of M along the axis, real zeros elsewhere
    assert _groups_nonzero(q.dequantize(), q.axis, m).max() <= n
    kept, pattern = nm_compress(q)
    assert kept.shape[q.axis] == shape[q.axis] * n // m
    assert pattern.shape[q.axis] == shape[q.axis] // m
    assert pattern.max() < len(nm_patterns(n, m))
    np.testing.assert_array_equal(nm_expand(kept, pattern, q.fmt, q.zero_points), q.codes)
    dense = replace(q.fmt, nm_n=0, nm_m=0)
    # kept codes + one pattern per group (4 bits for 2:4's six, a byte for 4:8's seventy)
    codes = x.size * n // m // (2 if fmt.packed else 1)
    assert fmt.code_storage_bytes(x.size) == codes + x.size // m // (2 if n == 2 else 1)
    assert q.nbytes < quantize(x, dense).nbytes
    assert q.nbytes == fmt.bytes_for(shape)


def test_nm_keeps_the_largest_magnitudes_and_the_patterns_are_lexicographic():
    x = np.array([[0.1], [-3.0], [2.0], [0.5]], np.float32)
    fmt = BlockFormat(bits=8, block_size=4, axis=0, nm_n=2, nm_m=4)
    np.testing.assert_array_equal(nm_keep_mask(x, fmt)[:, 0], [False, True, True, False])
    assert nm_patterns(2, 4).tolist() == [[0, 1], [0, 2], [0, 3], [1, 2], [1, 3], [2, 3]]
    kept, pattern = nm_compress(quantize(x, fmt))
    assert pattern.tolist() == [[3]]  # positions (1, 2)
    assert kept[:, 0].tolist() == [-127, 85]


def test_nm_format_rejects_what_it_cannot_store():
    with pytest.raises(ValueError, match="M = 4 must divide the block size 6"):
        BlockFormat(bits=8, block_size=6, nm_n=2, nm_m=4)
    with pytest.raises(ValueError, match="0 < N < M <= 8"):
        BlockFormat(bits=8, block_size=32, nm_n=4, nm_m=4)
    q = quantize(np.ones((8, 2), np.float32), BlockFormat(bits=8, block_size=8, axis=0))
    with pytest.raises(ValueError, match="needs an N:M format"):
        nm_compress(q)
    dense_q = replace(q, fmt=replace(q.fmt, nm_n=2, nm_m=4))
    with pytest.raises(ValueError, match="more than 2 nonzero"):
        nm_compress(dense_q)


def _nm_model(w, act_block: int, bias: np.ndarray) -> onnx.ModelProto:
    """matmul_model's BlockMatMul with the weight codes stored as N:M kept codes + patterns."""
    model = matmul_model(w, 2, x_int8=False, act_block=act_block, bias=bias, out_block=16)
    kept, pattern = nm_compress(w)
    graph = model.graph
    codes = next(t for t in graph.initializer if t.name == "w_codes")
    dtype = TensorProto.INT4 if w.fmt.packed else TensorProto.INT8
    codes.CopyFrom(
        helper.make_tensor("w_codes", dtype, list(kept.shape), kept.reshape(-1).tolist())
    )
    ptype = TensorProto.UINT4 if w.fmt.pattern_bits() == 4 else TensorProto.INT8
    graph.initializer.append(
        helper.make_tensor("w_nm", ptype, list(pattern.shape), pattern.reshape(-1).tolist())
    )
    node = graph.node[0]
    inputs = list(node.input) + [""] * (11 - len(node.input)) + ["w_nm"]
    del node.input[:]
    node.input.extend(inputs)
    node.attribute.extend(
        [helper.make_attribute("nm_n", w.fmt.nm_n), helper.make_attribute("nm_m", w.fmt.nm_m)]
    )
    return model


@pytest.mark.parametrize("fmt", NM_FORMATS[:3], ids=lambda f: f.describe())
def test_block_matmul_expands_nm_weights_bit_exact(fmt, isas, monkeypatch):  # noqa: F811
    k, n, act_block = 256, 24, 32
    rng = np.random.default_rng(3)
    w = quantize(rng.standard_normal((k, n)).astype(np.float32) * 0.05, fmt.with_axis(0))
    bias = rng.standard_normal(n).astype(np.float32)
    x = activations((5, k))
    kept, pattern = nm_compress(w)
    common = dict(
        block_size=fmt.block_size, frac_bits=fmt.frac_bits, act_block_size=act_block,
        w_zero_points=w.zero_points, bias=bias, out_block_size=16,
        w_multipliers=w.multipliers, superblock=w.fmt.superblock,
    )  # fmt: skip
    ref = block_matmul(x, kept, w.scale_codes, w_nm_pattern=pattern, nm_n=fmt.nm_n,
                       nm_m=fmt.nm_m, **common)  # fmt: skip
    dense = block_matmul(x, w.codes, w.scale_codes, **common)
    np.testing.assert_array_equal(ref["y"], dense["y"])  # the reference expands first
    model = _nm_model(w, act_block, bias)
    for isa in isas:
        out = run(model, monkeypatch, isa, {"x": x})
        np.testing.assert_array_equal(out["y"], ref["y"], err_msg=isa)
        np.testing.assert_array_equal(out["y_q"], ref["y_q"], err_msg=isa)


def test_block_matmul_refuses_bad_nm_patterns(monkeypatch):
    fmt = NM_FORMATS[0].with_axis(0)
    w = quantize(np.random.default_rng(0).standard_normal((128, 8)).astype(np.float32), fmt)
    model = _nm_model(w, 32, np.zeros(8, np.float32))
    bad = next(t for t in model.graph.initializer if t.name == "w_nm")
    values = [15] * (32 * 8)  # uint4 15: no such 2:4 pattern (there are six)
    bad.CopyFrom(helper.make_tensor("w_nm", TensorProto.UINT4, [32, 8], values))
    with pytest.raises(Exception, match="N:M pattern index 15 out of range"):
        run(model, monkeypatch, "scalar", {"x": activations((1, 128))})


def test_sparsegpt_reconstruction_beats_magnitude_pruning():
    rng = np.random.default_rng(0)
    k, d, t = 64, 16, 4000
    mix = rng.standard_normal((k, k)) * 0.3 + np.eye(k)
    x = rng.standard_normal((t, k)) @ mix  # correlated inputs: reconstruction has room
    w = rng.standard_normal((k, d))
    b = rng.standard_normal(d)
    a = np.concatenate([x, np.ones((t, 1))], 1)
    g = a.T @ a
    w2, b2 = sparsegpt_nm(w, b, g, 2, 4)
    assert _groups_nonzero(w2, 0, 4).max() <= 2
    y = x @ w + b
    err = ((x @ w2 + b2 - y) ** 2).sum()
    mask = nm_keep_mask(w, BlockFormat(bits=8, block_size=4, axis=0, nm_n=2, nm_m=4))
    err_magnitude = ((x @ np.where(mask, w, 0) + b - y) ** 2).sum()
    assert err < 0.75 * err_magnitude


def test_nm_model_runs_in_both_forms_and_is_smaller(tiny_bert_dir, fp32_reference):
    from conftest import run_onnx, tiny_feeds

    plain = bctonnx.compress_model(tiny_bert_dir, "w8a8", block_size=16)
    for mode in ("integer", "qdq"):
        result = bctonnx.compress_model(tiny_bert_dir, "w8a8", block_size=16, mode=mode,
                                        sparsity="2:4")  # fmt: skip
        out = run_onnx(result.model, tiny_feeds())["last_hidden_state"]
        ref = fp32_reference()
        cos = (out * ref).sum(-1) / np.linalg.norm(out, axis=-1) / np.linalg.norm(ref, axis=-1)
        assert cos.mean() > 0.97, mode
        kinds = {r["kind"] for r in result.report.pruning}
        assert kinds == {"nm"} and result.report.calibration_tokens > 0
        if mode == "integer":
            assert result.report.output_bytes < 0.85 * plain.report.output_bytes
            ops = {n.op_type for n in result.model.graph.node}
            assert "BlockMatMul" in ops and "ScatterElements" not in ops
        else:
            assert "ScatterElements" in {n.op_type for n in result.model.graph.node}

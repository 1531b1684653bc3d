"""TokenCodes and NearestSlot (bctonnx/ops/ref_tokens.py): the reference gives what token
dropping's standard-op chains give on real hidden states, the kernels are bit-exact with the
reference on every instruction-set path, malformed inputs are refused, and the integer model
with the ops (TokenOpsFromChains) gives the same bits as without them."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from bctonnx.passes import token_drop
from onnx import TensorProto, helper
from test_integer import require_library
from test_matmul import available_isas, session
from test_token_drop import minilm_feeds, with_outputs

import bctonnx
from bctonnx.ops.ref_tokens import nearest_slot, token_codes


def ops_model() -> onnx.ModelProto:
    """TokenCodes (all three outputs) feeding NearestSlot."""
    nodes = [
        helper.make_node("TokenCodes", ["x"], ["codes", "norm", "offset"], domain="bctonnx"),
        helper.make_node(
            "NearestSlot", ["codes", "norm", "index", "valid"], ["slot"], domain="bctonnx"
        ),
    ]
    graph = helper.make_graph(
        nodes,
        "token_ops",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, None),
            helper.make_tensor_value_info("index", TensorProto.INT64, None),
            helper.make_tensor_value_info("valid", TensorProto.BOOL, None),
        ],
        [
            helper.make_tensor_value_info(name, dtype, None)
            for name, dtype in (
                ("codes", TensorProto.INT8),
                ("norm", TensorProto.FLOAT),
                ("offset", TensorProto.UINT8),
                ("slot", TensorProto.INT64),
            )
        ],
    )
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("bctonnx", 1)]
    return helper.make_model(graph, opset_imports=opsets, ir_version=9)


def reference(x, index, valid):
    codes, norm, offset = token_codes(x)
    return codes, norm, offset, nearest_slot(codes, norm, index, valid)


SHAPES = [(2, 7, 5, 3), (3, 33, 64, 17), (1, 130, 384, 64), (2, 5, 1040, 5), (1, 3, 65, 1)]


@pytest.mark.parametrize("isa", ["", "avx512", "avx2", "scalar"])
def test_kernels_equal_the_reference(isa, monkeypatch):
    """Odd shapes (H not a multiple of 4 / 16 / 64, T not of 16), scales from 1e-3 to 1e3,
    a zero row, a row with a NaN, repeated values (ties), invalid slots; on every path the CPU
    has (AVX-512 + VNNI, else the portable one)."""
    if isa and isa not in available_isas():
        pytest.skip(f"this CPU has no {isa} path")
    sess = session(ops_model(), monkeypatch, isa)
    rng = np.random.default_rng(0)
    for b, s, h, t in SHAPES:
        x = (rng.standard_normal((b, s, h)) * 10.0 ** rng.uniform(-3, 3, (b, s, 1))).astype(
            np.float32
        )
        x[0, 0] = 0
        x[0, 1, 0] = np.nan
        x[-1, -1] = x[-1, 0]  # a token equal to another: equal cosines
        index = rng.integers(0, s, (b, t))
        valid = rng.random((b, t)) < 0.8
        got = sess.run(None, {"x": x, "index": index, "valid": valid})
        want = reference(x, index, valid)
        for name, a, r in zip(("codes", "norm", "offset", "slot"), got, want, strict=True):
            assert a.dtype == r.dtype and np.array_equal(a, r), (isa, (b, s, h, t), name)


@pytest.mark.parametrize(
    "x, index, valid, fragment",
    [
        ((2, 3), (1, 1), (1, 1), "TokenCodes: hidden must be \\[B, S, H\\]"),
        ((1, 3, 1041), (1, 1), (1, 1), "H in 1..1040"),
        ((1, 3, 0), (1, 1), (1, 1), "H in 1..1040"),
        ((1, 3, 8), (1, 0), (1, 0), "no slots"),
        ((2, 3, 8), (1, 2), (1, 2), "index and valid must both be \\[B, T\\]"),
        ((1, 3, 8), (1, 2), (1, 3), "index and valid must both be \\[B, T\\]"),
        ((1, 3, 8), "out", (1, 2), "index 3 is out of range 0..2"),
        ((1, 3, 8), "negative", (1, 2), "index -1 is out of range"),
    ],
)
def test_malformed_inputs_are_refused(x, index, valid, fragment, monkeypatch):
    sess = session(ops_model(), monkeypatch)
    if index == "out":
        index = np.array([[0, 3]], np.int64)
    elif index == "negative":
        index = np.array([[-1, 0]], np.int64)
    else:
        index = np.zeros(index, np.int64)
    feeds = {"x": np.ones(x, np.float32), "index": index, "valid": np.ones(valid, bool)}
    with pytest.raises(Exception, match=fragment):
        sess.run(None, feeds)


def test_norm_shape_is_checked(monkeypatch):
    node = helper.make_node("NearestSlot", ["c", "n", "i", "v"], ["slot"], domain="bctonnx")
    graph = helper.make_graph(
        [node],
        "nearest",
        [
            helper.make_tensor_value_info("c", TensorProto.INT8, None),
            helper.make_tensor_value_info("n", TensorProto.FLOAT, None),
            helper.make_tensor_value_info("i", TensorProto.INT64, None),
            helper.make_tensor_value_info("v", TensorProto.BOOL, None),
        ],
        [helper.make_tensor_value_info("slot", TensorProto.INT64, None)],
    )
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("bctonnx", 1)]
    sess = session(helper.make_model(graph, opset_imports=opsets, ir_version=9), monkeypatch)
    feeds = {
        "c": np.zeros((1, 3, 8), np.int8),
        "n": np.zeros((1, 4), np.float32),
        "i": np.zeros((1, 2), np.int64),
        "v": np.ones((1, 2), bool),
    }
    with pytest.raises(Exception, match="norm must be \\[B, S\\]"):
        sess.run(None, feeds)


# --- in the compressed model --------------------------------------------------------------------


@pytest.fixture(scope="module")
def integer_pair(minilm_dir):
    """all-MiniLM-L6-v2 w8a8 integer with keep 0.5, ranking by redundancy (the codes feed the
    scores too) and by attention: (with the token ops, without them) per score."""
    require_library()
    pairs = {}
    for score in ("auto", "attention"):
        with_ops = bctonnx.compress(minilm_dir, "w8a8", token_keep="0.5", token_score=score)
        with pytest.MonkeyPatch.context() as patch:  # the pipeline without the lowering
            patch.setattr(token_drop.TokenOpsFromChains, "call", _unchanged)
            chains = bctonnx.compress(minilm_dir, "w8a8", token_keep="0.5", token_score=score)
        pairs[score] = (with_ops, chains)
    return pairs


def _unchanged(self, model):
    return token_drop.ir.passes.PassResult(model, modified=False)


def _ops(proto: onnx.ModelProto, domain: str, op_type: str) -> list[onnx.NodeProto]:
    return [n for n in proto.graph.node if n.domain == domain and n.op_type == op_type]


def test_reference_equals_the_standard_op_chains_on_real_hidden_states(
    integer_pair, minilm_dir, monkeypatch
):
    """The chains' own tensors in the model without the ops (named as the ops' outputs, which
    take their names over) against the reference on the hidden state they read."""
    feeds = minilm_feeds(minilm_dir)
    for score, (with_ops, chains) in integer_pair.items():
        codes_node = _ops(with_ops, "bctonnx", "TokenCodes")[0]
        nearest_node = _ops(with_ops, "bctonnx", "NearestSlot")[0]
        names = [codes_node.input[0], *codes_node.output[:2], *nearest_node.input[2:]]
        names.append(nearest_node.output[0])
        got = session(with_outputs(chains, *names), monkeypatch, threads=1).run(names, feeds)
        hidden, codes, norm, index, valid, slot = got
        assert hidden.shape[-1] == 384 and index.shape[1] < hidden.shape[1]
        ref_codes, ref_norm, _ = token_codes(hidden)
        assert np.array_equal(codes, ref_codes) and np.array_equal(norm, ref_norm), score
        assert np.array_equal(slot, nearest_slot(codes, norm, index, valid)), score


def test_integer_model_with_the_ops_gives_the_same_bits(integer_pair, minilm_dir, monkeypatch):
    """Same last_hidden_state, kept tokens and merge targets with and without the ops, at 1
    and 2 threads, on the default path and the portable one; the lowering leaves no chain."""
    feeds = minilm_feeds(minilm_dir)
    for score, (with_ops, chains) in integer_pair.items():
        assert len(_ops(with_ops, "bctonnx", "TokenCodes")) == 1
        assert len(_ops(with_ops, "bctonnx", "NearestSlot")) == 1
        assert not _ops(with_ops, "", "ReduceSumSquare") and not _ops(with_ops, "", "ArgMax")
        nearest = _ops(with_ops, "bctonnx", "NearestSlot")[0].output[0]
        names = ["last_hidden_state", "token_drop/keep@3", "token_drop/kept@3", nearest]
        want = session(with_outputs(chains, *names), monkeypatch, threads=1).run(names, feeds)
        for isa, threads in (("", 1), ("", 2), ("scalar", 2)):
            sess = session(with_outputs(with_ops, *names), monkeypatch, isa, threads)
            for name, a, b in zip(names, sess.run(names, feeds), want, strict=True):
                assert np.array_equal(a, b), (score, isa, threads, name)

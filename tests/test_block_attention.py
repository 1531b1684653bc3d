"""BlockAttention: the fused attention op (scores, their quantization, IntSoftmax and P.V in one
kernel) is bit-exact with its numpy reference (ref_attention.block_attention) on every
instruction-set path and thread count, equals the three separate ops when the mask keeps every
key, and gives a sequence the same output alone as in a padded batch."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from test_matmul import available_isas, session

from bctonnx.ops.ref_attention import attention_pv, block_attention
from bctonnx.ops.ref_matmul import block_batch_matmul
from bctonnx.ops.ref_nonlinear import int_softmax
from bctonnx.ops.ref_quant import block_quantize

BLOCK = 32


def attention_model(
    with_mask: bool = True,
    with_mul: bool = True,
    with_bias: bool = False,
    with_rows: bool = False,
    **attrs,
) -> onnx.ModelProto:
    """One BlockAttention node; ``with_rows`` also asks for its ``received`` output."""
    names = ["q", "qs", "k", "ks", "v", "vs"]
    types = [TensorProto.INT8, TensorProto.FLOAT] * 3
    inputs = list(names)
    for flag, name, kind in (
        (with_mask, "mask", TensorProto.FLOAT),
        (with_mul, "mul", TensorProto.FLOAT),
        (with_bias, "bias", TensorProto.FLOAT),
        (with_rows, "rows", TensorProto.UINT8),
    ):
        inputs.append(name if flag else "")
        if flag:
            names.append(name)
            types.append(kind)
    while not inputs[-1]:
        inputs.pop()
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)]
    if with_rows:
        outputs.append(helper.make_tensor_value_info("received", TensorProto.INT32, None))
    node = helper.make_node(
        "BlockAttention",
        inputs,
        [o.name for o in outputs],
        domain="bctonnx",
        **{"block_size": BLOCK, **attrs},
    )
    graph = helper.make_graph(
        [node],
        "block_attention",
        [helper.make_tensor_value_info(n, t, None) for n, t in zip(names, types, strict=True)],
        outputs,
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("bctonnx", 1)]
    )
    model.ir_version = 10
    return model


def operands(b: int, s: int, h: int, d: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Q, K, V codes and scales [b, S, h, d] (token-major), from floats with outliers."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for name, amp in (("q", 1.0), ("k", 1.5), ("v", 0.7)):
        x = rng.standard_normal((b, s, h, d)).astype(np.float32) * amp
        x[..., 3] *= 12  # an outlier channel
        x[:, ::7] *= 30  # and some loud tokens (V segments with mixed exponents)
        codes, scales = block_quantize(x, BLOCK)
        feeds[name], feeds[name + "s"] = codes, scales
    return feeds


def padding_mask(lengths: list[int], s: int) -> np.ndarray:
    """BERT's additive mask [b, 1, 1, S]: 0 for the tokens of each sequence, -3.4e38 after."""
    m = np.zeros((len(lengths), 1, 1, s), np.float32)
    for i, n in enumerate(lengths):
        m[i, ..., n:] = np.finfo(np.float32).min
    return m


def reference(feeds: dict, mask=None, mul=None, bias=None, rows=None, **attrs):
    return block_attention(
        feeds["q"], feeds["qs"], feeds["k"], feeds["ks"], feeds["v"], feeds["vs"], mask, mul,
        bias, rows, block_size=BLOCK, **attrs,
    )  # fmt: skip


@pytest.mark.parametrize(
    "b, s, h, d, lengths",
    [(2, 40, 3, 32, [40, 17]), (3, 64, 2, 64, [64, 33, 1]), (1, 7, 1, 32, [7])],
    ids=["s40", "s64-d64", "s7"],
)
def test_block_attention_is_bit_exact_on_every_isa(b, s, h, d, lengths, monkeypatch):
    feeds = operands(b, s, h, d)
    feeds["mask"] = padding_mask(lengths, s)
    feeds["mul"] = np.array(0.4204482, np.float32)
    ref = reference(feeds, feeds["mask"], feeds["mul"])
    model = attention_model()
    for isa in available_isas():
        for threads in (1, 2):
            out = session(model, monkeypatch, isa, threads).run(None, feeds)[0]
            np.testing.assert_array_equal(out, ref, err_msg=f"{isa} {threads} threads")


@pytest.mark.parametrize("score_block", [16, 48, 64, 128, 4096, 24, 7])
def test_every_score_block_size_is_bit_exact_on_every_isa(score_block, monkeypatch):
    """The softmax step's kernels per ISA (AVX-512 and AVX2 for multiples of 16, whole or split
    32-element steps; the portable one otherwise) on rows that end inside a score block."""
    feeds = operands(2, 70, 2, 32, seed=3)
    feeds["mask"] = padding_mask([70, 37], 70)
    ref = reference(feeds, feeds["mask"], score_block_size=score_block)
    model = attention_model(with_mul=False, score_block_size=score_block)
    for isa in available_isas():
        out = session(model, monkeypatch, isa).run(None, feeds)[0]
        np.testing.assert_array_equal(out, ref, err_msg=isa)


@pytest.mark.parametrize(
    "d, block, s", [(64, 4, 45), (64, 16, 33), (128, 64, 70), (256, 32, 17), (96, 48, 96)]
)
def test_the_fused_scores_take_every_block_and_head_width(d, block, s, monkeypatch):
    """The AVX-512 scores kernel (attention/scores.cc: Q.K^T, the multiplier, key bias, dropped
    keys and the scores' quantization in registers) on block sizes and head widths beside the
    presets' 32 / 32 and 64 / 32, rows and keys that end inside a 4 x 32 tile: the reference's
    result on every ISA (the general path below AVX-512)."""
    rng = np.random.default_rng(d + block + s)
    feeds = {}
    for name, amp in (("q", 1.0), ("k", 1.5), ("v", 0.7)):
        x = rng.standard_normal((2, s, 2, d)).astype(np.float32) * amp
        x[:, ::5] *= 40  # loud tokens: several exponents per row
        feeds[name], feeds[name + "s"] = block_quantize(x, block)
    feeds["mask"] = padding_mask([s, s // 2 + 1], s)
    feeds["mul"] = np.array(0.3535534, np.float32)
    feeds["bias"] = np.log(rng.uniform(0.5, 3.0, (2, 1, 1, s))).astype(np.float32)
    ref = block_attention(
        feeds["q"], feeds["qs"], feeds["k"], feeds["ks"], feeds["v"], feeds["vs"],
        feeds["mask"], feeds["mul"], feeds["bias"], None, block_size=block,
    )  # fmt: skip
    model = attention_model(with_bias=True, block_size=block)
    for isa in available_isas():
        out = session(model, monkeypatch, isa).run(None, feeds)[0]
        np.testing.assert_array_equal(out, ref, err_msg=isa)


@pytest.mark.parametrize("which", ["q", "k", "v"])
def test_an_operand_may_come_heads_first(which, monkeypatch):
    """[b, h, S, d] instead of token-major (dynamo exports leave K so): the same result."""
    feeds = operands(2, 24, 3, 32, seed=13)
    mask = padding_mask([24, 10], 24)
    ref = reference(feeds, mask)
    moved = dict(feeds, mask=mask)
    for key in (which, which + "s"):
        moved[key] = np.ascontiguousarray(feeds[key].transpose(0, 2, 1, 3))
    model = attention_model(with_mul=False, **{f"{which}_heads_first": 1})
    out = session(model, monkeypatch).run(None, moved)[0]
    np.testing.assert_array_equal(out, ref)
    again = {k: v for k, v in moved.items() if k != "mask"}
    np.testing.assert_array_equal(reference(again, mask, **{f"{which}_heads_first": True}), ref)


@pytest.mark.parametrize("h, d, dv", [(3, 32, 32), (2, 64, 96), (12, 32, 32)])
def test_heads_may_come_as_the_projections_write_them(h, d, dv, monkeypatch):
    """num_heads = h: q, k, v [b, S, h * d] and scales [b, S, h * d / B] (the bytes of the
    rank-4 operands), y [b, S, h * dv]: the rank-4 result, on every ISA, with token dropping's
    key bias and received output too."""
    feeds = token_drop_feeds(2, 40, h, [40, 23], seed=17) if d == dv else operands(2, 40, h, d)
    if d != dv:
        v_feeds = operands(2, 40, h, dv, seed=5)
        feeds["v"], feeds["vs"] = v_feeds["v"], v_feeds["vs"]
        feeds["mask"] = padding_mask([40, 23], 40)
    extra = {k: feeds[k] for k in ("bias", "rows") if k in feeds}
    want = reference(
        {k: feeds[k] for k in ("q", "qs", "k", "ks", "v", "vs")}, feeds["mask"], **extra
    )
    want_y = want[0] if isinstance(want, tuple) else want
    flat = dict(feeds)
    for key in ("q", "qs", "k", "ks", "v", "vs"):
        flat[key] = feeds[key].reshape(2, 40, -1)
    got = reference(
        {k: flat[k] for k in ("q", "qs", "k", "ks", "v", "vs")}, flat["mask"], num_heads=h,
        **extra,
    )  # fmt: skip
    got_y = got[0] if isinstance(got, tuple) else got
    np.testing.assert_array_equal(got_y, want_y.reshape(2, 40, h * dv))
    model = attention_model(
        with_mul=False, with_bias="bias" in extra, with_rows="rows" in extra, num_heads=h
    )
    for isa in available_isas():
        out = session(model, monkeypatch, isa).run(None, flat)
        np.testing.assert_array_equal(out[0], got_y, err_msg=isa)
        if "rows" in extra:
            np.testing.assert_array_equal(out[1], want[1], err_msg=isa)


def test_the_num_heads_form_refuses_operands_it_cannot_split(monkeypatch):
    feeds = operands(2, 8, 2, 32)
    flat = {k: v.reshape(2, 8, -1) for k, v in feeds.items()}
    flat["mask"] = padding_mask([8, 5], 8)
    with pytest.raises(Exception, match="must be \\[b, S, h \\* w\\]"):
        session(attention_model(with_mul=False, num_heads=3), monkeypatch).run(None, flat)
    with pytest.raises(ValueError, match="must be \\[b, S, h \\* w\\]"):
        reference({k: v for k, v in flat.items() if k != "mask"}, flat["mask"], num_heads=3)
    with pytest.raises(Exception, match="token-major operands only"):
        session(attention_model(with_mul=False, num_heads=2, k_heads_first=1), monkeypatch)
    four = dict(feeds, mask=flat["mask"])  # rank-4 operands given to the num_heads form
    with pytest.raises(Exception, match="must be \\[b, S, h \\* w\\]"):
        session(attention_model(with_mul=False, num_heads=2), monkeypatch).run(None, four)


def test_an_expanded_mask_is_its_key_mask(monkeypatch):
    """Exports expand BERT's [b, 1, 1, S] mask to [b, 1, S, S]: the same keys are kept."""
    feeds = operands(2, 24, 2, 32, seed=11)
    mask = padding_mask([24, 9], 24)
    feeds["mask"] = np.ascontiguousarray(np.broadcast_to(mask, (2, 1, 24, 24)))
    out = session(attention_model(with_mul=False), monkeypatch).run(None, feeds)[0]
    np.testing.assert_array_equal(out, reference(feeds, mask))


def test_without_a_mask_it_is_the_three_separate_ops():
    """No key dropped: BlockBatchMatMul -> BlockQuantize -> IntSoftmax -> AttentionPV."""
    feeds = operands(2, 48, 2, 32, seed=3)
    mul = np.float32(0.5)
    scores = block_batch_matmul(
        feeds["q"], feeds["qs"], feeds["k"], feeds["ks"], block_size=BLOCK, y_multiplier=mul,
        a_transposed=True, b_transposed=True, out_block_size=32,
    )  # fmt: skip
    p = int_softmax(scores["y_q"], scores["y_scale"], 32)
    pv = attention_pv(
        p, feeds["v"], feeds["vs"], block_size=BLOCK, transpose_output=True, v_transposed=True
    )
    np.testing.assert_array_equal(reference(feeds, None, mul), pv)
    keep_all = np.zeros((2, 1, 1, 48), np.float32)
    np.testing.assert_array_equal(reference(feeds, keep_all, mul), pv)


def test_a_sequence_gets_the_same_output_alone_and_padded_in_a_batch(monkeypatch):
    """The keys the mask drops take no part: the first sequence's rows are bit-identical
    whether it runs alone (19 tokens) or padded to 64 beside a longer one, whatever the padded
    positions hold."""
    s, h, d, n = 64, 2, 32, 19
    batch = operands(2, s, h, d, seed=5)
    rng = np.random.default_rng(9)
    for name in ("k", "v"):  # loud garbage in the padding: it must not matter
        batch[name][0, n:] = rng.integers(-127, 128, batch[name][0, n:].shape, dtype=np.int8)
        batch[name + "s"][0, n:] = np.float32(2.0**10)
    batch["mask"] = padding_mask([n, s], s)
    alone = {k: v[:1, :n] for k, v in batch.items() if k != "mask"}
    alone["mask"] = padding_mask([n], n)
    model = attention_model(with_mul=False)
    for isa in available_isas():
        y_batch = session(model, monkeypatch, isa).run(None, batch)[0]
        y_alone = session(model, monkeypatch, isa).run(None, alone)[0]
        np.testing.assert_array_equal(y_batch[0, :n], y_alone[0], err_msg=isa)
    ref_batch = reference({k: v for k, v in batch.items() if k != "mask"}, batch["mask"])
    ref_alone = reference(alone, alone["mask"])
    np.testing.assert_array_equal(ref_batch[0, :n], ref_alone[0])
    # without the padding's exclusion (the separate ops) the two would differ: the test can fail
    loose = attention_pv(
        int_softmax(*block_quantize(
            block_batch_matmul(batch["q"], batch["qs"], batch["k"], batch["ks"], block_size=BLOCK,
                               a_transposed=True, b_transposed=True)["y"], 32), 32, batch["mask"]),
        batch["v"], batch["vs"], block_size=BLOCK, transpose_output=True, v_transposed=True,
    )  # fmt: skip
    assert not np.array_equal(loose[0, :n], ref_alone[0])


def test_the_reference_is_close_to_float_attention():
    feeds = operands(1, 32, 2, 32, seed=7)
    deq = {n: feeds[n].astype(np.float64) * np.repeat(feeds[n + "s"], BLOCK, -1) for n in "qkv"}
    scores = np.einsum("bshd,bthd->bhst", deq["q"], deq["k"])
    p = np.exp(scores - scores.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    exact = np.einsum("bhst,bthd->bshd", p, deq["v"])
    got = reference(feeds)
    assert np.abs(got - exact).max() < 0.02 * np.abs(exact).max()


def token_drop_feeds(b, s, h, lengths, seed=0) -> dict[str, np.ndarray]:
    """Operands with what token dropping adds: a padding mask, log weights of merged tokens as
    the key bias (0 for padding), and the real tokens as the query rows."""
    feeds = operands(b, s, h, BLOCK, seed=seed)
    rng = np.random.default_rng(seed + 1)
    feeds["mask"] = padding_mask(lengths, s)
    weights = rng.integers(1, 6, (b, 1, 1, s))
    feeds["bias"] = np.where(feeds["mask"] == 0, np.log(weights), 0).astype(np.float32)
    feeds["rows"] = (feeds["mask"] == 0).astype(np.uint8)
    return feeds


def token_drop_reference(feeds: dict, **attrs):
    return reference(
        {k: feeds[k] for k in ("q", "qs", "k", "ks", "v", "vs")},
        feeds.get("mask"), feeds.get("mul"), feeds.get("bias"), feeds.get("rows"), **attrs,
    )  # fmt: skip


@pytest.mark.parametrize(
    "b, s, lengths", [(2, 40, [40, 17]), (3, 70, [70, 33, 1])], ids=["s40", "s70"]
)
def test_key_bias_and_received_are_bit_exact_on_every_isa(b, s, lengths, monkeypatch):
    """Token dropping's inputs (log weights as a key bias, the real tokens as query rows) and
    the attention each key received (int32 sums of the probability codes over heads and rows)
    equal the reference on every instruction-set path and thread count; the received sums are
    the probability codes' own sums (the separate ops' P, read back)."""
    feeds = token_drop_feeds(b, s, 3, lengths, seed=21)
    feeds["mul"] = np.array(0.4204482, np.float32)
    y_ref, received_ref = token_drop_reference(feeds)
    assert received_ref.dtype == np.int32 and received_ref.shape == (b, s)
    # received by hand: P of the reference's own steps, summed over heads and real query rows
    scores = block_batch_matmul(
        feeds["q"], feeds["qs"], feeds["k"], feeds["ks"], block_size=BLOCK,
        y_multiplier=feeds["mul"], a_transposed=True, b_transposed=True,
    )["y"] + feeds["bias"]  # fmt: skip
    scores = np.where(feeds["mask"] == 0, scores, np.float32(0)).astype(np.float32)
    p = int_softmax(*block_quantize(scores, 32), 32, feeds["mask"]).astype(np.int64)
    by_hand = np.einsum("br,bhrc->bc", feeds["rows"][:, 0, 0].astype(np.int64), p)
    np.testing.assert_array_equal(received_ref, by_hand)
    assert not np.array_equal(y_ref, reference(feeds, feeds["mask"], feeds["mul"]))  # bias acts
    model = attention_model(with_bias=True, with_rows=True)
    for isa in available_isas():
        for threads in (1, 2):
            y, received = session(model, monkeypatch, isa, threads).run(None, feeds)
            np.testing.assert_array_equal(y, y_ref, err_msg=f"{isa} {threads} threads")
            np.testing.assert_array_equal(received, received_ref, err_msg=f"{isa} {threads}")
    # without the received output requested, rows are read for nothing: y is the same
    y_only = attention_model(with_bias=True)
    out = session(y_only, monkeypatch).run(None, {k: v for k, v in feeds.items() if k != "rows"})
    np.testing.assert_array_equal(out[0], y_ref)


def test_received_is_the_same_alone_and_in_a_padded_batch(monkeypatch):
    """A sequence's received sums and output do not depend on its batch's padding."""
    s, n = 64, 23
    batch = token_drop_feeds(2, s, 2, [n, s], seed=4)
    batch["k"][0, n:] = 77  # garbage in the padding
    alone = {k: v[:1, ..., :n] if k in ("mask", "bias", "rows") else v[:1, :n]
             for k, v in batch.items()}  # fmt: skip
    model = attention_model(with_mul=False, with_bias=True, with_rows=True)
    for isa in available_isas():
        y_b, r_b = session(model, monkeypatch, isa).run(None, batch)
        y_a, r_a = session(model, monkeypatch, isa).run(None, alone)
        np.testing.assert_array_equal(y_b[0, :n], y_a[0], err_msg=isa)
        np.testing.assert_array_equal(r_b[0, :n], r_a[0], err_msg=isa)
        assert not r_b[0, n:].any()  # padding keys receive nothing


def test_received_needs_rows_and_a_key_bias_one_per_key(monkeypatch):
    feeds = token_drop_feeds(2, 8, 1, [8, 5])
    no_rows = attention_model(with_mul=False, with_bias=True, with_rows=True)
    del no_rows.graph.node[0].input[9]
    no_rows.graph.input.pop()
    with pytest.raises(Exception, match="needs the rows input"):  # when the session is created
        session(no_rows, monkeypatch)
    bad = dict(feeds, bias=np.zeros((2, 1, 8, 8), np.float32))
    sess = session(attention_model(with_mul=False, with_bias=True, with_rows=True), monkeypatch)
    with pytest.raises(Exception, match="one value per key"):
        sess.run(None, bad)
    with pytest.raises(ValueError, match="not one per key"):
        token_drop_reference(bad)


@pytest.mark.parametrize(
    "mask, message",
    [
        (np.zeros((2, 2, 1, 8), np.float32), "key mask"),  # one per head
        (np.triu(np.full((8, 8), -1e9, np.float32), 1)[None, None], "differs"),  # causal
        (np.full((2, 1, 1, 8), -1.0, np.float32), "0 or < -1000"),
    ],
)
def test_masks_it_cannot_honour_are_refused(mask, message, monkeypatch):
    feeds = operands(2, 8, 1, 32)
    feeds["mask"] = mask
    sess = session(attention_model(with_mul=False), monkeypatch)
    with pytest.raises(Exception, match=message):
        sess.run(None, feeds)
    with pytest.raises(ValueError, match=message):
        reference({k: v for k, v in feeds.items() if k != "mask"}, mask)


@pytest.mark.parametrize(
    "attrs, message",
    [
        ({"segment": 3}, "segment"),
        ({"p_exponent": 5}, "p_exponent"),
        ({"block_size": 0}, "block_size"),
    ],
)
def test_bad_attributes_are_refused_at_session_creation(attrs, message, monkeypatch):
    with pytest.raises(Exception, match=message):
        session(attention_model(**attrs), monkeypatch)

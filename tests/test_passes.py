"""Each pass on the tiny exported BERT, the lowering on one-node graphs, and the pipeline."""

from __future__ import annotations

from collections import Counter
from dataclasses import replace

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from bctonnx.passes import (
    Canonicalize,
    LowerQDQ,
    PassError,
    QuantizeActivations,
    QuantizeEmbeddings,
    QuantizeWeights,
)
from bctonnx.passes.common import MID_DOMAIN, const_array, fmt_attrs, fmt_from_node, role
from bctonnx.passes.pipeline import build_pipeline
from bctonnx.passes.simplify_shapes import SHAPE_PRESERVING
from conftest import HIDDEN, NUM_LAYERS, run_onnx, tiny_feeds

import bctonnx
from bctonnx.blockformat import BlockFormat, dequantize, fake_quantize, quantize
from bctonnx.config import resolve_config
from bctonnx.errors import BctError
from bctonnx.modelio import load_model

L = NUM_LAYERS
W8 = BlockFormat(bits=8, block_size=16)
E8 = BlockFormat(bits=8, block_size=16)
A8 = BlockFormat(bits=8, block_size=32)
STANDARD_DOMAINS = ("", "ai.onnx")


# --- helpers -----------------------------------------------------------------------------------


def run_passes(path, *passes) -> ir.Model:
    """Load the model and run the passes in order, sorting after each like the pipeline."""
    model, _ = load_model(path)
    for p in passes:
        p(model)
        model.graph.sort()
    return model


def all_passes(act: BlockFormat = A8):
    return [Canonicalize(), QuantizeWeights(W8), QuantizeEmbeddings(E8), QuantizeActivations(act)]


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def producer_op(value: ir.Value | None) -> tuple[str, str] | None:
    node = value.producer() if value is not None else None
    return None if node is None else (node.domain, node.op_type)


def is_fake_quant(node: ir.Node | None) -> bool:
    return node is not None and node.domain == MID_DOMAIN and node.op_type == "BlockFakeQuant"


def fake_quant_above(value: ir.Value) -> ir.Node | None:
    """The BlockFakeQuant a value comes from, through layout ops and scalings by constants."""
    for _ in range(4):
        node = value.producer()
        if node is None:
            return None
        if is_fake_quant(node):
            return node
        if node.op_type in ("Transpose", "Reshape", "Cast"):
            value = node.inputs[0]
        elif node.op_type in ("Mul", "Div") and node.inputs[1].producer() is None:
            value = node.inputs[0]  # scaling by a folded constant / initializer
        elif node.op_type in ("Mul", "Div") and node.inputs[1].shape == ir.Shape([1]):
            value = node.inputs[0]  # SDPA export: scaling by sqrt(1/sqrt(d)), shape [1]
        else:
            return None
    return None


def read_only_by_fake_quant(value: ir.Value) -> bool:
    uses = value.uses()
    return len(uses) == 1 and is_fake_quant(uses[0][0])


def graph_output_names(model: ir.Model | onnx.ModelProto) -> list[str]:
    if isinstance(model, onnx.ModelProto):
        return [o.name for o in model.graph.output]
    return [o.name for o in model.graph.outputs]


# --- the fixture itself ------------------------------------------------------------------------


def test_tiny_bert_export_has_model_config_and_tokenizer(tiny_bert_dir, fp32_reference):
    from transformers import AutoConfig, AutoTokenizer

    config = AutoConfig.from_pretrained(tiny_bert_dir)
    assert (config.hidden_size, config.num_hidden_layers) == (HIDDEN, NUM_LAYERS)
    tokenizer = AutoTokenizer.from_pretrained(tiny_bert_dir)
    ids = tokenizer("the water is hot")["input_ids"]
    assert ids[0] == tokenizer.cls_token_id and ids[-1] == tokenizer.sep_token_id
    assert tokenizer.unk_token_id not in ids
    out = fp32_reference(7)
    assert out.shape == (2, 7, HIDDEN) and np.all(np.isfinite(out))


# --- canonicalize --------------------------------------------------------------------------------


def test_canonicalize_sets_opset_21_and_ir_version_10(tiny_bert_onnx):
    assert onnx.load(str(tiny_bert_onnx)).opset_import[0].version != 21  # the export is older
    model = run_passes(tiny_bert_onnx, Canonicalize())
    assert model.opset_imports[""] == 21
    assert model.graph.opset_imports[""] == 21
    assert model.ir_version == 10


def test_canonicalize_fuses_erf_gelu_into_gelu(tiny_bert_onnx):
    assert any(n.op_type == "Erf" for n in onnx.load(str(tiny_bert_onnx)).graph.node)
    ops = Counter(n.op_type for n in run_passes(tiny_bert_onnx, Canonicalize()).graph)
    assert ops["Gelu"] == L
    assert ops["Erf"] == 0


def test_canonicalize_has_one_layernormalization_per_sublayer_plus_embeddings(tiny_bert_onnx):
    ops = Counter(n.op_type for n in run_passes(tiny_bert_onnx, Canonicalize()).graph)
    assert ops["LayerNormalization"] == 2 * L + 1
    assert ops["ReduceMean"] == 0


@pytest.mark.parametrize(
    ("role_name", "count"),
    [
        ("linear", 6 * L),
        ("attention.qk", L),
        ("attention.pv", L),
        ("attention.mask", L),
        ("embedding", 3),  # word, position and token-type tables
        ("softmax", L),
        ("gelu", L),
        ("layernorm", 2 * L + 1),
        ("residual", 2 * L + 2),  # two per layer + word+type and +position in the embeddings
    ],
)
def test_canonicalize_tags_each_role_the_expected_number_of_times(tiny_bert_onnx, role_name, count):
    roles = Counter(role(n) for n in run_passes(tiny_bert_onnx, Canonicalize()).graph)
    assert roles[role_name] == count


def test_linear_roles_are_q_k_v_o_ffn1_ffn2_of_every_layer(tiny_bert_onnx):
    model = run_passes(tiny_bert_onnx, Canonicalize())
    linear = [n for n in model.graph if role(n) == "linear"]
    parts = {
        "attention/self/query": (HIDDEN, HIDDEN),
        "attention/self/key": (HIDDEN, HIDDEN),
        "attention/self/value": (HIDDEN, HIDDEN),
        "attention/output/dense": (HIDDEN, HIDDEN),
        "intermediate/dense": (HIDDEN, 128),
        "layer.{i}/output/dense": (128, HIDDEN),
    }
    found = set()
    for node in linear:
        weight = const_array(node.inputs[1])
        assert node.op_type == "MatMul"
        for i in range(L):
            for part, shape in parts.items():
                key = part.format(i=i)
                if f"layer.{i}/" in node.name and f"{key}/" in node.name:
                    assert weight.shape == shape, node.name
                    found.add((i, part))
    assert len(found) == 6 * L


def test_attention_roles_sit_before_and_after_the_softmax(tiny_bert_onnx):
    model = run_passes(tiny_bert_onnx, Canonicalize())
    for node in model.graph:
        if role(node) == "attention.pv":
            assert node.inputs[0].producer().op_type == "Softmax"
        if role(node) == "attention.qk":
            (mask_add, _), *rest = node.outputs[0].uses()
            assert not rest and role(mask_add) == "attention.mask"
            assert mask_add.outputs[0].uses()[0][0].op_type == "Softmax"
        if role(node) == "embedding":
            table = const_array(node.inputs[0])
            assert table is not None and table.ndim == 2 and table.shape[1] == HIDDEN


def test_canonicalized_model_computes_what_the_export_computes(tiny_bert_onnx, fp32_reference):
    model = run_passes(tiny_bert_onnx, Canonicalize())
    proto = ir.serde.serialize_model(model)
    onnx.checker.check_model(proto)
    out = run_onnx(proto, tiny_feeds(seq=7))["last_hidden_state"]
    np.testing.assert_allclose(out, fp32_reference(7), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(("split", "collapsed"), [((2, 3), True), ((3, 2), False)])
def test_canonicalize_collapses_the_dynamo_exporters_flattened_transpose(split, collapsed):
    """Reshape([a, b, c, d] -> [a*b, c, d]), Transpose(0, 2, 1), Reshape(-> [a, b, d, c]) is
    Transpose(0, 1, 3, 2) (the dynamo exporter's K^T); split the other way round it is not."""
    from bctonnx.passes.canonicalize import collapse_flattened_transposes, infer_shapes

    h = onnx.helper
    nodes = [
        h.make_node("Reshape", ["x", "s3"], ["m"]),
        h.make_node("Transpose", ["m"], ["t"], perm=[0, 2, 1]),
        h.make_node("Reshape", ["t", "s4"], ["y"]),
    ]
    inits = [
        onnx.numpy_helper.from_array(np.array([6, 5, 7], np.int64), "s3"),
        onnx.numpy_helper.from_array(np.array([*split, 7, 5], np.int64), "s4"),
    ]
    graph = h.make_graph(
        nodes,
        "g",
        [h.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 3, 5, 7])],
        [h.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)],
        inits,
    )
    proto = h.make_model(graph, opset_imports=[h.make_opsetid("", 21)], ir_version=10)
    model = ir.serde.deserialize_model(proto)
    infer_shapes(model)
    assert collapse_flattened_transposes(model.graph) == int(collapsed)
    ir.passes.common.RemoveUnusedNodesPass()(model)
    ops = [n.op_type for n in model.graph]
    assert ops == (["Transpose"] if collapsed else ["Reshape", "Transpose", "Reshape"])
    x = {"x": np.random.default_rng(0).standard_normal((2, 3, 5, 7)).astype(np.float32)}
    got = run_onnx(ir.serde.serialize_model(model), x)["y"]
    np.testing.assert_array_equal(got, run_onnx(proto, x)["y"])


# --- quantize_weights --------------------------------------------------------------------------


def test_quantize_weights_feeds_every_linear_from_a_block_dequantize_of_its_weight(tiny_bert_onnx):
    model = run_passes(tiny_bert_onnx, Canonicalize())
    originals = {n.name: const_array(n.inputs[1]) for n in model.graph if role(n) == "linear"}
    QuantizeWeights(W8)(model)
    model.graph.sort()
    linear = [n for n in model.graph if role(n) == "linear"]
    assert len(linear) == 6 * L == len(originals)
    for node in linear:
        dq = node.inputs[1].producer()
        assert dq is not None and (dq.domain, dq.op_type) == (MID_DOMAIN, "BlockDequantize")
        fmt = fmt_from_node(dq)
        assert (fmt.bits, fmt.block_size, fmt.axis) == (8, 16, 0)
        codes, scales = const_array(dq.inputs[0]), const_array(dq.inputs[1])
        assert codes.dtype == np.int8 and codes.shape == originals[node.name].shape
        assert scales.shape == (codes.shape[0] // 16, codes.shape[1])
        expected = fake_quantize(originals[node.name], W8.with_axis(0))
        np.testing.assert_array_equal(dequantize(codes, scales, fmt), expected)
        assert node.inputs[1].shape == ir.Shape(codes.shape)


def test_quantize_weights_blocks_along_the_reduction_axis(tiny_bert_onnx):
    model = run_passes(tiny_bert_onnx, Canonicalize(), QuantizeWeights(W8))
    for node in model.graph:
        if role(node) == "linear":
            dq = node.inputs[1].producer()
            k = const_array(dq.inputs[0]).shape[0]
            assert node.inputs[0].shape[-1] == k  # x[..., K] @ W[K, N]
            assert fmt_from_node(dq).axis == 0


def test_quantize_weights_with_a_block_that_does_not_divide_k_names_the_weight(tiny_bert_onnx):
    model = run_passes(tiny_bert_onnx, Canonicalize())
    with pytest.raises(PassError, match=r"block size 48 .*reduction axis \(64\).*16, 32, 64"):
        QuantizeWeights(BlockFormat(bits=8, block_size=48))(model)


def test_quantize_weights_skips_excluded_nodes(tiny_bert_onnx):
    model = run_passes(tiny_bert_onnx, Canonicalize(), QuantizeWeights(W8, exclude=["*query*"]))
    for node in model.graph:
        if role(node) == "linear":
            from_dq = producer_op(node.inputs[1]) == (MID_DOMAIN, "BlockDequantize")
            assert from_dq != ("query" in node.name), node.name


# --- quantize_embeddings -----------------------------------------------------------------------


def test_quantize_embeddings_replaces_every_table_gather_by_a_block_gather(tiny_bert_onnx):
    model = run_passes(tiny_bert_onnx, Canonicalize())
    gathers = {
        n.outputs[0].name: const_array(n.inputs[0]) for n in model.graph if role(n) == "embedding"
    }
    assert len(gathers) == 3
    QuantizeEmbeddings(E8)(model)
    model.graph.sort()
    float_table_gathers = [
        n
        for n in model.graph
        if n.op_type == "Gather"
        and n.domain in STANDARD_DOMAINS
        and const_array(n.inputs[0]) is not None
        and const_array(n.inputs[0]).dtype == np.float32
    ]
    assert float_table_gathers == []
    block_gathers = [n for n in model.graph if (n.domain, n.op_type) == (MID_DOMAIN, "BlockGather")]
    assert len(block_gathers) == 3
    for node in block_gathers:
        name = node.outputs[0].name  # the Gather's output name lives on
        assert name in gathers
        fmt = fmt_from_node(node)
        assert (fmt.bits, fmt.block_size, fmt.axis) == (8, 16, 1)
        codes, scales = const_array(node.inputs[0]), const_array(node.inputs[1])
        assert codes.shape == gathers[name].shape
        expected = fake_quantize(gathers[name], E8.with_axis(1))
        np.testing.assert_array_equal(dequantize(codes, scales, fmt), expected)
        assert node.inputs[2].dtype == ir.DataType.INT64  # the ids, still a graph value
        assert len(node.outputs[0].uses()) >= 1


def test_quantize_embeddings_fits_a_maximum_block_to_the_hidden_size(tiny_bert_onnx):
    # presets give the embeddings a maximum block (w8a8: 384); a table whose hidden size it
    # does not divide gets their gcd: 48 on the tiny model's 64 -> blocks of 16
    e48 = replace(E8, block_size=48)
    with pytest.raises(PassError, match=r"block size 48 does not divide the hidden size \(64\)"):
        QuantizeEmbeddings(e48)(run_passes(tiny_bert_onnx, Canonicalize()))
    model = run_passes(tiny_bert_onnx, Canonicalize(), QuantizeEmbeddings(e48, fit_block=True))
    plain16 = run_passes(tiny_bert_onnx, Canonicalize(), QuantizeEmbeddings(E8))  # blocks of 16
    gathers = [n for n in model.graph if n.op_type == "BlockGather"]
    assert len(gathers) == 3
    reference = [n for n in plain16.graph if n.op_type == "BlockGather"]
    for node, same in zip(gathers, reference, strict=True):
        assert (
            fmt_from_node(node).block_size == 16 == HIDDEN // const_array(node.inputs[1]).shape[1]
        )
        np.testing.assert_array_equal(const_array(node.inputs[0]), const_array(same.inputs[0]))
        np.testing.assert_array_equal(const_array(node.inputs[1]), const_array(same.inputs[1]))
    # a block that divides is kept (32 on 64, not cut to a smaller divisor)
    e32 = replace(E8, block_size=32)
    model = run_passes(tiny_bert_onnx, Canonicalize(), QuantizeEmbeddings(e32, fit_block=True))
    assert {fmt_from_node(n).block_size for n in model.graph if n.op_type == "BlockGather"} == {32}


def test_w8a8_preset_fits_its_embedding_block_but_an_explicit_one_must_divide(tiny_bert_onnx):
    config = resolve_config("w8a8", weight_block_size=16)  # the tiny model's K is 64
    assert config.fit_embedding_blocks and config.embeddings.block_size == 384
    assert not resolve_config("w8a8", embedding_block_size=384).fit_embedding_blocks
    assert not resolve_config("w8a8", block_size=32).fit_embedding_blocks
    # the description says the 384 is a maximum (the table here gets 64)
    assert "embeddings=int8 b<=384 " in config.describe()
    assert "embeddings=int8 b384 " in resolve_config("w8a8", embedding_block_size=384).describe()
    # Canonicalize, QuantizeWeights, QuantizeEmbeddings: 384 on hidden 64 -> blocks of 64
    model = run_passes(tiny_bert_onnx, *build_pipeline(config)[:3])
    blocks = [fmt_from_node(n).block_size for n in model.graph if n.op_type == "BlockGather"]
    assert blocks == [64, 64, 64]
    with pytest.raises(BctError, match="block size 384 does not divide the hidden size"):
        bctonnx.compress(
            tiny_bert_onnx, preset="w8a8", weight_block_size=16, embedding_block_size=384
        )


# --- quantize_activations ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def activation_model(tiny_bert_onnx) -> ir.Model:
    """Canonicalized, weights/embeddings quantized, activations fake-quantized (read only)."""
    return run_passes(tiny_bert_onnx, *all_passes())


def test_quantize_activations_inserts_one_fake_quant_per_quantized_tensor(activation_model):
    fqs = [n for n in activation_model.graph if is_fake_quant(n)]
    # embeddings: word, type, word+type, position, sum (= LN input), LN output            -> 6
    # per layer: Q, K^T, V, scores, probs, context, attn-out, sum, LN, ffn1, gelu, ffn2,
    #            sum, LN (the LN outputs feed the next layer)                                 -> 14
    assert len(fqs) == 6 + 14 * L
    for node in fqs:
        fmt = fmt_from_node(node)
        assert (fmt.bits, fmt.block_size, fmt.axis) == (8, 32, -1)
        assert not is_fake_quant(node.inputs[0].producer()), "quantized twice"
        assert len(node.inputs[0].uses()) == 1, "a tensor read both raw and quantized"


def test_every_attention_matmul_input_is_quantized(activation_model):
    attention = [n for n in activation_model.graph if role(n) in ("attention.qk", "attention.pv")]
    assert len(attention) == 2 * L
    for node in attention:
        for value in node.inputs[:2]:
            assert fake_quant_above(value) is not None, (node.name, value.name)


def test_every_linear_activation_input_is_quantized(activation_model):
    linear = [n for n in activation_model.graph if role(n) == "linear"]
    assert len(linear) == 6 * L
    for node in linear:
        assert is_fake_quant(node.inputs[0].producer()), node.name


@pytest.mark.parametrize("op_role", ["layernorm", "gelu", "softmax"])
def test_layernorm_gelu_softmax_inputs_and_outputs_are_quantized(activation_model, op_role):
    nodes = [n for n in activation_model.graph if role(n) == op_role]
    assert nodes
    for node in nodes:
        assert read_only_by_fake_quant(node.outputs[0]), node.name
        source = node.inputs[0].producer()
        if op_role == "softmax" and role(source) == "attention.mask":
            # the huge negative mask stays in float: the scores before the mask are quantized
            assert any(fake_quant_above(v) for v in source.inputs), node.name
        else:
            assert is_fake_quant(source), node.name


def test_residual_adds_read_quantized_inputs(activation_model):
    residual = [n for n in activation_model.graph if role(n) == "residual"]
    assert len(residual) == 2 * L + 2
    for node in residual:
        assert all(is_fake_quant(v.producer()) for v in node.inputs), node.name
        assert read_only_by_fake_quant(node.outputs[0]), node.name


def test_quantize_activations_keeps_graph_input_and_output_names(tiny_bert_onnx, activation_model):
    original = onnx.load(str(tiny_bert_onnx))
    assert graph_output_names(activation_model) == [o.name for o in original.graph.output]
    assert [i.name for i in activation_model.graph.inputs] == [i.name for i in original.graph.input]
    # the name now sits on the quantized tensor
    assert is_fake_quant(activation_model.graph.outputs[0].producer())


def test_attention_key_is_blocked_along_the_reduction_axis(activation_model):
    for node in activation_model.graph:
        if role(node) != "attention.qk":
            continue
        reduction = node.inputs[0].shape[-1]  # Q[..., s, d] @ K^T[..., d, s]: d
        assert isinstance(reduction, int)
        for value in node.inputs[:2]:
            fq = fake_quant_above(value)
            assert fq.inputs[0].shape[-1] == reduction, (node.name, fq.inputs[0].shape)


# --- lower_qdq on the tiny model -----------------------------------------------------------------


@pytest.fixture(scope="module")
def lowered_model(tiny_bert_onnx) -> ir.Model:
    return run_passes(tiny_bert_onnx, *all_passes(), LowerQDQ())


def test_lower_qdq_leaves_only_standard_onnx_ops(lowered_model):
    domains = {n.domain for n in lowered_model.graph}
    assert domains <= set(STANDARD_DOMAINS)
    assert MID_DOMAIN not in lowered_model.opset_imports
    assert MID_DOMAIN not in lowered_model.graph.opset_imports
    ops = Counter(n.op_type for n in lowered_model.graph)
    assert ops["QuantizeLinear"] == 6 + 14 * L  # one per fake-quant
    assert ops["DequantizeLinear"] == (6 + 14 * L) + 6 * L + 3  # fake-quants, weights, tables


def test_lowered_model_serializes_checks_and_runs_close_to_fp32(lowered_model, fp32_reference):
    proto = ir.serde.serialize_model(lowered_model)
    onnx.checker.check_model(proto, full_check=True)
    assert {o.domain for o in proto.opset_import} <= set(STANDARD_DOMAINS)
    out = run_onnx(proto, tiny_feeds(seq=7))["last_hidden_state"]
    ref = fp32_reference(7)
    assert out.shape == ref.shape
    assert cosine(out, ref) > 0.99
    assert not np.array_equal(out, ref)  # it is quantized


@pytest.mark.parametrize("seq", [5, 7, 32, 33])
def test_lowered_model_runs_at_sequence_lengths_that_are_not_a_block_multiple(
    tiny_bert_onnx, fp32_reference, seq
):
    """Softmax output [b, h, s, s] is blocked along s (block 32) with a run-time partial block.

    The probabilities tensor and its fake-quantized form are exposed as outputs, so the
    lowered QuantizeLinear/DequantizeLinear can be compared with blockformat itself.
    """
    model = run_passes(tiny_bert_onnx, *all_passes())
    fq = next(
        n for n in model.graph if is_fake_quant(n) and producer_op(n.inputs[0]) == ("", "Softmax")
    )
    probs, quantized = fq.inputs[0], fq.outputs[0]
    model.graph.outputs.extend([probs, quantized])
    names = (probs.name, quantized.name)  # the lowering moves the names onto new values
    LowerQDQ()(model)
    model.graph.sort()
    out = run_onnx(ir.serde.serialize_model(model), tiny_feeds(seq=seq))
    p, p_hat = (out[n] for n in names)
    assert p.shape == (2, 4, seq, seq)
    expected = fake_quantize(p, A8.with_axis(-1), allow_partial=True)
    np.testing.assert_allclose(p_hat, expected, rtol=1e-6, atol=0)
    assert cosine(out["last_hidden_state"], fp32_reference(seq)) > 0.99


# --- lowering of single mid-level nodes ----------------------------------------------------------


def one_node_model(op_type: str, inputs: list[ir.Value], fmt: BlockFormat, out_shape) -> ir.Model:
    node = ir.Node(
        MID_DOMAIN, op_type, inputs, ir.convenience.convert_attributes(fmt_attrs(fmt)), name="mid"
    )
    y = node.outputs[0]
    y.name, y.dtype, y.shape = "y", ir.DataType.FLOAT, ir.Shape(out_shape)
    graph_inputs = [v for v in inputs if v is not None and v.const_value is None]
    initializers = [v for v in inputs if v is not None and v.const_value is not None]
    graph = ir.Graph(
        graph_inputs,
        [y],
        nodes=[node],
        initializers=initializers,
        opset_imports={"": 21, MID_DOMAIN: 1},
        name="one_node",
    )
    return ir.Model(graph, ir_version=10)


def lower_and_serialize(model: ir.Model) -> onnx.ModelProto:
    LowerQDQ()(model)
    model.graph.sort()
    proto = ir.serde.serialize_model(model)
    onnx.checker.check_model(proto)
    assert all(n.domain in STANDARD_DOMAINS for n in proto.graph.node)
    return proto


def fake_quant_model(fmt: BlockFormat, rows: int = 3) -> onnx.ModelProto:
    x = ir.Value(name="x", shape=ir.Shape([rows, "d"]), type=ir.TensorType(ir.DataType.FLOAT))
    return lower_and_serialize(
        one_node_model("BlockFakeQuant", [x], fmt.with_axis(-1), [rows, "d"])
    )


def const_value(name: str, array: np.ndarray) -> ir.Value:
    value = ir.Value(
        name=name, shape=ir.Shape(array.shape), type=ir.TensorType(ir.tensor(array).dtype)
    )
    value.const_value = ir.tensor(array)
    return value


ACT_FORMATS = [
    BlockFormat(bits=8, block_size=32),
    BlockFormat(bits=4, block_size=8),
    BlockFormat(bits=2, block_size=4),
    BlockFormat(bits=8, block_size=32, scale_kind="pow2"),
    BlockFormat(bits=8, block_size=16, scale_kind="pow2", frac_bits=3),
]


@pytest.mark.parametrize("fmt", ACT_FORMATS, ids=lambda f: f.describe().replace(" ", "_"))
def test_lowered_block_fake_quant_matches_blockformat_on_a_dynamic_axis(fmt):
    proto = fake_quant_model(fmt)
    rng = np.random.default_rng(fmt.bits * 100 + fmt.block_size)
    for d in (1, 5, 7, 16, 32, 33, 100):
        x = (rng.standard_normal((3, d)) * rng.uniform(0.1, 30, (3, 1))).astype(np.float32)
        y = run_onnx(proto, {"x": x})["y"]
        expected = fake_quantize(x, fmt.with_axis(-1), allow_partial=True)
        np.testing.assert_allclose(y, expected, rtol=1e-6, atol=0, err_msg=f"d={d}")


def test_lowered_block_fake_quant_gives_zeros_for_all_zero_blocks():
    proto = fake_quant_model(BlockFormat(bits=8, block_size=4), rows=2)
    x = np.zeros((2, 10), np.float32)
    x[1, 4:8] = [1.0, -2.0, 0.5, 0.25]
    y = run_onnx(proto, {"x": x})["y"]
    assert np.all(np.isfinite(y))
    np.testing.assert_array_equal(
        y, fake_quantize(x, BlockFormat(bits=8, block_size=4), allow_partial=True)
    )


def test_lowered_pow2_fake_quant_keeps_exact_power_of_two_scales():
    fmt = BlockFormat(bits=8, block_size=4, scale_kind="pow2")
    x = np.array([[127 * 2.0**-15, 2.0**-15, 0.0, 0.0]], np.float32)
    y = run_onnx(fake_quant_model(fmt, rows=1), {"x": x})["y"]
    np.testing.assert_array_equal(y, fake_quantize(x, fmt))  # exact: x is on the grid


def test_lowered_pow2_fake_quant_clamps_scale_codes_like_blockformat():
    fmt = BlockFormat(bits=8, block_size=4, scale_kind="pow2", frac_bits=3)
    x = np.array([[1.2e-4, -3e-5, 1e-6, 0.0]], np.float32)
    y = run_onnx(fake_quant_model(fmt, rows=1), {"x": x})["y"]
    np.testing.assert_allclose(y, fake_quantize(x, fmt), rtol=1e-6, atol=0)


def test_lowered_float_fake_quant_floors_the_scale_like_blockformat():
    fmt = BlockFormat(bits=8, block_size=4)
    x = np.array([[1e-37, -5e-38, 0.0, 0.0]], np.float32)
    y = run_onnx(fake_quant_model(fmt, rows=1), {"x": x})["y"]
    np.testing.assert_allclose(y, fake_quantize(x, fmt), rtol=1e-6, atol=0)


STORED_FORMATS = [
    BlockFormat(bits=8, block_size=16),
    BlockFormat(bits=8, block_size=16, scale_dtype="float16"),
    BlockFormat(bits=8, block_size=32, scale_kind="pow2", frac_bits=3),
    BlockFormat(bits=4, block_size=16, scale_kind="pow2"),
    BlockFormat(bits=4, block_size=32, scale_kind="pow2", frac_bits=3),
    BlockFormat(bits=3, block_size=16, scale_dtype="float16"),
    BlockFormat(bits=8, block_size=16, symmetric=False),
    BlockFormat(bits=4, block_size=16, scale_kind="pow2", frac_bits=3, symmetric=False),
    BlockFormat(bits=4, block_size=32, scale_kind="pow2", frac_bits=3, clip="mse", symmetric=False),
]
# 4-bit scale codes and superblocks: weights only (embedding rows keep a byte per scale)
_W4_ASYM_S4 = BlockFormat(
    bits=4, block_size=16, scale_kind="pow2", frac_bits=3, clip="mse", symmetric=False, scale_bits=4
)  # fmt: skip
WEIGHT_FORMATS = STORED_FORMATS + [
    BlockFormat(bits=4, block_size=16, scale_kind="pow2", frac_bits=3, scale_bits=4),
    _W4_ASYM_S4,
    # superblocks of 64 (K = 64: one per column); of 32, with 4-bit codes for them
    BlockFormat(bits=4, block_size=16, scale_kind="pow2", frac_bits=3, superblock=64),
    replace(_W4_ASYM_S4, superblock=32),
]


def stored_inputs(q) -> list[ir.Value]:
    values = [const_value("codes", q.codes), const_value("scales", q.scale_codes)]
    if q.zero_points is not None:
        values.append(const_value("zp", q.zero_points))
    if q.multipliers is not None:
        values += [None] * (q.zero_points is None) + [const_value("mult", q.multipliers)]
    return values


@pytest.mark.parametrize("fmt", WEIGHT_FORMATS, ids=lambda f: f.describe().replace(" ", "_"))
def test_lowered_block_dequantize_reproduces_dequantized_weights(fmt):
    w = np.random.default_rng(1).standard_normal((64, 24)).astype(np.float32)
    w[:16, 5] *= 1e-3  # a block far below its column (4-bit scale codes floor it)
    q = quantize(w, fmt.with_axis(0))
    model = one_node_model(
        "BlockDequantize",
        stored_inputs(q),
        q.fmt,
        list(w.shape),
    )
    proto = lower_and_serialize(model)
    if fmt.packed:
        assert any(t.data_type == onnx.TensorProto.INT4 for t in proto.graph.initializer)
    if fmt.scale_bits == 4:
        assert any(t.data_type == onnx.TensorProto.UINT4 for t in proto.graph.initializer)
    y = run_onnx(proto, {})["y"]
    np.testing.assert_allclose(y, q.dequantize(), rtol=1e-6, atol=0)


@pytest.mark.parametrize("fmt", STORED_FORMATS, ids=lambda f: f.describe().replace(" ", "_"))
def test_lowered_block_gather_returns_the_dequantized_rows(fmt):
    # 48 columns = three blocks of 16: an odd count of packed zero points per row
    width = 48 if 48 % fmt.block_size == 0 else 64
    table = np.random.default_rng(2).standard_normal((50, width)).astype(np.float32)
    q = quantize(table, fmt.with_axis(1))
    ids = ir.Value(name="ids", shape=ir.Shape(["b", "s"]), type=ir.TensorType(ir.DataType.INT64))
    inputs = [const_value("codes", q.codes), const_value("scales", q.scale_codes), ids]
    if q.zero_points is not None:
        inputs.append(const_value("zp", q.zero_points))
    model = one_node_model("BlockGather", inputs, q.fmt, ["b", "s", width])
    # a second lookup of the same table (an optimized graph can keep the exporter's Gather
    # beside EmbedLayerNormalization's): the table is still stored once
    ids2 = ir.Value(name="ids2", shape=ir.Shape([4]), type=ir.TensorType(ir.DataType.INT64))
    mid = model.graph.node(0)
    second = ir.Node(MID_DOMAIN, "BlockGather", [*inputs[:2], ids2, *inputs[3:]],
                     mid.attributes.values(), name="mid2")  # fmt: skip
    second.outputs[0].name, second.outputs[0].dtype = "y2", ir.DataType.FLOAT
    second.outputs[0].shape = ir.Shape([4, width])
    model.graph.append(second)
    model.graph.inputs.append(ids2)
    model.graph.outputs.append(second.outputs[0])
    proto = lower_and_serialize(model)
    read = {i for n in proto.graph.node for i in n.input}
    tables = [t.name for t in proto.graph.initializer if t.dims[:1] == [50] and t.name in read]
    assert len(tables) == len(inputs) - 1  # codes, scales (and zero points), once each
    idx, idx2 = np.array([[0, 49, 7], [3, 3, 12]], np.int64), np.array([5, 0, 49, 5])
    out = run_onnx(proto, {"ids": idx, "ids2": idx2})
    np.testing.assert_allclose(out["y"], q.dequantize()[idx], rtol=1e-6, atol=0)
    np.testing.assert_allclose(out["y2"], q.dequantize()[idx2], rtol=1e-6, atol=0)


# --- the pipeline: bctonnx.compress ------------------------------------------------------------

PRESET_CASES = [("w8a8", 0.99), ("w4a8", 0.98)]


@pytest.fixture(scope="module")
def compressed(tiny_bert_onnx):
    """compress() of the tiny model per preset in the portable QDQ form (block 16: hidden is
    only 64); the integer form has its own tests (test_integer.py, test_matmul.py)."""
    cache: dict[str, onnx.ModelProto] = {}

    def get(preset: str) -> onnx.ModelProto:
        if preset not in cache:
            cache[preset] = bctonnx.compress(
                tiny_bert_onnx, preset=preset, block_size=16, mode="qdq"
            )
        return cache[preset]

    return get


@pytest.mark.parametrize(("preset", "min_cosine"), PRESET_CASES)
def test_compressed_presets_run_on_stock_onnxruntime(
    compressed, fp32_reference, preset, min_cosine
):
    proto = compressed(preset)
    assert isinstance(proto, onnx.ModelProto)
    onnx.checker.check_model(proto, full_check=True)
    assert {n.domain for n in proto.graph.node} <= set(STANDARD_DOMAINS)
    assert {o.domain for o in proto.opset_import} <= set(STANDARD_DOMAINS)
    out = run_onnx(proto, tiny_feeds(seq=7))["last_hidden_state"]  # plain SessionOptions
    assert cosine(out, fp32_reference(7)) > min_cosine


@pytest.mark.parametrize("preset", ["w8a8", "w4a8"])
def test_shape_nodes_never_read_a_dequantization(compressed, preset):
    # Shape of a hidden state must not keep a whole-tensor DequantizeLinear alive
    proto = compressed(preset)
    producers = {o: n for n in proto.graph.node for o in n.output}
    shapes = [n for n in proto.graph.node if n.op_type == "Shape"]
    assert shapes
    for node in shapes:
        src = producers.get(node.input[0])
        assert src is None or src.op_type not in SHAPE_PRESERVING, (node.name, src.op_type)
    readers = Counter(i for n in proto.graph.node for i in n.input)
    outputs = {o.name for o in proto.graph.output}
    for node in proto.graph.node:  # and no node is left computing something nobody reads
        assert any(readers[o] or o in outputs for o in node.output), node.name


@pytest.mark.parametrize(("preset", "bits"), [("w8a8", 8), ("w4a8", 4)])
def test_compressed_linear_weights_are_stored_as_intN_initializers(compressed, preset, bits):
    proto = compressed(preset)
    inits = {t.name: t for t in proto.graph.initializer}
    wanted = onnx.TensorProto.INT4 if bits == 4 else onnx.TensorProto.INT8
    producers = {o: n for n in proto.graph.node for o in n.output}
    matmul_weights = []
    for node in proto.graph.node:
        if node.op_type != "MatMul" or node.input[1] in inits:
            continue
        dq = producers.get(node.input[1])
        if dq is not None and dq.op_type == "DequantizeLinear" and dq.input[0] in inits:
            matmul_weights.append(inits[dq.input[0]])
    assert len(matmul_weights) == 6 * L
    assert all(t.data_type == wanted for t in matmul_weights)
    # no FP32 copy of a weight matrix or embedding table is left behind
    floats = [t for t in proto.graph.initializer if t.data_type == onnx.TensorProto.FLOAT]
    assert max(int(np.prod(t.dims)) for t in floats) < HIDDEN * HIDDEN


def test_compressed_file_is_smaller_than_fp32(compressed, tiny_bert_onnx):
    fp32 = tiny_bert_onnx.stat().st_size
    w8 = len(compressed("w8a8").SerializeToString())
    w4 = len(compressed("w4a8").SerializeToString())
    assert w4 < w8 < fp32 / 2


@pytest.mark.parametrize("preset", ["w8a8", "w4a8"])
def test_compress_never_mutates_the_callers_model_proto(tiny_bert_onnx, preset):
    proto = onnx.load(str(tiny_bert_onnx))
    before = proto.SerializeToString()
    out = bctonnx.compress(proto, preset=preset, block_size=16)
    assert proto.SerializeToString() == before
    assert out is not proto
    assert any(n.domain == "bctonnx" for n in out.graph.node)  # the integer form, by default


@pytest.mark.parametrize("preset", ["w8a8", "w4a8"])
def test_compress_keeps_graph_input_and_output_names(compressed, tiny_bert_onnx, preset):
    original = onnx.load(str(tiny_bert_onnx))
    proto = compressed(preset)
    assert graph_output_names(proto) == graph_output_names(original) == ["last_hidden_state"]
    assert [i.name for i in proto.graph.input] == [i.name for i in original.graph.input]


def test_compress_of_a_proto_a_file_and_a_directory_agree(tiny_bert_dir, tiny_bert_onnx):
    feeds = tiny_feeds(seq=7)
    from_file = bctonnx.compress(tiny_bert_onnx, preset="w8a8", block_size=16)
    from_file = run_onnx(from_file, feeds)["last_hidden_state"]
    from_dir = bctonnx.compress(tiny_bert_dir, preset="w8a8", block_size=16)
    from_proto = bctonnx.compress(onnx.load(str(tiny_bert_onnx)), preset="w8a8", block_size=16)
    np.testing.assert_array_equal(run_onnx(from_dir, feeds)["last_hidden_state"], from_file)
    np.testing.assert_array_equal(run_onnx(from_proto, feeds)["last_hidden_state"], from_file)


def test_compress_with_an_impossible_block_size_raises_a_user_error(tiny_bert_onnx):
    with pytest.raises(BctError, match="does not divide"):
        bctonnx.compress(tiny_bert_onnx, preset="w8a8", weight_block_size=48)


def test_lowering_refuses_float16_activation_scales():
    """Activation scales are computed at run time in float32; an fp16 request is refused."""
    from bctonnx.passes import PassError

    with pytest.raises(PassError, match="float32"):
        fake_quant_model(BlockFormat(bits=8, block_size=32, scale_dtype="float16"))


# --- store_float16 -------------------------------------------------------------------------------


def test_w4a8_stores_the_floats_it_leaves_as_float16_and_stays_close(compressed, fp32_reference):
    proto = compressed("w4a8")
    big_fp32 = [
        t.name
        for t in proto.graph.initializer
        if t.data_type == onnx.TensorProto.FLOAT and np.prod(t.dims) >= 64
    ]
    assert big_fp32 == []
    assert any(t.data_type == onnx.TensorProto.FLOAT16 for t in proto.graph.initializer)
    out = run_onnx(proto, tiny_feeds(seq=5))["last_hidden_state"]
    assert cosine(out, fp32_reference(5)) > 0.98


def test_store_float16_keeps_tensors_float16_cannot_hold():
    from bctonnx.passes.store_float16 import StoreFloat16

    x = ir.Value(name="x", shape=ir.Shape([2, 64]), type=ir.TensorType(ir.DataType.FLOAT))
    ok = const_value("ok", np.linspace(-2, 2, 64, dtype=np.float32))
    huge = const_value("huge", np.full(64, -3.4e38, np.float32))
    tiny = const_value("tiny", np.full(64, 1e-7, np.float32))  # a float16 subnormal
    add1 = ir.Node("", "Add", [x, ok], name="a1")
    add2 = ir.Node("", "Add", [add1.outputs[0], huge], name="a2")
    add3 = ir.Node("", "Add", [add2.outputs[0], tiny], name="a3")
    add3.outputs[0].name = "y"
    graph = ir.Graph(
        [x],
        [add3.outputs[0]],
        nodes=[add1, add2, add3],
        initializers=[ok, huge, tiny],
        opset_imports={"": 21},
    )
    model = ir.Model(graph, ir_version=10)
    StoreFloat16()(model)
    kinds = {name: v.const_value.dtype for name, v in graph.initializers.items()}
    assert kinds == {
        "ok.f16": ir.DataType.FLOAT16,
        "huge": ir.DataType.FLOAT,
        "tiny.f16": ir.DataType.FLOAT16,
    }
    xv = np.random.default_rng(0).standard_normal((2, 64)).astype(np.float32)
    y = run_onnx(ir.serde.serialize_model(model), {"x": xv})["y"]
    expected = xv + np.linspace(-2, 2, 64, dtype=np.float32) - 3.4e38 + 1e-7
    np.testing.assert_allclose(y, expected, rtol=1e-3)


def _heads_split_model(out_shape: list) -> ir.Model:
    """x [batch, seq, 384] -> Reshape(x, Concat(Unsqueeze(Gather(Shape(x), 0)), [-1, 12, 32]))"""
    b = onnx.helper
    nodes = [
        b.make_node("Shape", ["x"], ["shape"]),
        b.make_node("Gather", ["shape", "zero"], ["batch"], axis=0),
        b.make_node("Unsqueeze", ["batch", "axes"], ["batch1"]),
        b.make_node("Concat", ["batch1", "rest"], ["target"], axis=0),
        b.make_node("Reshape", ["x", "target"], ["y"]),
    ]
    graph = b.make_graph(
        nodes,
        "split",
        [b.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["batch", "seq", 384])],
        [b.make_tensor_value_info("y", onnx.TensorProto.FLOAT, out_shape)],
        [
            b.make_tensor("zero", onnx.TensorProto.INT64, [], [0]),
            b.make_tensor("axes", onnx.TensorProto.INT64, [1], [0]),
            b.make_tensor("rest", onnx.TensorProto.INT64, [3], [-1, 12, 32]),
        ],
    )
    proto = b.make_model(graph, opset_imports=[b.make_opsetid("", 21)], ir_version=10)
    return ir.serde.deserialize_model(proto)


@pytest.mark.parametrize(
    ("out_shape", "want"),
    [
        (["batch", "unk_1", 12, 32], [0, 0, 12, 32]),  # -1 got a fresh symbol: still provable
        (["batch", "seq", 12, 32], [0, 0, 12, 32]),
        (["other", "unk_1", 12, 32], None),  # two leading dims not known equal
        (["batch", "seq", 12, None], None),  # a trailing size unknown
    ],
)
def test_reshape_targets_become_constants_where_the_shapes_prove_them(out_shape, want):
    from bctonnx.passes.simplify_shapes import SimplifyShapes

    model = _heads_split_model(out_shape)
    reshape = next(n for n in model.graph if n.op_type == "Reshape")
    SimplifyShapes()(model)
    target = const_array(reshape.inputs[1])
    if want is None:
        assert target is None  # left computed
        return
    assert target.tolist() == want
    x = np.random.default_rng(0).standard_normal((2, 5, 384)).astype(np.float32)
    got = run_onnx(ir.serde.serialize_model(model), {"x": x})["y"]
    np.testing.assert_array_equal(got, x.reshape(2, 5, 12, 32))

"""canonicalize: bring any exported BERT-family graph to the one form the other passes expect.

- opset 21 (blocked QuantizeLinear/DequantizeLinear) and IR version 10;
- constants folded, large Constant nodes lifted to initializers, dead nodes removed;
- the Erf pattern ``0.5 * x * (1 + Erf(x / sqrt 2))`` (any association) becomes ``Gelu``
  (opset 20), the decomposed LayerNorm ``(x - mean) / sqrt(var + eps) * g + b`` becomes
  ``LayerNormalization``;
- shapes inferred;
- every node the compressor acts on gets a role (node metadata ``bctonnx.role``):
  ``linear`` (MatMul/Gemm with a constant weight), ``attention.qk`` and ``attention.pv``
  (MatMul of two activations, before / after the Softmax), ``embedding`` (Gather from a
  constant 2-D float table), ``gelu``, ``softmax``, ``layernorm``, ``residual`` (Add of two
  activations) and ``attention.mask`` (the Add of the mask to the scores).

Graphs of other exporters and optimizers come to the same form where that is cheap and exact:

- torch.onnx dynamo exporter's per-node debug metadata (stack traces, module names) dropped,
  and its K^T of attention, ``Reshape([b, h, S, d] -> [b*h, S, d])``, ``Transpose(0, 2, 1)``,
  ``Reshape(-> [b, h, d, S])``, becomes the one ``Transpose(0, 1, 3, 2)`` it is (checked on
  the inferred shapes), the form TorchScript exports write, so the scores get the integer
  ``BlockBatchMatMul`` too;
- initializers also listed as graph inputs (``keep_initializers_as_inputs=True``) become plain
  constants (a warning says so); weights that are graph inputs without a value are refused;
- onnxruntime's fused ops (``onnxruntime.transformers.optimizer``, domain ``com.microsoft``)
  back to the standard ops they compute (`_UNFUSE`): ``SkipLayerNormalization`` -> Add(s) +
  LayerNormalization, ``BiasGelu`` / ``Gelu`` -> (Add +) Gelu, ``FastGelu`` -> (Add +)
  Gelu(approximate="tanh"), ``EmbedLayerNormalization`` -> Gathers + Adds + LayerNormalization
  (its mask index a ReduceSum of the mask), ``Attention`` -> the self-attention as the
  exporters write it (three MatMul + Add, heads by Reshape + Transpose, Q.(K^T * scale) +
  additive mask, Softmax, .V, heads joined);
- every other node of a domain bctonnx does not know, and a fused op used in a way the above
  does not express (a causal ``Attention``, past state, ...), is left exactly as it is, with its
  weights, and one WARNING names each such node: never silently rewritten, never silently
  skipped;
- a graph with no MatMul/Gemm weight and no embedding table is refused (nothing to compress).
"""

from __future__ import annotations

import contextlib
import logging
import math

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as common_passes
import onnxscript.optimizer
from onnxscript.rewriter import pattern
from onnxscript.version_converter import ConvertVersionPass

from .common import (
    TARGET_IR_VERSION,
    TARGET_OPSET,
    PassError,
    const_array,
    is_const,
    is_float,
    new_initializer,
    role,
    set_role,
    take_over,
)

log = logging.getLogger(__name__)

MIN_OPSET = 13
# Ops whose meaning changed between opset 18 and 21; a graph using them is converted with the
# version converter instead of having its opset number raised.
_CHANGED_SINCE_18 = {"DFT", "GridSample", "GroupNormalization", "Split", "Pad"}


# --- fusion rules: each pattern reads like the math it matches ------------------------------


def _erf_gelu_a(op, x):
    return 0.5 * (x * (op.Erf(x / math.sqrt(2)) + 1.0))


def _erf_gelu_b(op, x):
    return x * (0.5 * (op.Erf(x / math.sqrt(2)) + 1.0))


def _erf_gelu_c(op, x):
    return (x * 0.5) * (op.Erf(x / math.sqrt(2)) + 1.0)


def _erf_gelu_d(op, x):
    return (x * (op.Erf(x / math.sqrt(2)) + 1.0)) * 0.5


def _erf_gelu_e(op, x):
    return (x * (op.Erf(x * (1 / math.sqrt(2))) + 1.0)) * 0.5


def _gelu(op, x):
    return op.Gelu(x)


def _layer_norm(op, x, gamma, beta, epsilon):
    mean = op.ReduceMean(x, [-1], keepdims=1)
    centered = op.Sub(x, mean)
    variance = op.ReduceMean(
        pattern.OrValue([op.Pow(centered, 2.0), op.Mul(centered, centered)]), [-1], keepdims=1
    )
    normalized = op.Div(centered, op.Sqrt(op.Add(variance, epsilon)))
    return op.Add(op.Mul(normalized, gamma), beta)


def _layer_norm_condition(context, x, gamma, beta, epsilon, **_) -> bool:
    eps = const_array(epsilon)
    return (
        is_float(x)
        and eps is not None
        and eps.size == 1
        and is_const(gamma)
        and is_const(beta)
        and const_array(gamma).ndim == 1
    )


def _layer_norm_replacement(op, x, gamma, beta, epsilon):
    return op.LayerNormalization(x, gamma, beta, axis=-1, epsilon=float(const_array(epsilon)))


FUSION_RULES = pattern.RewriteRuleSet(
    [
        pattern.RewriteRule(p, _gelu)
        for p in (_erf_gelu_a, _erf_gelu_b, _erf_gelu_c, _erf_gelu_d, _erf_gelu_e)
    ]
    + [pattern.RewriteRule(_layer_norm, _layer_norm_replacement, _layer_norm_condition)]
)


class Canonicalize(ir.passes.InPlacePass):
    """Opset 21, folded constants, Gelu/LayerNormalization fused, shapes, roles tagged."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        refuse_input_weights(model.graph)
        drop_exporter_debug_info(model.graph)
        initializers_as_constants(model.graph)
        upgrade_opset(model)
        unfuse_contrib_ops(model.graph)
        common_passes.LiftConstantsToInitializersPass(lift_all_constants=False, size_limit=1024)(
            model
        )
        onnxscript.optimizer.fold_constants(model)
        FUSION_RULES.apply_to_model(model)
        common_passes.RemoveUnusedNodesPass()(model)
        infer_shapes(model)
        if any(n.domain == CONTRIB_DOMAIN for n in model.graph):
            infer_contrib_shapes(model)
        if collapse_flattened_transposes(model.graph):
            common_passes.RemoveUnusedNodesPass()(model)
        tag_roles(model.graph)
        warn_left_alone(model.graph)
        if not any(role(n) in ("linear", "embedding") for n in model.graph):
            half = any(
                v.dtype in (ir.DataType.FLOAT16, ir.DataType.BFLOAT16)
                for v in model.graph.initializers.values()
            )
            raise PassError(
                "nothing to compress: no MatMul/Gemm with a constant weight and no embedding "
                "table (Gather from a constant 2-D table) in the graph; bctonnx compresses "
                "BERT-family encoders"
                + (
                    " with float32 weights, and this model's are float16 / bfloat16: compress "
                    "its float32 export"
                    if half
                    else ""
                )
            )
        return ir.passes.PassResult(model, modified=True)


def upgrade_opset(model: ir.Model) -> None:
    opset = model.graph.opset_imports.get("", model.opset_imports.get(""))
    if opset is None:
        raise PassError("the model imports no default ONNX opset")
    if opset < MIN_OPSET:
        raise PassError(f"unsupported opset {opset}: export with opset >= {MIN_OPSET}")
    if opset > TARGET_OPSET:
        raise PassError(f"unsupported opset {opset}: bctonnx emits opset {TARGET_OPSET}")
    changed = {n.op_type for n in model.graph.all_nodes() if n.domain == ""} & _CHANGED_SINCE_18
    if opset < TARGET_OPSET and (opset < 18 or changed):
        ConvertVersionPass(TARGET_OPSET, fallback=True)(model)
        if model.graph.opset_imports.get("") != TARGET_OPSET:
            raise PassError(f"cannot convert opset {opset} to {TARGET_OPSET}")
    # 18..20 -> 21 only widened type lists for the ops an encoder uses.
    model.graph.opset_imports[""] = TARGET_OPSET
    model.opset_imports[""] = TARGET_OPSET
    model.ir_version = TARGET_IR_VERSION


@contextlib.contextmanager
def _initializers_kept(graph: ir.Graph):
    """onnx_ir (1.1) turns initializers into graph inputs around its calls into ONNX's C API
    and does not undo that when serializing the model fails: put them back, or weights would
    look like run-time inputs to every later pass."""
    inputs = list(graph.inputs)
    initializers = {name: (v, v.const_value) for name, v in graph.initializers.items()}
    try:
        yield
    finally:
        if len(graph.inputs) != len(inputs) or len(graph.initializers) != len(initializers):
            graph.inputs.clear()
            graph.inputs.extend(inputs)
            for name, (value, tensor) in initializers.items():
                value.const_value = tensor
                if name not in graph.initializers:
                    graph.register_initializer(value)


def infer_shapes(model: ir.Model) -> None:
    try:
        with _initializers_kept(model.graph):
            result = common_passes.ShapeInferencePass()(model)
    except Exception as exc:  # shape inference is a help, not a requirement
        log.warning("shape inference failed (%s); continuing with the shapes the model has", exc)
        return
    if not result.modified and any(v.shape is None for n in model.graph for v in n.outputs):
        log.info("shape inference added nothing; continuing with the shapes the model has")


# --- other exporters' graphs --------------------------------------------------------------------

CONTRIB_DOMAIN = "com.microsoft"
# Domains whose nodes canonicalize understands (the others are left alone with a warning).
KNOWN_DOMAINS = ("", "ai.onnx")


# Per-node debug metadata of torch.onnx's dynamo exporter (stack traces with local paths,
# module names): several hundred bytes per node, a visible share of a compressed file.
_DEBUG_METADATA = ("pkg.torch.onnx.", "namespace")


def _same_dims(a: ir.Shape | None, b: list) -> bool:
    """``a`` is known and equal, dim by dim, to ``b`` (ints or named symbolic dims)."""
    if a is None or len(a) != len(b):
        return False
    for x, y in zip(a, b, strict=True):
        if isinstance(x, int) and isinstance(y, int):
            if x != y:
                return False
        elif isinstance(x, int) or isinstance(y, int) or x.value is None or x.value != y.value:
            return False
    return True


def collapse_flattened_transposes(graph: ir.Graph) -> int:
    """``Reshape(x: [a, b, c, d] -> [a*b, c, d])``, ``Transpose(0, 2, 1)``, ``Reshape(-> [a, b,
    d, c])`` (each read only by the next) -> ``Transpose(x, perm=(0, 1, 3, 2))``: the same
    elements in the same places (row-major merge and split of the leading dims). Only where
    the inferred shapes show it: x's dims, c and d in the middle and a, b, d, c at the end.
    Returns how many were collapsed."""
    count = 0
    for node in list(graph):
        if node.op_type != "Transpose" or node.domain not in ("", "ai.onnx"):
            continue
        perm = node.attributes.get("perm")
        if perm is None or list(perm.as_ints()) != [0, 2, 1]:
            continue
        first, mid, out = node.inputs[0].producer(), node.inputs[0], node.outputs[0]
        uses = list(out.uses())
        if (
            first is None
            or first.op_type != "Reshape"
            or len(uses) != 1
            or uses[0][0].op_type != "Reshape"
            or len(list(mid.uses())) != 1
            or out in graph.outputs
            or mid in graph.outputs
        ):
            continue
        last = uses[0][0]
        x, y = first.inputs[0], last.outputs[0]
        if x.shape is None or len(x.shape) != 4 or mid.shape is None or len(mid.shape) != 3:
            continue
        a, b, c, d = x.shape
        if not (
            _same_dims(ir.Shape(list(mid.shape)[1:]), [c, d]) and _same_dims(y.shape, [a, b, d, c])
        ):
            continue
        new = ir.node("Transpose", [x], {"perm": [0, 1, 3, 2]}, name=f"{last.name}/kt")
        graph.insert_before(first, new)
        new.outputs[0].shape, new.outputs[0].type = y.shape, y.type
        take_over(y, new.outputs[0])
        count += 1
    if count:
        log.info("dynamo K^T: %d Reshape/Transpose/Reshape collapsed to Transpose", count)
    return count


def drop_exporter_debug_info(graph: ir.Graph) -> None:
    for node in graph.all_nodes():
        for key in [k for k in node.metadata_props if k.startswith(_DEBUG_METADATA)]:
            del node.metadata_props[key]


def initializers_as_constants(graph: ir.Graph) -> None:
    """Initializers that are also graph inputs (``keep_initializers_as_inputs=True``) are
    overridable at run time, so no pass may treat them as constants: make them plain
    initializers (the graph input goes; nobody feeds a weight) and say so."""
    overridable = [v for v in graph.inputs if v.const_value is not None]
    if not overridable:
        return
    for value in overridable:
        graph.inputs.remove(value)
    log.warning(
        "%d initializers were also graph inputs (exported with keep_initializers_as_inputs); "
        "they are treated as constants and no longer inputs of the compressed model",
        len(overridable),
    )


def _op(
    graph: ir.Graph,
    anchor: ir.Node,
    op_type: str,
    inputs: list,
    name: str,
    dtype: ir.DataType | None = None,
    **attrs,
) -> ir.Value:
    """One standard-ONNX node inserted before ``anchor``; its output (named ``name``)."""
    node = ir.Node(
        "", op_type, inputs, ir.convenience.convert_attributes(attrs) if attrs else (), name=name
    )
    graph.insert_before(anchor, node)
    out = node.outputs[0]
    out.name = name
    if dtype is not None:
        out.dtype = dtype
    elif inputs and inputs[0] is not None and inputs[0].dtype is not None:
        out.dtype = inputs[0].dtype
    return out


INT32, INT64 = ir.DataType.INT32, ir.DataType.INT64
BOOL, FLOAT = ir.DataType.BOOL, ir.DataType.FLOAT


def _ints(graph: ir.Graph, name: str, values: list[int]) -> ir.Value:
    return new_initializer(graph, name, np.asarray(values, np.int64))


def _unsqueeze(graph: ir.Graph, anchor: ir.Node, x: ir.Value, axes: list[int], name: str):
    return _op(graph, anchor, "Unsqueeze", [x, _ints(graph, f"{name}/axes", axes)], name)


def _positions(graph: ir.Graph, anchor: ir.Node, x: ir.Value, base: str) -> ir.Value:
    """Range(0, x.shape[1]): the positions of a (batch, sequence, ...) tensor."""
    shape = _op(graph, anchor, "Shape", [x], f"{base}/shape", INT64)
    index = new_initializer(graph, f"{base}/seq_axis", np.int64(1))
    length = _op(graph, anchor, "Gather", [shape, index], f"{base}/seq_len")
    zero = new_initializer(graph, f"{base}/zero", np.int64(0))
    step = new_initializer(graph, f"{base}/step", np.int64(1))
    return _op(graph, anchor, "Range", [zero, length, step], f"{base}/positions")


def _layer_norm_node(graph, anchor, x, gamma, beta, eps, name) -> ir.Value:
    inputs = [x, gamma] + ([beta] if beta is not None else [])
    return _op(graph, anchor, "LayerNormalization", inputs, name, axis=-1, epsilon=eps)


def _float_attr(node: ir.Node, name: str, default: float) -> float:
    attr = node.attributes.get(name)
    return attr.as_float() if attr is not None else default


def _input(ins: list, i: int) -> ir.Value | None:
    return ins[i] if len(ins) > i else None


def _unfuse_skip_layer_norm(
    graph: ir.Graph, node: ir.Node, base: str, used: list, cache: dict
) -> bool:
    """output, mean, inv_std_var, input_skip_bias_sum = LN(input + skip + bias)."""
    ins = list(node.inputs)
    if len(ins) < 3 or ins[0] is None or ins[1] is None or ins[2] is None:
        return False
    if any(used[1:3]):
        return False  # mean / inv_std_var read by someone: keep the fused op
    x = ins[0]
    bias = _input(ins, 4)
    if bias is not None:
        x = _op(graph, node, "Add", [x, bias], f"{base}/bias_add")
    total = _op(graph, node, "Add", [x, ins[1]], f"{base}/skip_add")
    eps = _float_attr(node, "epsilon", 1e-12)
    take_over(
        node.outputs[0], _layer_norm_node(graph, node, total, ins[2], _input(ins, 3), eps, base)
    )
    if len(node.outputs) > 3 and used[3]:
        take_over(node.outputs[3], total)
    return True


def _unfuse_gelu(graph: ir.Graph, node: ir.Node, base: str, used: list, cache: dict) -> bool:
    """BiasGelu / Gelu / FastGelu(x [, bias]) -> Gelu(x + bias), FastGelu the tanh form."""
    ins = list(node.inputs)
    if not ins or ins[0] is None:
        return False
    x = ins[0]
    if _input(ins, 1) is not None:
        x = _op(graph, node, "Add", [x, ins[1]], f"{base}/bias_add")
    approximate = "tanh" if node.op_type == "FastGelu" else "none"
    take_over(node.outputs[0], _op(graph, node, "Gelu", [x], base, approximate=approximate))
    return True


def _unfuse_embed_layer_norm(
    graph: ir.Graph, node: ir.Node, base: str, used: list, cache: dict
) -> bool:
    """EmbedLayerNormalization(input_ids, segment_ids, word, position, segment tables, gamma,
    beta, mask, position_ids) -> LN(Gather(word) + Gather(position) [+ Gather(segment)]);
    its mask_index output (the mask's row sums: right-padded lengths) a ReduceSum; its
    embedding_sum output the sum before the LayerNorm."""
    ins = list(node.inputs)
    ids, seg_ids, word, pos, seg, gamma, beta = (_input(ins, i) for i in range(7))
    mask, pos_ids = _input(ins, 7), _input(ins, 8)
    if any(v is None for v in (ids, word, pos, gamma)) or (seg_ids is None) != (seg is None):
        return False
    if len(used) > 1 and used[1] and mask is None:
        return False  # a mask index without a mask: keep onnxruntime's own
    if pos_ids is None:  # positions 0 .. S-1
        pos_ids = _positions(graph, node, ids, base)
    total = _op(graph, node, "Gather", [word, ids], f"{base}/word", FLOAT)
    position = _op(graph, node, "Gather", [pos, pos_ids], f"{base}/position", FLOAT)
    total = _op(graph, node, "Add", [total, position], f"{base}/add_position")
    if seg is not None:
        segment = _op(graph, node, "Gather", [seg, seg_ids], f"{base}/segment", FLOAT)
        total = _op(graph, node, "Add", [total, segment], f"{base}/add_segment")
    eps = _float_attr(node, "epsilon", 1e-12)
    take_over(node.outputs[0], _layer_norm_node(graph, node, total, gamma, beta, eps, base))
    if len(used) > 1 and used[1]:
        mask32 = _op(graph, node, "Cast", [mask], f"{base}/mask_int32", INT32, to=INT32)
        axis = _ints(graph, f"{base}/axis", [1])
        lengths = _op(graph, node, "ReduceSum", [mask32, axis], f"{base}/mask_index", keepdims=0)
        take_over(node.outputs[1], lengths)
        cache.setdefault("lengths", []).append(lengths)
    if len(used) > 2 and used[2]:
        take_over(node.outputs[2], total)
    return True


def _mask_rank(mask: ir.Value | None, cache: dict) -> int | None:
    """The rank of Attention's mask_index before shapes are inferred: its own, a Cast's
    input's (the optimizer casts the 0/1 mask to int32), or 1 for lengths: the row sums of a
    2-D mask (the optimizer's ReduceSum(mask, axes=[1], keepdims=0), or an
    EmbedLayerNormalization's unfused above)."""
    while mask is not None:
        if mask.shape is not None:
            return len(mask.shape)
        if any(mask is v for v in cache.get("lengths", ())):
            return 1
        producer = mask.producer()
        if producer is not None and producer.op_type == "ReduceSum":
            keepdims = producer.attributes.get("keepdims")
            axes = const_array(_input(list(producer.inputs), 1))
            rows = _mask_rank(producer.inputs[0], cache)
            if keepdims is not None and not keepdims.as_int() and rows == 2 and axes is not None:
                return 1 if [int(a) % 2 for a in axes.reshape(-1)] == [1] else None
            return None
        if producer is None or producer.op_type != "Cast":
            return None
        mask = producer.inputs[0]
    return None


def _unfuse_attention(graph: ir.Graph, node: ir.Node, base: str, used: list, cache: dict) -> bool:
    """Attention(input, packed QKV weight, bias, mask_index) -> the BERT self-attention as the
    exporters write it: three MatMul + Add, heads split by Reshape + Transpose, scores
    Q.(K^T * scale), + mask, Softmax, .V, heads joined. Handled: constant weight and bias, no
    past / present / attention bias, not unidirectional, no mask or a 2-D 0/1 mask
    (batch, sequence) or 1-D right-padded lengths (batch); else the fused op stays."""
    ins = list(node.inputs)
    x, w, bias, mask_index = (_input(ins, i) for i in range(4))
    heads = node.attributes.get("num_heads")
    w_arr, b_arr = const_array(w), const_array(bias)
    if x is None or heads is None or w_arr is None or w_arr.ndim != 2:
        return False
    if any(_input(ins, i) is not None for i in range(4, len(ins))) or any(used[1:]):
        return False  # past state, attention bias or present output
    for attr in ("unidirectional", "do_rotary", "past_present_share_buffer"):
        a = node.attributes.get(attr)
        if a is not None and a.as_int():
            return False
    heads = heads.as_int()
    sizes = node.attributes.get("qkv_hidden_sizes")
    sizes = list(sizes.as_ints()) if sizes is not None else [w_arr.shape[1] // 3] * 3
    if (
        sum(sizes) != w_arr.shape[1]
        or sizes[0] != sizes[1]
        or any(n % heads for n in sizes)
        or (b_arr is not None and b_arr.shape != (w_arr.shape[1],))
        or (bias is not None and b_arr is None)
    ):
        return False
    mask_rank = _mask_rank(mask_index, cache)
    if mask_index is not None and mask_rank not in (1, 2):
        return False
    head_qk, head_v = sizes[0] // heads, sizes[2] // heads
    scale = _float_attr(node, "scale", 0.0) or 1.0 / math.sqrt(head_qk)
    offsets = np.cumsum([0, *sizes])
    proj = []
    for i, part in enumerate("qkv"):
        cols = slice(offsets[i], offsets[i + 1])
        wp = new_initializer(graph, f"{base}.{part}.weight", np.ascontiguousarray(w_arr[:, cols]))
        y = _op(graph, node, "MatMul", [x, wp], f"{base}/{part}/MatMul")
        if b_arr is not None:
            bp = new_initializer(graph, f"{base}.{part}.bias", np.ascontiguousarray(b_arr[cols]))
            y = _op(graph, node, "Add", [y, bp], f"{base}/{part}/Add")
        head = head_v if part == "v" else head_qk
        shape = _ints(graph, f"{base}/{part}/heads_shape", [0, 0, heads, head])
        proj.append(_op(graph, node, "Reshape", [y, shape], f"{base}/{part}/Reshape"))
    q, k, v = proj
    q = _op(graph, node, "Transpose", [q], f"{base}/q/Transpose", perm=[0, 2, 1, 3])
    kt = _op(graph, node, "Transpose", [k], f"{base}/k/Transpose", perm=[0, 2, 3, 1])
    c = new_initializer(graph, f"{base}/scale", np.asarray(scale, np.float32))
    kt = _op(graph, node, "Mul", [kt, c], f"{base}/k/Mul")
    scores = _op(graph, node, "MatMul", [q, kt], f"{base}/scores")
    filler = _float_attr(node, "mask_filter_value", -10000.0)
    key = (mask_index, filler)
    if mask_index is not None and key in cache:
        scores = _op(graph, node, "Add", [scores, cache[key]], f"{base}/masked_scores")
    elif mask_index is not None:
        if mask_rank == 2:  # 0/1 per key
            keep = _op(graph, node, "Cast", [mask_index], f"{base}/mask_bool", BOOL, to=BOOL)
        else:  # keys 0 .. length-1 of each row
            keys = _unsqueeze(graph, node, _positions(graph, node, x, base), [0], f"{base}/keys")
            lengths = _op(graph, node, "Cast", [mask_index], f"{base}/lengths", INT64, to=INT64)
            lengths = _unsqueeze(graph, node, lengths, [1], f"{base}/lengths_col")
            keep = _op(graph, node, "Less", [keys, lengths], f"{base}/mask_bool", BOOL)
        zero = new_initializer(graph, f"{base}/mask_zero", np.asarray(0.0, np.float32))
        fill = new_initializer(graph, f"{base}/mask_filter", np.asarray(filler, np.float32))
        additive = _op(graph, node, "Where", [keep, zero, fill], f"{base}/mask", FLOAT)
        additive = _unsqueeze(graph, node, additive, [1, 2], f"{base}/mask_4d")
        cache[key] = additive  # one mask for every layer
        scores = _op(graph, node, "Add", [scores, additive], f"{base}/masked_scores")
    probs = _op(graph, node, "Softmax", [scores], f"{base}/Softmax", axis=-1)
    v = _op(graph, node, "Transpose", [v], f"{base}/v/Transpose", perm=[0, 2, 1, 3])
    context = _op(graph, node, "MatMul", [probs, v], f"{base}/context")
    context = _op(
        graph, node, "Transpose", [context], f"{base}/context/Transpose", perm=[0, 2, 1, 3]
    )
    joined = _ints(graph, f"{base}/joined_shape", [0, 0, sizes[2]])
    take_over(node.outputs[0], _op(graph, node, "Reshape", [context, joined], f"{base}/output"))
    return True


_UNFUSE = {
    "SkipLayerNormalization": _unfuse_skip_layer_norm,
    "BiasGelu": _unfuse_gelu,
    "FastGelu": _unfuse_gelu,
    "Gelu": _unfuse_gelu,
    "EmbedLayerNormalization": _unfuse_embed_layer_norm,
    "Attention": _unfuse_attention,
}


def _unfuse(graph: ir.Graph, node: ir.Node, cache: dict) -> bool:
    """Replace one com.microsoft fused op by its standard-ONNX equivalent (same math).
    Returns False (node kept) for an op or a use of it this does not handle. ``cache``: what
    the rewrites of one graph share (the additive attention mask)."""
    rewrite = _UNFUSE.get(node.op_type)
    if rewrite is None:
        return False
    used = [bool(o.uses()) or o in graph.outputs for o in node.outputs]
    if not rewrite(graph, node, node.name or node.op_type, used, cache):
        return False
    graph.remove(node, safe=True)
    return True


def unfuse_contrib_ops(graph: ir.Graph) -> None:
    """onnxruntime's fused ops (`_UNFUSE`) back to the standard ops the passes recognise
    (Gelu needs opset >= 20: run after upgrade_opset)."""
    count, cache = 0, {}
    for node in list(graph):
        if node.domain == CONTRIB_DOMAIN and _unfuse(graph, node, cache):
            count += 1
    if count:
        log.info("unfused %d com.microsoft nodes into standard ONNX ops", count)


def infer_contrib_shapes(model: ir.Model) -> None:
    """ONNX shape inference stops at com.microsoft ops (fused Attention, ...); onnxruntime's
    symbolic shape inference knows them. Shapes it finds fill the values still without one
    (the quantize passes need the rank of every activation they block)."""
    from onnx_ir.passes.common._c_api_utils import call_onnx_api
    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

    def infer(proto):
        return SymbolicShapeInference.infer_shapes(proto, auto_merge=True, guess_output_rank=True)

    try:
        with _initializers_kept(model.graph):
            inferred = call_onnx_api(infer, model)
    except Exception as exc:  # a help, not a requirement: values without shape stay float
        log.warning("onnxruntime symbolic shape inference failed (%s)", str(exc).splitlines()[0])
        return
    values = {v.name: v for n in model.graph for v in n.outputs if v.name}
    for info in inferred.graph.value_info:
        value = values.get(info.name)
        if value is None or value.shape is not None or not info.type.HasField("tensor_type"):
            continue
        tensor_type = info.type.tensor_type
        if not tensor_type.HasField("shape"):
            continue
        dims = [
            d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
            for d in tensor_type.shape.dim
        ]
        value.shape = ir.Shape(dims)
        if value.dtype is None and tensor_type.elem_type:
            value.dtype = ir.DataType(tensor_type.elem_type)


def left_alone(graph: ir.Graph) -> list[tuple[ir.Node, str]]:
    """Nodes no pass will touch although they may hold weights or compute what BCT quantizes:
    ops of domains bctonnx does not know, or fused ops it could not unfuse (a causal Attention)."""
    found = []
    for node in graph:
        if node.domain in KNOWN_DOMAINS or node.domain.startswith("bctonnx"):
            continue
        weights = [v.name for v in node.inputs if v is not None and is_const(v) and is_float(v)]
        why = f"{node.domain} op bctonnx does not rewrite"
        if weights:
            why += f"; its weights are not quantized ({', '.join(weights)})"
        found.append((node, why))
    return found


def warn_left_alone(graph: ir.Graph) -> None:
    nodes = left_alone(graph)
    if nodes:
        log.warning(
            "left uncompressed, %d node(s) of ops bctonnx does not rewrite (their weights, inputs "
            "and outputs are not quantized): %s",
            len(nodes),
            ", ".join(f"{n.op_type} '{n.name}'" for n, _ in nodes),
        )


def refuse_input_weights(graph: ir.Graph) -> None:
    """Weights fed at run time (graph inputs without a value) cannot be compressed ahead."""
    for node in graph:
        if node.op_type in ("MatMul", "Gemm") and len(node.inputs) >= 2:
            candidates = [node.inputs[1]]
        elif node.op_type == "Gather" and node.inputs:
            candidates = [node.inputs[0]]
        else:
            continue
        for value in candidates:
            if (
                value is not None
                and value.is_graph_input()
                and value.const_value is None
                and is_float(value)
                and value.shape is not None
                and len(value.shape) == 2
            ):
                raise PassError(
                    f"node '{node.name}' reads its weight '{value.name}' from a graph input (not "
                    "a constant): bctonnx compresses weights stored in the model; export with "
                    "the weights as initializers"
                )


def _producer_type(value: ir.Value | None, skip=("Cast", "Identity", "Dropout")) -> str | None:
    while value is not None and value.producer() is not None:
        node = value.producer()
        if node.op_type not in skip:
            return node.op_type
        value = node.inputs[0]
    return None


def _feeds_softmax(value: ir.Value, depth: int = 4) -> bool:
    """Does this value reach a Softmax through scaling/masking ops only?"""
    if depth == 0:
        return False
    for user, _ in value.uses():
        if user.op_type == "Softmax":
            return True
        if user.op_type in ("Div", "Mul", "Add", "Where", "Cast", "Sub") and user.outputs:
            if _feeds_softmax(user.outputs[0], depth - 1):
                return True
    return False


def tag_roles(graph: ir.Graph) -> None:
    for node in graph:
        if node.domain not in ("", "ai.onnx") or role(node):
            continue
        op, ins = node.op_type, node.inputs
        if op in ("MatMul", "Gemm") and len(ins) >= 2:
            a, b = ins[0], ins[1]
            if is_const(b) and not is_const(a) and is_float(b):
                set_role(node, "linear")
            elif not is_const(a) and not is_const(b):
                if _producer_type(a) == "Softmax":
                    set_role(node, "attention.pv")
                elif _feeds_softmax(node.outputs[0]):
                    set_role(node, "attention.qk")
        elif op == "Gather" and is_const(ins[0]) and is_float(ins[0]):
            table = ins[0]
            if table.shape is not None and len(table.shape) == 2:
                set_role(node, "embedding")
        elif op == "Gelu":
            set_role(node, "gelu")
        elif op == "Softmax":
            set_role(node, "softmax")
        elif op == "LayerNormalization":
            set_role(node, "layernorm")
        elif op == "Add" and len(ins) == 2 and all(is_float(v) and not is_const(v) for v in ins):
            is_mask = any(u.op_type == "Softmax" for u, _ in node.outputs[0].uses())
            set_role(node, "attention.mask" if is_mask else "residual")

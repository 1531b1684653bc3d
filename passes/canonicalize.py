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
"""

from __future__ import annotations

import logging
import math

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
    role,
    set_role,
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
        upgrade_opset(model)
        common_passes.LiftConstantsToInitializersPass(lift_all_constants=False, size_limit=1024)(
            model
        )
        onnxscript.optimizer.fold_constants(model)
        FUSION_RULES.apply_to_model(model)
        common_passes.RemoveUnusedNodesPass()(model)
        infer_shapes(model)
        tag_roles(model.graph)
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


def infer_shapes(model: ir.Model) -> None:
    try:
        common_passes.ShapeInferencePass()(model)
    except Exception as exc:  # shape inference is a help, not a requirement
        log.warning("shape inference failed (%s); continuing with the shapes the model has", exc)


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

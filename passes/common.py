"""Small helpers every pass shares: roles, constants, the internal op domain, value rewiring.

The IR is onnx_ir (``onnx_ir.Model``): typed, handles external data lazily (models over
2 GB), and is the IR onnxscript's rewriter matches on, so canonicalize can state its fusions
as declarative patterns.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence

import numpy as np
import onnx_ir as ir

from bctonnx.blockformat import BlockFormat, BlockQuantized, pack_int4

# Nodes the quantize passes create and the lowering passes expand. They never reach a saved
# model: lower_qdq (portable) or the integer lowering replaces every one of them.
MID_DOMAIN = "bctonnx.mid"
# the op library's domain (bctonnx/ops/csrc/common.h: kDomain, kDomainVersion)
OPS_DOMAIN = "bctonnx"
OPS_VERSION = 1
ROLE_KEY = "bctonnx.role"
TARGET_OPSET = 21
TARGET_IR_VERSION = 10  # onnxruntime 1.31 loads IR <= 10 with opset 21 Q/DQ


class PassError(ValueError):
    """A model the passes cannot handle (the message names the node or tensor)."""


def role(node: ir.Node) -> str | None:
    return node.metadata_props.get(ROLE_KEY)


def set_role(node: ir.Node, name: str) -> None:
    node.metadata_props[ROLE_KEY] = name


def nodes_with_role(graph: ir.Graph, *names: str) -> list[ir.Node]:
    return [n for n in graph if role(n) in names]


def const_array(value: ir.Value | None) -> np.ndarray | None:
    """The numpy value of an initializer or Constant output, else None."""
    if value is None:
        return None
    tensor = ir.convenience.get_const_tensor(value)
    return None if tensor is None else tensor.numpy()


def is_const(value: ir.Value | None) -> bool:
    return value is not None and ir.convenience.get_const_tensor(value) is not None


def is_float(value: ir.Value | None) -> bool:
    return value is not None and value.dtype == ir.DataType.FLOAT


def excluded(node: ir.Node, patterns: Sequence[str]) -> bool:
    """A node is excluded when its name matches one of the glob patterns."""
    name = node.name or ""
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def fmt_attrs(fmt: BlockFormat) -> dict[str, int | str]:
    """A block format as node attributes (the mid ops and our custom ops use the same keys)."""
    return {
        "bits": fmt.bits,
        "block_size": fmt.block_size,
        "axis": fmt.axis,
        "scale_kind": fmt.scale_kind,
        "scale_dtype": fmt.scale_dtype,
        "frac_bits": fmt.frac_bits,
        "symmetric": int(fmt.symmetric),
        "scale_bits": fmt.scale_bits,
        "superblock": fmt.superblock,
        "nm_n": fmt.nm_n,
        "nm_m": fmt.nm_m,
    }


def fmt_from_node(node: ir.Node) -> BlockFormat:
    a = node.attributes
    return BlockFormat(
        bits=a["bits"].as_int(),
        block_size=a["block_size"].as_int(),
        axis=a["axis"].as_int(),
        scale_kind=a["scale_kind"].as_string(),
        scale_dtype=a["scale_dtype"].as_string(),
        frac_bits=a["frac_bits"].as_int(),
        symmetric=bool(a["symmetric"].as_int()) if "symmetric" in a else True,
        scale_bits=a["scale_bits"].as_int() if "scale_bits" in a else 8,
        superblock=a["superblock"].as_int() if "superblock" in a else 0,
        nm_n=a["nm_n"].as_int() if "nm_n" in a else 0,
        nm_m=a["nm_m"].as_int() if "nm_m" in a else 0,
    )


def stored_weight(node: ir.Node) -> BlockQuantized:
    """The constant weight of a mid-level BlockDequantize(codes, scales[, zp[, multipliers]])."""

    def optional(i: int) -> np.ndarray | None:
        return const_array(node.inputs[i]) if len(node.inputs) > i else None

    return BlockQuantized(
        const_array(node.inputs[0]),
        const_array(node.inputs[1]),
        fmt_from_node(node),
        optional(2),
        optional(3),
    )


def uint4_tensor(values: np.ndarray) -> ir.TensorProtocol:
    """Values 0..15 as a packed ONNX UINT4 tensor (scale offsets, multipliers)."""
    values = np.asarray(values)
    packed = pack_int4(values.astype(np.int8) - 8) ^ np.uint8(0x88)  # offset binary -> unsigned
    return ir.PackedTensor(packed, ir.DataType.UINT4, shape=ir.Shape(values.shape))


def nm_pattern_tensor(patterns: np.ndarray, fmt: BlockFormat) -> ir.TensorProtocol:
    """N:M pattern indices as stored: UINT4 (packed) when there are at most 16 patterns
    (2:4), else INT8 (4:8 has 70)."""
    if fmt.pattern_bits() == 4:
        return uint4_tensor(patterns)
    return ir.tensor(np.asarray(patterns).astype(np.int8))


def new_initializer(graph: ir.Graph, name: str, array: np.ndarray | ir.TensorProtocol) -> ir.Value:
    """Register a uniquely named initializer."""
    tensor = array if isinstance(array, ir.TensorProtocol) else ir.tensor(array)
    base, i = name, 0
    while name in graph.initializers:
        i += 1
        name = f"{base}_{i}"
    value = ir.Value(name=name, shape=ir.Shape(tensor.shape), type=ir.TensorType(tensor.dtype))
    value.const_value = tensor
    graph.register_initializer(value)
    return value


def take_over(old: ir.Value, new: ir.Value, *, reader: ir.Node | None = None) -> None:
    """Make every consumer (and graph output) of ``old`` read ``new`` instead, except
    ``reader`` (the node that computes ``new`` from ``old``).

    ``new`` takes ``old``'s name and ``old`` is renamed, so a tensor keeps its name through
    the pipeline: validate compares tensors by name, and users find their outputs unchanged.
    """
    graph = old.graph
    for user, index in list(old.uses()):
        if user is not reader:
            user.replace_input_with(index, new)
    if graph is not None:
        for i, out in enumerate(graph.outputs):
            if out is old:
                graph.outputs[i] = new
    if old.name:
        name = old.name
        old.name = f"{name}/bct_src"
        new.name = name
    if new.shape is None and old.shape is not None:
        new.shape = old.shape
    if new.type is None and old.type is not None:
        new.type = old.type


def rank(value: ir.Value) -> int | None:
    return None if value.shape is None else len(value.shape)

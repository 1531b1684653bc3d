"""inspect: what a compression would do to a model, before doing it.

Runs the pipeline's own passes up to the lowering (canonicalize, quantize weights, embeddings,
activations: `bctonnx.passes.build_pipeline` without the lowering and storage passes) and reads
the mid-level nodes they leave (``bctonnx.mid``: BlockDequantize, BlockGather,
BlockFakeQuant), so what is listed is what `compress` quantizes, with the same config. Per
tensor: shape, block layout (axis, block size, number of blocks), bits, scale kind, stored
bytes before and after; for activations (scales computed at run time) the node that makes the
tensor and the nodes that read it. Then the nodes left alone and why, and totals with the
expected compression ratio (an estimate: the lowering's extra graph nodes and any float16
Casts are not counted).
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import onnx_ir as ir

from bctonnx.passes import Canonicalize, QuantizeActivations, QuantizeEmbeddings, QuantizeWeights
from bctonnx.passes.canonicalize import left_alone
from bctonnx.passes.common import (
    MID_DOMAIN,
    const_array,
    excluded,
    fmt_from_node,
    is_const,
    role,
    stored_weight,
)
from bctonnx.passes.pipeline import build_pipeline
from bctonnx.passes.prune_ffn import PruneFFN
from bctonnx.passes.prune_heads import PruneHeads
from bctonnx.passes.sparsify_nm import SparsifyNM
from bctonnx.passes.store_float16 import MIN_ELEMENTS, _fits_float16
from bctonnx.passes.token_drop import (
    TokenDrop,
    check_stages,
    encoder_flops,
    encoder_shape,
    tokens_per_layer,
)

from .api import load_input, prune_context, user_errors
from .blockformat import BlockFormat, BlockQuantized
from .config import CompressionConfig, resolve_config
from .errors import BctError
from .validate import find_tokenizer_dir

_PLANNING_PASSES = (
    Canonicalize,
    PruneHeads,
    PruneFFN,
    SparsifyNM,
    TokenDrop,
    QuantizeWeights,
    QuantizeEmbeddings,
    QuantizeActivations,
)
FLOPS_SEQS = (128, 384)  # sequence lengths the expected encoder FLOPs are shown for


@dataclass
class TensorPlan:
    """One tensor the compression quantizes."""

    kind: str  # "weight", "embedding", "activation"
    tensor: str
    shape: list[int | str | None]
    axis: int
    block_size: int
    num_blocks: int | None  # None: depends on run-time sizes (activations)
    bits: int
    scale: str  # e.g. "pow2/8 1 byte", "pow2/8 sb384 x m" (superblocks), "fp32 at run time"
    symmetric: bool
    bytes_before: int | None  # float32 bytes (stored tensors only)
    bytes_after: int | None  # codes + scales + zero points as stored
    producer: str | None = None  # activations: the node that makes the tensor
    readers: list[str] = field(default_factory=list)  # the nodes that read it


@dataclass
class LeftAlone:
    node: str
    op_type: str
    reason: str


@dataclass
class TokenWork:
    """Expected encoder work for one sequence length, without and with the token schedule."""

    seq: int
    tokens_per_layer: list[int]
    flops: int  # the full model
    flops_kept: int  # with the config's token schedule (= flops without one)

    @property
    def saved(self) -> float:
        return 1 - self.flops_kept / self.flops if self.flops else 0.0


@dataclass
class InspectReport:
    model: str
    config: CompressionConfig
    input_bytes: int
    tensors: list[TensorPlan] = field(default_factory=list)
    left_alone: list[LeftAlone] = field(default_factory=list)
    float_bytes: int = 0  # float32 initializers left (biases, LayerNorm, excluded weights)
    float_bytes_stored: int = 0  # as stored (float16 where the config says so)
    pruning: list[dict] = field(default_factory=list)  # pruning / N:M, one record per layer
    search: dict | None = None  # --target-ratio: the searched plan (bctonnx.search)
    work: list[TokenWork] = field(default_factory=list)  # per sequence length in FLOPS_SEQS

    def of_kind(self, kind: str) -> list[TensorPlan]:
        return [t for t in self.tensors if t.kind == kind]

    @property
    def stored_before(self) -> int:
        return sum(t.bytes_before or 0 for t in self.tensors)

    @property
    def stored_after(self) -> int:
        return sum(t.bytes_after or 0 for t in self.tensors)

    @property
    def expected_output_bytes(self) -> int:
        saved = self.stored_before - self.stored_after + self.float_bytes - self.float_bytes_stored
        return max(self.input_bytes - saved, 1)

    @property
    def expected_ratio(self) -> float:
        return self.input_bytes / self.expected_output_bytes

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "config": self.config.to_dict(),
            "input_bytes": self.input_bytes,
            "tensors": [asdict(t) for t in self.tensors],
            "left_alone": [asdict(n) for n in self.left_alone],
            "stored_bytes_before": self.stored_before,
            "stored_bytes_after": self.stored_after,
            "float_bytes": self.float_bytes,
            "float_bytes_stored": self.float_bytes_stored,
            "expected_output_bytes": self.expected_output_bytes,
            "expected_ratio": self.expected_ratio,
            "pruning": self.pruning,
            "search": self.search,
            "token_schedule": [asdict(s) for s in self.config.token_keep],
            "work": [dict(asdict(w), saved=w.saved) for w in self.work],
        }


def planning_passes(config: CompressionConfig, prune=None) -> list[ir.passes.PassBase]:
    """The pipeline's passes for ``config`` up to (not including) the lowering (pruning and
    N:M sparsity included: they need ``prune``, the calibration context)."""
    return [p for p in build_pipeline(config, prune) if isinstance(p, _PLANNING_PASSES)]


def _scale_text(fmt: BlockFormat, stored: bool) -> str:
    if fmt.nm_m:  # N:M-sparse: kept codes + a pattern per group, then the scales
        return f"{fmt.nm_n}:{fmt.nm_m} " + _scale_text(replace(fmt, nm_n=0, nm_m=0), stored)
    if not stored:
        return "fp32 at run time"
    if fmt.scale_kind == "pow2":
        kind = "pow2" if fmt.frac_bits == 0 else f"pow2/{2**fmt.frac_bits}"
        if fmt.superblock:  # one code per superblock, a 4-bit multiplier m per block
            return f"{kind} sb{fmt.superblock} x m"
        return f"{kind} {'4-bit code' if fmt.scale_bits == 4 else '1 byte'}"
    return fmt.scale_dtype.replace("float", "fp")


def _dims(value: ir.Value) -> list[int | str | None]:
    if value.shape is None:
        return []
    return [d if isinstance(d, int) else (str(d) if d is not None else None) for d in value.shape]


def _readers(value: ir.Value) -> list[str]:
    return [u.node.name or u.node.op_type for u in value.uses()]


def _stored_plan(node: ir.Node, kind: str) -> TensorPlan:
    if kind == "embedding":  # BlockGather(codes, scales, ids[, zp])
        zp = const_array(node.inputs[3]) if len(node.inputs) > 3 else None
        stored = BlockQuantized(
            const_array(node.inputs[0]), const_array(node.inputs[1]), fmt_from_node(node), zp
        )
    else:
        stored = stored_weight(node)
    fmt, codes = stored.fmt, stored.codes
    # the tensor's name: codes are "<tensor>.bct_codes" (see quantize_weights/embeddings)
    tensor = (node.inputs[0].name or "").removesuffix(".bct_codes")
    readers = _readers(node.outputs[0])
    return TensorPlan(
        kind=kind,
        tensor=tensor,
        shape=list(codes.shape),
        axis=fmt.axis % codes.ndim,
        block_size=fmt.block_size,
        num_blocks=stored.num_blocks,
        bits=fmt.bits,
        scale=_scale_text(fmt, True),
        symmetric=fmt.symmetric,
        bytes_before=int(codes.size) * 4,
        bytes_after=stored.nbytes,
        readers=readers,
    )


def _activation_plan(node: ir.Node) -> TensorPlan:
    fmt = fmt_from_node(node)
    value = node.inputs[0]
    dims = _dims(value)
    num_blocks = None
    if dims and all(isinstance(d, int) for d in dims):
        num_blocks = math.prod(dims[:-1]) * math.ceil(dims[-1] / fmt.block_size)
    producer = value.producer()
    return TensorPlan(
        kind="activation",
        tensor=node.outputs[0].name or value.name or "",
        shape=dims,
        axis=-1,
        block_size=fmt.block_size,
        num_blocks=num_blocks,
        bits=fmt.bits,
        scale=_scale_text(fmt, False),
        symmetric=True,
        bytes_before=None,
        bytes_after=None,
        producer=(producer.name or producer.op_type) if producer is not None else "(graph input)",
        readers=_readers(node.outputs[0]) or ["(graph output)"],
    )


def _left_alone(graph: ir.Graph, config: CompressionConfig) -> list[LeftAlone]:
    found = [LeftAlone(n.name or "", n.op_type, why) for n, why in left_alone(graph)]
    for node in graph:
        r = role(node)
        if r == "linear" and is_const(node.inputs[1]):  # a weight no pass replaced
            why = (
                "excluded (--exclude)"
                if excluded(node, config.exclude)
                else "weights are not quantized by this config"
            )
            found.append(LeftAlone(node.name or "", node.op_type, why))
        elif r == "embedding":
            axis = node.attributes.get("axis")
            if excluded(node, config.exclude):
                why = "excluded (--exclude)"
            elif axis is not None and axis.as_int() != 0:
                why = "Gather along an axis other than 0"
            else:
                why = "embeddings are not quantized by this config"
            found.append(LeftAlone(node.name or "", node.op_type, why))
        elif (
            node.op_type in ("MatMul", "Gemm")
            and r is None
            and len(node.inputs) > 1
            and is_const(node.inputs[1])
        ):
            found.append(LeftAlone(node.name or "", node.op_type, "constant weight is not float32"))
        elif r is not None and config.exclude and excluded(node, config.exclude):
            found.append(LeftAlone(node.name or "", node.op_type, f"{r}: excluded (--exclude)"))
    return found


def _floats_left(graph: ir.Graph, config: CompressionConfig) -> tuple[int, int]:
    """Bytes of float32 initializers still read after quantization, and as they will be
    stored (StoreFloat16's rule: >= MIN_ELEMENTS elements that float16 can hold)."""
    total = stored = 0
    for value in graph.initializers.values():
        tensor = value.const_value
        if tensor is None or tensor.dtype != ir.DataType.FLOAT or not value.uses():
            continue
        total += tensor.nbytes
        half = config.float_dtype == "float16" and tensor.size >= MIN_ELEMENTS
        stored += tensor.nbytes // 2 if half and _fits_float16(tensor.numpy()) else tensor.nbytes
    return total, stored


def inspect_model(
    model: str | os.PathLike,
    preset: str | CompressionConfig = "w8a8",
    **overrides: Any,
) -> InspectReport:
    """What `compress` would quantize in ``model`` (an .onnx file or a model directory) with
    ``preset`` and ``overrides`` (`resolve_config` keywords). Raises `BctError` for an input
    compress would refuse."""
    try:
        config = resolve_config(preset, **overrides)
    except ValueError as exc:
        raise BctError(str(exc)) from None
    ir_model, input_bytes = load_input(model)
    context = prune_context(ir_model, config, find_tokenizer_dir(model))
    report = InspectReport(model=str(model), config=config, input_bytes=input_bytes)
    with user_errors():
        for p in planning_passes(config, context):
            p(ir_model)
            if isinstance(p, Canonicalize):
                report.work = expected_work(ir_model.graph, config)
    graph = ir_model.graph
    report.pruning = context.records if context is not None else []
    for node in graph:
        if node.domain != MID_DOMAIN:
            continue
        if node.op_type == "BlockDequantize":
            report.tensors.append(_stored_plan(node, "weight"))
        elif node.op_type == "BlockGather":
            report.tensors.append(_stored_plan(node, "embedding"))
        elif node.op_type == "BlockFakeQuant":
            report.tensors.append(_activation_plan(node))
    report.left_alone = _left_alone(graph, config)
    report.float_bytes, report.float_bytes_stored = _floats_left(graph, config)
    return report


def expected_work(graph: ir.Graph, config: CompressionConfig) -> list[TokenWork]:
    """Encoder FLOPs per sequence of each `FLOPS_SEQS` length (canonicalized graph)."""
    shape = encoder_shape(graph)
    if shape is None:
        return []
    stages = config.token_keep
    check_stages(stages, shape.num_layers)
    return [
        TokenWork(
            seq,
            tokens_per_layer(shape, stages, seq),
            encoder_flops(shape, (), seq),
            encoder_flops(shape, stages, seq, merge=config.token_merge),
        )
        for seq in FLOPS_SEQS
    ]


# --- text ------------------------------------------------------------------------------------


def _mb(n: int | None) -> str:
    return "-" if n is None else f"{n / 1e6:.3f} MB" if n >= 100_000 else f"{n / 1e3:.1f} KB"


def _shape(shape: list) -> str:
    return "[" + ", ".join("?" if d is None else str(d) for d in shape) + "]"


def format_inspect(report: InspectReport) -> str:
    lines = [f"{report.model}: {_mb(report.input_bytes)}", f"config: {report.config.describe()}"]
    if report.search:
        from .search import format_plan

        lines += ["", format_plan(report.search)]
    if report.pruning:
        lines += ["", "pruning / N:M (one line per layer):"]
        for r in report.pruning:
            if r["kind"] == "nm":
                lines.append(
                    f"  {r['nm']} {r['layer']}: relative output error {r['rel_error']:.4f}"
                )
            else:
                what = "heads" if r["kind"] == "heads" else "FFN neurons"
                lines.append(
                    f"  {what} {r['width']} -> {r['kept']} {r['layer']}: refit error "
                    f"{r['rel_error_after']:.4f}"
                )
    for kind, title in (("weight", "weights"), ("embedding", "embedding tables")):
        rows = report.of_kind(kind)
        lines += ["", f"{title} ({len(rows)}):"]
        if not rows:
            continue
        width = min(max(len(t.tensor) for t in rows), 48)
        lines.append(
            f"  {'tensor':<{width}} {'shape':<12} {'axis':>4} {'block':>5} {'blocks':>7} "
            f"{'bits':>4} {'scale':<16} {'sym':<4} {'before':>10} {'after':>10}"
        )
        for t in rows:
            lines.append(
                f"  {t.tensor[-width:]:<{width}} {_shape(t.shape):<12} {t.axis:>4} "
                f"{t.block_size:>5} {t.num_blocks:>7} {t.bits:>4} {t.scale:<16} "
                f"{'yes' if t.symmetric else 'no':<4} {_mb(t.bytes_before):>10} "
                f"{_mb(t.bytes_after):>10}"
            )
    acts = report.of_kind("activation")
    lines += ["", f"activations ({len(acts)}; blocks along the last axis, scales at run time):"]
    if acts:
        width = min(max(len(t.tensor) for t in acts), 44)
        lines.append(
            f"  {'tensor':<{width}} {'shape':<28} {'block':>5} {'bits':>4}  made by -> read by"
        )
        for t in acts:
            lines.append(
                f"  {t.tensor[-width:]:<{width}} {_shape(t.shape)[:28]:<28} {t.block_size:>5} "
                f"{t.bits:>4}  {t.producer} -> {', '.join(t.readers)}"
            )
    lines += ["", f"left alone ({len(report.left_alone)}):"]
    for n in report.left_alone:
        lines.append(f"  {n.op_type} '{n.node}': {n.reason}")
    lines += ["", *_format_work(report)]
    lines += [
        "",
        f"stored tensors: {_mb(report.stored_before)} -> {_mb(report.stored_after)}; "
        f"floats left: {_mb(report.float_bytes)} -> {_mb(report.float_bytes_stored)}",
        f"expected: {_mb(report.input_bytes)} -> ~{_mb(report.expected_output_bytes)}, "
        f"ratio ~{report.expected_ratio:.2f}x (estimate: the lowering's graph nodes not counted)",
    ]
    return "\n".join(lines)


def _format_work(report: InspectReport) -> list[str]:
    stages = report.config.token_keep
    if stages:
        how = "merged into kept ones" if report.config.token_merge else "dropped"
        head = [
            "token schedule: "
            + ", then ".join(
                f"after layer {s.layer} keep {s.keep:g} of each sequence's real tokens"
                for s in stages
            )
            + f" (ranked by {report.config.token_score}; the others {how})"
        ]
    else:
        head = ["token schedule: none (every layer runs on every token)"]
    if not report.work:
        return head + ["expected encoder FLOPs: unknown (no BERT encoder layers found)"]
    lines = head + ["expected encoder FLOPs per sequence (linear layers + attention):"]
    for w in report.work:
        line = f"  {w.seq:>4} tokens: {w.flops / 1e9:.2f} G"
        if stages:
            line += (
                f" -> {w.flops_kept / 1e9:.2f} G ({100 * w.saved:.0f}% fewer; tokens per layer "
                f"{', '.join(map(str, w.tokens_per_layer))})"
            )
        lines.append(line)
    return lines


__all__ = ["InspectReport", "LeftAlone", "TensorPlan", "format_inspect", "inspect_model"]

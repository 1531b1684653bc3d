"""The pass pipeline: which passes run, in which order, for a compression config."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import onnx_ir as ir
import onnx_ir.passes.common as common_passes

from bctonnx.config import CompressionConfig

from .canonicalize import Canonicalize
from .common import MID_DOMAIN, role
from .fuse_attention import FuseAttention
from .lower_dequantize import LowerDequantize
from .lower_gather import LowerGather
from .lower_integer import LowerInteger
from .lower_matmul import LowerMatMul
from .lower_qdq import LowerQDQ
from .prune_ffn import PruneFFN
from .prune_heads import PruneHeads
from .pruning import PruneContext
from .quantize_activations import QuantizeActivations
from .quantize_embeddings import QuantizeEmbeddings
from .quantize_weights import QuantizeWeights
from .simplify_shapes import SimplifyShapes
from .sparsify_nm import SparsifyNM
from .store_float16 import StoreFloat16
from .token_drop import TokenDrop, TokenOpsFromChains, TokenScoresFromCodes

log = logging.getLogger(__name__)


@dataclass
class PassSummary:
    name: str
    seconds: float
    nodes_before: int
    nodes_after: int
    counts: dict[str, int] = field(default_factory=dict)


def build_pipeline(
    config: CompressionConfig, prune: PruneContext | None = None
) -> list[ir.passes.PassBase]:
    """The passes for ``config``; pruning and N:M sparsity need ``prune`` (calibration text)."""
    passes: list[ir.passes.PassBase] = [Canonicalize()]
    if config.needs_calibration:
        if prune is None:
            raise ValueError("pruning and N:M sparsity need calibration text (a PruneContext)")
        weight_block = config.weights.block_size if config.weights is not None else 1
        act_block = config.activations.block_size if config.activations is not None else 1
        # a per-layer fraction is keyed by the consuming linear node's name: the attention
        # output projection's for heads, the FFN output layer's for neurons
        overrides = config.prune_overrides
        if config.prune_heads > 0 or overrides:
            passes.append(
                PruneHeads(
                    config.prune_heads,
                    prune,
                    weight_block=weight_block,
                    act_block=act_block,
                    overrides=overrides,
                )
            )
        if config.prune_ffn > 0 or overrides:
            passes.append(
                PruneFFN(
                    config.prune_ffn,
                    prune,
                    weight_block=weight_block,
                    act_block=act_block,
                    overrides=overrides,
                )
            )
        if config.weights is not None and any(
            f.nm_m for f in [config.weights, *(f for _, f in config.weight_overrides)]
        ):
            passes.append(
                SparsifyNM(config.weights, prune, config.exclude, config.weight_overrides)
            )
    if config.token_keep:
        passes.append(
            TokenDrop(
                config.token_keep,
                score=config.token_score,
                merge=config.token_merge,
                output=config.token_output,
                special_ids=config.special_token_ids or (),
            )
        )
    if config.weights is not None:
        passes.append(QuantizeWeights(config.weights, config.exclude, config.weight_overrides))
    if config.embeddings is not None:
        passes.append(
            QuantizeEmbeddings(config.embeddings, config.exclude, config.fit_embedding_blocks)
        )
    if config.activations is not None:
        passes.append(QuantizeActivations(config.activations, config.exclude))
    if config.mode == "qdq":
        passes.append(LowerQDQ())
    elif config.mode == "integer":
        if config.activations is None:
            raise ValueError(
                "mode 'integer' needs quantized activations (drop --no-activations, or use "
                "mode 'qdq')"
            )
        passes += [
            LowerInteger(),
            LowerMatMul(match_weight_blocks=config.match_weight_blocks),
            *([TokenScoresFromCodes(), TokenOpsFromChains()] if config.token_keep else []),
            FuseAttention(),
            LowerGather(),
            LowerQDQ(),
            LowerDequantize(),
        ]
    else:
        raise ValueError(f"unknown mode {config.mode!r}")
    if config.float_dtype == "float16":
        passes.append(StoreFloat16())
    passes.append(SimplifyShapes())
    return passes


def _counts(graph: ir.Graph) -> dict[str, int]:
    counts: dict[str, int] = {}
    for node in graph:
        key = f"{node.domain}::{node.op_type}" if node.domain == MID_DOMAIN else (role(node) or "")
        if key:
            counts[key] = counts.get(key, 0) + 1
    return counts


def run_pipeline(
    model: ir.Model,
    config: CompressionConfig,
    progress: Callable[[str], None] | None = None,
    prune: PruneContext | None = None,
) -> list[PassSummary]:
    """Run every pass in place; returns one summary per pass."""
    summaries = []
    for p in build_pipeline(config, prune):
        name = type(p).__name__
        if progress:
            progress(name)
        before = len(model.graph)
        t0 = time.perf_counter()
        p(model)
        model.graph.sort()
        summaries.append(
            PassSummary(
                name, time.perf_counter() - t0, before, len(model.graph), _counts(model.graph)
            )
        )
        log.info("%s: %d -> %d nodes", name, before, len(model.graph))
    common_passes.RemoveUnusedNodesPass()(model)
    common_passes.RemoveUnusedOpsetsPass()(model)
    strip_annotations(model)
    return summaries


def strip_annotations(model: ir.Model) -> None:
    """Drop what only the passes needed: role metadata and intermediate shapes (value_info).

    onnxruntime infers shapes itself; saving them would cost ~90 KB on MiniLM.
    """
    outputs = {id(v) for v in model.graph.outputs}
    for node in model.graph:
        for key in [k for k in node.metadata_props if k.startswith("bctonnx.")]:
            del node.metadata_props[key]
        for value in node.outputs:
            if id(value) not in outputs:
                value.shape = None
                value.type = None

"""Data-free mixed precision: which weights hurt most at low precision, and how few of them to
keep at higher precision to reach a target fidelity.

No labels and no calibration set: fidelity is the cosine similarity of the model's output to
the FP32 model's on a handful of texts (the package's own sentences by default, or the user's).

1. ``weight_sensitivity``: each linear weight alone is fake-quantized to the low-precision
   format (everything else FP32) and the output cosine drop is measured. The FP32 graph is
   run once with every weight as a graph input, so each probe is one inference, not one
   compression (MiniLM: 36 probes in about 20 s).
2. ``plan``: the weights are promoted to the high-precision format in that order, the real
   compressed model (all of the preset: embeddings, activations, lowering) is measured at
   k = 0, 1, 2, 4, ... promoted weights, then bisected, and the smallest k that reaches the
   target cosine wins: the best ratio at that fidelity.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field, replace

import numpy as np
import onnx
import onnx_ir as ir

from .blockformat import BlockFormat, fake_quantize
from .config import CompressionConfig
from .modelio import load_model
from .runtime import make_session
from .textio import default_texts, load_tokenizer, make_feeds, mean_pool
from .validate import rowwise_cosine

log = logging.getLogger(__name__)


@dataclass
class WeightSensitivity:
    node: str  # the MatMul/Gemm node name (what weight_overrides match)
    weight: str
    shape: tuple[int, ...]
    cosine_drop: float  # 1 - output cosine with only this weight quantized
    reduction_size: int = 0  # K, the blocked axis


@dataclass
class MixedPrecisionPlan:
    config: CompressionConfig
    promoted: list[str] = field(default_factory=list)  # node names kept at the high format
    cosine: float = float("nan")  # of the chosen compressed model, on the probe texts
    target: float = float("nan")
    reached: bool = False
    trials: list[tuple[int, float]] = field(default_factory=list)  # (promoted count, cosine)


def _load(path) -> ir.Model:
    """A fresh IR model of a path or a ModelProto (an in-memory pruned model)."""
    if isinstance(path, onnx.ModelProto):
        return ir.serde.deserialize_model(path)
    model, _ = load_model(path)
    return model


def _linear_weights(path: str | os.PathLike) -> tuple[onnx.ModelProto, list[tuple[str, str, int]]]:
    """The canonicalized FP32 model and its linear weights: (node name, weight name, K axis)."""
    from bctonnx.passes.canonicalize import Canonicalize
    from bctonnx.passes.common import is_const, nodes_with_role
    from bctonnx.passes.quantize_weights import weight_reduction_axis

    model = _load(path)
    Canonicalize()(model)
    seen: set[str] = set()
    items = []
    for node in nodes_with_role(model.graph, "linear"):
        weight = node.inputs[1]
        if is_const(weight) and weight.name not in seen:
            seen.add(weight.name)
            items.append((node.name, weight.name, weight_reduction_axis(node)))
    return ir.serde.serialize_model(model), items


def _output_vectors(outputs: list[np.ndarray], feeds: dict) -> np.ndarray:
    out = np.asarray(outputs[0], dtype=np.float64)
    if out.ndim == 3 and "attention_mask" in feeds:
        return mean_pool(out, feeds["attention_mask"])
    return out.reshape(out.shape[0], -1)


def _probe_feeds(
    proto: onnx.ModelProto, texts, tokenizer_dir, skip=(), max_length: int = 128
) -> dict:
    tokenizer = load_tokenizer(tokenizer_dir) if tokenizer_dir else None
    names = [i.name for i in proto.graph.input if i.name not in skip]
    if tokenizer is not None and texts is None:
        texts = default_texts()[:32]
    batches = make_feeds(names, texts, tokenizer, batch_size=10_000, max_length=max_length)
    return batches[0]


def weight_sensitivity(
    path: str | os.PathLike,
    fmt: BlockFormat,
    *,
    texts: list[str] | None = None,
    tokenizer_dir: str | os.PathLike | None = None,
    threads: int | None = None,
) -> list[WeightSensitivity]:
    """Every linear weight's output cosine drop when it alone is in ``fmt``; largest first."""
    proto, items = _linear_weights(path)
    inits = {t.name: t for t in proto.graph.initializer}
    arrays = {w: onnx.numpy_helper.to_array(inits[w]).astype(np.float32) for _, w, _ in items}
    # the weights become graph inputs: one session, one run per probe
    keep = [t for t in proto.graph.initializer if t.name not in arrays]
    del proto.graph.initializer[:]
    proto.graph.initializer.extend(keep)
    for name, array in arrays.items():
        proto.graph.input.append(
            onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, array.shape)
        )
    feeds = _probe_feeds(proto, texts, tokenizer_dir, skip=arrays)
    sess = make_session(proto.SerializeToString(), threads)
    data_names = [i.name for i in sess.get_inputs() if i.name not in arrays]
    data = {n: feeds[n] for n in data_names}
    reference = _output_vectors(sess.run(None, {**data, **arrays}), feeds)
    result = []
    for node, weight, axis in items:
        quantized = fake_quantize(arrays[weight], fmt.with_axis(axis % arrays[weight].ndim))
        out = _output_vectors(sess.run(None, {**data, **arrays, weight: quantized}), feeds)
        drop = 1.0 - float(rowwise_cosine(out, reference).mean())
        shape = arrays[weight].shape
        result.append(WeightSensitivity(node, weight, shape, drop, shape[axis % len(shape)]))
    return sorted(result, key=lambda s: s.cosine_drop, reverse=True)


def plan(
    path: str | os.PathLike,
    config: CompressionConfig,
    target_cosine: float,
    *,
    promote: BlockFormat | None = None,
    texts: list[str] | None = None,
    tokenizer_dir: str | os.PathLike | None = None,
    threads: int | None = None,
) -> MixedPrecisionPlan:
    """The fewest weights promoted to ``promote`` for the compressed model to reach
    ``target_cosine`` vs FP32 on the probe texts. The default promotion is int8 with a
    one-byte pow2 scale per block of 128 (or of the base format's block size where 128 does
    not divide the weight's K)."""
    from .api import compress

    if config.weights is None:
        raise ValueError("a mixed-precision plan needs quantized weights")
    int8 = BlockFormat(bits=8, block_size=128, scale_kind="pow2", frac_bits=3)

    def promoted_format(s: WeightSensitivity) -> BlockFormat:
        if promote is not None:
            return promote
        if s.reduction_size % 128:
            return replace(int8, block_size=config.weights.block_size)
        return int8

    fp32 = ir.serde.serialize_model(_load(path))
    structure = config
    if config.needs_calibration:
        # pruning / N:M: done once (it reads calibration text), then every trial compresses
        # the pruned FP32 model (its N:M weights are already sparse: nothing to redo)
        from .api import structured_model

        path = structured_model(path, config, tokenizer_dir)
        config = replace(config, prune_ffn=0.0, prune_heads=0.0, prune_overrides=())
    ranking = weight_sensitivity(
        path, config.weights, texts=texts, tokenizer_dir=tokenizer_dir, threads=threads
    )
    feeds = _probe_feeds(fp32, texts, tokenizer_dir)
    ref_sess = make_session(fp32.SerializeToString(), threads)
    names = [i.name for i in ref_sess.get_inputs()]
    reference = _output_vectors(ref_sess.run(None, {n: feeds[n] for n in names}), feeds)
    model_input = path if isinstance(path, onnx.ModelProto) else os.fspath(path)

    def config_for(k: int) -> CompressionConfig:
        overrides = tuple((s.node, promoted_format(s)) for s in ranking[:k])
        return replace(config, weight_overrides=overrides + config.weight_overrides)

    measured: dict[int, float] = {}

    def measure(k: int) -> float:
        if k not in measured:
            proto = compress(model_input, config_for(k))
            sess = make_session(proto.SerializeToString(), threads)
            out = _output_vectors(sess.run(None, {n: feeds[n] for n in names}), feeds)
            measured[k] = float(rowwise_cosine(out, reference).mean())
            log.info("mixed precision: %d promoted -> cosine %.5f", k, measured[k])
        return measured[k]

    n = len(ranking)
    lo, hi = -1, None  # lo: largest k known to miss; hi: smallest k known to reach
    k = 0
    while k <= n:
        if measure(k) >= target_cosine:
            hi = k
            break
        lo = k
        k = 1 if k == 0 else min(2 * k, n) if k < n else n + 1
    if hi is not None:
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if measure(mid) >= target_cosine:
                hi = mid
            else:
                lo = mid
    chosen = hi if hi is not None else n
    return MixedPrecisionPlan(
        # compressing the original model: with its pruning, which every trial started from
        config=replace(
            config_for(chosen),
            prune_ffn=structure.prune_ffn,
            prune_heads=structure.prune_heads,
            prune_overrides=structure.prune_overrides,
        ),
        promoted=[s.node for s in ranking[:chosen]],
        cosine=measure(chosen),
        target=target_cosine,
        reached=hi is not None,
        trials=sorted(measured.items()),
    )

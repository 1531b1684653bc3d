"""--target-ratio: a label-free search for per-layer bits, pruning and N:M that reaches a
compression ratio with the output closest to FP32 on calibration text.

The choices, per layer of the encoder:

- every linear weight: its bit width (the config's weight format, int8 blocks of 128 with a
  one-byte pow2 scale, or w4a8's 4-bit superblocks) with or without 2:4 sparsity;
- every FFN block: the fraction of its neurons removed (0, 1/4, 1/2);
- every attention block: the fraction of its heads removed (0, 1/3, 2/3, in the steps the
  block alignment allows).

How (no labels anywhere):

1. one run of the FP32 model on calibration text gives the Gram matrix of every linear
   layer's input (`bctonnx.refit.Gram`);
2. every choice is tried alone on the FP32 model: the layer's weights replaced by what the
   choice makes of them (the quantized weight; the 2:4 weight reconstructed by
   `refit.sparsegpt_nm`; the pruned block with its output layer refit by `refit.obs_prune` /
   `refit.refit`, the removed rows zeroed), in one onnxruntime session whose weights are graph
   inputs, and its cost is the output's relative squared error against FP32 on held-out
   calibration tokens (logits, or mean-pooled embeddings);
3. bytes: the file bytes of the config itself (one real compression) minus its weights,
   plus each weight's stored bytes under its choice (`BlockFormat.bytes_for`, at its pruned
   shape);
4. greedy: from the most accurate choice of every layer, the move with the least added error
   per byte saved, until the estimated ratio reaches the target; then the real model is built
   (sequential pruning and reconstruction, quantization) and measured; if its ratio falls
   short, the greedy goes on from there for the missing bytes.

The errors of layers are taken as additive (an approximation: the real model is measured at
the end, and that measured error and ratio are what is reported).
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, field, replace

import numpy as np
import onnx
import onnx_ir as ir

from .blockformat import BlockFormat, fake_quantize
from .calibration import Calibration, Runner, calibration_set, read_calibration_texts, token_rows
from .config import PRESETS, CompressionConfig
from .errors import BctError
from .modelio import load_model
from .refit import Gram, obs_prune, refit, sparsegpt_nm
from .runtime import make_session

log = logging.getLogger(__name__)

INT8 = BlockFormat(bits=8, block_size=128, scale_kind="pow2", frac_bits=3)
FFN_FRACTIONS = (0.0, 0.25, 0.5)
HEAD_FRACTIONS = (0.0, 1 / 3, 2 / 3)
PROBE_BATCHES = 12  # held-out calibration batches the errors are measured on
SEARCH_TOKENS = 40_000  # calibration tokens the Gram matrices of the search read
FLOAT_BYTES = 2  # a bias element as stored (float16 in the presets)


@dataclass
class Choice:
    """One option of one group: what it is, its error alone, and how it changes bytes."""

    label: str
    error: float
    fmt: BlockFormat | None = None  # weights: the format
    fraction: float = 0.0  # blocks: the fraction removed
    keep: float = 1.0  # blocks: the kept share of the width


@dataclass
class Group:
    """A weight (kind "weight") or a prunable block ("ffn" / "heads") and its choices."""

    kind: str
    name: str  # node name: the MatMul (weights), the consuming linear node (blocks)
    choices: list[Choice]
    shape: tuple[int, int] = (0, 0)  # weights: [K, N]
    members: tuple[str, ...] = ()  # blocks: the weights whose K (down/O) or N (up/QKV) shrink
    reduce_k: tuple[str, ...] = ()  # blocks: members whose K shrinks (the others: N)
    current: int = 0


@dataclass
class RatioPlan:
    config: CompressionConfig
    target: float
    ratio: float = float("nan")  # measured on the built model
    error: float = float("nan")  # measured: output relative squared error vs FP32
    estimated_ratio: float = float("nan")
    reached: bool = False
    choices: list[dict] = field(default_factory=list)
    rounds: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {
            "target_ratio": self.target,
            "ratio": self.ratio,
            "estimated_ratio": self.estimated_ratio,
            "output_error": self.error,
            "reached": self.reached,
            "choices": self.choices,
            "rounds": self.rounds,
            "config": self.config.describe(),
        }


def format_plan(plan: dict) -> str:
    verdict = "reached" if plan["reached"] else "NOT reached"
    lines = [
        f"target ratio {plan['target_ratio']:g} {verdict}: {plan['ratio']:.3f}x (estimated "
        f"{plan['estimated_ratio']:.3f}x), output relative squared error vs FP32 on "
        f"calibration text {plan['output_error']:.5f}",
        "chosen configuration (per layer):",
    ]
    for c in plan["choices"]:
        lines.append(f"  {c['choice']:<24} {c['layer']}")
    return "\n".join(lines)


# --- statistics ----------------------------------------------------------------------------


def _output_rows(values: np.ndarray, batch: dict) -> np.ndarray:
    """Logits as they are; token states mean-pooled over real tokens."""
    out = np.asarray(values, np.float64)
    if out.ndim == 3:
        mask = batch["attention_mask"][..., None].astype(np.float64)
        return (out * mask).sum(1) / np.maximum(mask.sum(1), 1)
    return out.reshape(out.shape[0], -1)


class _Probe:
    """The FP32 model with every linear weight and bias as a graph input: one session, one
    run per candidate on the probe batches; the error is relative to FP32's output."""

    def __init__(self, proto: onnx.ModelProto, names: list[str], batches: list[dict]):
        p = onnx.ModelProto()
        p.CopyFrom(proto)
        inits = {t.name: t for t in p.graph.initializer}
        self.arrays = {n: onnx.numpy_helper.to_array(inits[n]).astype(np.float32) for n in names}
        keep = [t for t in p.graph.initializer if t.name not in self.arrays]
        del p.graph.initializer[:]
        p.graph.initializer.extend(keep)
        for name, a in self.arrays.items():
            p.graph.input.append(
                onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, a.shape)
            )
        del p.graph.output[1:]
        self.session = make_session(p.SerializeToString())
        self.data = [n.name for n in self.session.get_inputs() if n.name not in self.arrays]
        self.batches = batches
        self.reference = self._outputs({})
        self.energy = float(sum((r**2).sum() for r in self.reference))

    def _outputs(self, changes: dict[str, np.ndarray]) -> list[np.ndarray]:
        feeds = {**self.arrays, **changes}
        return [
            _output_rows(self.session.run(None, {**{n: b[n] for n in self.data}, **feeds})[0], b)
            for b in self.batches
        ]

    def error(self, changes: dict[str, np.ndarray]) -> float:
        out = self._outputs(changes)
        return float(sum(((o - r) ** 2).sum() for o, r in zip(out, self.reference, strict=True)))

    def relative(self, changes: dict[str, np.ndarray]) -> float:
        return self.error(changes) / max(self.energy, 1e-30)


def _grams(proto: onnx.ModelProto, calib: Calibration, inputs: list[str]) -> dict[str, Gram]:
    runner = Runner(proto, inputs)
    grams: dict[str, Gram] = {}
    for index, batch in enumerate(calib.batches):
        out = runner.run(batch)
        for name in inputs:
            x = token_rows(out[name], batch)
            if name not in grams:
                grams[name] = Gram(x.shape[1], 0)
            grams[name].add(x, np.zeros((x.shape[0], 0), np.float32), calib.held_out(index))
    return grams


class _PrunedOutput:
    """An output layer (FFN down / attention output projection) whose input groups (neurons /
    heads) greedy OBS removes: the model's output error for a count removed, the layer refit
    on the rest (`_refit_rows`). Its own-output Gram is built once for every count."""

    def __init__(self, probe, gram: Gram, lin, groups: list[list[int]]):
        self.probe, self.gram, self.lin, self.groups = probe, gram, lin, groups
        _, _, self.own = _refit_rows(gram, lin.weight, lin.bias, np.arange(lin.weight.shape[0]))

    def error(self, remove: int) -> float:
        removed = obs_prune(self.own, self.groups, remove)
        kept = np.concatenate([g for i, g in enumerate(self.groups) if i not in removed])
        wn, bn, _ = _refit_rows(self.gram, self.lin.weight, self.lin.bias, kept)
        lin = self.lin
        return self.probe.relative({lin.matmul.inputs[1].name: wn, **_bias(lin, bn)})


def _refit_rows(gram: Gram, w: np.ndarray, b: np.ndarray, keep: np.ndarray):
    """Rows of an output layer refit on its kept inputs against its own full output (the
    target X W + b of the FP32 model: C = G [W; b]); removed rows zero."""
    full = np.concatenate([w, b[None]]).astype(np.float64)
    g2 = Gram(gram.inputs, w.shape[1])
    g2.g = gram.g.copy()
    g2.c = np.matmul(gram.g, full)
    g2.yy = np.array([float((full * c).sum()) for c in g2.c])
    g2.n = gram.n.copy()
    wk, bk, _ = refit(g2, keep)
    out = np.zeros_like(w)
    out[keep] = wk
    return out, bk.astype(np.float32), g2


# --- the search ------------------------------------------------------------------------------


def _formats(base: BlockFormat) -> list[BlockFormat]:
    """Weight formats to choose among: the config's, int8 b128, w4a8's; each dense and 2:4."""
    w4 = PRESETS["w4a8"].weights
    out = []
    for f in (base, INT8, w4):
        for nm in ((0, 0), (2, 4)):
            g = replace(f, nm_n=nm[0], nm_m=nm[1])
            if g not in out:
                out.append(g)
    return out


def _fits(fmt: BlockFormat, k: int) -> BlockFormat | None:
    """``fmt`` for a weight of reduction size ``k`` (block / superblock fitted), or None."""
    if k % fmt.block_size:
        return None
    return replace(fmt, superblock=fmt.superblock_for(k)) if fmt.superblock else fmt


def search_ratio(
    model: str | os.PathLike | onnx.ModelProto,
    config: CompressionConfig,
    *,
    tokenizer_dir: str | os.PathLike | None,
    base_dir: str | os.PathLike | None = None,
    max_rounds: int = 3,
) -> RatioPlan:
    """The per-layer configuration for ``config.target_ratio`` (see module)."""
    from bctonnx.passes.canonicalize import Canonicalize
    from bctonnx.passes.encoder_layers import attention_blocks, ffn_blocks, linear_from_matmul
    from bctonnx.passes.pruning import alignment, kept_count, kept_heads

    from .api import compress_model, load_input

    target = float(config.target_ratio or 0)
    if config.weights is None:
        raise BctError("--target-ratio needs quantized weights")
    base = replace(
        config, target_ratio=None, prune_ffn=0.0, prune_heads=0.0, prune_overrides=(),
        weights=replace(config.weights, nm_n=0, nm_m=0), weight_overrides=(),
    )  # fmt: skip
    if isinstance(model, onnx.ModelProto):
        ir_model, input_bytes = load_input(model, base_dir)
    else:
        ir_model, _ = load_model(model)
        _, input_bytes = load_input(model, base_dir)
    Canonicalize()(ir_model)
    proto = ir.serde.serialize_model(ir_model)
    names = [v.name for v in ir_model.graph.inputs]
    texts = read_calibration_texts(config.calib_texts) if config.calib_texts else None
    calib = calibration_set(
        tokenizer_dir, names, texts, source=config.calib_texts, max_tokens=SEARCH_TOKENS
    )
    graph = ir_model.graph
    from bctonnx.passes.common import excluded, nodes_with_role

    linears = []
    for node in nodes_with_role(graph, "linear"):
        lin = linear_from_matmul(node)
        if lin is None or excluded(node, config.exclude):
            continue
        if len(list(node.inputs[1].uses())) != 1:
            continue
        linears.append(lin)
    by_name = {lin.name: lin for lin in linears}
    inputs = list(dict.fromkeys(lin.matmul.inputs[0].name for lin in linears))
    log.info("search: Gram matrices of %d inputs on %d tokens", len(inputs), calib.tokens)
    grams = _grams(proto, calib, inputs)
    probe_batches = [b for i, b in enumerate(calib.batches) if calib.held_out(i)][:PROBE_BATCHES]
    weight_names = [lin.matmul.inputs[1].name for lin in linears]
    bias_names = [lin.bias_value.name for lin in linears if lin.bias_value is not None]
    probe = _Probe(proto, weight_names + bias_names, probe_batches)

    groups: list[Group] = []
    wb = config.weights.block_size
    ab = config.activations.block_size if config.activations is not None else 1
    # weights
    for lin in linears:
        w, k = lin.weight, lin.weight.shape[0]
        gram = grams[lin.matmul.inputs[0].name]
        g_all = gram.total()[0]
        choices = []
        for f in _formats(config.weights):
            fmt = _fits(f, k)
            if fmt is None:
                continue
            w2, b2 = w, lin.bias
            if fmt.nm_m:
                w2, b2 = sparsegpt_nm(w, lin.bias, g_all, *fmt.nm)
            wq = fake_quantize(w2, fmt.with_axis(0))
            change = {lin.matmul.inputs[1].name: wq}
            if b2 is not None and lin.bias_value is not None:
                change[lin.bias_value.name] = b2.astype(np.float32)
            choices.append(Choice(fmt.describe(), probe.relative(change), fmt=f))
        groups.append(Group("weight", lin.name, choices, shape=w.shape))
    # FFN blocks and attention blocks
    for block in ffn_blocks(graph):
        if block.down.name not in by_name:
            continue
        width = block.width
        q = alignment(wb, ab, width)
        gram = grams[block.act.outputs[0].name]
        choices = []
        pruned = _PrunedOutput(probe, gram, block.down, [[j] for j in range(width)])
        for frac in FFN_FRACTIONS:
            keep = kept_count(width, frac, q)
            if any(c.keep == keep / width for c in choices):
                continue
            if keep == width:
                choices.append(Choice("FFN kept", 0.0))
                continue
            err = pruned.error(width - keep)
            choices.append(
                Choice(f"FFN {keep}/{width}", err, fraction=1 - keep / width, keep=keep / width)
            )
        groups.append(
            Group(
                "ffn",
                block.down.name,
                choices,
                members=(block.up.name, block.down.name),
                reduce_k=(block.down.name,),
            )
        )
    for block in attention_blocks(graph):
        if block.o.name not in by_name:
            continue
        d, heads = block.head_dim, block.heads
        gram = grams[block.merge.outputs[0].name]
        choices = []
        hgroups = [list(range(h * d, (h + 1) * d)) for h in range(heads)]
        pruned = _PrunedOutput(probe, gram, block.o, hgroups)
        for frac in HEAD_FRACTIONS:
            keep = kept_heads(heads, d, frac, wb, ab)
            if any(c.keep == keep / heads for c in choices):
                continue
            if keep == heads:
                choices.append(Choice("heads kept", 0.0))
                continue
            err = pruned.error(heads - keep)
            choices.append(
                Choice(f"heads {keep}/{heads}", err, fraction=1 - keep / heads, keep=keep / heads)
            )
        groups.append(
            Group(
                "heads",
                block.o.name,
                choices,
                members=(block.q.name, block.k.name, block.v.name, block.o.name),
                reduce_k=(block.o.name,),
            )
        )

    # bytes: the config's own file minus its weights, then each weight at its choice
    base_result = compress_model(model, base, base_dir=base_dir, tokenizer=tokenizer_dir)
    weights_of_base = sum(
        _fits(config.weights, s.shape[0]).bytes_for(s.shape) for s in groups if s.kind == "weight"
    )
    other = base_result.report.output_bytes - weights_of_base
    budget = input_bytes / target

    def keep_factor(name: str) -> tuple[float, float]:
        """(K factor, N factor) of a weight from its blocks' current choices."""
        fk = fn = 1.0
        for g in groups:
            if g.kind == "weight" or name not in g.members:
                continue
            keep = g.choices[g.current].keep
            if name in g.reduce_k:
                fk *= keep
            else:
                fn *= keep
        return fk, fn

    weight_groups = {g.name: g for g in groups if g.kind == "weight"}

    def weight_bytes(g: Group) -> float:
        """Stored bytes of a weight (and its bias) at its choice and pruned shape; infinite
        when the pruned K is not a multiple of the chosen format's block."""
        fk, fn = keep_factor(g.name)
        k, n = g.shape
        k2, n2 = round(k * fk), round(n * fn)
        fmt = _fits(g.choices[g.current].fmt, k2)
        if fmt is None:
            return math.inf
        return fmt.bytes_for((k2, n2)) + FLOAT_BYTES * n2

    def total_bytes() -> float:
        return other + sum(weight_bytes(g) for g in weight_groups.values())

    # start: the most accurate choice everywhere
    for g in groups:
        g.current = int(np.argmin([c.error for c in g.choices]))

    def greedy(budget_bytes: float) -> None:
        while total_bytes() > budget_bytes:
            best = None
            now = total_bytes()
            for g in groups:
                for j, c in enumerate(g.choices):
                    if j == g.current:
                        continue
                    old = g.current
                    g.current = j
                    saved = now - total_bytes()
                    g.current = old
                    if not saved > 0 or math.isinf(saved):
                        continue
                    cost = (c.error - g.choices[old].error) / saved
                    if best is None or cost < best[0]:
                        best = (cost, g, j)
            if best is None:
                break
            best[1].current = best[2]

    plan = RatioPlan(config=base, target=target)
    shortfall = 0.0
    for round_ in range(max_rounds):
        greedy(budget - shortfall)
        chosen = _config_of(base, groups, by_name)
        plan.estimated_ratio = input_bytes / total_bytes()
        result = compress_model(model, chosen, base_dir=base_dir, tokenizer=tokenizer_dir)
        ratio = result.report.ratio
        built = make_session(result.model.SerializeToString())
        feeds_names = [i.name for i in built.get_inputs()]
        out = [
            _output_rows(built.run(None, {n: b[n] for n in feeds_names})[0], b)
            for b in probe_batches
        ]
        err = float(sum(((o - r) ** 2).sum() for o, r in zip(out, probe.reference, strict=True)))
        plan.config, plan.ratio, plan.error = chosen, ratio, err / max(probe.energy, 1e-30)
        plan.rounds.append(
            {"estimated_ratio": plan.estimated_ratio, "ratio": ratio, "error": plan.error}
        )
        log.info("search round %d: %.3fx (estimated %.3fx)", round_, ratio, plan.estimated_ratio)
        if ratio >= target:
            plan.reached = True
            break
        shortfall += result.report.output_bytes - budget + 1
    plan.choices = [
        {"layer": g.name, "kind": g.kind, "choice": g.choices[g.current].label,
         "error_alone": g.choices[g.current].error}
        for g in groups
    ]  # fmt: skip
    return plan


def _bias(lin, b: np.ndarray) -> dict:
    return {} if lin.bias_value is None else {lin.bias_value.name: b}


def _config_of(base: CompressionConfig, groups: list[Group], by_name: dict) -> CompressionConfig:
    """The config of the current choices: a weight override per node (exact names), a pruning
    override per block."""
    overrides = []
    prune = []
    for g in groups:
        c = g.choices[g.current]
        if g.kind == "weight":
            overrides.append((_glob_exact(g.name), c.fmt))
        else:
            prune.append((_glob_exact(g.name), c.fraction if c.fraction > 0 else 0.0))
    return replace(base, weight_overrides=tuple(overrides), prune_overrides=tuple(prune))


def _glob_exact(name: str) -> str:
    """A glob that matches exactly ``name`` (fnmatch's special characters escaped)."""
    return "".join(f"[{ch}]" if ch in "*?[" else ch for ch in name)

"""validate: run a reference and a candidate model on the same inputs and compare.

Reports, per graph output: max / mean abs error and cosine similarity (per row of the last
axis, masked by the attention mask for token outputs); for a token-level hidden state also the
mean-pooled sentence-embedding cosine; for logits, top-1 agreement. The per-layer table compares
every LayerNormalization output that both models still carry under the same name (bctonnx
keeps tensor names through compression), or, in the integer form, the dequantized output of the
IntLayerNorm that replaced it (it keeps the node's name), and labels it with its encoder layer,
so the block that hurts stands out. For a candidate in the integer form, each integer op
(IntGelu, IntSoftmax, IntLayerNorm) is compared with its float original applied to the op's
own (dequantized) input on real activations: max and mean abs error in units of the op's output
scale (LSB) and the relative error.
"""

from __future__ import annotations

import os
import re
from dataclasses import asdict, dataclass, field

import numpy as np
import onnx
import onnxruntime as ort
from tqdm.auto import tqdm

from .errors import BctError
from .modelio import load_proto
from .ops.ref_attention import split_heads
from .runtime import session_options
from .textio import (  # defined here before bctonnx.textio: still importable from here
    default_texts,
    find_tokenizer_dir,
    load_tokenizer,
    make_feeds,
    mean_pool,
    read_texts,
    vocab_size,
)

__all__ = [
    "IntOpStats",
    "LayerStats",
    "OutputStats",
    "ValidationReport",
    "default_texts",
    "find_tokenizer_dir",
    "format_report",
    "integer_op_stats",
    "layer_probes",
    "load_tokenizer",
    "make_feeds",
    "mean_pool",
    "read_texts",
    "rowwise_cosine",
    "validate",
    "vocab_size",
]


@dataclass
class OutputStats:
    name: str
    max_abs_err: float
    mean_abs_err: float
    cosine: float
    top1_agreement: float | None = None
    pooled_cosine: float | None = None


@dataclass
class LayerStats:
    label: str
    tensor: str
    max_abs_err: float
    mean_abs_err: float
    rel_err: float
    cosine: float


@dataclass
class IntOpStats:
    """An integer op vs its float original on the same activations."""

    node: str
    op_type: str
    max_err_lsb: float  # max |int - float| / output scale of the element's block
    mean_err_lsb: float
    rel_err: float  # sum |int - float| / sum |float|


@dataclass
class ValidationReport:
    num_inputs: int
    outputs: list[OutputStats] = field(default_factory=list)
    layers: list[LayerStats] = field(default_factory=list)
    int_ops: list[IntOpStats] = field(default_factory=list)

    @property
    def embedding_cosine(self) -> float | None:
        """Mean cosine of the sentence embeddings (pooled output, or mean-pooled tokens)."""
        for o in self.outputs:
            if "sentence" in o.name or "pool" in o.name:
                return o.cosine
        for o in self.outputs:
            if o.pooled_cosine is not None:
                return o.pooled_cosine
        return None

    def to_dict(self) -> dict:
        d = asdict(self)
        d["embedding_cosine"] = self.embedding_cosine
        return d


# --- per-layer probes ----------------------------------------------------------------------------

_LAYER_RE = re.compile(r"layers?[._/]?(\d+)")


_LAYER_NORMS = ("LayerNormalization", "SkipLayerNormalization", "EmbedLayerNormalization")


def layer_probes(proto: onnx.ModelProto) -> list[tuple[str, str, str]]:
    """(label, tensor name, node name) of each LayerNorm output (onnxruntime's fused ones
    too), in graph order; labelled by the node's name, or its output's where the name says
    nothing (onnxruntime's optimizer names a node SkipLayerNorm_AddBias_3 and keeps the
    exporter's output name)."""
    probes = []
    for node in proto.graph.node:
        if node.op_type not in _LAYER_NORMS or not node.output:
            continue
        names = [n for n in (node.name, node.output[0]) if n]
        m = next((m for m in map(_LAYER_RE.search, names) if m), None)
        if m:
            where = "attention" if "attention" in m.string else "output"
            label = f"layer {m.group(1)} {where}"
        elif any("embed" in n.lower() for n in names):
            label = "embeddings"
        else:
            label = names[0]
        probes.append((label, node.output[0], node.name))
    return probes


@dataclass(frozen=True)
class _CandProbe:
    """Where the candidate has a reference LayerNorm's output: the tensor itself, or (integer
    form) the codes and block scales of the IntLayerNorm of the same node name."""

    tensor: str
    scales: str | None = None
    block_size: int = 0

    def fetch(self) -> list[str]:
        return [self.tensor] + ([self.scales] if self.scales else [])

    def value(self, values: dict[str, np.ndarray]) -> np.ndarray:
        if self.scales is None:
            return values[self.tensor]
        return _dequantize_blocks(values[self.tensor], values[self.scales], self.block_size)


def _candidate_probes(
    ref_proto: onnx.ModelProto, cand_proto: onnx.ModelProto, skip: list[str]
) -> list[tuple[str, str, _CandProbe]]:
    """(label, reference tensor, where the candidate has it) for `layer_probes` of the
    reference that the candidate still has, except the tensors in ``skip`` (graph outputs)."""
    cand_tensors = {o for n in cand_proto.graph.node for o in n.output}
    int_ln = {
        n.name: n
        for n in cand_proto.graph.node
        if n.domain == "bctonnx" and n.op_type == "IntLayerNorm" and n.name and len(n.output) > 1
    }
    probes = []
    for label, tensor, node_name in layer_probes(ref_proto):
        if tensor in skip:
            continue
        if tensor in cand_tensors:
            probes.append((label, tensor, _CandProbe(tensor)))
        elif node_name in int_ln:
            node = int_ln[node_name]
            cand = _CandProbe(node.output[0], node.output[1], int(_attrs(node)["block_size"]))
            probes.append((label, tensor, cand))
    return probes


def _attrs(node: onnx.NodeProto) -> dict:
    """A node's attributes by name (onnx's Python values; strings as bytes)."""
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def _with_outputs(proto: onnx.ModelProto, names: list[str]) -> bytes:
    p = onnx.ModelProto()
    p.CopyFrom(proto)
    have = {o.name for o in p.graph.output}
    produced = {o for n in p.graph.node for o in n.output}
    for name in names:
        if name not in have and name in produced:
            p.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
    return p.SerializeToString()


def _session(model: bytes, threads: int | None) -> ort.InferenceSession:
    try:
        return ort.InferenceSession(
            model, session_options(threads), providers=["CPUExecutionProvider"]
        )
    except Exception as exc:
        raise BctError(f"onnxruntime cannot load the model: {str(exc).splitlines()[0]}") from None


# --- metrics ----------------------------------------------------------------------------------------


def rowwise_cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a.reshape(-1, a.shape[-1]).astype(np.float64)
    b = b.reshape(-1, b.shape[-1]).astype(np.float64)
    num = (a * b).sum(-1)
    den = np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1)
    return np.where(den > 0, num / np.maximum(den, 1e-300), 1.0)


class _Acc:
    """Accumulates one tensor's errors over batches."""

    def __init__(self):
        self.max_err, self.abs_sum, self.ref_abs_sum, self.count = 0.0, 0.0, 0.0, 0
        self.cos: list[np.ndarray] = []
        self.pooled: list[np.ndarray] = []
        self.top1: list[np.ndarray] = []

    def add(self, ref: np.ndarray, cand: np.ndarray, mask: np.ndarray | None, name: str):
        if ref.shape != cand.shape:
            raise BctError(f"output '{name}' has shape {cand.shape}, reference has {ref.shape}")
        ref64, cand64 = ref.astype(np.float64), cand.astype(np.float64)
        valid = np.ones(ref.shape[:-1], bool) if ref.ndim else np.ones((), bool)
        if mask is not None and ref.ndim == 3 and ref.shape[:2] == mask.shape:
            valid = mask.astype(bool)
            self.pooled.append(rowwise_cosine(mean_pool(ref64, mask), mean_pool(cand64, mask)))
        err = np.abs(ref64 - cand64)[valid] if ref.ndim else np.abs(ref64 - cand64)
        self.max_err = max(self.max_err, float(err.max(initial=0.0)))
        self.abs_sum += float(err.sum())
        self.ref_abs_sum += float(np.abs(ref64)[valid].sum() if ref.ndim else abs(ref64))
        self.count += int(err.size)
        if ref.ndim >= 1:
            self.cos.append(rowwise_cosine(ref64, cand64)[valid.reshape(-1)])
        if "logits" in name and ref.ndim == 2:
            self.top1.append(ref.argmax(-1) == cand.argmax(-1))

    def stats(self, name: str) -> OutputStats:
        return OutputStats(
            name=name,
            max_abs_err=self.max_err,
            mean_abs_err=self.abs_sum / max(self.count, 1),
            cosine=float(np.concatenate(self.cos).mean()) if self.cos else float("nan"),
            top1_agreement=float(np.concatenate(self.top1).mean()) if self.top1 else None,
            pooled_cosine=float(np.concatenate(self.pooled).mean()) if self.pooled else None,
        )


def validate(
    reference: str | os.PathLike,
    candidate: str | os.PathLike,
    *,
    tokenizer_dir: str | os.PathLike | None = None,
    texts: list[str] | None = None,
    batch_size: int = 16,
    max_length: int = 128,
    per_layer: bool = True,
    threads: int | None = None,
    progress: bool = True,
) -> ValidationReport:
    """Compare ``candidate`` against ``reference`` on the same inputs (see module doc)."""
    ref_proto, ref_path = load_proto(reference)
    cand_proto, cand_path = load_proto(candidate)
    # checked (external data stays inside the model folder): now read it, for onnxruntime
    onnx.load_external_data_for_model(ref_proto, str(ref_path.parent))
    onnx.load_external_data_for_model(cand_proto, str(cand_path.parent))
    tok_dir = tokenizer_dir or find_tokenizer_dir(reference, candidate)
    tokenizer = load_tokenizer(tok_dir) if tok_dir else None
    if tokenizer is not None and texts is None:
        texts = default_texts()
    outputs = [o.name for o in ref_proto.graph.output]
    cand_outputs = {o.name for o in cand_proto.graph.output}
    missing = [o for o in outputs if o not in cand_outputs]
    if missing:
        raise BctError(f"candidate model lacks outputs {missing} of the reference")
    probes = _candidate_probes(ref_proto, cand_proto, outputs) if per_layer else []
    probe_names = [t for _, t, _ in probes]
    cand_fetch = list(outputs) + sorted({t for _, _, c in probes for t in c.fetch()})
    ref_sess = _session(_with_outputs(ref_proto, probe_names), threads)
    cand_sess = _session(_with_outputs(cand_proto, cand_fetch), threads)
    input_names = [i.name for i in ref_sess.get_inputs()]
    vocab = vocab_size(ref_proto)
    batches = make_feeds(input_names, texts, tokenizer, batch_size, max_length, vocab_size=vocab)
    fetch = outputs + probe_names
    accs = {n: _Acc() for n in fetch}
    n_inputs = 0
    for feeds in tqdm(batches, desc="validate", unit="batch", disable=not progress, leave=False):
        ref_out = dict(zip(fetch, ref_sess.run(fetch, feeds), strict=True))
        cand_out = dict(zip(cand_fetch, cand_sess.run(cand_fetch, feeds), strict=True))
        mask = feeds.get("attention_mask")
        for name in outputs:
            accs[name].add(np.asarray(ref_out[name]), np.asarray(cand_out[name]), mask, name)
        for _, name, cand in probes:
            accs[name].add(np.asarray(ref_out[name]), cand.value(cand_out), mask, name)
        n_inputs += len(next(iter(feeds.values())))
    report = ValidationReport(num_inputs=n_inputs)
    report.int_ops = integer_op_stats(cand_proto, batches, threads)
    report.outputs = [accs[n].stats(n) for n in outputs]
    for label, name, _ in probes:
        s = accs[name].stats(name)
        acc = accs[name]
        rel = acc.abs_sum / acc.ref_abs_sum if acc.ref_abs_sum else float("nan")
        report.layers.append(LayerStats(label, name, s.max_abs_err, s.mean_abs_err, rel, s.cosine))
    return report


# --- integer ops vs their float originals ---------------------------------------------------------

INT_OPS = ("IntGelu", "IntSoftmax", "IntLayerNorm", "BlockAttention")


def _float_gelu(x: np.ndarray, node, _inits) -> np.ndarray:
    import torch

    approximate = _attrs(node).get("approximate", b"none")
    approximate = approximate.decode() if isinstance(approximate, bytes) else approximate
    return torch.nn.functional.gelu(
        torch.from_numpy(x.astype(np.float32)), approximate=approximate
    ).numpy()


def _float_softmax(x: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    z = x.astype(np.float64) + (mask if mask is not None else 0.0)
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def _float_attention(values: dict, node, inits) -> tuple[np.ndarray, np.ndarray]:
    """BlockAttention's float original on its dequantized q, k, v ([b, S, h, d]): softmax(q.k^T
    * multiplier + mask) v, and the unit its error is counted in: per output element the
    largest V step of its head and column block (the output is a mix of V rows)."""

    def get(name: str) -> np.ndarray | None:
        if not name:
            return None
        if name in values:
            return values[name]
        return onnx.numpy_helper.to_array(inits[name]) if name in inits else None

    attrs = _attrs(node)
    block = int(attrs["block_size"])
    heads = int(attrs.get("num_heads", 0))  # operands [b, S, h * d]: as [b, S, h, d]
    operands = [get(node.input[i]) for i in range(6)]
    if heads:
        operands = [split_heads(x, heads, name) for x, name in zip(operands, "qQkKvV", strict=True)]
    q, k, v = (_dequantize_blocks(operands[i], operands[i + 1], block) for i in (0, 2, 4))
    q, k, v = (  # heads-first operands as the token-major tensors they stand for
        np.swapaxes(x, 1, 2) if int(attrs.get(f"{n}_heads_first", 0)) else x
        for x, n in ((q, "q"), (k, "k"), (v, "v"))
    )
    inputs = list(node.input) + [""] * (8 - len(node.input))
    mask, mul = get(inputs[6]), get(inputs[7])
    scores = np.einsum("bshd,bthd->bhst", q, k) * (
        float(mul.reshape(-1)[0]) if mul is not None else 1.0
    )
    p = _float_softmax(scores, None if mask is None else mask.astype(np.float64))
    ref = np.einsum("bhst,bthd->bshd", p, v)
    v_scale = operands[5]
    if int(attrs.get("v_heads_first", 0)):
        v_scale = np.swapaxes(v_scale, 1, 2)
    v_step = v_scale.max(axis=1, keepdims=True)  # [b, 1, h, nb]
    lsb = np.broadcast_to(
        np.repeat(v_step.astype(np.float64), block, -1)[..., : ref.shape[-1]], ref.shape
    )
    if heads:  # the op's output: [b, S, h * dv]
        ref, lsb = ref.reshape(*ref.shape[:2], -1), lsb.reshape(*lsb.shape[:2], -1)
    return ref, lsb


def _dequantize_blocks(codes: np.ndarray, scales: np.ndarray, block: int) -> np.ndarray:
    """codes * their block's scale, blocks along the last axis (the last may be partial)."""
    d = codes.shape[-1]
    return codes.astype(np.float64) * np.repeat(scales.astype(np.float64), block, -1)[..., :d]


def _accumulate(a: list, err: np.ndarray, lsb: np.ndarray, ref: np.ndarray) -> None:
    """max and sum of err in LSB, element count, sum of err, sum of |ref|."""
    a[0] = max(a[0], float((err / lsb).max(initial=0)))
    a[1] += float((err / lsb).sum())
    a[2] += err.size
    a[3] += float(err.sum())
    a[4] += float(np.abs(ref).sum())


def integer_op_stats(
    proto: onnx.ModelProto, batches: list[dict], threads: int | None, max_batches: int = 2
) -> list[IntOpStats]:
    """Each integer op of ``proto`` vs its float original (see module doc); [] if none."""
    nodes = [n for n in proto.graph.node if n.domain == "bctonnx" and n.op_type in INT_OPS]
    if not nodes:
        return []
    inits = {t.name: t for t in proto.graph.initializer}
    # (node, input codes, input scales, mask or None, output codes, output scales or None)
    plan = []
    extra = set()  # BlockAttention reads k, v, their scales and the mask too
    for node in nodes:
        mask = node.input[2] if node.op_type == "IntSoftmax" and len(node.input) > 2 else None
        scale = node.output[1] if len(node.output) > 1 else None
        plan.append((node, node.input[0], node.input[1], mask, node.output[0], scale))
        if node.op_type == "BlockAttention":
            extra |= set(node.input[2:])
    fetch = sorted(
        {t for p in plan for t in p[1:] if t and t not in inits} | extra - set(inits) - {""}
    )
    if not plan:
        return []
    sess = _session(_with_outputs(proto, fetch), threads)
    acc = {p[0].name or p[0].output[0]: [0.0, 0.0, 0, 0.0, 0.0] for p in plan}
    for feeds in batches[:max_batches]:
        values = dict(zip(fetch, sess.run(fetch, feeds), strict=True))
        for node, q_name, s_name, mask_name, out_name, scale_name in plan:
            attrs = _attrs(node)
            if node.op_type == "BlockAttention":
                ref, lsb = _float_attention(values, node, inits)
                got = values[out_name].astype(np.float64)
                _accumulate(acc[node.name or node.output[0]], np.abs(got - ref), lsb, ref)
                continue
            block = int(attrs["block_size"])
            out_block = int(attrs.get("out_block_size", 0)) or block  # IntGelu's may be larger
            x = _dequantize_blocks(values[q_name], values[s_name], block)
            if scale_name:
                got = _dequantize_blocks(values[out_name], values[scale_name], out_block)
            else:  # IntSoftmax: uint8 probabilities in steps of 1/256
                got = values[out_name].astype(np.float64) * 2.0**-8
            if node.op_type == "IntGelu":
                ref = _float_gelu(x, node, inits).astype(np.float64)
            elif node.op_type == "IntSoftmax":
                mask = None
                if mask_name:
                    mask = values[mask_name] if mask_name in values else None
                    if mask is None and mask_name in inits:
                        mask = onnx.numpy_helper.to_array(inits[mask_name])
                ref = _float_softmax(x, None if mask is None else mask.astype(np.float64))
            else:
                gamma, beta = (
                    _dequantize_blocks(
                        onnx.numpy_helper.to_array(inits[node.input[i]]),
                        onnx.numpy_helper.to_array(inits[node.input[i + 1]]),
                        block,
                    )
                    for i in (2, 4)
                )
                mu = x.mean(-1, keepdims=True)
                var = ((x - mu) ** 2).mean(-1, keepdims=True)
                ref = (x - mu) / np.sqrt(var + float(attrs.get("epsilon", 1e-5))) * gamma + beta
            if scale_name:
                lsb = _dequantize_blocks(np.ones_like(got), values[scale_name], out_block)
            else:
                lsb = np.full_like(got, 2.0**-8)  # IntSoftmax: probabilities in steps of 1/256
            _accumulate(acc[node.name or node.output[0]], np.abs(got - ref), lsb, ref)
    return [
        IntOpStats(
            node=name,
            op_type=next(p[0].op_type for p in plan if (p[0].name or p[0].output[0]) == name),
            max_err_lsb=a[0],
            mean_err_lsb=a[1] / max(a[2], 1),
            rel_err=a[3] / a[4] if a[4] else float("nan"),
        )
        for name, a in acc.items()
    ]


def format_report(report: ValidationReport) -> str:
    lines = [f"compared on {report.num_inputs} inputs", ""]
    lines.append(
        f"{'output':<28} {'max abs err':>12} {'mean abs err':>13} {'cosine':>9} {'extra':>20}"
    )
    for o in report.outputs:
        extra = ""
        if o.top1_agreement is not None:
            extra = f"top-1 agree {o.top1_agreement:.4f}"
        elif o.pooled_cosine is not None:
            extra = f"pooled cos {o.pooled_cosine:.5f}"
        lines.append(
            f"{o.name[:28]:<28} {o.max_abs_err:>12.5f} {o.mean_abs_err:>13.6f} {o.cosine:>9.5f} {extra:>20}"
        )
    if report.embedding_cosine is not None:
        lines += ["", f"sentence-embedding cosine vs reference: {report.embedding_cosine:.5f}"]
    if report.layers:
        lines += [
            "",
            f"{'layer':<22} {'max abs err':>12} {'mean abs err':>13} {'rel err':>9} {'cosine':>9}",
        ]
        worst = max(range(len(report.layers)), key=lambda i: report.layers[i].rel_err)
        for i, s in enumerate(report.layers):
            mark = "  <- largest relative error" if i == worst else ""
            lines.append(
                f"{s.label:<22} {s.max_abs_err:>12.5f} {s.mean_abs_err:>13.6f} {s.rel_err:>9.5f} {s.cosine:>9.5f}{mark}"
            )
    if report.int_ops:
        lines += [
            "",
            "integer ops vs their float originals on the same activations:",
            "(float op on the same dequantized input; LSB = the op's output scale; BlockAttention:"
            " float attention on its q, k, v, LSB = V's largest step in the head and block)",
            f"{'op':<15} {'max err (LSB)':>14} {'mean err (LSB)':>15} {'rel err':>9}  node",
        ]
        for o in report.int_ops:
            lines.append(
                f"{o.op_type:<15} {o.max_err_lsb:>14.2f} {o.mean_err_lsb:>15.3f} {o.rel_err:>9.5f}  {o.node}"
            )
    return "\n".join(lines)

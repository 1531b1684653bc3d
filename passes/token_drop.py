"""token_drop: fewer tokens in the later encoder layers, chosen per input at run time.

A schedule is a list of stages `bctonnx.config.TokenStage` ``(keep, layer)``: after ``layer``
encoder layers, every sequence goes on with ``ceil(keep x n)`` of its ``n`` real tokens (its
attention mask); the others leave (merged into a kept token, below). Special tokens ([CLS],
every [SEP]: the first and last real token, the ids given, the last token of each token type)
are always kept and padding never counts. A later stage keeps a smaller fraction of the same
``n``. The pass runs on the float graph right after ``canonicalize`` (before quantization) and
writes standard ONNX ops only, so both lowerings take it as it is::

    score "attention" (received from all real tokens) / "cls" (received from [CLS]):
      P = the Softmax output of layer L-1                     [B, heads, S, S]
      score[b, j] = sum_h sum_i row[b, i] * u8(P)[b, h, i, j]  MatMulInteger, int32: exact
    score "redundancy": 2 - max_{i != j} cos(h_i, h_j), from the tokens' int8 codes (below)
    key = special: 2^40, real: score, padding: -1             int64, one per token
    rank = position in TopK(key) (ties: the lower index)       ScatterElements
    keep = real & (special | rank < ceil(keep * n))            n from the attention mask
    idx = the kept positions in their original order, then the others (TopK of
          keep ? j : S + j, ascending); S' = the batch's largest kept count
          (``keep`` and ``idx`` are the tensors token_drop/keep@L and token_drop/kept@L)
    h' = GatherND(h, idx)                                      [B, S', H], the input of layer L
    mask' = slot < kept count ? 0 : -3.4e38                    every attention mask from L on

``merge`` (the default) does not throw the other tokens away: each is averaged into the kept
token (special ones included) whose hidden state is most similar (cosine; ties: the lower
slot), weighted by how many tokens each stands for, and every later attention counts a merged
token that many times (proportional attention, as in ToMe, Bolya et al. 2023)::

    w'[s] = sum_{j -> s} w[j]          h'[s] = sum_{j -> s} w[j] h[j] / w'[s]
    scores + log w'[key]               an Add before the mask add (role attention.bias, which
                                       quantize_activations quantizes with the scores)

``score="auto"`` ranks by attention for a model whose outputs read [CLS] only, by redundancy
for one with a full-length output (sentence embeddings). Measured on MiniLM (float models,
unlabeled train text; benchmarks/token_keep.py, README "Token downsampling"), at 0.5 from
layer 3: merging instead of dropping takes STS-B's mean |score difference| to FP32 from 0.28
to 0.13 and SST-2's logit RMS difference from 0.35 to 0.22; attention from all real tokens
ranks better there than from [CLS] (0.13 vs 0.15) or by redundancy (0.15); for mean-pooled
sentence embeddings redundancy ranks better (cosine 0.92 vs 0.90; at 0.7: 0.980 vs 0.961).

Batch invariance, by construction: each sequence's selection reads only its own attention
probabilities, ids, mask and hidden states, and slots beyond its kept count are masked
padding. No step's result depends on the tensor sizes: the scores are integer sums; cosines
are exact integer dot products of per-token int8 codes (``round(h / (max|h| / 127))``) and
correctly rounded float steps; merges are scatter-adds in token order (padding adds exact
zeros); log w' comes from a table. (A float MatMul over the padded token axis, and
onnxruntime's Log, gave results 1 ULP apart alone and in a batch.) In the integer form P is
IntSoftmax's uint8 codes / 256, and `TokenScoresFromCodes` (after the lowering) has the score
read the codes; fuse_attention then makes each layer one BlockAttention all the same: the
scores' MatMulInteger + ReduceSum become its ``received`` output (rows: the same query rows)
and the log weights its ``key_bias`` input (ref_attention.block_attention), and the fused op
leaves the masked keys out, so the compressed forms are batch-invariant too (tested).
`TokenOpsFromChains` (integer form, after the lowering) then makes the codes chain one
``TokenCodes`` node and the nearest-slot chain (cosines, Where, ArgMax) one ``NearestSlot``
(bctonnx/ops/ref_tokens.py): bit-identical results, a fraction of the time (~90 small nodes
of ~115 stay: selection, merge, masks).

Outputs. A classifier reading [CLS] (the pooler's Gather of position 0: [CLS] stays slot 0)
needs nothing more: the dropped tokens simply leave. A full-length output (``last_hidden_state``,
which sentence-embedding users mean-pool with the attention mask, or any reader but a [CLS]
Gather) gets its original length back, each dropped token filled by ``output``:

    "copy"    the final state of the kept token it was merged into (with ``merge``; else the
              most similar kept one): in a masked mean, a merged token counts w times
    "frozen"  its own hidden state at the layer where it left

(padding positions of a full-length output hold copies too: nothing reads them.)
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction

import numpy as np
import onnx_ir as ir

from bctonnx.config import TOKEN_SCORES, TokenStage
from bctonnx.ops.ref_tokens import MAX_HIDDEN

from .common import (
    OPS_DOMAIN,
    PassError,
    const_array,
    new_initializer,
    role,
    set_role,
    take_over,
)

log = logging.getLogger(__name__)

MASKED = float(np.finfo(np.float32).min)  # the additive mask of a padding slot
SPECIAL_KEY = 1 << 40  # above any score: heads x tokens x 255 < 2^40
OUTPUTS = ("copy", "frozen")
KEEP_DENOMINATOR = 1000  # keep fractions are rationals p/q, q <= this (exact ceil in int64)
BIAS_ROLE = "attention.bias"
LOG_TABLE = 8192  # log w for merged-token weights w < this (longer inputs: clamped)  # the Add of log w' to the attention scores


@dataclass
class EncoderLayer:
    """One BERT (post-LayerNorm) encoder layer as this pass sees it."""

    input: ir.Value  # the hidden state entering the layer, [B, S, H]
    output: ir.Value  # the hidden state leaving it (its last LayerNormalization's output)
    softmax: ir.Node
    mask_add: ir.Node | None  # the Add of the additive attention mask to the scores
    mask_index: int  # which input of mask_add is the mask


# --- finding the encoder ------------------------------------------------------------------------


def _linear_input(value: ir.Value) -> ir.Value | None:
    """The activation the Q projection reads, walking up from the attention's Q operand."""
    for _ in range(8):
        node = value.producer()
        if node is None:
            return None
        if role(node) == "linear":
            return node.inputs[0]
        if node.op_type not in ("Mul", "Div", "Transpose", "Reshape", "Cast", "Add"):
            return None
        live = [v for v in node.inputs if v is not None and const_array(v) is None]
        if node.op_type == "Add" and len(live) != 1:  # the bias add: one live input
            return None
        value = live[0] if node.op_type == "Add" else node.inputs[0]
    return None


def _softmax_after(scores: ir.Node) -> tuple[ir.Node, ir.Node | None, int] | None:
    """The Softmax the scores reach through scaling and the mask add, and that add."""
    value, mask_add, mask_index = scores.outputs[0], None, -1
    for _ in range(6):
        users = [u.node for u in value.uses()]
        if len(users) != 1:
            return None
        node = users[0]
        if role(node) == "softmax":
            return node, mask_add, mask_index
        if role(node) == "attention.mask":
            mask_add, mask_index = node, 1 if node.inputs[0] is value else 0
        elif node.op_type not in ("Mul", "Div", "Cast"):
            return None
        value = node.outputs[0]
    return None


def _next_layernorm(value: ir.Value) -> ir.Value | None:
    """The residual Add reading ``value``, then its LayerNormalization: that output."""
    adds = [u.node for u in value.uses() if role(u.node) == "residual"]
    if len(adds) != 1:
        return None
    norms = [u.node for u in adds[0].outputs[0].uses() if role(u.node) == "layernorm"]
    return norms[0].outputs[0] if len(norms) == 1 else None


def encoder_layers(graph: ir.Graph) -> list[EncoderLayer]:
    """The encoder layers in order (from canonicalize's roles); PassError for a graph that is
    not a BERT-style post-LayerNorm encoder."""
    layers = []
    for node in graph:
        if role(node) != "attention.qk":
            continue
        hidden = _linear_input(node.inputs[0])
        found = _softmax_after(node)
        middle = _next_layernorm(hidden) if hidden is not None else None
        output = _next_layernorm(middle) if middle is not None else None
        if found is None or output is None:
            raise PassError(
                f"token dropping: attention node '{node.name}' is not in a BERT encoder layer "
                "(Q/K/V projections of one hidden state, Softmax, then residual Add + "
                "LayerNormalization twice)"
            )
        layers.append(EncoderLayer(hidden, output, *found))
    if not layers:
        raise PassError("token dropping: no encoder attention layer in the graph")
    for a, b in zip(layers, layers[1:], strict=False):
        if a.output is not b.input:
            raise PassError(
                f"token dropping: the encoder layers are not chained ('{a.output.name}' leaves "
                f"one layer, the next reads '{b.input.name}')"
            )
    return layers


def _input_named(graph: ir.Graph, name: str) -> ir.Value | None:
    return next((v for v in graph.inputs if v.name == name), None)


def _token_ids(graph: ir.Graph) -> ir.Value:
    """The token ids: ``input_ids``, else the graph input indexing the largest table."""
    ids = _input_named(graph, "input_ids")
    if ids is not None:
        return ids
    tables = [
        (n.inputs[0].const_value.size, n.inputs[1])
        for n in graph
        if role(n) == "embedding" and n.inputs[1] is not None and n.inputs[1].is_graph_input()
    ]
    if not tables:
        raise PassError("token dropping: no token-id input (input_ids) in the graph")
    return max(tables, key=lambda t: t[0])[1]


def _is_cls_reader(node: ir.Node, value: ir.Value) -> bool:
    """Gather(value, 0, axis=1): a pooler reading position 0, [CLS], only."""
    if node.op_type != "Gather" or node.inputs[0] is not value:
        return False
    axis = node.attributes.get("axis")
    index = const_array(node.inputs[1])
    return (
        axis is not None
        and axis.as_int() == 1
        and index is not None
        and index.size == 1
        and int(index.reshape(-1)[0]) == 0
    )


def needs_full_length(graph: ir.Graph, value: ir.Value) -> bool:
    """Does anything but a [CLS] reader see this hidden state (a graph output, mean pooling,
    a token-level head)?"""
    if any(o is value for o in graph.outputs):
        return True
    return any(not _is_cls_reader(u.node, value) for u in value.uses())


def keep_fraction(keep: float) -> Fraction:
    """``keep`` as the rational the graph computes ceil(keep x n) with."""
    return Fraction(keep).limit_denominator(KEEP_DENOMINATOR)


def check_stages(stages: Sequence[TokenStage], num_layers: int) -> None:
    """Stages this model can take (`bctonnx.config.parse_token_keep` checked their form)."""
    for stage in stages:
        if not 1 <= stage.layer < num_layers:
            raise PassError(
                f"token keep from layer {stage.layer}: the model has {num_layers} encoder "
                f"layers, so tokens can leave after layer 1..{num_layers - 1}"
            )


# --- building ------------------------------------------------------------------------------------

I64, I32, F32, U8, BOOL = (
    ir.DataType.INT64,
    ir.DataType.INT32,
    ir.DataType.FLOAT,
    ir.DataType.UINT8,
    ir.DataType.BOOL,
)


class _Builder:
    """Appends standard ONNX nodes named token_drop/... to the graph (sorted at the end) and
    keeps one initializer per constant."""

    def __init__(self, graph: ir.Graph):
        self.graph = graph
        self.count = 0
        self.consts: dict[str, ir.Value] = {}

    def __call__(self, op_type: str, *inputs, dtype=None, outputs: int = 1, **attrs):
        self.count += 1
        name = f"token_drop/{op_type}_{self.count}"
        node = ir.Node(
            "",
            op_type,
            list(inputs),
            ir.convenience.convert_attributes(attrs),
            num_outputs=outputs,
            name=name,
        )
        self.graph.append(node)
        for i, out in enumerate(node.outputs):
            out.name = f"{name}/{i}" if outputs > 1 else name
            if dtype is not None:
                out.dtype = dtype
        return node.outputs[0] if outputs == 1 else tuple(node.outputs)

    def const(self, array) -> ir.Value:
        array = np.asarray(array)
        key = f"{array.dtype}{array.shape}{array.tobytes().hex()}"
        if key not in self.consts:
            name = f"token_drop/c{len(self.consts)}"
            self.consts[key] = new_initializer(self.graph, name, array)
        return self.consts[key]

    def axes(self, *axes: int) -> ir.Value:
        return self.const(np.array(axes, np.int64))

    def i64(self, v: int) -> ir.Value:
        return self.const(np.int64(v))

    def f32(self, v: float) -> ir.Value:
        return self.const(np.float32(v))

    def arange(self, width: ir.Value) -> ir.Value:
        """0 .. width-1 for a [1] int64 width."""
        return self("Range", self.i64(0), self("Squeeze", width, self.axes(0)), self.i64(1))

    def width(self, tokens: ir.Value) -> ir.Value:
        """[1] int64: the size of axis 1 (tokens)."""
        return self("Shape", tokens, start=1, end=2, dtype=I64)


@dataclass
class _Tokens:
    """The sequence state between stages, per slot: [B, S] each."""

    valid: ir.Value  # bool: a real token (not padding)
    special: ir.Value  # bool
    weight: ir.Value | None  # float: how many input tokens the slot stands for (merge)


@dataclass
class _Stage:
    """What a stage made, for putting a full-length output back together."""

    hidden: ir.Value  # its input hidden state [B, S, H]
    keep: ir.Value  # [B, S] bool
    source: ir.Value  # [B, S] int64: the slot a token's output comes from


class TokenDrop(ir.passes.InPlacePass):
    """Drop or merge tokens between encoder layers per the schedule (see module doc)."""

    def __init__(
        self,
        stages: Sequence[TokenStage],
        *,
        score: str = "auto",
        merge: bool = True,
        output: str = "copy",
        special_ids: Sequence[int] = (),
    ):
        super().__init__()
        if score not in TOKEN_SCORES:
            raise ValueError(f"token score must be one of {', '.join(TOKEN_SCORES)}")
        if output not in OUTPUTS:
            raise ValueError(f"token output must be one of {', '.join(OUTPUTS)}, got {output!r}")
        self.stages = tuple(stages)
        self.score = score
        self.merge = merge
        self.output = output
        self.special_ids = tuple(int(i) for i in special_ids)

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        if not self.stages:
            return ir.passes.PassResult(model, modified=False)
        graph = model.graph
        layers = encoder_layers(graph)
        check_stages(self.stages, len(layers))
        full_length = needs_full_length(graph, layers[-1].output)
        self.rank_by = self.score
        if self.score == "auto":
            self.rank_by = "redundancy" if full_length else "attention"
        b = self.b = _Builder(graph)
        ids = _token_ids(graph)
        mask = _input_named(graph, "attention_mask")
        if mask is None:
            mask = b("Expand", b.i64(1), b("Shape", ids))
        valid = b("Cast", mask, to=BOOL, dtype=BOOL)
        real = b("ReduceSum", b("Cast", valid, to=I64), b.axes(1), keepdims=1, dtype=I64)
        tokens = _Tokens(
            valid,
            self._specials(ids, _input_named(graph, "token_type_ids"), valid),
            b("Cast", valid, to=F32, dtype=F32) if self.merge else None,
        )
        made = []
        for i, stage in enumerate(self.stages):
            layer = layers[stage.layer]
            until = self.stages[i + 1].layer if i + 1 < len(self.stages) else len(layers)
            readers = list(layer.input.uses())
            probs = layers[stage.layer - 1].softmax.outputs[0]
            hidden, tokens, record = self._stage(stage, layer.input, probs, tokens, real)
            for use in readers:
                use.node.replace_input_with(use.idx, hidden)
            self._attend(layers[stage.layer : until], tokens)
            made.append(record)
        if full_length:
            self._restore_length(layers[-1].output, made)
        graph.sort()
        return ir.passes.PassResult(model, modified=True)

    def _specials(self, ids: ir.Value, types: ir.Value | None, valid: ir.Value) -> ir.Value:
        """[B, S] bool: the first and last real token, the tokens with a special id, and the
        last token of each token type (a pair's first [SEP]); never padding."""
        b = self.b
        width = b.width(ids)
        pos = b.arange(width)
        first = b("ReduceMin", b("Where", valid, pos, width), b.axes(1), keepdims=1)
        last = b("ReduceMax", b("Where", valid, pos, b.i64(-1)), b.axes(1), keepdims=1)
        special = b("Or", b("Equal", pos, first), b("Equal", pos, last))
        if self.special_ids:
            listed = b.const(np.array(self.special_ids, np.int64))
            hit = b("Equal", b("Unsqueeze", ids, b.axes(2)), listed)  # [B, S, K]
            hit = b("ReduceMax", b("Cast", hit, to=I32), b.axes(2), keepdims=0)
            special = b("Or", special, b("Cast", hit, to=BOOL))
        if types is not None:
            head = b("Slice", types, b.axes(0), b.axes(-1), b.axes(1))
            tail = b("Slice", types, b.axes(1), b.axes(2**62), b.axes(1))
            change = b("Cast", b("Not", b("Equal", head, tail)), to=I32)
            change = b("Pad", change, b.const(np.array([0, 0, 0, 1], np.int64)))
            special = b("Or", special, b("Cast", change, to=BOOL))
        return b("And", special, valid, dtype=BOOL)

    def _scores(self, probs: ir.Value, valid: ir.Value, codes) -> ir.Value:
        """[B, S] int64: how much each token is worth keeping (module doc)."""
        b = self.b
        if self.rank_by == "redundancy":
            # 2 - the cosine to the most similar other real token, in steps of 2^-20
            pos = b.arange(b.width(valid))
            similar = self._cosines(codes, codes)  # [B, S, S]
            other = b("Not", b("Equal", b("Unsqueeze", pos, b.axes(1)), pos))  # [S, S]
            other = b("And", other, b("Unsqueeze", valid, b.axes(1)))  # [B, S, S]
            similar = b("Where", other, similar, b.f32(-2.0))
            closest = b("ReduceMax", similar, b.axes(2), keepdims=0)
            distinct = b("Mul", b("Sub", b.f32(2.0), closest), b.f32(2.0**20))
            return b("Cast", distinct, to=I64)
        row = valid
        if self.rank_by == "cls":
            width = b.width(valid)
            pos = b.arange(width)
            first = b("ReduceMin", b("Where", valid, pos, width), b.axes(1), keepdims=1)
            row = b("And", valid, b("Equal", pos, first))
        row = b("Unsqueeze", b("Cast", row, to=U8), b.axes(1, 2), dtype=U8)  # [B, 1, 1, S]
        row.shape = ir.Shape([None, 1, 1, None])  # (fuse_attention takes it as rows)
        p_codes = b("QuantizeLinear", probs, b.f32(1 / 256), b.const(np.uint8(0)), dtype=U8)
        received = b("MatMulInteger", row, p_codes)  # [B, heads, 1, S] int32
        return b("Cast", b("ReduceSum", received, b.axes(1, 2), keepdims=0), to=I64)

    def _stage(self, stage: TokenStage, hidden, probs, tokens: _Tokens, real):
        b = self.b
        valid, special = tokens.valid, tokens.special
        width = b.width(valid)
        pos = b.arange(width)
        codes = self._token_codes(hidden)  # for cosine similarities
        key = b("Where", valid, self._scores(probs, valid, codes), b.i64(-1))
        key = b("Where", special, b.i64(SPECIAL_KEY), key)
        _, order = b("TopK", key, width, axis=1, largest=1, sorted=1, outputs=2)
        rank = b("ScatterElements", order, order, b("Expand", pos, b("Shape", order)), axis=1)
        fraction = keep_fraction(stage.keep)
        limit = b("Add", b("Mul", real, b.i64(fraction.numerator)), b.i64(fraction.denominator - 1))
        limit = b("Div", limit, b.i64(fraction.denominator))  # ceil(keep * n), exact
        keep = b("And", valid, b("Or", special, b("Less", rank, limit)), dtype=BOOL)
        keep.name = f"token_drop/keep@{stage.layer}"  # [B, S] bool, named for tests and users
        kept = b("Cast", keep, to=I64)
        count = b("ReduceSum", kept, b.axes(1), keepdims=1)  # [B, 1]
        new_width = b("ReduceMax", count, b.axes(0), keepdims=0, dtype=I64)  # [1]
        # the kept positions in their order first, then the others
        _, idx = b(
            "TopK",
            b("Where", keep, pos, b("Add", pos, width)),
            new_width,
            axis=1,
            largest=0,
            sorted=1,
            outputs=2,
        )
        idx.name = f"token_drop/kept@{stage.layer}"  # [B, S'] int64: positions, kept first
        slots = b.arange(new_width)
        new_valid = b("Less", slots, count, dtype=BOOL)
        new_special = b("GatherElements", b("Cast", special, to=I32), idx, axis=1)
        new_special = b("Cast", new_special, to=BOOL, dtype=BOOL)
        idx = b("Unsqueeze", idx, b.axes(2))
        slot_of = b("Sub", b("CumSum", kept, b.i64(1)), b.i64(1))  # a kept token's slot
        source = b("Where", keep, slot_of, b.i64(0))
        weight = None
        if self.merge or self.output == "copy":
            source = b("Where", keep, slot_of, self._nearest(codes, idx, new_valid))
        if self.merge:
            new_hidden, weight = self._merge(hidden, source, tokens.weight, new_width)
        else:
            new_hidden = b("GatherND", hidden, idx, batch_dims=1, dtype=F32)
        if hidden.shape is not None:
            new_hidden.shape = ir.Shape([hidden.shape[0], f"kept{stage.layer}", hidden.shape[-1]])
        return (
            new_hidden,
            _Tokens(new_valid, new_special, weight),
            _Stage(hidden, keep, source),
        )

    def _merge(self, hidden, source, weight, new_width):
        """Weighted means of the tokens each slot takes in, and the slots' weights.

        Scatter-adds in token order (ScatterElements with reduction "add"; padding has weight 0
        and adds exact zeros): every slot sums the same terms in the same order whatever the
        padding, unlike a matmul over the padded token axis. (Not ScatterND: onnxruntime
        1.31 runs its updates on several threads, so two tokens adding to one slot race; at 2
        threads one MiniLM run in ~5 differed from the last.)"""
        b = self.b
        rows = b("Concat", b("Shape", hidden, end=1), new_width, axis=0)
        zero = ir.tensor(np.array([0], np.float32))
        sums = b(
            "ConstantOfShape", b("Concat", rows, b("Shape", hidden, start=2), axis=0), value=zero
        )
        weighted = b("Mul", hidden, b("Unsqueeze", weight, b.axes(2)))
        index = b("Expand", b("Unsqueeze", source, b.axes(2)), b("Shape", weighted))
        sums = b("ScatterElements", sums, index, weighted, axis=1, reduction="add")
        counts = b("ConstantOfShape", rows, value=zero)
        counts = b("ScatterElements", counts, source, weight, axis=1, reduction="add", dtype=F32)
        scale = b("Reciprocal", b("Max", counts, b.f32(1e-6)))
        return b("Mul", sums, b("Unsqueeze", scale, b.axes(2)), dtype=F32), counts

    def _token_codes(self, hidden: ir.Value) -> tuple[ir.Value, ir.Value, ir.Value]:
        """Each token's hidden state on its own integer grid (max |h| / 127): the codes as
        uint8 (offset 128) and int8, and their squared norm (an exact whole number in float).
        Cosines from them are exact integer dot products (MatMulInteger) and correctly rounded
        float steps, the same whatever else is in the batch (a float matmul is not: its
        kernel's summation order follows the tensor sizes)."""
        b = self.b
        peak = b("ReduceMax", b("Abs", hidden), b.axes(2), keepdims=1)
        step = b("Div", b("Max", peak, b.f32(1e-30)), b.f32(127.0))
        grid = b("Round", b("Div", hidden, step))  # whole numbers in [-127, 127]
        offset = b("Cast", b("Add", grid, b.f32(128.0)), to=U8)
        codes = b("Cast", grid, to=ir.DataType.INT8)
        norm = b("ReduceSumSquare", grid, b.axes(2), keepdims=0, dtype=F32)  # < 2^24: exact
        return offset, codes, norm

    def _cosines(self, rows, columns) -> ir.Value:
        """[B, S, S'] float: cosines between two sets of tokens (`_token_codes`)."""
        b = self.b
        dots = b(
            "MatMulInteger",
            rows[0],
            b("Transpose", columns[1], perm=[0, 2, 1]),
            b.const(np.uint8(128)),  # uint8 x int8: onnxruntime's fast integer GEMM
        )
        norms = b("Mul", b("Unsqueeze", rows[2], b.axes(2)), b("Unsqueeze", columns[2], b.axes(1)))
        return b("Div", b("Cast", dots, to=F32), b("Sqrt", b("Max", norms, b.f32(1.0))))

    def _nearest(self, codes, idx: ir.Value, valid: ir.Value) -> ir.Value:
        """[B, S] int64: for every token, the kept slot whose hidden state is most similar
        (cosine of the token codes; ArgMax: ties go to the lower slot)."""
        b = self.b
        kept = (None, *(b("GatherND", c, idx, batch_dims=1) for c in codes[1:]))
        similar = self._cosines(codes, kept)  # [B, S, S']
        similar = b("Where", b("Unsqueeze", valid, b.axes(1)), similar, b.f32(-2.0))
        return b("ArgMax", similar, axis=2, keepdims=0, dtype=I64)

    def _attend(self, layers: list[EncoderLayer], tokens: _Tokens) -> None:
        """The layers after a stage attend to its slots: the mask of its padding, and with
        merge the log of each slot's weight added to the scores."""
        b = self.b
        open_ = b("Unsqueeze", tokens.valid, b.axes(1, 2))  # [B, 1, 1, S']
        mask = b("Where", open_, b.f32(0.0), b.f32(MASKED), dtype=F32)
        mask.shape = ir.Shape([None, 1, 1, None])
        bias = None
        if tokens.weight is not None:
            # log w from a table (w: whole numbers, padding slots 0 and masked anyway): a
            # Log kernel's result may depend on the tensor's size (vectorized vs scalar path)
            count = b("Cast", b("Min", tokens.weight, b.f32(LOG_TABLE - 1)), to=I64)
            table = np.log(np.maximum(np.arange(LOG_TABLE), 1)).astype(np.float32)
            bias = b("Unsqueeze", b("Gather", b.const(table), count), b.axes(1, 2), dtype=F32)
            bias.shape = mask.shape
        for layer in layers:
            if layer.mask_add is None:
                raise PassError(
                    f"token dropping: the attention before '{layer.softmax.name}' has no mask "
                    "add to mask the dropped slots"
                )
            layer.mask_add.replace_input_with(layer.mask_index, mask)
            if bias is None:
                continue
            scores = layer.mask_add.inputs[1 - layer.mask_index]
            biased = b("Add", scores, bias, dtype=F32)
            set_role(biased.producer(), BIAS_ROLE)
            biased.shape = scores.shape
            layer.mask_add.replace_input_with(1 - layer.mask_index, biased)

    def _restore_length(self, final: ir.Value, made: list[_Stage]) -> None:
        """The final hidden state at its original length again (module doc)."""
        b = self.b
        full, first = final, None
        for record in reversed(made):
            index = b("Unsqueeze", record.source, b.axes(2))
            full = b("GatherND", full, index, batch_dims=1, dtype=F32)
            first = first or full.producer()
            if self.output == "frozen":
                kept = b("Unsqueeze", record.keep, b.axes(2))
                full = b("Where", kept, full, record.hidden, dtype=F32)
        take_over(final, full, reader=first)


class TokenScoresFromCodes(ir.passes.InPlacePass):
    """(integer form, after lower_matmul) The token scores read IntSoftmax's uint8 codes:

        QuantizeLinear(Mul(Cast(p: uint8), 2^-8), 2^-8, 0) -> p

    exact (p / 256 * 256 = p), so P is not widened to float for the scores alone. The chain
    goes (when nothing else reads it), so that fuse_attention sees the scores' MatMulInteger as
    the probabilities' only reader beside P.V and fuses the layer, the sums becoming
    BlockAttention's ``received`` output."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        count = 0
        for node in list(model.graph):
            if node.op_type == "QuantizeLinear" and (node.name or "").startswith("token_drop/"):
                codes = _softmax_codes(node)
                if codes is not None:
                    for user, index in list(node.outputs[0].uses()):
                        user.replace_input_with(index, codes)
                    _remove_unread(model.graph, node)
                    count += 1
        return ir.passes.PassResult(model, modified=bool(count))


def _remove_unread(graph: ir.Graph, node: ir.Node | None) -> None:
    """Remove ``node`` and then its producers, while nothing reads their outputs."""
    while node is not None and not any(list(o.uses()) for o in node.outputs):
        if any(o is out for o in node.outputs for out in graph.outputs):
            return
        producer = node.inputs[0].producer() if node.inputs and node.inputs[0] else None
        graph.remove(node, safe=True)
        node = producer


def _scalar(value: ir.Value | None) -> float | None:
    array = const_array(value)
    return float(array.reshape(-1)[0]) if array is not None and array.size == 1 else None


def _softmax_codes(quantize: ir.Node) -> ir.Value | None:
    """p when ``quantize`` is QuantizeLinear(Mul(Cast(p: uint8 of IntSoftmax), s), s, 0)."""
    mul = quantize.inputs[0].producer()
    cast = mul.inputs[0].producer() if mul is not None and mul.op_type == "Mul" else None
    if cast is None or cast.op_type != "Cast":
        return None
    codes = cast.inputs[0]
    source = codes.producer()
    zero = const_array(quantize.inputs[2]) if len(quantize.inputs) > 2 else None
    scale = _scalar(quantize.inputs[1])
    if (
        codes.dtype != ir.DataType.UINT8
        or source is None
        or source.op_type != "IntSoftmax"
        or scale is None
        or _scalar(mul.inputs[1]) != scale
        or zero is None
        or zero.dtype != np.uint8
        or zero.any()
    ):
        return None
    return codes


class TokenOpsFromChains(ir.passes.InPlacePass):
    """(integer form, after lower_matmul) Token dropping's own chains as one node each
    (bctonnx/ops/ref_tokens.py; bit-identical results):

        `_token_codes`' Abs .. Round, Cast, Cast, ReduceSumSquare   -> TokenCodes
        `_nearest`'s GatherND x2, MatMulInteger, cosine steps, Where, ArgMax -> NearestSlot

    A chain that is not exactly what TokenDrop writes stays as it is. The qdq form keeps the
    standard ops (it runs in any ONNX runtime)."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph, count = model.graph, 0
        for node in list(graph):
            if _ours(node, "ReduceSumSquare") and node.graph is graph:
                count += _lower_codes(graph, node)
        for node in list(graph):
            if _ours(node, "ArgMax") and node.graph is graph:
                count += _lower_nearest(graph, node)
        for node in list(graph):  # TokenCodes' offset output only when something reads it
            if node.domain == OPS_DOMAIN and node.op_type == "TokenCodes":
                _drop_unread_offset(graph, node)
        return ir.passes.PassResult(model, modified=bool(count))


class _NoMatch(Exception):
    pass


def _ours(node: ir.Node | None, op_type: str) -> bool:
    return (
        node is not None
        and node.domain == ""
        and node.op_type == op_type
        and (node.name or "").startswith("token_drop/")
    )


def _made(value: ir.Value | None, op_type: str) -> ir.Node:
    """The token_drop ``op_type`` node producing ``value``, else _NoMatch."""
    node = value.producer() if value is not None else None
    if not _ours(node, op_type):
        raise _NoMatch
    return node


def _attr_is(node: ir.Node, name: str, want, default=None) -> None:
    attr = node.attributes.get(name)
    value = default if attr is None else attr.value
    if isinstance(value, Sequence) and not isinstance(value, str):
        value = list(value)
    if value != want:
        raise _NoMatch


def _const_is(value: ir.Value | None, want: np.ndarray) -> None:
    array = const_array(value)
    if array is None or array.dtype != want.dtype or not np.array_equal(array, want):
        raise _NoMatch


def _only_users(value: ir.Value, *nodes: ir.Node) -> None:
    users = [u.node for u in value.uses()]
    if len(users) != len(nodes) or {id(n) for n in users} != {id(n) for n in nodes}:
        raise _NoMatch
    if value.is_graph_output():
        raise _NoMatch


def _remove_dead(graph: ir.Graph, nodes: Sequence[ir.Node]) -> None:
    """Remove those of ``nodes`` whose outputs nothing reads, until none is left."""
    alive = list(nodes)
    while True:
        dead = [n for n in alive if not any(list(o.uses()) for o in n.outputs)]
        if not dead:
            return
        for n in dead:
            graph.remove(n, safe=True)
            alive.remove(n)


def _lower_codes(graph: ir.Graph, norm_node: ir.Node) -> int:
    try:
        _const_is(norm_node.inputs[1], np.array([2], np.int64))
        _attr_is(norm_node, "keepdims", 0, 1)
        round_ = _made(norm_node.inputs[0], "Round")
        grid = round_.outputs[0]
        div = _made(round_.inputs[0], "Div")
        hidden, step = div.inputs
        step_div = _made(step, "Div")
        _const_is(step_div.inputs[1], np.array(127.0, np.float32))
        floor = _made(step_div.inputs[0], "Max")
        _const_is(floor.inputs[1], np.array(1e-30, np.float32))
        peak = _made(floor.inputs[0], "ReduceMax")
        _const_is(peak.inputs[1], np.array([2], np.int64))
        _attr_is(peak, "keepdims", 1, 1)
        abs_ = _made(peak.inputs[0], "Abs")
        if abs_.inputs[0] is not hidden or hidden.dtype != F32:
            raise _NoMatch
        if hidden.shape is not None and len(hidden.shape) != 3:
            raise _NoMatch
        width = hidden.shape[-1] if hidden.shape is not None else None
        if not isinstance(width, int) or not 1 <= width <= MAX_HIDDEN:
            raise _NoMatch  # the op's bound (exact norms); the chain stays
        users = [u.node for u in grid.uses()]
        to_i8 = [n for n in users if _ours(n, "Cast") and n.attributes["to"].value == 3]
        add = [n for n in users if _ours(n, "Add")]
        if len(to_i8) != 1 or len(add) != 1:
            raise _NoMatch
        _const_is(add[0].inputs[1], np.array(128.0, np.float32))
        add_users = [u.node for u in add[0].outputs[0].uses()]
        if len(add_users) != 1 or not _ours(add_users[0], "Cast"):
            raise _NoMatch
        to_u8 = add_users[0]
        _attr_is(to_u8, "to", 2)
        for value, readers in (
            (grid, (to_i8[0], add[0], norm_node)),
            (step, (div,)),
            (floor.outputs[0], (step_div,)),
            (peak.outputs[0], (floor,)),
            (abs_.outputs[0], (peak,)),
            (div.outputs[0], (round_,)),
        ):
            _only_users(value, *readers)
    except _NoMatch:
        return 0
    node = ir.Node(
        OPS_DOMAIN, "TokenCodes", [hidden], num_outputs=3, name=f"{abs_.name}/TokenCodes"
    )
    graph.insert_before(abs_, node)
    for new, old, dtype in zip(
        node.outputs, (to_i8[0], norm_node, to_u8), (ir.DataType.INT8, F32, U8), strict=True
    ):
        new.dtype = dtype
        take_over(old.outputs[0], new)
    _remove_dead(
        graph, [to_u8, add[0], to_i8[0], norm_node, round_, div, step_div, floor, peak, abs_]
    )
    return 1


def _drop_unread_offset(graph: ir.Graph, node: ir.Node) -> None:
    if list(node.outputs[2].uses()) or node.outputs[2].is_graph_output():
        return
    lean = ir.Node(OPS_DOMAIN, "TokenCodes", list(node.inputs), num_outputs=2, name=node.name)
    graph.insert_before(node, lean)
    for new, old in zip(lean.outputs, node.outputs[:2], strict=False):
        new.dtype = old.dtype
        take_over(old, new)
    graph.remove(node, safe=True)


def _lower_nearest(graph: ir.Graph, argmax: ir.Node) -> int:
    try:
        _attr_is(argmax, "axis", 2)
        _attr_is(argmax, "keepdims", 0, 1)
        _attr_is(argmax, "select_last_index", 0, 0)
        where = _made(argmax.inputs[0], "Where")
        _const_is(where.inputs[2], np.array(-2.0, np.float32))
        open_ = _made(where.inputs[0], "Unsqueeze")
        _const_is(open_.inputs[1], np.array([1], np.int64))
        valid = open_.inputs[0]
        div = _made(where.inputs[1], "Div")
        cast = _made(div.inputs[0], "Cast")
        _attr_is(cast, "to", 1)
        dots = _made(cast.inputs[0], "MatMulInteger")
        if len(dots.inputs) != 3:
            raise _NoMatch
        _const_is(dots.inputs[2], np.array(128, np.uint8))
        offset = dots.inputs[0]
        transpose = _made(dots.inputs[1], "Transpose")
        _attr_is(transpose, "perm", [0, 2, 1])
        kept_codes = _made(transpose.inputs[0], "GatherND")
        sqrt = _made(div.inputs[1], "Sqrt")
        floor = _made(sqrt.inputs[0], "Max")
        _const_is(floor.inputs[1], np.array(1.0, np.float32))
        mul = _made(floor.inputs[0], "Mul")
        rows = _made(mul.inputs[0], "Unsqueeze")
        cols = _made(mul.inputs[1], "Unsqueeze")
        _const_is(rows.inputs[1], np.array([2], np.int64))
        _const_is(cols.inputs[1], np.array([1], np.int64))
        kept_norm = _made(cols.inputs[0], "GatherND")
        codes_node = offset.producer()
        if (
            codes_node is None
            or codes_node.domain != OPS_DOMAIN
            or codes_node.op_type != "TokenCodes"
            or len(codes_node.outputs) != 3
            or offset is not codes_node.outputs[2]
            or kept_codes.inputs[0] is not codes_node.outputs[0]
            or kept_norm.inputs[0] is not codes_node.outputs[1]
            or rows.inputs[0] is not codes_node.outputs[1]
            or kept_codes.inputs[1] is not kept_norm.inputs[1]
        ):
            raise _NoMatch
        for gather in (kept_codes, kept_norm):
            _attr_is(gather, "batch_dims", 1)
        index = _made(kept_codes.inputs[1], "Unsqueeze")
        _const_is(index.inputs[1], np.array([2], np.int64))
        for value, readers in (
            (where.outputs[0], (argmax,)),
            (div.outputs[0], (where,)),
            (cast.outputs[0], (div,)),
            (dots.outputs[0], (cast,)),
            (transpose.outputs[0], (dots,)),
            (sqrt.outputs[0], (div,)),
            (floor.outputs[0], (sqrt,)),
            (mul.outputs[0], (floor,)),
            (rows.outputs[0], (mul,)),
            (cols.outputs[0], (mul,)),
            (kept_norm.outputs[0], (cols,)),
            (kept_codes.outputs[0], (transpose,)),
            (open_.outputs[0], (where,)),
        ):
            _only_users(value, *readers)
    except _NoMatch:
        return 0
    node = ir.Node(
        OPS_DOMAIN,
        "NearestSlot",
        [codes_node.outputs[0], codes_node.outputs[1], index.inputs[0], valid],
        name=f"{argmax.name}/NearestSlot",
    )
    graph.insert_before(argmax, node)
    node.outputs[0].dtype = I64
    take_over(argmax.outputs[0], node.outputs[0])
    chain = [argmax, where, open_, div, cast, dots, transpose, kept_codes, sqrt, floor, mul]
    _remove_dead(graph, [*chain, rows, cols, kept_norm, index])
    return 1


# --- expected work ---------------------------------------------------------------------------


@dataclass(frozen=True)
class EncoderShape:
    """What the encoder's work per token depends on (read from a canonicalized graph)."""

    num_layers: int
    hidden: int
    linear_macs: int  # multiply-adds of one layer's linear layers per token


def encoder_shape(graph: ir.Graph) -> EncoderShape | None:
    """From canonicalize's roles: attention layers, the hidden size, and the token-level linear
    layers' weights (inputs of rank 3: the pooler and classifier read one vector)."""
    layers = [n for n in graph if role(n) == "attention.qk"]
    macs, hidden = 0, None
    for node in graph:
        if role(node) != "linear" or node.inputs[0].shape is None:
            continue
        weight = node.inputs[1].shape
        if len(node.inputs[0].shape) == 3 and weight is not None and weight.is_static():
            macs += int(np.prod(weight.numpy()))
            hidden = hidden or int(weight[0])
    if not layers or not macs or hidden is None:
        return None
    return EncoderShape(len(layers), hidden, macs // len(layers))


def tokens_per_layer(shape: EncoderShape, stages: Sequence[TokenStage], seq: int) -> list[int]:
    """Tokens each encoder layer runs on for a sequence of ``seq`` real tokens."""
    counts = [seq] * shape.num_layers
    for stage in stages:
        kept = math.ceil(keep_fraction(stage.keep) * seq)
        counts[stage.layer :] = [kept] * (shape.num_layers - stage.layer)
    return counts


def encoder_flops(
    shape: EncoderShape, stages: Sequence[TokenStage], seq: int, merge: bool = True
) -> int:
    """Floating-point-operation count (2 per multiply-add) of the encoder for one sequence of
    ``seq`` tokens: linear layers, attention scores and context, and the stages' own matmuls
    (merge: similarity and sums). Embeddings, norms and elementwise ops are left out."""
    counts = tokens_per_layer(shape, stages, seq)
    macs = sum(t * shape.linear_macs + 2 * t * t * shape.hidden for t in counts)
    before = [seq] + counts
    for stage in stages:
        t, kept = before[stage.layer], counts[stage.layer]
        macs += t * kept * shape.hidden * (2 if merge else 0)
    return 2 * macs

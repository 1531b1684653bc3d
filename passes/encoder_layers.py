"""Where the prunable structures of a canonicalized encoder are: FFN blocks and self-attention
blocks, found from the roles canonicalize tags (not a pass; the pruning passes read it).

    FFN:        x -> MatMul(W1) [+ b1] -> Gelu -> MatMul(W2) [+ b2] -> ...
    attention:  Q, K, V = x -> MatMul(Wq|Wk|Wv) [+ b] -> Reshape([.., heads, head_dim]) -> ..
                scores = attention.qk(Q.., K..) ... context = attention.pv(P, V..)
                -> Transpose -> Reshape([.., heads * head_dim]) -> MatMul(Wo) [+ bo]

A linear layer is (MatMul node, its constant weight [K, N], its bias Add and constant bias,
if any). A structure whose pieces do not have this shape is not reported (the passes say
which layer they could not read).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from .common import const_array, is_const, nodes_with_role, role


@dataclass
class Linear:
    matmul: ir.Node
    add: ir.Node | None  # the bias Add, if any

    @property
    def weight(self) -> np.ndarray:
        return const_array(self.matmul.inputs[1]).astype(np.float32)

    @property
    def bias_value(self) -> ir.Value | None:
        if self.add is None:
            return None
        out = self.matmul.outputs[0]
        return self.add.inputs[1] if self.add.inputs[0] is out else self.add.inputs[0]

    @property
    def bias(self) -> np.ndarray | None:
        b = self.bias_value
        return None if b is None else const_array(b).astype(np.float32).reshape(-1)

    @property
    def output(self) -> ir.Value:
        """The layer's output tensor (after the bias)."""
        return (self.add or self.matmul).outputs[0]

    @property
    def name(self) -> str:
        return self.matmul.name or ""

    def residual_sum(self, block_input: ir.Value) -> ir.Value | None:
        """The output of the residual Add of this layer's output and ``block_input``."""
        add = _single_use(self.output)
        if add is None or add.op_type != "Add" or len(add.inputs) != 2:
            return None
        other = add.inputs[1] if add.inputs[0] is self.output else add.inputs[0]
        return add.outputs[0] if other is block_input else None


@dataclass
class FFNBlock:
    up: Linear
    act: ir.Node
    down: Linear

    @property
    def width(self) -> int:
        return self.up.weight.shape[1]


@dataclass
class AttentionBlock:
    q: Linear
    k: Linear
    v: Linear
    o: Linear
    splits: list[ir.Node]  # the Reshapes to [.., heads, head_dim] of Q, K and V
    merge: ir.Node  # the Reshape of the context back to [.., heads * head_dim]
    heads: int
    head_dim: int


def _single_use(value: ir.Value) -> ir.Node | None:
    uses = list(value.uses())
    if len(uses) != 1 or (value.graph is not None and value in value.graph.outputs):
        return None
    return uses[0].node


def linear_from_matmul(node: ir.Node) -> Linear | None:
    """The linear layer of a ``linear`` MatMul with a 2-D weight (and its bias Add)."""
    if node.op_type != "MatMul" or role(node) != "linear":
        return None
    w = const_array(node.inputs[1])
    if w is None or w.ndim != 2:
        return None
    add = _single_use(node.outputs[0])
    if add is not None and add.op_type == "Add" and len(add.inputs) == 2:
        other = add.inputs[1] if add.inputs[0] is node.outputs[0] else add.inputs[0]
        b = const_array(other)
        if is_const(other) and b is not None and b.size == w.shape[1] and b.shape[-1] == b.size:
            return Linear(node, add)
    return Linear(node, None)


def _linear_producing(value: ir.Value) -> Linear | None:
    """The linear layer whose output (after its bias) is ``value``."""
    node = value.producer()
    if node is None:
        return None
    if node.op_type == "Add":
        for v in node.inputs:
            p = v.producer() if v is not None else None
            if p is not None and p.op_type == "MatMul":
                lin = linear_from_matmul(p)
                if lin is not None and lin.add is node:
                    return lin
        return None
    lin = linear_from_matmul(node)
    return lin if lin is not None and lin.add is None else None


def ffn_blocks(graph: ir.Graph) -> list[FFNBlock]:
    blocks = []
    for act in nodes_with_role(graph, "gelu"):
        up = _linear_producing(act.inputs[0])
        reader = _single_use(act.outputs[0])
        down = linear_from_matmul(reader) if reader is not None else None
        if up is None or down is None or down.matmul.inputs[0] is not act.outputs[0]:
            continue
        if up.weight.shape[1] != down.weight.shape[0]:
            continue
        blocks.append(FFNBlock(up, act, down))
    return blocks


def _rank(value: ir.Value) -> int | None:
    return None if value.shape is None else len(value.shape)


def _walk_to_linear(value: ir.Value, splits: list[ir.Node]) -> Linear | None:
    """From an attention operand back through Transpose / Reshape / scalar Mul or Div to the
    linear layer that made it; the 4-D Reshapes passed are appended to ``splits``."""
    for _ in range(8):
        lin = _linear_producing(value)
        if lin is not None:
            return lin
        node = value.producer()
        if node is None:
            return None
        if node.op_type in ("Transpose", "Reshape"):
            if node.op_type == "Reshape":
                splits.append(node)
            value = node.inputs[0]
        elif node.op_type in ("Mul", "Div"):
            ranks = [_rank(v) if v is not None else None for v in node.inputs]
            big = [i for i, r in enumerate(ranks) if r is not None and r >= 3]
            if len(big) != 1:
                return None
            value = node.inputs[big[0]]
        else:
            return None
    return None


def _heads_of(reshape: ir.Node) -> tuple[int, int] | None:
    shape = reshape.outputs[0].shape
    if shape is None or len(shape) != 4:
        return None
    h, d = shape[2], shape[3]
    return (h, d) if isinstance(h, int) and isinstance(d, int) else None


def attention_blocks(graph: ir.Graph) -> list[AttentionBlock]:
    blocks = []
    for pv in nodes_with_role(graph, "attention.pv"):
        p = pv.inputs[0].producer()
        qk = None
        # the scores: pv's P comes from Softmax(Add(qk, mask)) (through casts / divisions)
        for _ in range(6):
            if p is None:
                break
            if role(p) == "attention.qk":
                qk = p
                break
            p = p.inputs[0].producer() if p.inputs else None
        if qk is None:
            continue
        q_splits: list[ir.Node] = []
        k_splits: list[ir.Node] = []
        v_splits: list[ir.Node] = []
        q = _walk_to_linear(qk.inputs[0], q_splits)
        k = _walk_to_linear(qk.inputs[1], k_splits)
        v = _walk_to_linear(pv.inputs[1], v_splits)
        if q is None or k is None or v is None:
            continue
        if not (len(q_splits) == len(k_splits) == len(v_splits) == 1):
            continue
        # the context: Transpose -> Reshape -> output projection
        t = _single_use(pv.outputs[0])
        merge = _single_use(t.outputs[0]) if t is not None and t.op_type == "Transpose" else None
        if merge is None or merge.op_type != "Reshape":
            continue
        reader = _single_use(merge.outputs[0])
        o = linear_from_matmul(reader) if reader is not None else None
        if o is None or o.matmul.inputs[0] is not merge.outputs[0]:
            continue
        hd = {_heads_of(s) for s in (q_splits[0], k_splits[0], v_splits[0])}
        if len(hd) != 1 or None in hd:
            continue
        heads, head_dim = hd.pop()
        width = heads * head_dim
        if not all(lin.weight.shape[1] == width for lin in (q, k, v)):
            continue
        if o.weight.shape[0] != width:
            continue
        blocks.append(
            AttentionBlock(
                q, k, v, o, [q_splits[0], k_splits[0], v_splits[0]], merge, heads, head_dim
            )
        )
    return blocks

"""fuse_attention: an encoder layer's integer attention becomes one ``BlockAttention`` node.

    BlockBatchMatMul(q, q_s, k, k_s[, c])            (token-major operands, y_q / y_scale out)
      -> IntSoftmax(y_q, y_scale[, mask])            (block = the scores' output block)
      -> AttentionPV(p, v, v_s)                      (token-major V and output)
    => BlockAttention(q, q_s, k, k_s, v, v_s[, mask][, c])

(ref_attention.block_attention; the kernel keeps the scores and probabilities of a head in its
thread's cache and runs one task per head instead of three ops with a thread synchronisation
each). The fused op also drops the masked keys entirely, so a sequence's output does not depend
on its padding or its batch: the mask must be a key mask, one value per key and the same for
every query row -- BERT's [b, 1, 1, S], or as exports write it, that mask expanded to
[b, 1, S, S] (the kernel checks the rows at run time). It is recognized on the inferred shape or
on how it is made: elementwise ops with constant scalars over an Expand or an Unsqueeze of a
rank-2 [b, S] mask to [b, 1, 1, S]. Any other mask, or a chain whose intermediate results have
other readers, is left unfused.

Token dropping (passes/token_drop.py) adds two things the fused op takes too:

    BlockBatchMatMul(...) -> Add(y, bias) -> BlockQuantize -> IntSoftmax      (merged tokens'
        log weights, one per key)                           => key_bias input
    IntSoftmax(...) -> MatMulInteger(rows [b, 1, 1, S] uint8, p) -> ReduceSum(axes 1, 2)
        (the attention each key received, the tokens' ranking)  => rows input, received output

so a layer whose probabilities rank the tokens, and every layer after a merge, stays one node.

Heads as the projections write them: when q, k, v and their scales are the heads split of
rank-3 BlockMatMul outputs (``Reshape(x, [0, 0, h, w])``) and the only reader of the output is
the merge back (``Reshape`` to ``[b, S, h * dv]``), the op reads and writes the rank-3 tensors
(``num_heads = h``; the same bytes), and the eight Reshape nodes around it go (with the merge's
shape arithmetic): ~15 fewer nodes per layer, ~4% of MiniLM's 1 x 128 time at 2 threads.
"""

from __future__ import annotations

import logging

import onnx_ir as ir

from .common import OPS_DOMAIN, const_array, take_over

log = logging.getLogger(__name__)


def _attr(node: ir.Node, name: str, default: int = 0) -> int:
    a = node.attributes.get(name)
    return default if a is None else a.as_int()


def _only_reader(value: ir.Value) -> ir.Node | None:
    users = list(value.uses())
    if len(users) != 1 or any(out is value for out in value.graph.outputs if value.graph):
        return None
    return users[0][0]


def _is_op(node: ir.Node | None, op_type: str) -> bool:
    return node is not None and node.domain == OPS_DOMAIN and node.op_type == op_type


ELEMENTWISE = frozenset(
    {"Cast", "Sub", "Add", "Mul", "Div", "Where", "Neg", "Not", "Equal", "Less", "Greater"}
)


def _scalar_const(value: ir.Value) -> bool:
    arr = const_array(value)
    return arr is not None and arr.size == 1


def _ints(node: ir.Node, index: int, attr: str) -> list[int] | None:
    if len(node.inputs) > index and node.inputs[index] is not None:
        arr = const_array(node.inputs[index])
        return None if arr is None else [int(a) for a in arr.reshape(-1)]
    a = node.attributes.get(attr)
    return None if a is None else list(a.as_ints())


def is_key_mask(value: ir.Value | None, depth: int = 0) -> bool:
    """The mask holds one value per key, the same for every query row (see the module doc)."""
    if value is None:
        return True
    shape = value.shape
    if shape is not None and 0 < len(shape) <= 4:
        dims = [1] * (4 - len(shape)) + list(shape)
        if dims[1] == 1 and dims[2] == 1:
            return True
    node = value.producer()
    if node is None or depth > 16:
        return False
    if node.domain in ("", "ai.onnx") and node.op_type in ELEMENTWISE:
        operands = [i for i in node.inputs if i is not None and not _scalar_const(i)]
        return bool(operands) and all(is_key_mask(i, depth + 1) for i in operands)
    if node.op_type == "Expand":  # rows broadcast from one row stay equal
        return is_key_mask(node.inputs[0], depth + 1)
    if node.op_type == "Unsqueeze":
        axes = _ints(node, 1, "axes")
        src = node.inputs[0]
        if axes is not None and sorted(axes) == [1, 2] and src.shape is not None:
            return len(src.shape) == 2  # [b, S] -> [b, 1, 1, S]
        inner = src.producer()
        if axes == [2] and inner is not None and inner.op_type == "Unsqueeze":
            first = _ints(inner, 1, "axes")
            return (
                first == [1]
                and inner.inputs[0].shape is not None
                and (len(inner.inputs[0].shape) == 2)
            )
    return False


class FuseAttention(ir.passes.InPlacePass):
    """BlockBatchMatMul -> IntSoftmax -> AttentionPV => BlockAttention (see the module doc)."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        fused = 0
        for scores in [n for n in model.graph if _is_op(n, "BlockBatchMatMul")]:
            if self._fuse(model.graph, scores):
                fused += 1
        if fused:
            log.info("fuse_attention: %d attention(s) fused", fused)
        unexpanded = sum(_unexpand_mask(model.graph, n) for n in list(model.graph))
        return ir.passes.PassResult(model, modified=fused > 0 or unexpanded > 0)

    def _fuse(self, graph: ir.Graph, scores: ir.Node) -> bool:
        found = _quantized_scores(scores)
        if found is None:
            return False
        softmax, block, bias, between = found
        if _attr(softmax, "block_size") != block:
            return False
        mask = softmax.inputs[2] if len(softmax.inputs) > 2 else None
        if not is_key_mask(mask):
            return False
        readers = [u.node for u in softmax.outputs[0].uses()]
        if any(out is softmax.outputs[0] for out in graph.outputs):
            return False
        context = next((n for n in readers if _is_op(n, "AttentionPV")), None)
        received = _received_sum(readers, softmax.outputs[0], context)
        if context is None or context.inputs[0] is not softmax.outputs[0]:
            return False
        if len(readers) != 1 + (received is not None):
            return False  # the probabilities have another reader
        if not _attr(context, "transpose_output"):
            return False
        if _attr(context, "block_size") != _attr(scores, "block_size"):
            return False
        q, q_s, k, k_s = scores.inputs[:4]
        mul = scores.inputs[4] if len(scores.inputs) > 4 else None
        v, v_s = context.inputs[1:3]
        attrs = {
            "block_size": _attr(scores, "block_size"),
            "score_block_size": block,
            "segment": _attr(context, "segment", 32),
            "p_exponent": _attr(context, "p_exponent", -8),
        }
        # operands not token-major come [b, h, S, d] (dynamo exports leave K so)
        for name, value, token_major in (
            ("q_heads_first", q, _attr(scores, "a_transposed")),
            ("k_heads_first", k, _attr(scores, "b_transposed")),
            ("v_heads_first", v, _attr(context, "v_transposed")),
        ):
            if not token_major:
                if value.shape is None or len(value.shape) != 4:
                    return False
                attrs[name] = 1
        rows, total = received if received is not None else (None, None)
        inputs = [q, q_s, k, k_s, v, v_s, mask, mul, bias, rows]
        while inputs[-1] is None:
            inputs.pop()
        node = ir.Node(
            OPS_DOMAIN,
            "BlockAttention",
            inputs,
            ir.convenience.convert_attributes(attrs),
            num_outputs=1 if total is None else 2,
            name=context.name.rsplit("/", 1)[0] + "/BlockAttention" if context.name else None,
        )
        graph.insert_before(context, node)
        node.outputs[0].dtype = ir.DataType.FLOAT
        node.outputs[0].shape = context.outputs[0].shape
        take_over(context.outputs[0], node.outputs[0])
        dead = [context]
        if total is not None:
            node.outputs[1].dtype = ir.DataType.INT32
            node.outputs[1].shape = total.outputs[0].shape
            take_over(total.outputs[0], node.outputs[1])
            dead = [total, total.inputs[0].producer(), context]
        for n in (*dead, softmax, *between, scores):
            graph.remove(n, safe=True)
        _heads_as_written(graph, node)
        return True


def _unexpand_mask(graph: ir.Graph, expand: ir.Node) -> bool:
    """Exports expand BERT's [b, 1, 1, S] key mask to [b, 1, S, S] before the elementwise ops
    that make it additive; when every reader down that chain is a BlockAttention's mask (which
    takes [b, 1, 1, S] as it is), the Expand goes and the chain runs on S values per sequence
    instead of S x S (MiniLM 8 x 128: four ops over 131,072 floats per run)."""
    if expand.op_type != "Expand" or expand.domain not in ("", "ai.onnx"):
        return False
    src = expand.inputs[0]
    if src is None or not is_key_mask(src) or src.shape is None or len(src.shape) != 4:
        return False
    chain, todo = [], [expand.outputs[0]]
    while todo:
        value = todo.pop()
        if any(out is value for out in graph.outputs):
            return False
        for user, index in value.uses():
            if _is_op(user, "BlockAttention") and index == 6:
                continue
            if user.domain not in ("", "ai.onnx") or user.op_type not in ELEMENTWISE:
                return False
            others = [i for i in user.inputs if i is not None and i is not value]
            if any(not _scalar_const(i) and _source_expand(i) is not expand for i in others):
                return False
            if user not in chain:
                chain.append(user)
                todo.extend(user.outputs)
    if not chain:
        return False
    for node in chain:
        for out in node.outputs:
            out.shape = None
    take_over(expand.outputs[0], src)
    graph.remove(expand, safe=True)
    return True


def _source_expand(value: ir.Value, depth: int = 0) -> ir.Node | None:
    """The Expand an elementwise chain's operand comes from, or None."""
    node = value.producer()
    if node is None or depth > 16:
        return None
    if node.op_type == "Expand":
        return node
    if node.domain in ("", "ai.onnx") and node.op_type in ELEMENTWISE:
        found = {_source_expand(i, depth + 1) for i in node.inputs if i is not None}
        found.discard(None)
        return found.pop() if len(found) == 1 else None
    return None


def _split_source(value: ir.Value, block: int | None) -> tuple[ir.Value, int, int] | None:
    """(x, h, w) when ``value`` is ``Reshape(x, [0, 0, h, w])`` of output 1 or 2 of a rank-3
    BlockMatMul (the codes: w a multiple of ``block``; the scales: block None), else None."""
    r = value.producer()
    if r is None or r.op_type != "Reshape" or r.domain not in ("", "ai.onnx"):
        return None
    if _attr(r, "allowzero") or len(r.inputs) < 2:
        return None
    target = const_array(r.inputs[1])
    if target is None or target.shape != (4,) or list(target[:2]) != [0, 0]:
        return None
    h, w = int(target[2]), int(target[3])
    if h <= 0 or w <= 0 or (block is not None and w % block):
        return None
    x = r.inputs[0]
    mm = x.producer()
    if not _is_op(mm, "BlockMatMul") or x is not mm.outputs[1 if block is not None else 2]:
        return None
    codes = mm.outputs[1]
    if codes.shape is None or len(codes.shape) != 3:
        return None
    return x, h, w


def _heads_as_written(graph: ir.Graph, node: ir.Node) -> bool:
    """The num_heads form of a fused BlockAttention (module doc), when its operands allow."""
    if any(_attr(node, f"{x}_heads_first") for x in "qkv"):
        return False
    block = _attr(node, "block_size")
    found = [_split_source(node.inputs[i], block if i % 2 == 0 else None) for i in range(6)]
    if any(f is None for f in found) or len({f[1] for f in found}) != 1:
        return False
    if any(found[i][0].producer() is not found[i + 1][0].producer() for i in (0, 2, 4)):
        return False
    heads, width_v = found[0][1], found[4][2]
    merge = _only_reader(node.outputs[0])
    if merge is None or merge.op_type != "Reshape" or merge.domain not in ("", "ai.onnx"):
        return False
    shape = merge.outputs[0].shape
    if shape is None or len(shape) != 3 or not isinstance(shape[2], int):
        return False
    if shape[2] != heads * width_v:
        return False
    for i, (x, _, _) in enumerate(found):
        node.replace_input_with(i, x)
    node.attributes["num_heads"] = ir.AttrInt64("num_heads", heads)
    node.outputs[0].shape = shape
    take_over(merge.outputs[0], node.outputs[0])
    graph.remove(merge, safe=True)
    return True


def _quantized_scores(scores: ir.Node):
    """(IntSoftmax, its block size, key bias or None, the nodes between) when the scores reach
    IntSoftmax quantized by the GEMM itself, or (token dropping's key bias) through
    Add(y, bias) -> BlockQuantize; else None."""
    outs = scores.outputs
    if len(outs) >= 3 and not (outs[0].name and list(outs[0].uses())):
        softmax = _only_reader(outs[1])
        if not _is_op(softmax, "IntSoftmax") or _only_reader(outs[2]) is not softmax:
            return None
        if softmax.inputs[0] is not outs[1] or softmax.inputs[1] is not outs[2]:
            return None
        if _attr(scores, "out_bits", 8) != 8:
            return None
        return softmax, _attr(scores, "out_block_size"), None, ()
    if any(list(o.uses()) for o in outs[1:]):
        return None
    add = _only_reader(outs[0])
    if add is None or add.domain not in ("", "ai.onnx") or add.op_type != "Add":
        return None
    bias = add.inputs[1] if add.inputs[0] is outs[0] else add.inputs[0]
    if bias is None or bias is outs[0] or not is_key_mask(bias):
        return None
    if bias.dtype not in (None, ir.DataType.FLOAT):
        return None
    quant = _only_reader(add.outputs[0])
    if not _is_op(quant, "BlockQuantize") or _attr(quant, "bits", 8) != 8:
        return None
    softmax = _only_reader(quant.outputs[0])
    if not _is_op(softmax, "IntSoftmax") or _only_reader(quant.outputs[1]) is not softmax:
        return None
    if softmax.inputs[0] is not quant.outputs[0] or softmax.inputs[1] is not quant.outputs[1]:
        return None
    return softmax, _attr(quant, "block_size"), bias, (quant, add)


def _received_sum(readers: list[ir.Node], p: ir.Value, context: ir.Node | None):
    """(rows, the ReduceSum) when one reader of the probabilities is token dropping's
    ReduceSum(MatMulInteger(rows [b, 1, 1, S] uint8, p), axes (1, 2), keepdims 0)."""
    others = [n for n in readers if n is not context]
    if len(others) != 1:
        return None
    mm = others[0]
    if mm.op_type != "MatMulInteger" or mm.domain not in ("", "ai.onnx"):
        return None
    if len(mm.inputs) != 2 or mm.inputs[1] is not p or mm.inputs[0] is p:
        return None
    rows = mm.inputs[0]
    if rows.dtype != ir.DataType.UINT8 or rows.shape is None or len(rows.shape) != 4:
        return None
    if rows.shape[1] != 1 or rows.shape[2] != 1:
        return None
    total = _only_reader(mm.outputs[0])
    if total is None or total.op_type != "ReduceSum" or _attr(total, "keepdims", 1) != 0:
        return None
    if _ints(total, 1, "axes") not in ([1, 2], [2, 1]):
        return None
    return rows, total

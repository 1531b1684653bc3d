"""The op library refuses malformed graphs (issue 20): compressed tiny BERTs, mutated, each case
loaded and run once in a child process (tests/fuzz_runner.py) with a timeout.

Models: the tiny BERT compressed with every preset (w8a8, w8a8-fast, w4a8; integer form, blocks
of 16), and w8a8 with attention left unfused (the pipeline without FuseAttention), so that
BlockBatchMatMul, IntSoftmax and AttentionPV are fuzzed too: every op of the library. (w8a8-fast
is w8a8 at blocks of 16, byte for byte: asserted, and fuzzed once.)

Mutations: every bctonnx node's attributes (outside the op's spec: below / above its range, a
boolean 7 / -1 / 2, a required one removed, an int given as a float; in spec: a block size
halved), the initializers its kernel reads (flattened / given a leading 1, an element
dropped, transposed, another dtype), and the feeds (empty batch, empty sequence, a sequence
longer than the position table, token ids out of range or negative, every token masked). The
first node of each op gets every bad value, the others one each in turn, which keeps the run
near a minute (two child processes at a time).

Asserted: no case crashes the process (a signal) or hangs; every attribute outside its op's
spec and every constant input inconsistent with the attributes is refused when the session is
created, with a message naming the node and the attribute or input; an in-spec value that does
not fit the data flowing in (blocks of 8 where the codes come in blocks of 16) is refused at
session creation or at run time, never computed; feeds are refused at run time (or, empty,
give empty outputs). The mutations that legitimately still run are listed in `legit_cases` and
asserted to run (those that cannot change the arithmetic: with the same bits).
"""

from __future__ import annotations

import json
import math
import selectors
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper
from test_integer import require_library

from bctonnx.ops.ref_quant import MAX_BLOCK_SIZE

RUNNER = Path(__file__).with_name("fuzz_runner.py")
CASE_TIMEOUT = 60.0  # seconds without a result line: a hang (a case takes ~30 ms)
MAX_POSITIONS, VOCAB, TYPES = 64, 512, 2  # conftest's tiny BERT
MAX_BLOCK = MAX_BLOCK_SIZE  # common.h kMaxBlockSize
UNFUSED_OPS = {"BlockBatchMatMul", "IntSoftmax", "AttentionPV"}  # BlockAttention's parts

# ------------------------------------------------------------------------------------------
# The spec of every attribute (the kernels' and the numpy references' rules)


@dataclass(frozen=True)
class Attr:
    kind: str  # "int", "bool", "float", "string"
    lo: int = 0
    hi: int = 0
    required: bool = False
    default: object = None
    block: bool = False  # a block size: halving it is in spec
    extra_bad: tuple = ()  # in range, still out of spec

    def bad_values(self, node_attrs: dict) -> list[tuple[object, str]]:
        """(value, attribute type) pairs outside the spec."""
        if self.kind == "bool":
            return [(7, "int"), (-1, "int"), (2, "int")]
        if self.kind == "float":
            return [(-1.0, "float"), (math.inf, "float"), (math.nan, "float")]
        if self.kind == "string":
            return [("sigmoid", "string"), ("", "string")]
        values = [self.lo - 1, self.hi + 1, 2**40, -(2**40)]
        values += [v(node_attrs) if callable(v) else v for v in self.extra_bad]
        return [(v, "int") for v in dict.fromkeys(values)]


def Int(lo, hi, default=None, **kw) -> Attr:  # noqa: N802
    return Attr("int", lo, hi, required=default is None, default=default, **kw)


def Bool(default) -> Attr:  # noqa: N802
    return Attr("bool", 0, 1, default=default)


BLOCK = dict(block=True)
NOT_A_MULTIPLE = (lambda a: a["block_size"] + a["block_size"] // 2,)  # 24 for blocks of 16
SPECS: dict[str, dict[str, Attr]] = {
    "BlockQuantize": {"block_size": Int(1, MAX_BLOCK, **BLOCK), "bits": Int(2, 8, 8)},
    "BlockDequantize": {"block_size": Int(1, MAX_BLOCK, **BLOCK)},
    "BlockRequantize": {
        "in_block_size": Int(0, MAX_BLOCK, **BLOCK),
        "block_size": Int(1, MAX_BLOCK, **BLOCK),
        "bits": Int(2, 8, 8),
    },
    "IntGelu": {
        "block_size": Int(1, 4096, **BLOCK),
        "out_block_size": Int(0, MAX_BLOCK, 0, extra_bad=NOT_A_MULTIPLE, **BLOCK),
        "approximate": Attr("string", default="none"),
        "simd": Bool(1),
    },
    "IntSoftmax": {"block_size": Int(1, 4096, **BLOCK), "simd": Bool(1)},
    "IntLayerNorm": {
        "block_size": Int(1, 4096, **BLOCK),
        "epsilon": Attr("float", default=1e-5),
        "simd": Bool(1),
    },
    "BlockMatMul": {
        "block_size": Int(1, MAX_BLOCK, **BLOCK),
        "frac_bits": Int(0, 4),
        "act_block_size": Int(1, MAX_BLOCK, **BLOCK),
        "act_bits": Int(2, 8, 8),
        "out_block_size": Int(0, MAX_BLOCK, 0, **BLOCK),
        "out_bits": Int(2, 8, 8),
        "residual_block_size": Int(0, MAX_BLOCK, 0, **BLOCK),
        "superblock": Int(0, MAX_BLOCK, 0, extra_bad=NOT_A_MULTIPLE, **BLOCK),
    },
    "BlockBatchMatMul": {
        "block_size": Int(1, MAX_BLOCK, **BLOCK),
        "out_block_size": Int(0, MAX_BLOCK, 0, **BLOCK),
        "out_bits": Int(2, 8, 8),
        "a_transposed": Bool(0),
        "b_transposed": Bool(0),
    },
    "AttentionPV": {
        "block_size": Int(1, MAX_BLOCK, **BLOCK),
        "segment": Int(2, 256, 32, extra_bad=(33,)),
        "p_exponent": Int(-32, 0, -8),
        "transpose_output": Bool(0),
        "v_transposed": Bool(0),
    },
    "BlockAttention": {
        "block_size": Int(1, 4096, **BLOCK),
        "score_block_size": Int(1, 4096, 32, **BLOCK),
        "segment": Int(2, 256, 32, extra_bad=(33,)),
        "p_exponent": Int(-32, 0, -8),
        "q_heads_first": Bool(0),
        "k_heads_first": Bool(0),
        "v_heads_first": Bool(0),
        "num_heads": Int(0, 4096, 0),
    },
    "BlockGather": {
        "bits": Int(4, 8, extra_bad=(5, 6, 7)),
        "block_size": Int(1, MAX_BLOCK, **BLOCK),
        "frac_bits": Int(0, 4, 0),
    },
}


# ------------------------------------------------------------------------------------------
# Cases


@dataclass
class Case:
    id: str
    model: str
    expect: str  # "create": refused at session creation; "refused": at creation or run;
    #              "ok": runs; "same": runs with the unmutated model's bits; "either": runs or
    #              is refused at creation; "empty": runs or is refused by a stock onnxruntime
    #              op (not ours)
    mutation: dict | None = None
    feeds: str = "base"
    names: list[str] = field(default_factory=list)  # a "create" message names one of the
    #                                                 nodes (names[0:-1]) and names[-1]

    def to_json(self) -> dict:
        shape, feeds = FEEDS[self.feeds]
        return {"id": self.id, "model": self.model, "mutation": self.mutation,
                "shape": shape, "feeds": feeds}  # fmt: skip


def _feeds(batch: int, seq: int, ids=None, types=0, mask=1) -> tuple[list, dict]:
    rng = np.random.default_rng(batch * 100 + seq)
    input_ids = rng.integers(5, 100, (batch, seq)) if ids is None else np.full((batch, seq), ids)
    attention = np.full((batch, seq), mask)
    if batch > 1 and seq > 3:  # the second sequence padded
        attention[1, seq // 2 :] = 0
    feeds = {
        "input_ids": input_ids,
        "attention_mask": attention,
        "token_type_ids": np.full((batch, seq), types),
    }
    return [batch, seq], {k: v.reshape(-1).tolist() for k, v in feeds.items()}


FEEDS = {
    "base": _feeds(2, 20),  # 20 tokens: blocks of 16 and 8 along the sequence differ
    "empty batch": _feeds(0, 8),
    "empty sequence": _feeds(2, 0),
    "longer than the position table": _feeds(1, MAX_POSITIONS + 1),
    "token id = vocab size": _feeds(2, 8, ids=VOCAB),
    "token id below -vocab size": _feeds(2, 8, ids=-VOCAB - 1),
    "token type id out of range": _feeds(2, 8, types=TYPES),
    "token id -1": _feeds(2, 8, ids=-1),  # ONNX Gather: counts from the end (the FP32 model too)
    "every token masked": _feeds(2, 8, mask=0),  # softmax rows of zeros: output of the biases
}
FEED_EXPECT = {
    "base": "ok",
    "empty batch": "empty",
    "empty sequence": "empty",
    "token id -1": "ok",
    "every token masked": "ok",
}


def _attrs(node: onnx.NodeProto) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _set(node, attr, value, kind="int") -> dict:
    return {"node": node.name, "attr": attr, "value": value, "type": kind}


def attribute_cases(key: str, model: onnx.ModelProto, ops) -> list[Case]:
    """Per bctonnx node (of `ops`) and attribute of its op: bad values (every one on the op's
    first node, one in turn on the others), a required one removed, a block size halved; per op
    once: an int attribute given as a float."""
    cases, seen = [], set()
    nodes = [n for n in model.graph.node if n.domain == "bctonnx" and n.op_type in ops]
    for i, node in enumerate(nodes):
        first = node.op_type not in seen
        seen.add(node.op_type)
        attrs = _attrs(node)
        for name, spec in SPECS[node.op_type].items():
            tag = f"{key}:{node.name}:{name}"
            bad = spec.bad_values(attrs)
            for value, kind in bad if first else [bad[i % len(bad)]]:
                mutation = _set(node, name, value, kind)
                cases.append(
                    Case(f"{tag}={value}", key, "create", mutation, names=[node.name, name])
                )
            if spec.required and (first or i % 2):
                mutation = _set(node, name, None)
                cases.append(
                    Case(f"{tag} removed", key, "create", mutation, names=[node.name, name])
                )
            if spec.block and attrs.get(name, 0) >= 2:
                value = attrs[name] // 2
                expect = "ok" if legit_block_size(node, name, value) else "refused"
                cases.append(Case(f"{tag}={value}", key, expect, _set(node, name, value)))
        if first:
            name = next(n for n, s in SPECS[node.op_type].items() if s.kind in ("int", "bool"))
            mutation = _set(node, name, 16.0, "float")
            cases.append(Case(f"{key}:{node.name}:{name} as a float", key, "create", mutation,
                              names=[node.name, name]))  # fmt: skip
    return cases


def legit_block_size(node: onnx.NodeProto, name: str, value: int) -> bool:
    """A halved block size that still runs: one only the op itself uses -- BlockAttention's
    score blocks, or the activation blocks of a BlockMatMul that quantizes its float input
    itself (when they still nest with the weight blocks)."""
    if node.op_type == "BlockAttention":
        return name == "score_block_size"
    if node.op_type == "BlockMatMul" and name == "act_block_size":
        attrs = _attrs(node)
        block = attrs.get("superblock") or attrs["block_size"]
        return node.input[1] == "" and max(block, value) % min(block, value) == 0
    return False


def legit_cases(key: str, model: onnx.ModelProto, ops) -> list[Case]:
    """Mutations within the spec that must still run, on the first node of each op: optional
    attributes removed where they hold the default (the same bits), `simd` 0 (the portable
    kernels: the same bits), other values in range of attributes no other node depends on."""
    changed = {  # op -> (attribute, value, attribute type)
        "BlockQuantize": [("bits", 4, "int")],
        "BlockRequantize": [("bits", 6, "int")],
        "BlockMatMul": [("out_bits", 6, "int"), ("frac_bits", 0, "int"), ("act_bits", 7, "int")],
        "BlockBatchMatMul": [("out_bits", 6, "int")],
        "AttentionPV": [("segment", 2, "int"), ("p_exponent", -12, "int")],
        "BlockAttention": [("segment", 64, "int"), ("p_exponent", -12, "int")],
        "IntLayerNorm": [("epsilon", 0.5, "float"), ("epsilon", None, "float")],
        "IntGelu": [("approximate", "tanh", "string")],
    }
    cases, seen = [], set()
    for node in model.graph.node:
        if node.domain != "bctonnx" or node.op_type in seen or node.op_type not in ops:
            continue
        seen.add(node.op_type)
        attrs = _attrs(node)
        tag = f"{key}:{node.name}"
        for name, value, kind in changed.get(node.op_type, []):
            cases.append(Case(f"{tag}:{name}={value}", key, "ok", _set(node, name, value, kind)))
        for name, spec in SPECS[node.op_type].items():
            if name == "simd":
                cases.append(Case(f"{tag}:simd=0", key, "same", _set(node, name, 0)))
            elif spec.default is not None and attrs.get(name) == spec.default:
                cases.append(Case(f"{tag}:{name} removed", key, "same", _set(node, name, None)))
    return cases


def constant_inputs(model: onnx.ModelProto, ops) -> dict[str, list[tuple[str, str, int]]]:
    """Initializer read by a bctonnx node of `ops` -> the (node, op, input index) of every
    bctonnx node whose kernel reads it, directly or through a Cast, those of `ops` first."""
    inits = {t.name for t in model.graph.initializer}
    cast_of = {n.output[0]: n.input[0] for n in model.graph.node if n.op_type == "Cast"}
    readers: dict[str, list[tuple[str, str, int]]] = {}
    for node in model.graph.node:
        if node.domain == "bctonnx":
            for index, name in enumerate(node.input):
                source = cast_of.get(name, name)
                if source in inits:
                    readers.setdefault(source, []).append((node.name, node.op_type, index))
    return {
        name: sorted(nodes, key=lambda r: r[1] not in ops)
        for name, nodes in readers.items()
        if any(op in ops for _, op, _ in nodes)
    }


def initializer_cases(key: str, model: onnx.ModelProto, ops) -> list[Case]:
    """Per constant input of a bctonnx node: flattened (rank 1: a leading 1 added), its last
    element dropped, transposed (rank 2), another dtype -- every one on the first initializer of
    each op input, one in turn on the others. Refused at session creation, except the shapes that
    stay in spec: a transposed square matrix (other weights, the same format; with zero points
    and multipliers the widened codes may leave int8, refused then) and a one-element
    y_multiplier of another rank (the same bits)."""
    tensors = {t.name: t for t in model.graph.initializer}
    cast_fed = {n.input[0] for n in model.graph.node if n.op_type == "Cast"}
    asymmetric = any(t.name.endswith("bmm_zp") for t in model.graph.initializer)
    cases, seen = [], set()
    for i, (name, readers) in enumerate(constant_inputs(model, ops).items()):
        t = tensors[name]
        dims, count = list(t.dims), math.prod(t.dims)
        names = [node for node, _, _ in readers] + [""]
        mutations = []  # (what, mutation, expect)
        if len(dims) >= 2:
            mutations.append(("flattened", {"shape": [count]}, "create"))
        else:
            mutations.append(
                ("[1, ...]", {"shape": [1, *dims]}, "same" if count == 1 else "create")
            )
        mutations.append(("element dropped", {"drop": True}, "create"))
        if len(dims) == 2:
            square = "either" if asymmetric else "ok"
            mutations.append(
                ("transposed", {"transpose": True}, square if dims[0] == dims[1] else "create")
            )
        if name not in cast_fed:
            other = {onnx.TensorProto.FLOAT: "float64", onnx.TensorProto.INT8: "uint8"}
            mutations.append(("dtype", {"dtype": other.get(t.data_type, "int8")}, "create"))
        role = readers[0][1:]
        chosen = mutations if role not in seen else [mutations[i % len(mutations)]]
        seen.add(role)
        for what, mutation, expect in chosen:
            cases.append(Case(f"{key}:{name}:{what}", key, expect, {"init": name, **mutation},
                              names=names))  # fmt: skip
    return cases


def feed_cases(key: str) -> list[Case]:
    return [Case(f"{key}:feeds {f}", key, FEED_EXPECT.get(f, "refused"), feeds=f) for f in FEEDS]


# ------------------------------------------------------------------------------------------
# Models and the child processes


@pytest.fixture(scope="module")
def fuzz_models(tiny_bert_onnx, tmp_path_factory) -> dict[str, Path]:
    from test_matmul import _compress

    out = tmp_path_factory.mktemp("fuzz")
    protos = {p: _compress(tiny_bert_onnx, p) for p in ("w8a8", "w8a8-fast", "w4a8")}
    protos["w8a8-unfused"] = _compress(tiny_bert_onnx, "w8a8", fuse_attention=False)
    assert UNFUSED_OPS <= {n.op_type for n in protos["w8a8-unfused"].graph.node}
    # at blocks of 16 w8a8-fast's re-blocking has nothing to do: the same model, fuzzed once
    assert protos.pop("w8a8-fast").SerializeToString() == protos["w8a8"].SerializeToString()
    paths = {}
    for key, proto in protos.items():
        paths[key] = out / f"{key}.onnx"
        onnx.save(proto, paths[key])
    return paths


def run_cases(models: dict[str, Path], cases: list[Case], work: Path, workers: int = 2) -> dict:
    """Every case's result line, from `workers` child processes at a time (the cases dealt out
    in turn)."""
    with ThreadPoolExecutor(workers) as pool:
        parts = pool.map(lambda w: _run_in_children(models, cases[w::workers], work / f"w{w}"),
                         range(workers))  # fmt: skip
        return {k: v for part in parts for k, v in part.items()}


def _run_in_children(models: dict[str, Path], cases: list[Case], work: Path) -> dict[str, dict]:
    """Run `cases` in a child; one that dies (signal, exit) or stays silent for CASE_TIMEOUT is
    charged to its first case without a line, then a new child takes the rest."""
    work.mkdir(parents=True, exist_ok=True)
    results: dict[str, dict] = {}
    pending = [c.to_json() for c in cases]
    for attempt in range(len(pending) + 1):
        if not pending:
            break
        spec = work / f"cases-{attempt}.json"
        spec.write_text(json.dumps({"models": {k: str(p) for k, p in models.items()},
                                    "cases": pending}))  # fmt: skip
        with (work / f"stderr-{attempt}.txt").open("w") as stderr:
            proc = subprocess.Popen([sys.executable, str(RUNNER), str(spec)],
                                    stdout=subprocess.PIPE, stderr=stderr, text=True)  # fmt: skip
            done = _collect(proc, pending, results)
        failed = results[pending[done - 1]["id"]]
        if failed["stage"] in ("crash", "hang"):  # the child's last words (a sanitizer report)
            failed["stderr"] = (work / f"stderr-{attempt}.txt").read_text()[-3000:]
        pending = pending[done:]
    return results


def _collect(proc: subprocess.Popen, pending: list[dict], results: dict) -> int:
    """Read a child's result lines into `results`; how many of `pending` it settled."""
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    done = 0
    while done < len(pending):
        if not sel.select(CASE_TIMEOUT):
            proc.kill()
            results[pending[done]["id"]] = {"stage": "hang"}
            done += 1
            break
        line = proc.stdout.readline()
        if not line:
            code = proc.wait()
            results[pending[done]["id"]] = {"stage": "crash", "returncode": code}
            done += 1
            break
        result = json.loads(line)
        results[result["id"]] = result
        done += 1
    proc.stdout.close()
    proc.wait()
    return done


# ------------------------------------------------------------------------------------------
# The test


def check(case: Case, result: dict, base_digest: str | None) -> str | None:
    """What is wrong with a case's result (None: as specified)."""
    stage = result["stage"]
    error = result.get("error", "")
    if stage in ("crash", "hang"):
        return f"{stage} ({result.get('returncode', '')}): {result.get('stderr', '')}"
    if stage == "create" and "(node '" not in error and "in node (" not in error:
        return f"refused at session creation without naming the node: {error[:300]}"
    if case.expect == "create":
        if stage != "create":
            return f"not refused at session creation ({stage}: {error[:200]})"
        nodes, what = case.names[:-1], case.names[-1]
        if not any(f"'{n}'" in error or f"({n})" in error for n in nodes) or what not in error:
            return f"the message does not name the node and {what!r}: {error[:300]}"
    elif case.expect == "refused":
        if stage == "ok":
            return "ran: not refused"
    elif case.expect in ("ok", "same"):
        if stage != "ok":
            return f"did not run ({stage}: {error[:300]})"
        if case.expect == "same" and result["digest"] != base_digest:
            return "ran with other bits than the unmutated model"
    elif case.expect == "either":
        if stage == "run" or (stage == "create" and not any(f"'{n}'" in error for n in case.names)):
            return f"neither ran nor was refused at creation naming the node: {error[:300]}"
    elif case.expect == "empty":
        ours = [op for op in SPECS if f"running {op} node" in error]
        if stage != "ok" and (stage != "run" or ours):
            return f"refused by our op: {error[:300]}"
    return None


def test_mutated_models_are_refused_or_run_never_crash(fuzz_models, tmp_path):
    require_library()
    cases: list[Case] = []
    for key, path in fuzz_models.items():
        model = onnx.load(path)
        # the unfused model: only the ops the fused ones do not have (the rest is w8a8's)
        ops = UNFUSED_OPS if key == "w8a8-unfused" else set(SPECS)
        cases += feed_cases(key)
        cases += attribute_cases(key, model, ops)
        cases += initializer_cases(key, model, ops)
        cases += legit_cases(key, model, ops)
    ids = [c.id for c in cases]
    assert len(ids) == len(set(ids))
    assert len(cases) < 1500, f"{len(cases)} cases: keep the test near a minute"
    results = run_cases(fuzz_models, cases, tmp_path)
    base = {key: results[f"{key}:feeds base"].get("digest") for key in fuzz_models}
    problems = [
        f"{case.id}: {why}"
        for case in cases
        if (why := check(case, results[case.id], base[case.model])) is not None
    ]
    counts = {s: sum(r["stage"] == s for r in results.values()) for s in ("create", "run", "ok")}
    print(f"{len(cases)} cases: {counts}")
    assert not problems, f"{len(problems)} of {len(cases)} cases:\n" + "\n".join(problems[:60])

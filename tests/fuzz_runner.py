"""The child process of tests/test_fuzz_ops.py: mutated models, each loaded with the op library
and run once.

    python fuzz_runner.py CASES.json

CASES.json: ``{"models": {key: path}, "cases": [{"id", "model", "mutation", "feeds"}]}``. For
every case, in order: the model's proto copied, ``mutation`` applied (`mutate`), an onnxruntime
session created with bctonnx's op library, one run on ``feeds`` (input name -> nested int64
lists). One JSON line per case on stdout, flushed before the next case starts::

    {"id": ..., "stage": "create" | "run" | "ok", "error": str, "digest": sha1 of the outputs}

so a crash or a hang is the first case without a line (the parent restarts after it).
"""

from __future__ import annotations

import hashlib
import json
import sys

import numpy as np
import onnx
from onnx import helper, numpy_helper


def _attribute(value, kind: str) -> onnx.AttributeProto:
    return helper.make_attribute("_", {"int": int, "float": float, "string": str}[kind](value))


def mutate(model: onnx.ModelProto, mutation: dict) -> None:
    """Apply one mutation in place:

    - ``{"node", "attr", "value", "type"}``: set the node's attribute to ``value`` as an
      ``type`` ("int", "float", "string") attribute; ``value`` None removes it;
    - ``{"init", "shape"}``: the initializer reshaped (same elements);
    - ``{"init", "drop": True}``: its last index along the last axis dropped (a scalar: empty);
    - ``{"init", "transpose": True}``: its axes reversed;
    - ``{"init", "dtype"}``: its values cast to the numpy dtype of that name.
    """
    if "node" in mutation:
        node = next(n for n in model.graph.node if n.name == mutation["node"])
        kept = [a for a in node.attribute if a.name != mutation["attr"]]
        del node.attribute[:]
        node.attribute.extend(kept)
        if mutation["value"] is not None:
            attr = _attribute(mutation["value"], mutation["type"])
            attr.name = mutation["attr"]
            node.attribute.append(attr)
        return
    if "init" in mutation:
        tensor = next(t for t in model.graph.initializer if t.name == mutation["init"])
        array = numpy_helper.to_array(tensor)
        if "shape" in mutation:
            array = array.reshape(mutation["shape"])
        elif mutation.get("drop"):
            array = array.reshape(-1)[:0] if array.ndim == 0 else array[..., :-1]
        elif mutation.get("transpose"):
            array = np.ascontiguousarray(array.T)
        elif "dtype" in mutation:
            array = array.astype(mutation["dtype"])
        tensor.CopyFrom(numpy_helper.from_array(np.asarray(array), tensor.name))


def run_case(model: onnx.ModelProto, case: dict) -> dict:
    import onnxruntime as ort

    import bctonnx

    mutated = onnx.ModelProto()
    mutated.CopyFrom(model)
    if case.get("mutation"):
        mutate(mutated, case["mutation"])
    so = bctonnx.session_options(threads=1)
    so.log_severity_level = 4  # errors are reported here, not logged
    out = {"id": case["id"]}
    try:
        sess = ort.InferenceSession(
            mutated.SerializeToString(), so, providers=["CPUExecutionProvider"]
        )
    except Exception as exc:  # noqa: BLE001 - any refusal is a result
        return out | {"stage": "create", "error": str(exc)}
    feeds = {k: np.array(v, np.int64).reshape(case["shape"]) for k, v in case["feeds"].items()}
    try:
        outputs = sess.run(None, feeds)
    except Exception as exc:  # noqa: BLE001
        return out | {"stage": "run", "error": str(exc)}
    digest = hashlib.sha1()
    for o in outputs:
        digest.update(str(o.shape).encode() + np.ascontiguousarray(o).tobytes())
    return out | {"stage": "ok", "digest": digest.hexdigest()}


def main(path: str) -> None:
    spec = json.loads(open(path).read())
    models = {k: onnx.load(p) for k, p in spec["models"].items()}
    for case in spec["cases"]:
        print(json.dumps(run_case(models[case["model"]], case)), flush=True)


if __name__ == "__main__":
    main(sys.argv[1])

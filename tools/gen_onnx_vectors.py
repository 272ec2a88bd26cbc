#!/usr/bin/env python3
"""Extract ONNX's own backend node-test vectors for DynamicQuantizeLinear and MatMulInteger.

Writes tests/data/onnx_node_vectors.json, which tests/onnx_vectors.rs checks dynq against
(no Python is needed at test time).

    python3 tools/gen_onnx_vectors.py            # (re)write the JSON file
    python3 tools/gen_onnx_vectors.py --check    # exit 1 if the committed file is stale

Requires the `onnx` and `numpy` pip packages. The vectors come from
`onnx.backend.test.case.node.collect_testcases`, i.e. the same in-memory cases from which ONNX
generates its backend test data. Every case whose name is `test_dynamicquantizelinear*` or
`test_matmulinteger*` is taken (including the `_expanded` function-body variants, which carry
the same data through a graph of primitive ops).

File format (JSON, sorted keys, indent 1, trailing newline):

    {
     "cases": [ {
        "name": "test_...",            ONNX test-case name
        "op": "DynamicQuantizeLinear" | "MatMulInteger",
        "expanded": bool,              true for the `_expanded` (function body) variants
        "graph_ops": [...],            op types of the nodes of the test model, in order
        "opset": {domain: version},    opset imports of the test model ("" = ai.onnx)
        "attributes": {...},           attributes of the node (non-expanded cases only)
        "data_sets": [ {"inputs": [tensor...], "outputs": [tensor...]} ]
     } ],
     "format": 1,
     "generator": "tools/gen_onnx_vectors.py",
     "onnx_version": "..."
    }

    tensor = {"name": str, "dtype": "float32" | "uint8" | "int8" | "int32" | ...,
              "shape": [dims...] ([] for a scalar), "data": [values in row-major order],
              "bits": [uint32 bit patterns]   (float32 only; the authoritative values)}

For float32 tensors `data` holds the shortest decimal that round-trips to the same float32
(for reading; "inf", "-inf", "nan" as strings) and `bits` the exact IEEE-754 bit patterns.
"""

from __future__ import annotations

import argparse
import difflib
import json
import math
import os
import re
import sys
import warnings

FORMAT_VERSION = 1
GENERATOR = "tools/gen_onnx_vectors.py"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUTPUT = os.path.join(ROOT, "tests", "data", "onnx_node_vectors.json")

CASE_RE = re.compile(r"^test_(dynamicquantizelinear|matmulinteger)(_.*)?$")
OPS = {"dynamicquantizelinear": "DynamicQuantizeLinear", "matmulinteger": "MatMulInteger"}
REQUIRED = [
    "test_dynamicquantizelinear",
    "test_dynamicquantizelinear_max_adjusted",
    "test_dynamicquantizelinear_min_adjusted",
    "test_matmulinteger",
]


def die(msg: str) -> None:
    print(f"gen_onnx_vectors.py: error: {msg}", file=sys.stderr)
    sys.exit(1)


def f32_decimal(v):
    """Shortest decimal that parses back to the same float32, as a JSON-ready value."""
    import numpy as np

    f = np.float32(v)
    if math.isnan(f):
        return "nan"
    if math.isinf(f):
        return "inf" if f > 0 else "-inf"
    # numpy prints float32 with the shortest round-tripping digits (Dragon4, unique=True).
    s = np.format_float_scientific(f, unique=True, trim="-")
    d = float(s)  # json then writes repr(d), the shortest decimal for this (exact) double
    if np.float32(d) != f or math.copysign(1.0, d) != math.copysign(1.0, float(f)):
        raise AssertionError(f"decimal {s!r} does not round-trip to float32 {f!r}")
    return d


def tensor_json(name: str, arr) -> dict:
    import numpy as np

    a = np.asarray(arr)
    dt = a.dtype
    flat = a.reshape(-1)
    t = {"name": name, "dtype": str(dt), "shape": [int(d) for d in a.shape]}
    if dt == np.float32:
        t["bits"] = [int(b) for b in flat.view(np.uint32)]
        t["data"] = [f32_decimal(v) for v in flat]
    elif dt.kind in "iu" or dt == np.bool_:
        t["data"] = [int(v) for v in flat]
    else:
        die(f"tensor {name!r} has dtype {dt}, which this generator does not know how to store exactly")
    return t


def attribute_json(attr):
    import onnx

    v = onnx.helper.get_attribute_value(attr)
    if isinstance(v, bytes):
        return v.decode("utf-8", "replace")
    if isinstance(v, (int, float, str)):
        return v
    if isinstance(v, (list, tuple)) and all(isinstance(x, (int, float, str, bytes)) for x in v):
        return [x.decode("utf-8", "replace") if isinstance(x, bytes) else x for x in v]
    return f"<{type(v).__name__}>"


def collect() -> dict:
    import onnx
    from onnx.backend.test.case.node import collect_testcases

    with warnings.catch_warnings():
        # Other operators' exporters emit numpy overflow warnings while all cases are built.
        warnings.simplefilter("ignore")
        cases = collect_testcases(None)

    out = []
    for case in sorted(cases, key=lambda c: c.name):
        m = CASE_RE.match(case.name)
        if not m:
            continue
        op = OPS[m.group(1)]
        model = case.model
        if model is None:
            die(f"case {case.name} has no in-memory model")
        graph = model.graph
        nodes = list(graph.node)
        expanded = case.name.endswith("_expanded")
        if not expanded and (len(nodes) != 1 or nodes[0].op_type != op):
            die(f"case {case.name}: expected a single {op} node, got {[n.op_type for n in nodes]}")
        in_names = [i.name for i in graph.input]
        out_names = [o.name for o in graph.output]
        data_sets = []
        for inputs, outputs in case.data_sets:
            if len(inputs) != len(in_names) or len(outputs) != len(out_names):
                die(f"case {case.name}: data set arity does not match the model's inputs/outputs")
            data_sets.append(
                {
                    "inputs": [tensor_json(n, a) for n, a in zip(in_names, inputs)],
                    "outputs": [tensor_json(n, a) for n, a in zip(out_names, outputs)],
                }
            )
        if not data_sets:
            die(f"case {case.name} has no data sets")
        entry = {
            "name": case.name,
            "op": op,
            "expanded": expanded,
            "graph_ops": [n.op_type for n in nodes],
            "opset": {o.domain: int(o.version) for o in model.opset_import},
            "data_sets": data_sets,
        }
        if not expanded:
            entry["attributes"] = {a.name: attribute_json(a) for a in nodes[0].attribute}
        out.append(entry)

    names = {c["name"] for c in out}
    missing = [n for n in REQUIRED if n not in names]
    if missing:
        die(f"onnx {onnx.__version__} does not provide the expected test cases {missing}")
    return {
        "cases": out,
        "format": FORMAT_VERSION,
        "generator": GENERATOR,
        "onnx_version": onnx.__version__,
    }


def render(doc: dict) -> str:
    return json.dumps(doc, sort_keys=True, indent=1, ensure_ascii=True, allow_nan=False) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true", help="do not write; exit 1 if the committed file differs")
    ap.add_argument("--output", default=OUTPUT, help=f"path of the JSON file (default: {os.path.relpath(OUTPUT, ROOT)})")
    args = ap.parse_args()

    try:
        import numpy  # noqa: F401
        import onnx  # noqa: F401
    except ImportError as e:
        die(f"{e}; install the generator's dependencies with `pip install onnx numpy`")

    doc = collect()
    text = render(doc)
    rel = os.path.relpath(args.output, ROOT)

    if not args.check:
        os.makedirs(os.path.dirname(args.output), exist_ok=True)
        with open(args.output, "w", encoding="utf-8", newline="\n") as f:
            f.write(text)
        n_dq = sum(c["op"] == "DynamicQuantizeLinear" for c in doc["cases"])
        n_mm = sum(c["op"] == "MatMulInteger" for c in doc["cases"])
        print(f"wrote {rel}: {n_dq} DynamicQuantizeLinear and {n_mm} MatMulInteger cases from onnx {doc['onnx_version']}")
        return

    try:
        with open(args.output, encoding="utf-8", newline="") as f:
            current = f.read()
    except FileNotFoundError:
        die(f"{rel} does not exist; generate it with `python3 tools/gen_onnx_vectors.py`")
    if current == text:
        print(f"{rel} is up to date (onnx {doc['onnx_version']})")
        return

    msg = [f"{rel} is stale: it differs from what onnx {doc['onnx_version']} generates."]
    try:
        committed_version = json.loads(current).get("onnx_version")
    except (ValueError, AttributeError):
        committed_version = None
        msg.append("The committed file is not valid JSON.")
    if committed_version is not None and committed_version != doc["onnx_version"]:
        msg.append(
            f"The committed file was generated with onnx {committed_version} but onnx "
            f"{doc['onnx_version']} is installed: install onnx=={committed_version} to check it, "
            "or regenerate it with the new version and review the changes."
        )
    msg.append("Regenerate it with `python3 tools/gen_onnx_vectors.py` and commit the result. Diff (committed -> generated):")
    diff = list(difflib.unified_diff(current.splitlines(), text.splitlines(), "committed", "generated", lineterm="", n=2))
    if len(diff) > 80:
        diff = diff[:80] + [f"... ({len(diff) - 80} more diff lines)"]
    print("\n".join(msg + diff), file=sys.stderr)
    sys.exit(1)


if __name__ == "__main__":
    main()

"""The installed wheel on its own (run from outside the source tree, in a virtual environment
where only the wheel provides dynq): the library inside the package is the one used, the numpy
wrapper computes, and the ONNX tools convert a model that ONNX Runtime then runs with the
custom op from that same library.

    python -m venv --system-site-packages env && env/bin/pip install --no-deps dist/dynq-*.whl
    (cd /tmp && env/bin/python /path/to/tests/wheel_smoke.py)
"""

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

import dynq

pkg = Path(dynq.__file__).resolve().parent
lib = Path(dynq.library_path()).resolve()
assert "site-packages" in str(pkg), f"dynq imported from {pkg}, not from an installed wheel"
assert lib == pkg / "libdynq.so", f"library {lib} is not the wheel's ({pkg / 'libdynq.so'})"
print(f"dynq {dynq.version()} from {pkg}, kernel {dynq.active_isa()}")

rng = np.random.default_rng(5)
w = rng.standard_normal((64, 48)).astype(np.float32)
a = rng.standard_normal((7, 64)).astype(np.float32)
y = dynq.gemm(dynq.PackedWeights.from_float(w, layout="kn"), a)
cos = float((y * (a @ w)).sum() / np.linalg.norm(y) / np.linalg.norm(a @ w))
assert y.shape == (7, 48) and cos > 0.999, cos

import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

model = helper.make_model(
    helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Add", ["h", "b"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 48])],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(rng.standard_normal(48).astype(np.float32), "b")],
    ),
    opset_imports=[helper.make_opsetid("", 17)],
    ir_version=8,  # what ONNX Runtime 1.17 and later all read
)
with tempfile.TemporaryDirectory() as d:
    src, out = os.path.join(d, "fp32.onnx"), os.path.join(d, "int8.onnx")
    onnx.save_model(model, src)
    # The console script the wheel installs, next to this interpreter.
    tool = Path(sys.executable).parent / "dynq-onnx"
    r = subprocess.run([str(tool), "quantize", src, out, "--quiet"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    so = ort.SessionOptions()
    so.register_custom_ops_library(str(lib))
    sess = ort.InferenceSession(out, so, providers=["CPUExecutionProvider"])
    assert [n.op_type for n in onnx.load(out).graph.node] == ["DynQMatMul"]
    got = sess.run(None, {"x": a})[0]
    want = ort.InferenceSession(src, providers=["CPUExecutionProvider"]).run(None, {"x": a})[0]
    c = float((got * want).sum() / np.linalg.norm(got) / np.linalg.norm(want))
    assert c > 0.999, c
print(f"wheel smoke test passed (gemm cosine {cos:.6f}, ONNX Runtime {ort.__version__} op cosine {c:.6f})")

"""Models and reference outputs for tests/ort_c_api.rs (the ONNX Runtime C API client test).

Run by that test with the Python whose onnxruntime is under test, PYTHONPATH=bindings/python and
DYNQ_LIBRARY set to the libdynq.so under test:

    python tests/ort_c_api.py WORKDIR

Writes into WORKDIR:
- fp32.onnx: x [m, 64] -> MatMul -> Add -> Relu -> MatMul -> Add -> y [m, 32] (float)
- dq.onnx: fp32.onnx converted by `python -m dynq.onnx quantize` (two dynq.DynQMatMul nodes)
- bad_w_dtype.onnx: a DynQMatMul node 'dq_bad' whose weight is float instead of int8
- bad_attr.onnx: a DynQMatMul node 'dq_bad' whose attribute act_type is "bogus"
- x.f32, ref.f32, py.f32: the input, the fp32 model's output and the output of dq.onnx run by
  this onnxruntime's Python API with the same libdynq.so (raw little-endian float32)
- meta.txt: key=value lines: shapes, onnxruntime version and, with DYNQ_ORT_C_API_SHIM set,
  the file and offset of its OrtApiBase (see api_base_location)
"""

import ctypes
import os
import subprocess
import sys

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

ROWS, K, HIDDEN, N = 6, 64, 96, 32
OPSETS = [helper.make_opsetid("", 17), helper.make_opsetid("dynq", 1)]


def model(nodes, inputs, outputs, inits):
    g = helper.make_graph(nodes, "g", inputs, outputs, inits)
    # IR 8 / opset 17: loadable by every ONNX Runtime from 1.17 on.
    return helper.make_model(g, opset_imports=OPSETS, ir_version=8)


class DlInfo(ctypes.Structure):
    _fields_ = [("fname", ctypes.c_char_p), ("fbase", ctypes.c_void_p), ("sname", ctypes.c_char_p), ("saddr", ctypes.c_void_p)]


def api_base_location(shim):
    """Where this onnxruntime's OrtApiBase is, for a wheel without libonnxruntime.so (1.17, 1.18:
    the C API is linked into the Python extension module and not exported). The C library `shim`
    keeps the OrtApiBase that its RegisterCustomOps is given, as every custom-op library is."""
    so = ort.SessionOptions()
    so.register_custom_ops_library(shim)
    get = ctypes.CDLL(shim).dynq_test_ort_api_base
    get.restype = ctypes.c_void_p
    base = get()
    info = DlInfo()
    libc = ctypes.CDLL(None)
    assert base and libc.dladdr(ctypes.c_void_p(base), ctypes.byref(info)), "OrtApiBase not found"
    return {"ort_module": info.fname.decode(), "ort_api_base_offset": base - info.fbase}


def main():
    out = sys.argv[1]
    lib = os.environ["DYNQ_LIBRARY"]
    rng = np.random.default_rng(11)
    w1 = (rng.standard_normal((K, HIDDEN)) * 0.2).astype(np.float32)
    b1 = (rng.standard_normal(HIDDEN) * 0.1).astype(np.float32)
    w2 = (rng.standard_normal((HIDDEN, N)) * 0.2).astype(np.float32)
    b2 = (rng.standard_normal(N) * 0.1).astype(np.float32)
    fp32 = model(
        [
            helper.make_node("MatMul", ["x", "w1"], ["h0"], name="fc1"),
            helper.make_node("Add", ["h0", "b1"], ["h1"], name="fc1_bias"),
            helper.make_node("Relu", ["h1"], ["h"], name="fc1_relu"),
            helper.make_node("MatMul", ["h", "w2"], ["y0"], name="fc2"),
            helper.make_node("Add", ["y0", "b2"], ["y"], name="fc2_bias"),
        ],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["m", K])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["m", N])],
        [numpy_helper.from_array(a, n) for a, n in ((w1, "w1"), (b1, "b1"), (w2, "w2"), (b2, "b2"))],
    )
    fp32_path = os.path.join(out, "fp32.onnx")
    dq_path = os.path.join(out, "dq.onnx")
    onnx.save(fp32, fp32_path)
    # The converter's own command line, as a user runs it.
    subprocess.run([sys.executable, "-m", "dynq.onnx", "quantize", "--quiet", fp32_path, dq_path], check=True)
    dq = onnx.load(dq_path)
    dq_nodes = [n for n in dq.graph.node if n.domain == "dynq" and n.op_type == "DynQMatMul"]
    assert len(dq_nodes) == 2, [(n.domain, n.op_type) for n in dq.graph.node]

    # Skewed, one-sided-ish activations with rows of different ranges.
    x = (rng.standard_normal((ROWS, K)) * rng.uniform(0.5, 3.0, size=(ROWS, 1)) + 0.2).astype(np.float32)
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    ref = ort.InferenceSession(fp32_path, so, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.register_custom_ops_library(lib)
    py = ort.InferenceSession(dq_path, so, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    for name, a in (("x", x), ("ref", ref), ("py", py)):
        np.ascontiguousarray(a, dtype="<f4").tofile(os.path.join(out, name + ".f32"))

    # Malformed dynq nodes: a float weight (refused by the op's shape inference) and an unknown
    # attribute value (refused when ONNX Runtime creates the kernel).
    wq = rng.integers(-127, 128, size=(K, N)).astype(np.int8)
    scales = np.full(N, 0.01, np.float32)
    a_vi = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["m", K])]
    y_vi = [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)]
    for name, w, attrs in (
        ("bad_w_dtype", wq.astype(np.float32), {}),
        ("bad_attr", wq, {"act_type": "bogus"}),
    ):
        node = helper.make_node("DynQMatMul", ["x", "W", "S"], ["y"], domain="dynq", name="dq_bad", **attrs)
        inits = [numpy_helper.from_array(w, "W"), numpy_helper.from_array(scales, "S")]
        onnx.save(model([node], a_vi, y_vi, inits), os.path.join(out, name + ".onnx"))

    meta = {"rows": ROWS, "k": K, "n": N, "ort_version": ort.__version__}
    shim = os.environ.get("DYNQ_ORT_C_API_SHIM")
    if shim:
        meta.update(api_base_location(shim))
    with open(os.path.join(out, "meta.txt"), "w", encoding="utf-8") as f:
        for k, v in meta.items():
            f.write(f"{k}={v}\n")


if __name__ == "__main__":
    main()

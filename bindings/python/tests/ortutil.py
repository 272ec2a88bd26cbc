"""Helpers to build small ONNX models with the dynq op and run them in ONNX Runtime."""

import os

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

import dynq

OPSETS = [helper.make_opsetid("", 17), helper.make_opsetid("dynq", 1), helper.make_opsetid("com.microsoft", 1)]


def model(nodes, inputs, outputs, inits=(), value_infos=()):
    g = helper.make_graph(nodes, "g", inputs, outputs, list(inits), value_info=list(value_infos))
    # IR 8 / opset 17: loadable by every ONNX Runtime from 1.17 on.
    return helper.make_model(g, opset_imports=OPSETS, ir_version=8)


# ONNX Runtime 1.17.3 to 1.21.1 (at least) crash while creating a session when a custom-op node
# leaves an optional input empty before a present one (A, W, S, "", smooth); 1.31.1 accepts it.
ORT_EMPTY_MIDDLE_INPUT = (1, 31)


def dynq_model(w_q, scales, bias=None, a_shape=("batch", "seq", None), const=True, elem=TensorProto.FLOAT, smooth=None, residual=False, ln=None, **attrs):
    """A model computing Y = DynQMatMul(A, W, scales[, bias[, smooth[, R[, G[, Be]]]]]); W is an
    initializer (const=True) or a graph input (const=False); A and Y have element type `elem`.
    With residual=True, R is a graph input of Y's shape (bias and smooth then default to zeros
    and ones rather than empty inputs, see ORT_EMPTY_MIDDLE_INPUT). `ln` = (gamma, beta or None):
    the layer norm scale and bias as initializers G and Be (needs residual=True)."""
    k, n = w_q.shape
    a_shape = [k if d is None else d for d in a_shape]
    if residual:
        bias = np.zeros(n, np.float32) if bias is None else bias
        smooth = np.ones(k, np.float32) if smooth is None else smooth
    ins = ["A", "W", "S"] + (["B"] if bias is not None else [])
    if smooth is not None:
        ins += ([""] if bias is None else []) + ["M"]  # see ORT_EMPTY_MIDDLE_INPUT
    if residual:
        ins.append("R")
    if ln is not None:
        assert residual
        ins += ["G"] + (["Be"] if ln[1] is not None else [])
    node = helper.make_node("DynQMatMul", ins, ["Y"], domain="dynq", name="dq", **attrs)
    inits = [numpy_helper.from_array(np.asarray(scales, np.float32), "S")]
    if bias is not None:
        inits.append(numpy_helper.from_array(np.asarray(bias, np.float32), "B"))
    if smooth is not None:
        inits.append(numpy_helper.from_array(np.asarray(smooth, np.float32), "M"))
    if ln is not None:
        inits.append(numpy_helper.from_array(np.asarray(ln[0], np.float32), "G"))
        if ln[1] is not None:
            inits.append(numpy_helper.from_array(np.asarray(ln[1], np.float32), "Be"))
    inputs = [helper.make_tensor_value_info("A", elem, a_shape)]
    if residual:
        inputs.append(helper.make_tensor_value_info("R", elem, a_shape[:-1] + [n]))
    if const:
        inits.append(numpy_helper.from_array(w_q, "W"))
    else:
        inputs.append(helper.make_tensor_value_info("W", TensorProto.INT8, [k, n]))
    return model([node], inputs, [helper.make_tensor_value_info("Y", elem, None)], inits)


def session(m, threads=1, custom=True):
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    if custom:
        so.register_custom_ops_library(dynq.library_path())
    data = m.SerializeToString() if isinstance(m, onnx.ModelProto) else m
    return ort.InferenceSession(data, so, providers=["CPUExecutionProvider"])


def gelu(x):
    import math

    erf = np.vectorize(math.erf, otypes=[np.float64])
    return (0.5 * x * (1.0 + erf(x / np.sqrt(2.0)))).astype(np.float32)


def gelu_tanh(x):
    x = np.asarray(x, dtype=np.float64)
    return (0.5 * x * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * x**3)))).astype(np.float32)


# The first ONNX Runtime whose custom-op schemas accept either output type (float or float16)
# for one op name; older ones run DynQMatMul with float A only (and say so when given float16).
ORT_F16_OP = (1, 19)
# (major, minor) of the installed ONNX Runtime.
ORT_VERSION = tuple(int(v) for v in ort.__version__.split(".")[:2])


def skip_without_f16_op():
    import pytest

    if ORT_VERSION < ORT_F16_OP:
        pytest.skip(f"DynQMatMul with float16 A needs ONNX Runtime >= {ORT_F16_OP[0]}.{ORT_F16_OP[1]}")


def layer_norm_ref(x, gamma, beta=None, eps=1e-5):
    """dynq's layer norm, bit for bit, in numpy float32 (its definition: 64 lane sums in order,
    a halving tree; the mean, corrected once by the mean deviation from it, then the variance;
    every step one f32 operation) over the last axis of `x`."""
    x = np.asarray(x, np.float32)
    n = x.shape[-1]
    rows = x.reshape(-1, n)
    pad = (-n) % 64

    def tree(s):
        while s.shape[-1] > 1:
            h = s.shape[-1] // 2
            s = s[:, :h] + s[:, h:]
        return s[:, 0]

    def lane_sums(v):
        v = np.concatenate([v, np.zeros((v.shape[0], pad), np.float32)], axis=1)
        s = np.zeros((v.shape[0], 64), np.float32)
        for c in range(v.shape[1] // 64):
            s = s + v[:, 64 * c : 64 * (c + 1)]
        return tree(s)

    nn = np.float32(n)
    m0 = lane_sums(rows) / nn
    mean = m0 + lane_sums(rows - m0[:, None]) / nn
    d = rows - mean[:, None]
    var = lane_sums(d * d) / nn
    inv = np.float32(1) / np.sqrt(var + np.float32(eps))
    y = (d * inv[:, None]) * np.asarray(gamma, np.float32)
    if beta is not None:
        y = y + np.asarray(beta, np.float32)
    return y.astype(np.float32).reshape(x.shape)


def dynamic_quantize_matmul_ref(a, w_q, w_scale, w_zp=None, bias=None, saturating=False):
    """ONNX Runtime's com.microsoft.DynamicQuantizeMatMul by its definition: A quantized per tensor
    to uint8 (DynamicQuantizeLinear), the integer product, then `acc * (sa * sw) + bias` in float32.

    saturating=False: the exact integer product, what the op defines (and what ONNX Runtime
    returns on CPUs with VNNI). saturating=True: what a `vpmaddubsw` kernel returns, each pair of
    adjacent products `qa[k] * w[k] + qa[k+1] * w[k+1]` (raw uint8 activations) clamped to int16
    before the int32 sum, the A zero point taken out afterwards (ONNX Runtime's MLAS on x86 CPUs
    with AVX2 or AVX-512 but without VNNI)."""
    a = np.asarray(a, np.float32).reshape(-1, w_q.shape[0])
    lo, hi = min(np.float32(0), a.min(initial=0)), max(np.float32(0), a.max(initial=0))
    sa = np.float32((np.float32(hi) - np.float32(lo)) / np.float32(255))
    if sa == 0:
        sa = np.float32(1)
    za = int(np.clip(np.rint(np.float32(0) - np.float32(lo) / sa), 0, 255))
    qa = np.clip(np.rint(a / sa) + za, 0, 255).astype(np.int64)
    w = w_q.astype(np.int64) - (0 if w_zp is None else np.asarray(w_zp, np.int64))
    if not saturating:
        acc = (qa - za) @ w
    else:
        k = w.shape[0]
        qa2 = np.zeros((qa.shape[0], k + k % 2), np.int64)
        qa2[:, :k] = qa
        w2 = np.zeros((k + k % 2, w.shape[1]), np.int64)
        w2[:k] = w
        pairs = qa2[:, 0::2, None] * w2[None, 0::2, :] + qa2[:, 1::2, None] * w2[None, 1::2, :]
        acc = np.clip(pairs, -32768, 32767).sum(axis=1) - za * w.sum(axis=0)
    y = acc.astype(np.float32) * (sa * np.asarray(w_scale, np.float32))
    if bias is not None:
        y = y + np.asarray(bias, np.float32)
    return y.astype(np.float32)


def check_against_ort_int8(y_dynq, y_ort, a, w_q, w_scale, w_zp=None, bias=None, tol=1e-5):
    """dynq's output equals the exact DynamicQuantizeMatMul (to float rounding); ONNX Runtime's
    equals either that or, on a CPU without VNNI, the int16-saturating product (which must then
    differ from the exact one). Returns "exact" or "saturated": which one ONNX Runtime gave."""
    exact = dynamic_quantize_matmul_ref(a, w_q, w_scale, w_zp, bias)
    scale = max(float(np.abs(exact).max()), 1e-30)
    err = lambda y, ref: float(np.abs(np.asarray(y, np.float32).reshape(ref.shape) - ref).max()) / scale
    assert err(y_dynq, exact) <= tol, ("dynq against the exact product", err(y_dynq, exact))
    if err(y_ort, exact) <= tol:
        return "exact"
    sat = dynamic_quantize_matmul_ref(a, w_q, w_scale, w_zp, bias, saturating=True)
    flags = open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else ""
    assert not any(f in flags.split() for f in ("avx512_vnni", "avx_vnni")), "ONNX Runtime is inexact on a CPU with VNNI"
    assert err(y_ort, sat) <= tol, ("ONNX Runtime is neither exact nor the int16-saturating product", err(y_ort, exact), err(y_ort, sat))
    assert err(sat, exact) > tol
    return "saturated"

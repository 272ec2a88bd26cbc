"""The ONNX Runtime custom op dynq.DynQMatMul, run by the real onnxruntime package."""

import gc
import os
import threading

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import dynq
from ortutil import ORT_EMPTY_MIDDLE_INPUT, ORT_F16_OP, ORT_VERSION, check_against_ort_int8, dynq_model, gelu, gelu_tanh, layer_norm_ref, model, session, skip_without_f16_op

RNG = np.random.default_rng(7)


def weights(k, n, seed=0):
    r = np.random.default_rng(seed)
    q = r.integers(-127, 128, size=(k, n)).astype(np.int8)
    s = (r.random(n) * 0.02 + 0.001).astype(np.float32)
    return q, s


@pytest.mark.parametrize("a_shape", [(5,), (7, 5), (2, 3, 5), (2, 1, 3, 5)])
@pytest.mark.parametrize("activation", ["none", "relu", "gelu", "gelu_tanh", "silu", "quick_gelu"])
def test_op_matches_numpy_and_dynq(a_shape, activation):
    k = a_shape[-1]
    n = 9
    q, s = weights(k, n)
    b = RNG.standard_normal(n).astype(np.float32)
    m = dynq_model(q, s, b, a_shape=["d%d" % i for i in range(len(a_shape) - 1)] + [None], activation=activation)
    a = (RNG.standard_normal(a_shape) * 2).astype(np.float32)
    y = session(m).run(None, {"A": a})[0]
    assert y.shape == a_shape[:-1] + (n,)
    # Bit-identical to the library's own GEMM (same quantization, same epilogue order).
    p = dynq.PackedWeights.from_quantized(q, s, layout="kn")
    lib = dynq.gemm(p, a, bias=b, epilogue=activation)
    np.testing.assert_array_equal(y, lib)
    # And close to the float product of the dequantized weights.
    ref = a.astype(np.float64) @ (q.astype(np.float64) * s) + b
    if activation == "relu":
        ref = np.maximum(ref, 0)
    forms = {
        "gelu": gelu,
        "gelu_tanh": gelu_tanh,
        "silu": lambda x: x / (1 + np.exp(-x)),
        "quick_gelu": lambda x: x / (1 + np.exp(-1.702 * x)),
    }
    if activation in forms:
        ref = forms[activation](ref)
    err = np.abs(y - ref).max() / (np.abs(ref).max() + 1e-6)
    assert err < 0.02, err
    if activation in forms:
        # dynq's erf and tanh agree with the exact ones to ~3e-7.
        exact = forms[activation](dynq.gemm(p, a, bias=b).astype(np.float64))
        np.testing.assert_allclose(y, exact, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("act_type", ["asymmetric_u8", "symmetric_i8"])
@pytest.mark.parametrize("gran", ["per_row", "per_tensor"])
@pytest.mark.parametrize("activation", ["none", "gelu", "gelu_tanh"])
@pytest.mark.parametrize("rows,k,n", [(300, 256, 200), (1, 4096, 1536), (13, 64, 40)])
def test_activation_modes_match_library(act_type, gran, activation, rows, k, n):
    # The first two are large enough (15M and 6M multiply-adds) to be split into parallel tasks
    # on ONNX Runtime's pool: by rows and column blocks, and by column blocks alone for M = 1.
    q, s = weights(k, n, 1)
    a = (RNG.standard_normal((rows, k)) * RNG.uniform(0.1, 5, size=(rows, 1))).astype(np.float32)
    m = dynq_model(q, s, a_shape=["m", None], act_granularity=gran, act_type=act_type, activation=activation)
    p = dynq.PackedWeights.from_quantized(q, s, layout="kn")
    lib = dynq.gemm(p, a, act_granularity=gran, act_type=act_type, epilogue=activation)
    for threads in (1, 2, 4):
        y = session(m, threads).run(None, {"A": a})[0]
        np.testing.assert_array_equal(y, lib)


@pytest.mark.parametrize("gran", ["per_row", "per_tensor"])
def test_float16_activations_and_output(gran):
    """A float16 model: A and Y are float16 (Y = the float32 result rounded to nearest-even),
    bit-identical to the library at any thread count; a float model still gets float."""
    skip_without_f16_op()
    k, n = 256, 200
    q, s = weights(k, n, 3)
    b = RNG.standard_normal(n).astype(np.float32)
    m16 = dynq_model(q, s, b, a_shape=["m", None], act_granularity=gran, activation="gelu", elem=TensorProto.FLOAT16)
    p = dynq.PackedWeights.from_quantized(q, s, layout="kn")
    for rows in (1, 7, 300):
        a = (RNG.standard_normal((rows, k)) * 3).astype(np.float16)
        lib = dynq.gemm(p, a, bias=b, act_granularity=gran, epilogue="gelu")
        assert lib.dtype == np.float16
        want = dynq.gemm(p, a.astype(np.float32), bias=b, act_granularity=gran, epilogue="gelu").astype(np.float16)
        np.testing.assert_array_equal(lib, want)
        for threads in (1, 2):
            y = session(m16, threads).run(None, {"A": a})[0]
            assert y.dtype == np.float16 and y.shape == (rows, n)
            np.testing.assert_array_equal(y, lib)
    m32 = dynq_model(q, s, b, a_shape=["m", None], act_granularity=gran)
    y32 = session(m32).run(None, {"A": np.ones((2, k), np.float32)})[0]
    assert y32.dtype == np.float32


def test_per_tensor_u8_matches_ort_dynamic_quantize_matmul():
    """Same int8 weights, per-tensor uint8 activations: dynq equals ONNX Runtime's own
    com.microsoft.DynamicQuantizeMatMul by its definition (the exact integer product), to within
    float rounding. ONNX Runtime itself gives that on CPUs with VNNI; on x86 CPUs without it, its
    int16-saturating product instead (checked to be exactly that), which dynq does not reproduce."""
    seen = set()
    for (rows, k, n, per_channel) in [(16, 128, 64, True), (33, 384, 96, False), (1, 256, 17, True)]:
        q, s = weights(k, n, rows)
        if not per_channel:
            s = s[:1]
        b = RNG.standard_normal(n).astype(np.float32)
        a = (RNG.standard_normal((rows, k)) * 1.5 + 0.3).astype(np.float32)
        inits = [numpy_helper.from_array(q, "W"), numpy_helper.from_array(s, "S"), numpy_helper.from_array(b, "B")]
        a_vi = [helper.make_tensor_value_info("A", TensorProto.FLOAT, ["m", k])]
        y_vi = [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)]
        ms = model([helper.make_node("DynamicQuantizeMatMul", ["A", "W", "S", "", "B"], ["Y"], domain="com.microsoft")], a_vi, y_vi, inits)
        md = model([helper.make_node("DynQMatMul", ["A", "W", "S", "B"], ["Y"], domain="dynq", act_granularity="per_tensor")], a_vi, y_vi, inits)
        y_ms = session(ms, custom=False).run(None, {"A": a})[0]
        y_dq = session(md).run(None, {"A": a})[0]
        seen.add(check_against_ort_int8(y_dq, y_ms, a, q, s, bias=b))
    print(f"ONNX Runtime's DynamicQuantizeMatMul on this CPU: {'/'.join(sorted(seen))}")


def test_output_shape_inference():
    q, s = weights(12, 5)
    sess = session(dynq_model(q, s, a_shape=["batch", "seq", None]))
    out = sess.get_outputs()[0]
    assert out.type == "tensor(float)"
    assert out.shape == ["batch", "seq", 5]
    # Unnamed unknown dims stay unknown (not a literal -1): Reshape from Shape keeps working.
    k = 12
    nodes = [
        helper.make_node("Relu", ["A"], ["R"]),
        helper.make_node("DynQMatMul", ["R", "W", "S"], ["Y0"], domain="dynq"),
        helper.make_node("Shape", ["Y0"], ["sh"]),
        helper.make_node("Reshape", ["Y0", "sh"], ["Y"]),
    ]
    inits = [numpy_helper.from_array(q, "W"), numpy_helper.from_array(s, "S")]
    m = model(nodes, [helper.make_tensor_value_info("A", TensorProto.FLOAT, [None, None, k])], [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)], inits)
    a = RNG.standard_normal((2, 3, k)).astype(np.float32)
    assert session(m).run(None, {"A": a})[0].shape == (2, 3, 5)


def test_empty_batch():
    q, s = weights(8, 3)
    y = session(dynq_model(q, s, a_shape=["m", None])).run(None, {"A": np.zeros((0, 8), np.float32)})[0]
    assert y.shape == (0, 3)


@pytest.mark.parametrize("as_graph_input", [True, False])
def test_non_constant_weight_is_packed_per_call(as_graph_input):
    q, s = weights(16, 6)
    a = RNG.standard_normal((4, 16)).astype(np.float32)
    want = session(dynq_model(q, s, a_shape=["m", None])).run(None, {"A": a})[0]
    if as_graph_input:
        m = dynq_model(q, s, a_shape=["m", None], const=False)
        feeds = {"A": a, "W": q}
    else:
        # An initializer also listed as a graph input may be overridden: not a constant.
        m = dynq_model(q, s, a_shape=["m", None])
        m.graph.input.append(helper.make_tensor_value_info("W", TensorProto.INT8, [16, 6]))
        feeds = {"A": a}
    sess = session(m)
    np.testing.assert_array_equal(sess.run(None, feeds)[0], want)
    if as_graph_input:
        q2 = q.copy()
        q2[0] = -q2[0]
        want2 = session(dynq_model(q2, s, a_shape=["m", None])).run(None, {"A": a})[0]
        np.testing.assert_array_equal(sess.run(None, {"A": a, "W": q2})[0], want2)


@pytest.mark.parametrize("gran", ["per_row", "per_tensor"])
@pytest.mark.parametrize("with_bias", [False, True])
def test_smoothing_factors_equal_premultiplied_activations(gran, with_bias):
    """The optional `smooth` input: A * smooth (one f32 multiplication) is what gets quantized, so
    the node equals, bit for bit, the node without it fed the multiplied A; with or without a
    bias (absent bias = empty input name), on 1 and 2 threads; float16 A too."""
    if not with_bias and ORT_VERSION < ORT_EMPTY_MIDDLE_INPUT:
        pytest.skip("ONNX Runtime before 1.31 crashes on a custom-op node with an empty middle input (the converter writes a zero bias instead)")
    k, n, rows = 96, 40, 300
    q, s = weights(k, n, 3)
    b = RNG.standard_normal(n).astype(np.float32) if with_bias else None
    smooth = (10.0 ** RNG.uniform(-2, 2, size=k)).astype(np.float32)
    a = (RNG.standard_normal((rows, k)) * 3).astype(np.float32)
    want = session(dynq_model(q, s, b, a_shape=["m", None], act_granularity=gran, activation="gelu")).run(None, {"A": a * smooth})[0]
    m = dynq_model(q, s, b, a_shape=["m", None], act_granularity=gran, activation="gelu", smooth=smooth)
    for threads in (1, 2):
        np.testing.assert_array_equal(session(m, threads).run(None, {"A": a})[0], want)
    p = dynq.PackedWeights.from_quantized(q, s, layout="kn")
    np.testing.assert_array_equal(want, dynq.gemm(p, a * smooth, bias=b, act_granularity=gran, epilogue="gelu"))
    np.testing.assert_array_equal(want, dynq.gemm(p, a, bias=b, act_granularity=gran, epilogue="gelu", smooth=smooth))
    if ORT_VERSION >= ORT_F16_OP:
        a16 = a.astype(np.float16)
        m16 = dynq_model(q, s, b, a_shape=["m", None], act_granularity=gran, smooth=smooth, elem=TensorProto.FLOAT16)
        y16 = session(m16).run(None, {"A": a16})[0]
        lib = dynq.gemm(p, a16.astype(np.float32) * smooth, bias=b, act_granularity=gran)
        np.testing.assert_array_equal(y16, lib.astype(np.float16))



@pytest.mark.parametrize("gran", ["per_row", "per_tensor"])
def test_residual_input_adds_after_the_activation(gran):
    """The optional 6th input `residual` (Y's shape, A's type): Y = act(A W + bias) + residual,
    bit for bit the node without it plus one f32 addition (numpy's), on 1 and 2 threads, with
    3-d A; the library call gives the same bits; float16 A and residual too."""
    k, n = 96, 40
    q, s = weights(k, n, 5)
    b = RNG.standard_normal(n).astype(np.float32)
    smooth = (10.0 ** RNG.uniform(-1, 1, size=k)).astype(np.float32)
    a = (RNG.standard_normal((3, 70, k)) * 3).astype(np.float32)
    r = (RNG.standard_normal((3, 70, n)) * 5).astype(np.float32)
    base = session(dynq_model(q, s, b, act_granularity=gran, activation="gelu", smooth=smooth)).run(None, {"A": a})[0]
    m = dynq_model(q, s, b, act_granularity=gran, activation="gelu", smooth=smooth, residual=True)
    for threads in (1, 2):
        np.testing.assert_array_equal(session(m, threads).run(None, {"A": a, "R": r})[0], base + r)
    p = dynq.PackedWeights.from_quantized(q, s, layout="kn")
    np.testing.assert_array_equal(base + r, dynq.gemm(p, a, bias=b, act_granularity=gran, epilogue="gelu", smooth=smooth, residual=r))
    # No bias, no smoothing: the placeholders (zeros, ones) change nothing.
    plain = session(dynq_model(q, s, act_granularity=gran)).run(None, {"A": a})[0]
    np.testing.assert_array_equal(session(dynq_model(q, s, act_granularity=gran, residual=True)).run(None, {"A": a, "R": r})[0], plain + r)
    if ORT_VERSION >= ORT_F16_OP:
        a16, r16 = a.astype(np.float16), r.astype(np.float16)
        m16 = dynq_model(q, s, b, act_granularity=gran, residual=True, elem=TensorProto.FLOAT16)
        y16 = session(m16).run(None, {"A": a16, "R": r16})[0]
        lib = dynq.gemm(p, a16.astype(np.float32), bias=b, act_granularity=gran)
        np.testing.assert_array_equal(y16, (lib + r16.astype(np.float32)).astype(np.float16))


@pytest.mark.parametrize("elem", [TensorProto.FLOAT, TensorProto.FLOAT16])
def test_residual_broadcasts_like_add(elem):
    """A residual of another shape broadcasts with the product as ONNX's Add does (the converter
    folds skip connections whose shapes it cannot prove equal): Y = T(act(A W + bias) + R) with
    numpy's broadcasting, including residuals that make the output larger than the product, on 1
    and 2 threads; the same bits as the fused path where the shapes are equal."""
    if elem == TensorProto.FLOAT16 and ORT_VERSION < ORT_F16_OP:
        pytest.skip(f"float16 A needs onnxruntime >= {ORT_F16_OP}")
    np_t = np.float16 if elem == TensorProto.FLOAT16 else np.float32
    k, n = 64, 40
    q, s = weights(k, n, 7)
    b = RNG.standard_normal(n).astype(np.float32)
    p = dynq.PackedWeights.from_quantized(q, s, layout="kn")
    for a_dims, r_dims in [
        ((3, 50, k), (1, 50, n)),
        ((3, 50, k), (3, 1, n)),
        ((3, 50, k), (n,)),
        ((3, 50, k), (3, 50, 1)),
        ((3, 50, k), (2, 3, 50, n)),
        ((1, 50, k), (3, 50, n)),
        ((3, 50, k), (3, 50, n)),
    ]:
        m = dynq_model(q, s, b, a_shape=["a0", "a1", None], residual=True, activation="gelu", elem=elem)
        m.graph.input[1].type.tensor_type.shape.ClearField("dim")
        for d in range(len(r_dims)):
            m.graph.input[1].type.tensor_type.shape.dim.add().dim_param = f"r{d}"
        a = (RNG.standard_normal(a_dims) * 3).astype(np_t)
        r = (RNG.standard_normal(r_dims) * 5).astype(np_t)
        prod = dynq.gemm(p, a.astype(np.float32), bias=b, epilogue="gelu")
        want = (prod + r.astype(np.float32)).astype(np_t)
        for threads in (1, 2):
            y = session(m, threads).run(None, {"A": a, "R": r})[0]
            assert y.shape == want.shape and y.dtype == np_t, (a_dims, r_dims, y.shape)
            np.testing.assert_array_equal(y, want, err_msg=f"{a_dims} + {r_dims}")


def test_bad_residual_gives_clear_errors():
    q, s = weights(8, 4)
    a = np.ones((2, 8), np.float32)
    sess = session(dynq_model(q, s, a_shape=["m", None], residual=True))
    # R is declared [r, 4]; a residual that does not broadcast with [2, 4] is refused by the op
    # itself.
    m = dynq_model(q, s, a_shape=["m", None], residual=True)
    m.graph.input[1].type.tensor_type.shape.dim[0].dim_param = "r"
    with pytest.raises(Exception) as e:
        session(m).run(None, {"A": a, "R": np.ones((3, 4), np.float32)})
    msg = str(e.value)
    assert "residual of shape [3, 4] does not broadcast with the product's shape [2, 4]" in msg and "DynQMatMul node 'dq'" in msg, msg
    node = helper.make_node("DynQMatMul", ["A", "W", "S", "B", "M", "R"], ["Y"], domain="dynq", name="bad")
    inits = [numpy_helper.from_array(q, "W"), numpy_helper.from_array(s, "S"), numpy_helper.from_array(np.zeros(4, np.float32), "B")]
    inits += [numpy_helper.from_array(np.ones(8, np.float32), "M"), numpy_helper.from_array(np.ones((2, 4)), "R")]
    msg = bad([node], [helper.make_tensor_value_info("A", TensorProto.FLOAT, ["m", 8])], inits, {"A": a})
    assert "A's type float, got double [2, 4]" in msg, msg
    np.testing.assert_array_equal(sess.run(None, {"A": a, "R": np.ones((2, 4), np.float32)})[0].shape, (2, 4))


@pytest.mark.parametrize("gran", ["per_row", "per_tensor"])
@pytest.mark.parametrize("n", [40, 384, 700])
def test_layer_norm_inputs_normalize_each_row(gran, n):
    """Inputs 7 and 8 (layer norm scale and bias, attribute ln_epsilon): Y =
    LayerNorm(act(A W + bias) + R), bit for bit dynq's definition (layer_norm_ref) applied to the
    node's output without them, on 1 and 2 threads; within float rounding of ONNX Runtime's own
    LayerNormalization; float16 too (the stored float16 sum, normalized, rounded)."""
    k = 64
    q, s = weights(k, n, 9)
    b = RNG.standard_normal(n).astype(np.float32)
    g = RNG.uniform(0.5, 2, n).astype(np.float32)
    be = RNG.standard_normal(n).astype(np.float32)
    a = (RNG.standard_normal((3, 50, k)) * 3).astype(np.float32)
    r = (RNG.standard_normal((3, 50, n)) * 5).astype(np.float32)
    base = session(dynq_model(q, s, b, act_granularity=gran, activation="gelu", residual=True)).run(None, {"A": a, "R": r})[0]
    for beta, eps in [(be, None), (None, 1e-3)]:
        attrs = {} if eps is None else {"ln_epsilon": eps}
        m = dynq_model(q, s, b, act_granularity=gran, activation="gelu", residual=True, ln=(g, beta), **attrs)
        want = layer_norm_ref(base, g, beta, 1e-5 if eps is None else eps)
        for threads in (1, 2):
            np.testing.assert_array_equal(session(m, threads).run(None, {"A": a, "R": r})[0], want)
    # ONNX Runtime's LayerNormalization on the same sums agrees to float rounding.
    ln = helper.make_node("LayerNormalization", ["X", "G", "Be"], ["Y"], axis=-1, epsilon=1e-5)
    ort_ln = model([ln], [helper.make_tensor_value_info("X", TensorProto.FLOAT, [3, 50, n])], [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)],
                   [numpy_helper.from_array(g, "G"), numpy_helper.from_array(be, "Be")])
    np.testing.assert_allclose(session(ort_ln, custom=False).run(None, {"X": base})[0], layer_norm_ref(base, g, be), rtol=1e-5, atol=1e-5)
    if ORT_VERSION >= ORT_F16_OP:
        a16, r16 = a.astype(np.float16), r.astype(np.float16)
        base16 = session(dynq_model(q, s, b, act_granularity=gran, residual=True, elem=TensorProto.FLOAT16)).run(None, {"A": a16, "R": r16})[0]
        m16 = dynq_model(q, s, b, act_granularity=gran, residual=True, elem=TensorProto.FLOAT16, ln=(g, be))
        y16 = session(m16, 2).run(None, {"A": a16, "R": r16})[0]
        assert y16.dtype == np.float16
        np.testing.assert_array_equal(y16, layer_norm_ref(base16.astype(np.float32), g, be).astype(np.float16))


def test_layer_norm_with_a_broadcast_residual():
    """A residual of another shape (broadcast as ONNX's Add does) is added first, then each row
    of N values of the broadcast output is normalized; a residual that widens the last axis
    beyond N is refused (the layer norm's parameters have N values)."""
    k, n = 32, 48
    q, s = weights(k, n, 11)
    g = RNG.uniform(0.5, 2, n).astype(np.float32)
    m = dynq_model(q, s, a_shape=["a0", "a1", None], residual=True, ln=(g, None))
    m.graph.input[1].type.tensor_type.shape.ClearField("dim")
    for d in range(3):
        m.graph.input[1].type.tensor_type.shape.dim.add().dim_param = f"r{d}"
    p = dynq.PackedWeights.from_quantized(q, s, layout="kn")
    a = (RNG.standard_normal((1, 20, k)) * 3).astype(np.float32)
    r = (RNG.standard_normal((3, 20, n)) * 5).astype(np.float32)
    want = layer_norm_ref(dynq.gemm(p, a) + r, g)
    for threads in (1, 2):
        np.testing.assert_array_equal(session(m, threads).run(None, {"A": a, "R": r})[0], want)
    q1, s1 = weights(k, 1, 12)
    m1 = dynq_model(q1, s1, a_shape=["a0", "a1", None], residual=True, ln=(np.ones(1, np.float32), None))
    m1.graph.input[1].type.tensor_type.shape.ClearField("dim")
    for d in range(3):
        m1.graph.input[1].type.tensor_type.shape.dim.add().dim_param = f"r{d}"
    with pytest.raises(Exception) as e:
        session(m1).run(None, {"A": a, "R": np.ones((1, 20, 5), np.float32)})
    assert "layer norm normalizes rows of N = 1 values" in str(e.value), str(e.value)


def test_bad_layer_norm_gives_clear_errors():
    k, n = 8, 4
    q, s = weights(k, n)
    a = np.ones((2, k), np.float32)
    feeds = {"A": a, "R": np.ones((2, n), np.float32)}
    base = dict(a_shape=["m", None], residual=True)
    cases = [
        (dynq_model(q, s, ln=(np.ones(3, np.float32), None), **base), "layer norm scale must be a float tensor [N] = [4]"),
        (dynq_model(q, s, ln=(np.ones(4, np.float32), np.ones(5, np.float32)), **base), "layer norm bias must be a float tensor [N] = [4]"),
        (dynq_model(q, s, ln=(np.array([1, np.nan, 1, 1], np.float32), None), **base), "layer norm gamma[1] is NaN"),
        (dynq_model(q, s, ln=(np.ones(4, np.float32), None), ln_epsilon=-1.0, **base), "attribute 'ln_epsilon' is -1"),
        (dynq_model(q, s, ln=(np.ones(4, np.float32), None), ln_epsilon="x", **base), "attribute 'ln_epsilon' must be a float"),
    ]
    for m, want in cases:
        with pytest.raises(Exception) as e:
            session(m).run(None, feeds)
        assert want in str(e.value) and "DynQMatMul node 'dq'" in str(e.value), (want, str(e.value))
    # A bias without a scale: input 7 empty, input 8 given.
    m = dynq_model(q, s, **base)
    m.graph.node[0].input.extend(["", "Be"])
    m.graph.initializer.append(numpy_helper.from_array(np.ones(4, np.float32), "Be"))
    if ORT_VERSION >= ORT_EMPTY_MIDDLE_INPUT:
        with pytest.raises(Exception) as e:
            session(m).run(None, feeds)
        assert "a layer norm bias needs a layer norm scale" in str(e.value), str(e.value)


@pytest.mark.parametrize("gran", ["per_row", "per_tensor"])
def test_a_layout_heads_reads_the_transposed_context(gran):
    """Attribute a_layout = "heads": A is [batch, heads, seq, d] and the node computes on its
    Transpose(perm=[0, 2, 1, 3]) reshaped to [batch, seq, heads * d], bit for bit, on 1 and 2
    threads, with a residual and a layer norm too; the output shape [batch, seq, N] is
    inferred; float16 too."""
    B, H, S, d, n = 3, 12, 17, 32, 40
    k = H * d
    q, s = weights(k, n, 13)
    b = RNG.standard_normal(n).astype(np.float32)
    ctx = (RNG.standard_normal((B, H, S, d)) * 2).astype(np.float32)
    plain = np.ascontiguousarray(ctx.transpose(0, 2, 1, 3)).reshape(B, S, k)
    r = RNG.standard_normal((B, S, n)).astype(np.float32)
    g = RNG.uniform(0.5, 2, n).astype(np.float32)
    m = dynq_model(q, s, b, a_shape=["b", "h", "s", "d"], act_granularity=gran, a_layout="heads")
    want = session(dynq_model(q, s, b, act_granularity=gran)).run(None, {"A": plain})[0]
    for threads in (1, 2):
        sess = session(m, threads)
        assert [o.shape for o in sess.get_outputs()] == [["b", "s", n]]
        np.testing.assert_array_equal(sess.run(None, {"A": ctx})[0], want)
    m = dynq_model(q, s, b, a_shape=["b", "h", "s", "d"], act_granularity=gran, a_layout="heads", residual=True, ln=(g, None))
    m.graph.input[1].type.tensor_type.shape.ClearField("dim")
    for dim in ("b", "s", n):
        m.graph.input[1].type.tensor_type.shape.dim.add().CopyFrom(helper.make_tensor_value_info("t", TensorProto.FLOAT, [dim]).type.tensor_type.shape.dim[0])
    want = session(dynq_model(q, s, b, act_granularity=gran, residual=True, ln=(g, None))).run(None, {"A": plain, "R": r})[0]
    np.testing.assert_array_equal(session(m, 2).run(None, {"A": ctx, "R": r})[0], want)
    if ORT_VERSION >= ORT_F16_OP:
        m16 = dynq_model(q, s, b, a_shape=["b", "h", "s", "d"], act_granularity=gran, a_layout="heads", elem=TensorProto.FLOAT16)
        want16 = session(dynq_model(q, s, b, act_granularity=gran, elem=TensorProto.FLOAT16)).run(None, {"A": plain.astype(np.float16)})[0]
        np.testing.assert_array_equal(session(m16, 2).run(None, {"A": ctx.astype(np.float16)})[0], want16)


def test_bad_a_layout_gives_clear_errors():
    q, s = weights(64, 8)
    ctx = np.ones((2, 4, 3, 16), np.float32)
    with pytest.raises(Exception) as e:
        session(dynq_model(q, s, a_shape=["b", "s", None], a_layout="heads")).run(None, {"A": np.ones((2, 3, 64), np.float32)})
    assert 'a_layout = "heads" needs A of rank 4' in str(e.value), str(e.value)
    with pytest.raises(Exception) as e:
        session(dynq_model(q, s, a_shape=["b", "h", "s", "d"], a_layout="columns")).run(None, {"A": ctx})
    assert "attribute 'a_layout' is \"columns\"" in str(e.value), str(e.value)
    with pytest.raises(Exception) as e:
        session(dynq_model(q, s, a_shape=["b", "h", "s", "d"], a_layout="heads")).run(None, {"A": np.ones((2, 4, 3, 8), np.float32)})
    assert "K = 32" in str(e.value), str(e.value)


def split_model(q, s, b, widths, elem=TensorProto.FLOAT, smooth=None, **attrs):
    k, n = q.shape
    ins = ["A", "W", "S", "B"] + (["M"] if smooth is not None else [])
    outs = [f"Y{g}" for g in range(len(widths))]
    node = helper.make_node("DynQMatMul", ins, outs, domain="dynq", name="dq", split=list(widths), **attrs)
    inits = [numpy_helper.from_array(q, "W"), numpy_helper.from_array(s, "S"), numpy_helper.from_array(b, "B")]
    if smooth is not None:
        inits.append(numpy_helper.from_array(smooth, "M"))
    return model([node], [helper.make_tensor_value_info("A", elem, ["b", "s", k])], [helper.make_tensor_value_info(o, elem, None) for o in outs], inits)


@pytest.mark.parametrize("gran", ["per_row", "per_tensor"])
def test_split_outputs_are_column_slices(gran):
    """`split` (output widths): one node, several outputs, each bit for bit its columns of the
    single-output node (widths not multiples of the kernel's panel), on 1 and 2 threads, with
    smoothing and GELU, float16 too; shape inference gives each output its width."""
    k, n = 96, 62
    q, s = weights(k, n, 9)
    b = RNG.standard_normal(n).astype(np.float32)
    smooth = (10.0 ** RNG.uniform(-1, 1, size=k)).astype(np.float32)
    a = (RNG.standard_normal((2, 35, k)) * 3).astype(np.float32)
    whole = session(dynq_model(q, s, b, act_granularity=gran, activation="gelu", smooth=smooth)).run(None, {"A": a})[0]
    widths = [5, 40, 17]
    m = split_model(q, s, b, widths, smooth=smooth, act_granularity=gran, activation="gelu")
    for threads in (1, 2):
        sess = session(m, threads)
        got = sess.run(None, {"A": a})
        assert [o.shape for o in sess.get_outputs()] == [["b", "s", 5], ["b", "s", 40], ["b", "s", 17]]
        np.testing.assert_array_equal(np.concatenate(got, axis=-1), whole)
    if ORT_VERSION >= ORT_F16_OP:
        a16 = a.astype(np.float16)
        w16 = session(dynq_model(q, s, b, act_granularity=gran, elem=TensorProto.FLOAT16)).run(None, {"A": a16})[0]
        got16 = session(split_model(q, s, b, [31, 31], elem=TensorProto.FLOAT16, act_granularity=gran)).run(None, {"A": a16})
        assert got16[0].dtype == np.float16
        np.testing.assert_array_equal(np.concatenate(got16, axis=-1), w16)


def test_bad_split_gives_clear_errors():
    q, s = weights(8, 6)
    b = np.zeros(6, np.float32)
    a = np.ones((1, 2, 8), np.float32)
    for widths, expect in [([2, 3], "must add up to the weight's N = 6"), ([6, 0], "positive")]:
        with pytest.raises(Exception) as e:
            session(split_model(q, s, b, widths)).run(None, {"A": a})
        assert expect in str(e.value), str(e.value)
    # Two outputs and no split attribute.
    node = helper.make_node("DynQMatMul", ["A", "W", "S"], ["Y0", "Y1"], domain="dynq", name="bad")
    inits = [numpy_helper.from_array(q, "W"), numpy_helper.from_array(s, "S")]
    outs = [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in ("Y0", "Y1")]
    m = model([node], [helper.make_tensor_value_info("A", TensorProto.FLOAT, ["m", 8])], outs, inits)
    with pytest.raises(Exception) as e:
        session(m).run(None, {"A": a[0]})
    assert "no 'split' attribute" in str(e.value), str(e.value)

def heads_ref(y, heads, transposed=False):
    """What Reshape([0, 0, heads, -1]) then Transpose(perm=[0, 2, 1, 3] or [0, 2, 3, 1]) make of y."""
    b, s, n = y.shape
    r = y.reshape(b, s, heads, n // heads)
    return r.transpose(0, 2, 3, 1) if transposed else r.transpose(0, 2, 1, 3)


@pytest.mark.parametrize("gran", ["per_row", "per_tensor"])
def test_heads_layout_is_the_transposed_product(gran):
    """`heads` (and `heads_transposed`): the output in the attention layout [batch, heads, seq, d]
    (or [batch, heads, d, seq]) is, bit for bit, the plain output reshaped and transposed, for a
    sequence that does not fill whole row tiles and a head size that is not a multiple of a
    vector, on 1 and 2 threads, float16 too, and per output of a `split` node (Q, K and V);
    shape inference gives the transposed shapes with A's symbols."""
    k, n, heads = 64, 60, 5
    q, s = weights(k, n, 21)
    b = RNG.standard_normal(n).astype(np.float32)
    a = (RNG.standard_normal((3, 13, k)) * 2).astype(np.float32)
    plain = session(dynq_model(q, s, b, act_granularity=gran, activation="gelu")).run(None, {"A": a})[0]
    for transposed in (0, 1):
        m = dynq_model(q, s, b, act_granularity=gran, activation="gelu", heads=[heads], heads_transposed=[transposed])
        for threads in (1, 2):
            sess = session(m, threads)
            got = sess.run(None, {"A": a})[0]
            want = heads_ref(plain, heads, transposed)
            assert got.shape == want.shape
            np.testing.assert_array_equal(got, want)
            d = n // heads
            assert sess.get_outputs()[0].shape == (["batch", heads, d, "seq"] if transposed else ["batch", heads, "seq", d])
    # Q, K and V as one node: K transposed, V in the plain layout.
    widths, hs, ts = [20, 20, 20], [2, 4, 0], [0, 1, 0]
    m = split_model(q, s, b, widths, act_granularity=gran, heads=hs, heads_transposed=ts)
    got = session(m, 2).run(None, {"A": a})
    parts = np.split(session(dynq_model(q, s, b, act_granularity=gran)).run(None, {"A": a})[0], 3, axis=-1)
    np.testing.assert_array_equal(got[0], heads_ref(parts[0], 2))
    np.testing.assert_array_equal(got[1], heads_ref(parts[1], 4, True))
    np.testing.assert_array_equal(got[2], parts[2])
    if ORT_VERSION >= ORT_F16_OP:
        a16 = a.astype(np.float16)
        p16 = session(dynq_model(q, s, b, act_granularity=gran, elem=TensorProto.FLOAT16)).run(None, {"A": a16})[0]
        g16 = session(dynq_model(q, s, b, act_granularity=gran, elem=TensorProto.FLOAT16, heads=[heads])).run(None, {"A": a16})[0]
        assert g16.dtype == np.float16
        np.testing.assert_array_equal(g16, heads_ref(p16, heads))


def test_bad_heads_give_clear_errors():
    q, s = weights(8, 6)
    b = np.zeros(6, np.float32)
    a = np.ones((1, 2, 8), np.float32)
    for attrs, expect in [
        (dict(heads=[4]), "do not split into 4 heads"),
        (dict(heads=[2, 3]), "one count >= 0 per output (1)"),
        (dict(heads=[-1]), "one count >= 0 per output"),
        (dict(heads=[2], heads_transposed=[2]), "one 0 or 1 per output"),
        (dict(heads=[0], heads_transposed=[1]), "which has no heads"),
        (dict(heads_transposed=[1]), "needs the attribute 'heads'"),
        (dict(heads=3), "must be a list of integers"),
    ]:
        with pytest.raises(Exception) as e:
            session(dynq_model(q, s, b, **attrs)).run(None, {"A": a})
        assert expect in str(e.value), (attrs, str(e.value))
    # A of rank 2, and a residual: refused with the node named.
    with pytest.raises(Exception) as e:
        session(dynq_model(q, s, b, a_shape=["m", None], heads=[2])).run(None, {"A": a[0]})
    assert "needs A of rank 3" in str(e.value), str(e.value)
    with pytest.raises(Exception) as e:
        session(dynq_model(q, s, b, residual=True, heads=[2])).run(None, {"A": a, "R": np.zeros((1, 2, 6), np.float32)})
    assert "residual cannot be combined" in str(e.value) or "rank" in str(e.value), str(e.value)


def test_bad_smoothing_factors_give_clear_errors():
    q, s = weights(8, 4)
    a = np.ones((2, 8), np.float32)
    for smooth, expect in [
        (np.ones(7, np.float32), "[K] = [8]"),
        (np.array([1, 1, 0, 1, 1, 1, 1, 1], np.float32), "smoothing factor [2] is 0"),
        (np.array([1, 1, 1, -1, 1, 1, 1, 1], np.float32), "smoothing factor [3] is -1"),
        (np.array([1, 1, 1, 1, np.inf, 1, 1, 1], np.float32), "smoothing factor [4] is inf"),
    ]:
        with pytest.raises(Exception) as e:
            session(dynq_model(q, s, np.zeros(4, np.float32), a_shape=["m", None], smooth=smooth)).run(None, {"A": a})
        assert expect in str(e.value) and "DynQMatMul node 'dq'" in str(e.value), str(e.value)
    node = helper.make_node("DynQMatMul", ["A", "W", "S", "B", "M"], ["Y"], domain="dynq", name="bad")
    inits = [numpy_helper.from_array(q, "W"), numpy_helper.from_array(s, "S"), numpy_helper.from_array(np.zeros(4, np.float32), "B")]
    inits.append(numpy_helper.from_array(np.ones(8), "M"))
    msg = bad([node], [helper.make_tensor_value_info("A", TensorProto.FLOAT, ["m", 8])], inits, {"A": a})
    assert "smoothing factors must be" in msg and "double" in msg, msg
    # A finite activation whose product with its factor overflows is named.
    big = a.copy()
    big[1, 6] = 3e38
    with pytest.raises(Exception) as e:
        session(dynq_model(q, s, np.zeros(4, np.float32), a_shape=["m", None], smooth=np.full(8, 4.0, np.float32))).run(None, {"A": big})
    assert "A[1][6]" in str(e.value) and "overflows" in str(e.value), str(e.value)


def bad(nodes, inputs, inits, feeds=None):
    m = model(nodes, inputs, [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)], inits)
    with pytest.raises(Exception) as e:
        s = session(m)
        s.run(None, feeds or {})
    return str(e.value)


def test_bad_models_give_clear_errors():
    q, s = weights(8, 4)
    A = [helper.make_tensor_value_info("A", TensorProto.FLOAT, ["m", 8])]
    feeds = {"A": np.ones((2, 8), np.float32)}
    I = lambda arr, name: numpy_helper.from_array(arr, name)  # noqa: E731
    node = lambda ins=("A", "W", "S"), **kw: helper.make_node("DynQMatMul", list(ins), ["Y"], domain="dynq", name="bad", **kw)  # noqa: E731
    cases = [
        ([node()], A, [I(q.astype(np.uint8), "W"), I(s, "S")], "uint8"),
        ([node()], A, [I(q.astype(np.float32), "W"), I(s, "S")], "int8"),
        ([node()], A, [I(q.reshape(2, 4, 4), "W"), I(s, "S")], "rank 2"),
        ([node()], A, [I(weights(9, 4)[0], "W"), I(s, "S")], "K = 8"),
        ([node()], A, [I(q, "W"), I(s[:3], "S")], "scales"),
        ([node()], A, [I(q, "W"), I(s.astype(np.float64), "S")], "scales must be float"),
        ([node(activation="swish")], A, [I(q, "W"), I(s, "S")], "'activation'"),
        ([node(act_granularity=1)], A, [I(q, "W"), I(s, "S")], "must be a string"),
        ([node(act_type="int4")], A, [I(q, "W"), I(s, "S")], "symmetric_i8"),
        ([node(("A", "W", "S", "B"))], A, [I(q, "W"), I(s, "S"), I(np.ones(5, np.float32), "B")], "bias"),
        ([node(("A", "W"))], A, [I(q, "W")], "input size 2"),
        ([node()], [helper.make_tensor_value_info("A", TensorProto.FLOAT16, ["m", 8])], [I(q, "W"), I(s, "S")], "float16"),
        ([node()], A, [I(q, "W"), I(np.array([0.1, np.nan, 0.1, 0.1], np.float32), "S")], "scale"),
    ]
    for nodes, inputs, inits, expect in cases:
        f = feeds if inputs is A else {"A": np.ones((2, 8), np.float16)}
        msg = bad(nodes, inputs, inits, f)
        assert expect in msg, (expect, msg)
    # Wrong K at run time (the declared shape is symbolic).
    m = dynq_model(q, s, a_shape=["m", "k"])
    with pytest.raises(Exception) as e:
        session(m).run(None, {"A": np.ones((2, 7), np.float32)})
    assert "K = 7" in str(e.value) and "DynQMatMul node 'dq'" in str(e.value)
    # NaN activations are refused with the element named.
    a = np.ones((3, 8), np.float32)
    a[2, 5] = np.nan
    with pytest.raises(Exception) as e:
        session(dynq_model(q, s, a_shape=["m", None])).run(None, {"A": a})
    assert "A[2][5]" in str(e.value)
    # Per tensor too.
    with pytest.raises(Exception) as e:
        session(dynq_model(q, s, a_shape=["m", None], act_granularity="per_tensor")).run(None, {"A": a})
    assert "A[2][5]" in str(e.value)


def test_sessions_share_one_packed_copy():
    gc.collect()
    q, s = weights(256, 192, 99)
    m = dynq_model(q, s, a_shape=["m", None])
    before = dynq.ort_cache_stats()
    s1 = session(m)
    st1 = dynq.ort_cache_stats()
    assert st1["live"] == before["live"] + 1
    assert st1["misses"] == before["misses"] + 1
    s2 = session(m)
    s3 = session(m, threads=2)
    st2 = dynq.ort_cache_stats()
    assert st2["live"] == st1["live"], "a second session must not pack another copy"
    assert st2["bytes"] == st1["bytes"]
    assert st2["hits"] == st1["hits"] + 2
    a = RNG.standard_normal((5, 256)).astype(np.float32)
    y = s1.run(None, {"A": a})[0]
    np.testing.assert_array_equal(s2.run(None, {"A": a})[0], y)
    # Different weights: another copy.
    q2 = q.copy()
    q2[3, 3] ^= 1
    s4 = session(dynq_model(q2, s, a_shape=["m", None]))
    assert dynq.ort_cache_stats()["live"] == st1["live"] + 1
    del s1, s2, s3, s4
    gc.collect()
    assert dynq.ort_cache_stats()["live"] == before["live"], "packed copies are freed with the last session"


def test_sessions_in_threads_give_the_same_results():
    q, s = weights(192, 160, 5)
    b = RNG.standard_normal(160).astype(np.float32)
    m = dynq_model(q, s, b, a_shape=["m", None], activation="gelu")
    inputs = [RNG.standard_normal((r, 192)).astype(np.float32) for r in (1, 7, 64, 200)]
    ref = session(m).run
    want = [ref(None, {"A": a})[0] for a in inputs]
    sessions = [session(m, threads=t) for t in (1, 2, 3, 2)]
    errors = []

    def worker(i):
        try:
            sess = sessions[i]
            for rep in range(5):
                for a, w in zip(inputs, want):
                    np.testing.assert_array_equal(sess.run(None, {"A": a})[0], w)
        except Exception as e:  # pragma: no cover
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(sessions))]
    # One session shared by two threads as well.
    threads += [threading.Thread(target=worker, args=(0,))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[0]


def test_version_reported():
    # The library registers on this runtime; the supported range is 1.17 and later.
    assert ORT_VERSION >= (1, 17)


def test_library_registered_twice_in_one_session_options():
    """A program (or two of its layers) may register the library twice with the same options:
    the domain must be added once, else ONNX Runtime refuses the session ("Domain already set in
    registry")."""
    q, s = weights(32, 16)
    m = dynq_model(q, s)
    so = ort.SessionOptions()
    so.register_custom_ops_library(dynq.library_path())
    so.register_custom_ops_library(dynq.library_path())
    sess = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
    a = RNG.standard_normal((2, 3, 32)).astype(np.float32)
    want = session(m).run(None, {"A": a})[0]
    np.testing.assert_array_equal(sess.run(None, {"A": a})[0], want)


def test_single_threaded_session_runs_inline_with_the_same_results():
    """A 1-thread session's pool runs every task on the calling thread: after a few calls the
    node stops going through ParallelFor (DYNQ_ORT_VERBOSE says so, once per node), and every
    run gives the bits of the first. A 2-thread session concludes that at most once, when its
    worker is kept off the cores by other load (seen in CI while another build ran), and then
    probes again (the schedule is unit-tested in Rust); its results are the same bits."""
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent(
        """
        import sys
        import numpy as np
        sys.path[:0] = [sys.argv[1], sys.argv[2]]
        from ortutil import dynq_model, session
        from test_ort_op import weights
        q, s = weights(256, 384, 5)
        a = np.random.default_rng(1).standard_normal((2, 64, 256)).astype(np.float32)
        for threads in (1, 2):
            sess = session(dynq_model(q, s, np.zeros(384, np.float32), heads=[4]), threads)
            first = sess.run(None, {"A": a})[0]
            for _ in range(30):
                assert np.array_equal(sess.run(None, {"A": a})[0], first)
            print(f"threads {threads} done", file=sys.stderr, flush=True)
        """
    )
    here = os.path.dirname(os.path.abspath(__file__))
    env = dict(os.environ, DYNQ_ORT_VERBOSE="1")
    r = subprocess.run([sys.executable, "-c", code, here, os.path.dirname(here)], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    one, two = r.stderr.split("threads 1 done")
    assert one.count("running single-threaded") == 1, one
    assert two.count("running single-threaded") <= 1, two

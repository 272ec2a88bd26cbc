"""The numpy wrapper over the C ABI."""

import math

import numpy as np
import pytest

import dynq


def ref_per_row_u8(a, q, scales, bias=None):
    """numpy reference of per-row asymmetric uint8 activations (ONNX DynamicQuantizeLinear per row)."""
    a = a.astype(np.float32)
    lo = np.minimum(a.min(axis=1), 0).astype(np.float32)
    hi = np.maximum(a.max(axis=1), 0).astype(np.float32)
    sa = ((hi - lo) / np.float32(255)).astype(np.float32)
    safe = np.where(sa == 0, np.float32(1), sa).astype(np.float32)
    za = np.clip(np.round(-lo / safe), 0, 255)
    qa = np.clip(np.round(a / safe[:, None]) + za[:, None], 0, 255)
    qa = np.where(sa[:, None] == 0, za[:, None], qa)
    acc = (qa.astype(np.int64) - za[:, None].astype(np.int64)) @ q.astype(np.int64)  # q: [K, N]
    y = acc.astype(np.float32) * (sa[:, None] * scales[None, :].astype(np.float32))
    if bias is not None:
        y = y + bias
    return y.astype(np.float32)


def test_version_and_isa():
    assert dynq.version().count(".") == 2
    assert dynq.active_isa()


def test_numpy_quantization_matches_library():
    rng = np.random.default_rng(1)
    for shape, gran in [((64, 48), "per_channel"), ((33, 17), "per_tensor"), ((5, 3), "per_channel")]:
        w = (rng.standard_normal(shape) * rng.uniform(0.01, 3.0, size=(1, shape[1]))).astype(np.float32)
        w[:, 0] = 0.0  # an all-zero channel
        q, s = dynq.quantize_weights(w, gran, layout="kn")
        p = dynq.PackedWeights.from_float(w, layout="kn", granularity=gran)
        lq, ls = p.quantized()
        np.testing.assert_array_equal(q.T, lq)
        np.testing.assert_array_equal(s, ls)


def test_weight_qmax():
    """Weights quantized to [-qmax, qmax] (64: ONNX Runtime's reduce_range, which AVX2 CPUs
    without VNNI run with a narrower kernel): the numpy definition, and the integer reference."""
    rng = np.random.default_rng(4)
    w = (rng.standard_normal((70, 33)) * rng.uniform(0.01, 3.0, size=(1, 33))).astype(np.float32)
    a = rng.standard_normal((9, 70)).astype(np.float32)
    for qmax in (64, 63, 1, 127):
        for gran in ("per_channel", "per_tensor"):
            q, s = dynq.quantize_weights(w, gran, layout="kn", weight_qmax=qmax)
            assert np.abs(q).max() == qmax
            p = dynq.PackedWeights.from_float(w, layout="kn", granularity=gran, weight_qmax=qmax)
            lq, ls = p.quantized()
            np.testing.assert_array_equal(q.T, lq)
            np.testing.assert_array_equal(s, ls)
            if gran == "per_channel":
                np.testing.assert_allclose(dynq.gemm(p, a), ref_per_row_u8(a, q, s), rtol=1e-5, atol=1e-5)
            if qmax == 64 and dynq.active_isa() == "avx2":
                assert p.kernel.endswith("_narrow"), p.kernel
    for bad in (0, 128, -1, 1.5):
        with pytest.raises(ValueError):
            dynq.PackedWeights.from_float(w, weight_qmax=bad)


def test_gemm_matches_reference_bit_for_bit_on_integers():
    rng = np.random.default_rng(2)
    m, k, n = 37, 70, 45
    q = rng.integers(-127, 128, size=(k, n)).astype(np.int8)
    s = (rng.random(n) * 0.02 + 0.001).astype(np.float32)
    b = rng.standard_normal(n).astype(np.float32)
    a = rng.standard_normal((m, k)).astype(np.float32) * 3 + 1
    p = dynq.PackedWeights.from_quantized(q, s, layout="kn")
    y = dynq.gemm(p, a, bias=b)
    ref = ref_per_row_u8(a, q, s, b)
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)
    # Threads never change a bit.
    for t in (1, 2, 3):
        np.testing.assert_array_equal(dynq.gemm(p, a, bias=b, num_threads=t), y)
    # Leading dimensions are flattened.
    y3 = dynq.gemm(p, a[:36].reshape(4, 9, k), bias=b)
    np.testing.assert_array_equal(y3.reshape(36, n), y[:36])
    relu = dynq.gemm(p, a, bias=b, epilogue="relu")
    np.testing.assert_array_equal(relu, np.maximum(y, 0))
    # GELU in both forms, SiLU and QuickGELU, each against its formula in float64 on the output
    # without epilogue.
    yd = y.astype(np.float64)
    erf = np.vectorize(math.erf)
    forms = {
        "gelu": 0.5 * yd * (1 + erf(yd / math.sqrt(2))),
        "gelu_tanh": 0.5 * yd * (1 + np.tanh(math.sqrt(2 / math.pi) * (yd + 0.044715 * yd**3))),
        "silu": yd / (1 + np.exp(-yd)),
        "quick_gelu": yd / (1 + np.exp(-1.702 * yd)),
    }
    for name, want in forms.items():
        got = dynq.gemm(p, a, bias=b, epilogue=name).astype(np.float64)
        np.testing.assert_allclose(got, want, rtol=0, atol=2e-6 * (1 + np.abs(want).max()))
        for other_name, other in forms.items():
            if other_name != name:
                assert np.abs(got - other).max() > 5e-5, (name, other_name)


def test_serialize_roundtrip():
    rng = np.random.default_rng(3)
    w = rng.standard_normal((20, 11)).astype(np.float32)
    p = dynq.PackedWeights.from_float(w, layout="nk")
    p2 = dynq.PackedWeights.deserialize(p.serialize())
    assert (p2.n, p2.k) == (20, 11)
    a = rng.standard_normal((3, 11)).astype(np.float32)
    np.testing.assert_array_equal(dynq.gemm(p, a), dynq.gemm(p2, a))


def test_errors_are_exceptions_with_messages():
    w = np.ones((4, 3), dtype=np.float32)
    w[2, 1] = np.nan
    with pytest.raises(dynq.DynqError) as e:
        dynq.PackedWeights.from_float(w)
    assert e.value.status == "NON_FINITE" and "input" in e.value.message
    p = dynq.PackedWeights.from_float(np.ones((4, 3), dtype=np.float32))
    a = np.ones((2, 4), dtype=np.float32)
    a[1, 2] = np.inf
    with pytest.raises(dynq.DynqError) as e:
        dynq.gemm(p, a)
    assert "A[1][2]" in e.value.message
    with pytest.raises(dynq.DynqError):
        dynq.PackedWeights.deserialize(b"not a blob at all, clearly")
    with pytest.raises(ValueError):
        dynq.gemm(p, np.ones((2, 5), dtype=np.float32))
    with pytest.raises(ValueError):
        dynq.gemm(p, a, act_type="int4")


def test_smoothing_factors():
    """gemm(smooth=s) quantizes a * s (dynq_gemm_smoothed): the same bits as gemm on a * s, for
    float32 and float16 a; bad factors raise with the library's message."""
    r = np.random.default_rng(4)
    k, n = 40, 24
    q = r.integers(-127, 128, size=(k, n)).astype(np.int8)
    p = dynq.PackedWeights.from_quantized(q, (r.random(n) * 0.01 + 0.001).astype(np.float32), layout="kn")
    a = r.standard_normal((9, k)).astype(np.float32)
    s = (10.0 ** r.uniform(-1, 1, size=k)).astype(np.float32)
    np.testing.assert_array_equal(dynq.gemm(p, a, smooth=s), dynq.gemm(p, a * s))
    a16 = a.astype(np.float16)
    got = dynq.gemm(p, a16, smooth=s, act_granularity="per_tensor")
    assert got.dtype == np.float16
    np.testing.assert_array_equal(got, dynq.gemm(p, a16.astype(np.float32) * s, act_granularity="per_tensor").astype(np.float16))
    with pytest.raises(ValueError, match="40 values"):
        dynq.gemm(p, a, smooth=s[:5])
    bad = s.copy()
    bad[7] = np.nan
    with pytest.raises(dynq.DynqError, match=r"smoothing factor \[7\] is NaN"):
        dynq.gemm(p, a, smooth=bad)


def test_residual_and_split():
    """gemm(residual=): the product plus the residual (one f32 addition); gemm_split: each array
    holds its columns of gemm, bit for bit (float32 and float16); bad widths raise."""
    rng = np.random.default_rng(5)
    w = rng.standard_normal((64, 50)).astype(np.float32)
    p = dynq.PackedWeights.from_float(w, layout="kn")
    a = rng.standard_normal((3, 7, 64)).astype(np.float32)
    b = rng.standard_normal(50).astype(np.float32)
    r = rng.standard_normal((3, 7, 50)).astype(np.float32)
    whole = dynq.gemm(p, a, bias=b, epilogue="gelu")
    np.testing.assert_array_equal(dynq.gemm(p, a, bias=b, epilogue="gelu", residual=r), whole + r)
    with pytest.raises(ValueError):
        dynq.gemm(p, a, residual=r[:, :, :49])
    parts = dynq.gemm_split(p, a, [7, 30, 13], bias=b, epilogue="gelu")
    assert [x.shape for x in parts] == [(3, 7, 7), (3, 7, 30), (3, 7, 13)]
    np.testing.assert_array_equal(np.concatenate(parts, axis=-1), whole)
    a16 = a.astype(np.float16)
    parts16 = dynq.gemm_split(p, a16, [25, 25])
    assert parts16[0].dtype == np.float16
    np.testing.assert_array_equal(np.concatenate(parts16, axis=-1), dynq.gemm(p, a16))
    with pytest.raises(dynq.DynqError) as e:
        dynq.gemm_split(p, a, [25, 26])
    assert "add up to n = 50" in str(e.value)


def test_split_heads():
    """gemm_split(heads=...): outputs in [batch, heads, seq, d] (or [batch, heads, d, seq]), the
    values of reshaping and transposing the plain result, bit for bit, for heads of 16 and 32
    (written straight by the AVX-512 kernel) and of 12 (through a scratch tile), f32 and f16;
    a layout that does not fit raises."""
    rng = np.random.default_rng(9)
    widths, layouts = [192, 64, 36, 40], [(12, False), (2, False), (3, True), None]
    w = rng.standard_normal((48, sum(widths))).astype(np.float32)
    p = dynq.PackedWeights.from_float(w, layout="kn")
    b = rng.standard_normal(sum(widths)).astype(np.float32)
    for dt in (np.float32, np.float16):
        a = rng.standard_normal((3, 11, 48)).astype(dt)
        whole = dynq.gemm(p, a, bias=b, epilogue="gelu")
        parts = dynq.gemm_split(p, a, widths, bias=b, epilogue="gelu", heads=layouts)
        j = 0
        for y, wd, lay in zip(parts, widths, layouts):
            plain = whole[..., j:j + wd]
            j += wd
            if lay is None:
                want = plain
            else:
                h, transposed = lay
                want = plain.reshape(3, 11, h, wd // h).transpose((0, 2, 3, 1) if transposed else (0, 2, 1, 3))
            assert y.shape == want.shape and y.dtype == dt, (y.shape, want.shape)
            np.testing.assert_array_equal(y, want)
    a = rng.standard_normal((3, 11, 48)).astype(np.float32)
    with pytest.raises(ValueError):
        dynq.gemm_split(p, a, widths, heads=[(5, False), None, None, None])
    with pytest.raises(ValueError):
        dynq.gemm_split(p, a.reshape(33, 48), widths, heads=layouts)


def test_layer_norm():
    """gemm(layer_norm=(scale, bias, eps)): dynq_gemm_layer_norm, bit for bit dynq's layer norm
    definition (ortutil.layer_norm_ref, a numpy re-implementation) applied to the residual call's
    result; float16 rows are normalized from their rounded values; bad parameters raise."""
    from ortutil import layer_norm_ref

    rng = np.random.default_rng(5)
    k, n = 48, 130
    p = dynq.PackedWeights.from_float(rng.standard_normal((k, n)).astype(np.float32))
    a = rng.standard_normal((2, 33, k)).astype(np.float32)
    r = rng.standard_normal((2, 33, n)).astype(np.float32)
    b = rng.standard_normal(n).astype(np.float32)
    g = rng.uniform(0.5, 2, n).astype(np.float32)
    be = rng.standard_normal(n).astype(np.float32)
    base = dynq.gemm(p, a, bias=b, epilogue="gelu", residual=r)
    got = dynq.gemm(p, a, bias=b, epilogue="gelu", residual=r, layer_norm=(g, be, 1e-5))
    np.testing.assert_array_equal(got, layer_norm_ref(base, g, be, 1e-5))
    got = dynq.gemm(p, a, layer_norm=(g, None, 1e-3))
    np.testing.assert_array_equal(got, layer_norm_ref(dynq.gemm(p, a), g, None, 1e-3))
    a16, r16 = a.astype(np.float16), r.astype(np.float16)
    got16 = dynq.gemm(p, a16, residual=r16, layer_norm=(g, be, 1e-5))
    base16 = dynq.gemm(p, a16, residual=r16)
    assert got16.dtype == np.float16
    np.testing.assert_array_equal(got16, layer_norm_ref(base16.astype(np.float32), g, be).astype(np.float16))
    with pytest.raises(ValueError):
        dynq.gemm(p, a, layer_norm=(g[:-1], None, 1e-5))
    with pytest.raises(dynq.DynqError) as e:
        dynq.gemm(p, a, layer_norm=(g, be, -1.0))
    assert "epsilon" in str(e.value)

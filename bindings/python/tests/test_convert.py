"""The converter and the evaluator (python -m dynq.onnx quantize|evaluate)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import dynq
from dynq.onnx import QuantizeOptions, evaluate, make_inputs, quantize_model, save_model
from ortutil import check_against_ort_int8, model, session, skip_without_f16_op

PKG = str(Path(__file__).resolve().parent.parent)
RNG = np.random.default_rng(11)


def f32(*shape, scale=0.1):
    return (RNG.standard_normal(shape) * scale).astype(np.float32)


def mlp(d=32, h=64, vocab=300):
    """ids -> embedding Gather -> MatMul+Add+GELU(torch pattern) -> MatMul+Add+Relu -> Gemm(transB) ->
    MatMul with a graph-input weight -> small MatMul (4x4) -> LayerNormalization."""
    inits = [
        numpy_helper.from_array(f32(vocab, d, scale=1.0), "emb"),
        numpy_helper.from_array(f32(d, h), "w1"),
        numpy_helper.from_array(f32(h), "b1"),
        numpy_helper.from_array(np.array(1.4142135, np.float32), "sqrt2"),
        numpy_helper.from_array(np.array(1.0, np.float32), "one"),
        numpy_helper.from_array(np.array(0.5, np.float32), "half"),
        numpy_helper.from_array(f32(h, d), "w2"),
        numpy_helper.from_array(f32(d), "b2"),
        numpy_helper.from_array(f32(d, d), "w3t"),  # Gemm transB=1: [N, K]
        numpy_helper.from_array(f32(d), "c3"),
        numpy_helper.from_array(f32(d, 4), "w5"),
        numpy_helper.from_array(f32(4, 4), "w6"),
        numpy_helper.from_array(np.ones(4, np.float32), "ln_s"),
        numpy_helper.from_array(np.zeros(4, np.float32), "ln_b"),
    ]
    nodes = [
        helper.make_node("Gather", ["emb", "ids"], ["x0"], name="embed"),
        helper.make_node("Identity", ["x0"], ["x"], name="flatten"),
        helper.make_node("MatMul", ["x", "w1"], ["h1"], name="fc1"),
        helper.make_node("Add", ["h1", "b1"], ["h1b"], name="fc1_bias"),
        helper.make_node("Div", ["h1b", "sqrt2"], ["g_div"], name="g_div"),
        helper.make_node("Erf", ["g_div"], ["g_erf"], name="g_erf"),
        helper.make_node("Add", ["g_erf", "one"], ["g_add"], name="g_add"),
        helper.make_node("Mul", ["h1b", "g_add"], ["g_mul"], name="g_mul"),
        helper.make_node("Mul", ["g_mul", "half"], ["g"], name="g_half"),
        helper.make_node("MatMul", ["g", "w2"], ["h2"], name="fc2"),
        helper.make_node("Add", ["b2", "h2"], ["h2b"], name="fc2_bias"),
        helper.make_node("Relu", ["h2b"], ["r2"], name="relu2"),
        helper.make_node("Gemm", ["r2", "w3t", "c3"], ["h3"], name="fc3", transB=1),
        helper.make_node("MatMul", ["h3", "w4"], ["h4"], name="fc4_dynamic_weight"),
        helper.make_node("MatMul", ["h4", "w5"], ["h5"], name="fc5"),
        helper.make_node("MatMul", ["h5", "w6"], ["h6"], name="fc6_small"),
        helper.make_node("LayerNormalization", ["h6", "ln_s", "ln_b"], ["y"], name="ln", axis=-1),
    ]
    inputs = [
        helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch"]),
        helper.make_tensor_value_info("w4", TensorProto.FLOAT, [d, d]),
    ]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4]), helper.make_tensor_value_info("h3", TensorProto.FLOAT, ["batch", d])]
    return model(nodes, inputs, outputs, inits)


def feeds(d=32, n=24):
    return {"ids": RNG.integers(0, 300, size=(n,)).astype(np.int64), "w4": np.eye(d, dtype=np.float32) + f32(d, d, scale=0.02)}


def cosine(a, b):
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    return a @ b / np.linalg.norm(a) / np.linalg.norm(b)


def test_convert_mlp_fuses_and_keeps_the_rest():
    m = mlp()
    q, rep = quantize_model(m, QuantizeOptions(min_size=64, smooth="off"))
    ops = [(n.op_type, n.name) for n in q.graph.node]
    dq = {n.name: n for n in q.graph.node if n.op_type == "DynQMatMul"}
    assert set(dq) == {"fc1", "fc2", "fc3", "fc5"}, ops
    attrs = lambda n: {a.name: helper.get_attribute_value(a).decode() for a in n.attribute}  # noqa: E731
    assert attrs(dq["fc1"]) == {"activation": "gelu"} and len(dq["fc1"].input) == 4
    assert attrs(dq["fc2"]) == {"activation": "relu"} and len(dq["fc2"].input) == 4
    assert len(dq["fc3"].input) == 4  # Gemm's C became the bias
    assert dq["fc1"].output[0] == "g" and dq["fc2"].output[0] == "r2"
    names = {n.name for n in q.graph.node}
    assert {"fc4_dynamic_weight", "fc6_small", "ln", "flatten"} <= names  # kept as they were
    assert not names & {"fc1_bias", "g_div", "g_erf", "g_add", "g_mul", "g_half", "fc2_bias", "relu2"}
    assert not {"w1", "w2", "w3t", "emb"} & {t.name for t in q.graph.initializer}, "fp32 weights are dropped"
    assert ("fc6_small", "MatMul", "below --min-size") in rep.skipped
    assert any(r[0] == "fc4_dynamic_weight" and "not a constant" in r[2] for r in rep.skipped)
    assert rep.embeddings == [("embed", 300, 32)]
    onnx.checker.check_model(q)  # custom domain ops are accepted by the checker
    f = feeds()
    ref = session(m, custom=False).run(None, f)
    out = session(q).run(None, f)
    for r, o in zip(ref, out):
        assert cosine(r, o) > 0.999


def test_include_exclude_and_options():
    m = mlp()
    q, rep = quantize_model(m, QuantizeOptions(include_nodes=("fc1", "fc2"), quantize_embeddings=False))
    assert sorted(n.name for n in q.graph.node if n.op_type == "DynQMatMul") == ["fc1", "fc2"]
    assert any(n.op_type == "Gather" and n.input[0] == "emb" for n in q.graph.node)
    q, _ = quantize_model(m, QuantizeOptions(exclude_nodes=("fc2",), exclude_op_types=("Gemm", "Gather")))
    assert sorted(n.name for n in q.graph.node if n.op_type == "DynQMatMul") == ["fc1", "fc5", "fc6_small"]
    q, _ = quantize_model(m, QuantizeOptions(op_types=("Gemm",)))
    assert [n.name for n in q.graph.node if n.op_type == "DynQMatMul"] == ["fc3"]
    q, _ = quantize_model(
        m,
        QuantizeOptions(weight_granularity="per_tensor", act_granularity="per_tensor", act_type="symmetric_i8", fuse_activation=False, fuse_bias=False, smooth="off"),
    )
    n = next(n for n in q.graph.node if n.name == "fc1")
    attrs = {a.name: helper.get_attribute_value(a).decode() for a in n.attribute}
    assert attrs == {"act_granularity": "per_tensor", "act_type": "symmetric_i8"}
    assert len(n.input) == 3
    scale = next(t for t in q.graph.initializer if t.name == n.input[2])
    assert list(scale.dims) == [1]
    assert any(x.name == "fc1_bias" for x in q.graph.node) and any(x.name == "relu2" for x in q.graph.node)
    f = feeds()
    assert cosine(session(m, custom=False).run(None, f)[0], session(q).run(None, f)[0]) > 0.99


def test_weight_qmax_option():
    """--weight-qmax 64 stores weights in [-64, 64] (each layer's weights and scales are what
    dynq.quantize_weights gives), the model still matches fp32 closely, and the CLI and the
    options reject values outside 1..127."""
    m = mlp()
    init = {t.name: numpy_helper.to_array(t) for t in m.graph.initializer}
    q, rep = quantize_model(m, QuantizeOptions(min_size=64, smooth="off", weight_qmax=64))
    qi = {t.name: numpy_helper.to_array(t) for t in q.graph.initializer}
    dq = {n.name: n for n in q.graph.node if n.op_type == "DynQMatMul"}
    for name, wname in (("fc1", "w1"), ("fc2", "w2"), ("fc5", "w5")):
        w8, sc = qi[dq[name].input[1]], qi[dq[name].input[2]]
        assert w8.dtype == np.int8 and np.abs(w8).max() == 64, name
        want_q, want_s = dynq.quantize_weights(init[wname], "per_channel", layout="kn", weight_qmax=64)
        np.testing.assert_array_equal(w8, want_q)
        np.testing.assert_array_equal(sc, want_s)
    meta = {p.key: p.value for p in q.metadata_props}
    assert json.loads(meta["dynq.quantize_options"])["weight_qmax"] == 64
    f = feeds()
    for r, o in zip(session(m, custom=False).run(None, f), session(q).run(None, f)):
        assert cosine(r, o) > 0.998
    for bad in (0, 128):
        with pytest.raises(ValueError, match="weight_qmax"):
            quantize_model(m, QuantizeOptions(weight_qmax=bad))


def test_external_data_in_and_out(tmp_path):
    m = mlp()
    src = tmp_path / "fp32.onnx"
    mc = onnx.ModelProto()
    mc.CopyFrom(m)  # save_model with external data rewrites the proto it is given
    onnx.save_model(mc, str(src), save_as_external_data=True, location="fp32.onnx.data", size_threshold=0)
    assert (tmp_path / "fp32.onnx.data").exists()
    out = tmp_path / "int8.onnx"
    r = subprocess.run(
        [sys.executable, "-m", "dynq.onnx", "quantize", str(src), str(out), "--external-data", "--report-json", str(tmp_path / "r.json")],
        cwd=PKG, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": PKG},
    )
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "int8.onnx.data").exists()
    assert "converted 5 layers" in r.stdout
    rep = json.loads((tmp_path / "r.json").read_text())
    assert len(rep["converted"]) == 5 and rep["output_bytes"] < rep["input_bytes"] * 0.4
    f = feeds()
    ref = session(m, custom=False).run(None, f)[0]
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.register_custom_ops_library(dynq.library_path())
    got = ort.InferenceSession(str(out), so, providers=["CPUExecutionProvider"]).run(None, f)[0]
    assert cosine(ref, got) > 0.999


def bert_like(d=64, h=128, layers=2):
    """A small stack of MatMul+Add(+GELU) with LayerNorm, fed by a float input (for quantize_dynamic)."""
    nodes, inits = [], []
    x = "x"
    for i in range(layers):
        for j, (k, n, act) in enumerate([(d, h, True), (h, d, False)]):
            w, b, o = f"w{i}{j}", f"b{i}{j}", f"l{i}{j}"
            inits += [numpy_helper.from_array(f32(k, n), w), numpy_helper.from_array(f32(n), b)]
            nodes += [helper.make_node("MatMul", [x, w], [o + "_mm"], name=o), helper.make_node("Add", [o + "_mm", b], [o], name=o + "_add")]
            x = o
            if act:
                nodes.append(helper.make_node("Relu", [x], [x + "_r"], name=x + "_relu"))
                x = x + "_r"
        inits += [numpy_helper.from_array(np.ones(d, np.float32), f"s{i}"), numpy_helper.from_array(np.zeros(d, np.float32), f"z{i}")]
        nodes.append(helper.make_node("LayerNormalization", [x, f"s{i}", f"z{i}"], [f"ln{i}"], name=f"ln{i}", axis=-1))
        x = f"ln{i}"
    return model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", "s", d])], [helper.make_tensor_value_info(x, TensorProto.FLOAT, ["b", "s", d])], inits)


@pytest.mark.parametrize("weight_type,per_channel", [("QInt8", False), ("QInt8", True), ("QUInt8", False), ("QUInt8", True)])
def test_convert_ort_quantize_dynamic_models(tmp_path, weight_type, per_channel):
    from onnxruntime.quantization import QuantType, quantize_dynamic

    m = bert_like()
    src = tmp_path / "fp32.onnx"
    onnx.save_model(m, str(src))
    ortq = tmp_path / "ortq.onnx"
    quantize_dynamic(str(src), str(ortq), weight_type=getattr(QuantType, weight_type), per_channel=per_channel)
    qm = onnx.load(str(ortq))
    assert any(n.op_type == "MatMulInteger" for n in qm.graph.node)
    conv, rep = quantize_model(qm)
    types = {n.op_type for n in conv.graph.node}
    assert "MatMulInteger" not in types and "DynamicQuantizeLinear" not in types, types
    assert len(rep.converted) == 4 and all(r.bias for r in rep.converted)
    assert sum(r.activation == "relu" for r in rep.converted) == 2
    if weight_type == "QInt8":
        # Symmetric int8 weights are taken as they are: no channel was requantized, values identical.
        assert all(r.requantized_channels == 0 for r in rep.converted)
        orig = {t.name: numpy_helper.to_array(t) for t in qm.graph.initializer}
        new = {t.name: numpy_helper.to_array(t) for t in conv.graph.initializer}
        n = next(n for n in qm.graph.node if n.op_type == "MatMulInteger")
        d = next(x for x in conv.graph.node if x.name == n.name)
        np.testing.assert_array_equal(new[d.input[1]], orig[n.input[1]])
    x = f32(2, 9, 64, scale=1.0)
    ref = session(m, custom=False).run(None, {"x": x})[0]
    got = session(conv).run(None, {"x": x})[0]
    ortq_out = session(qm, custom=False).run(None, {"x": x})[0]
    assert cosine(ref, got) > 0.999
    assert cosine(ref, got) >= cosine(ref, ortq_out) - 1e-4  # per-row activations: no worse than ORT's


def test_convert_dynamic_quantize_matmul():
    k, n = 48, 40
    q = RNG.integers(-127, 128, size=(k, n)).astype(np.int8)
    s = (RNG.random(n) * 0.01).astype(np.float32)
    zp = np.full(n, 0, np.int8)
    b = f32(n)
    inits = [numpy_helper.from_array(q, "W"), numpy_helper.from_array(s, "S"), numpy_helper.from_array(zp, "Z"), numpy_helper.from_array(b, "B")]
    m = model(
        [helper.make_node("DynamicQuantizeMatMul", ["A", "W", "S", "Z", "B"], ["Y"], domain="com.microsoft", name="dqmm")],
        [helper.make_tensor_value_info("A", TensorProto.FLOAT, ["m", k])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)],
        inits,
    )
    conv, rep = quantize_model(m, QuantizeOptions(act_granularity="per_tensor"))
    assert [x.op_type for x in conv.graph.node] == ["DynQMatMul"]
    a = f32(5, k, scale=1.0)
    ort_int8 = session(m, custom=False).run(None, {"A": a})[0]
    got = session(conv).run(None, {"A": a})[0]
    # The converted model computes the op's definition exactly (ONNX Runtime itself saturates on
    # x86 CPUs without VNNI: see check_against_ort_int8).
    check_against_ort_int8(got, ort_int8, a, q, s, zp, b)


def test_uint8_weights_with_wide_zero_point_range_are_requantized():
    from dynq.onnx.convert import _int_weights_to_int8

    q = np.array([[0, 255, 10], [255, 0, 200]], np.uint8)  # with zp 128/10: col 1 fits, col 0 and 2 do not
    q8, s, nreq = _int_weights_to_int8(q, np.array([128, 127, 10], np.uint8), np.array([0.1, 0.2, 0.3], np.float32))
    real = (q.astype(np.float64) - [128, 127, 10]) * [0.1, 0.2, 0.3]
    assert nreq == 0 or np.abs(q8.astype(np.float64) * s - real).max() <= 0.5 * s.max()
    q8, s, nreq = _int_weights_to_int8(np.array([[0], [255]], np.uint8), np.array([0], np.uint8), np.array([1.0], np.float32))
    assert nreq == 1 and q8.ravel().tolist() == [0, 127] and abs(s[0] - 255 / 127) < 1e-6


def bert_like_with_outlier():
    """bert_like(layers=3) with one layer (l10) much harder to quantize: a huge outlier weight
    flattens its per-tensor scale."""
    m = bert_like(layers=3)
    for t in m.graph.initializer:
        if t.name == "w10":
            w = numpy_helper.to_array(t).copy()
            w[0, 0] = 40.0
            t.CopyFrom(numpy_helper.from_array(w, "w10"))
    return m


def test_evaluate_cli_json_gate_and_mixed_precision(tmp_path):
    m = bert_like_with_outlier()
    src, out = tmp_path / "fp32.onnx", tmp_path / "q.onnx"
    onnx.save_model(m, str(src))
    env = {**os.environ, "PYTHONPATH": PKG}
    run = lambda *a: subprocess.run([sys.executable, "-m", "dynq.onnx", *a], cwd=PKG, capture_output=True, text=True, env=env)  # noqa: E731
    # Without smoothing, which would repair much of the outlier (this test is about the gate).
    r = run("quantize", str(src), str(out), "--weight-granularity", "per_tensor", "--smooth", "off", "--quiet")
    assert r.returncode == 0, r.stderr
    r = run("evaluate", str(src), str(out), "--json", str(tmp_path / "e.json"), "--samples", "2", "--seq-len", "8", "--min-cosine", "0.5")
    assert r.returncode == 0, r.stderr
    assert "isolated cos" in r.stdout and "PASS" in r.stdout
    ev = json.loads((tmp_path / "e.json").read_text())
    assert len(ev["layers"]) == 6 and 0.5 < ev["final"][0]["cosine_mean"] < 0.99
    assert {"cosine", "sqnr_db", "max_abs_error", "isolated_cosine", "isolated_sqnr_db"} <= set(ev["layers"][0])
    worst = min(ev["layers"], key=lambda l: l["isolated_sqnr_db"])
    assert worst["name"] == "l10", worst
    c0 = ev["final"][0]["cosine_mean"]
    # Gate that cannot pass: exit code 3.
    r = run("evaluate", str(src), str(out), "--samples", "2", "--seq-len", "8", "--min-cosine", "1.01", "--no-per-layer")
    assert r.returncode == 3 and "accuracy gate failed" in r.stderr
    # Mixed precision: keep the most sensitive layers in fp32 until the gate passes.
    goal = c0 + (1 - c0) * 0.5
    mp = tmp_path / "mixed.onnx"
    r = run("evaluate", str(src), str(out), "--samples", "2", "--seq-len", "8", "--min-cosine", f"{goal:.9f}", "--mixed-precision", str(mp), "--json", str(tmp_path / "m.json"))
    assert r.returncode == 0, r.stdout + r.stderr
    ev = json.loads((tmp_path / "m.json").read_text())
    kept = ev["mixed_precision"]["kept_fp32"]
    assert kept and kept[0] == "l10" and ev["mixed_precision"]["final_cosine"] >= goal
    mm = onnx.load(str(mp))
    assert any(n.name == "l10" and n.op_type == "MatMul" for n in mm.graph.node)
    assert sum(n.op_type == "DynQMatMul" for n in mm.graph.node) == 6 - len(kept)
    res = evaluate(m, mm, make_inputs(m, seq_len=8, samples=2), per_layer=False)
    assert res.final_cosine >= goal - 1e-6


def test_mixed_precision_keeps_unnamed_layers(tmp_path):
    """Exporters may leave nodes unnamed: such a layer is known by its first output, so that the
    evaluator's report, --exclude-nodes and mixed precision all name it the same way."""
    m = bert_like_with_outlier()
    first_out = {}
    for n in m.graph.node:
        if n.op_type == "MatMul":
            first_out[n.name] = n.output[0]
            n.name = ""
    for n in m.graph.node:  # the other nodes keep their names, so no new name collides
        assert n.name or n.op_type == "MatMul"
    opts = QuantizeOptions(weight_granularity="per_tensor", smooth="off")
    conv, rep = quantize_model(m, opts)
    dq = [n for n in conv.graph.node if n.op_type == "DynQMatMul"]
    assert len(dq) == 6 and all(n.name for n in dq)
    assert first_out["l10"] in {n.name for n in dq}
    # Excluding by that name keeps exactly that layer in fp32.
    kept, _ = quantize_model(m, QuantizeOptions(weight_granularity="per_tensor", smooth="off", exclude_nodes=(first_out["l10"],)))
    assert sum(n.op_type == "DynQMatMul" for n in kept.graph.node) == 5
    assert any(n.op_type == "MatMul" and n.output[0] == first_out["l10"] for n in kept.graph.node)
    only, _ = quantize_model(m, QuantizeOptions(weight_granularity="per_tensor", smooth="off", include_nodes=(first_out["l10"],)))
    assert [n.name for n in only.graph.node if n.op_type == "DynQMatMul"] == [first_out["l10"]]
    # The evaluator reports it under that name and mixed precision keeps it.
    feeds_list = make_inputs(m, seq_len=8, samples=2)
    ev = evaluate(m, conv, feeds_list)
    worst = min(ev.layers, key=lambda l: l["isolated_sqnr_db"])
    assert worst["name"] == first_out["l10"], worst
    c0 = ev.final_cosine
    goal = c0 + (1 - c0) * 0.5
    ev = evaluate(m, conv, feeds_list, min_cosine=goal, mixed_precision_out=str(tmp_path / "mixed.onnx"))
    assert ev.mixed_precision["passed"], ev.mixed_precision
    assert ev.mixed_precision["kept_fp32"][0] == first_out["l10"]
    mm = onnx.load(str(tmp_path / "mixed.onnx"))
    assert any(n.op_type == "MatMul" and n.output[0] == first_out["l10"] for n in mm.graph.node)


def test_weights_behind_identity_and_constant_float_lists():
    """PyTorch's exporter reads a parameter used twice through one Identity per use, and some
    exporters write a bias as Constant(value_floats): both are constants and are converted; the
    shared weight is stored and counted once."""
    d = 32
    w, b = f32(d, d), f32(d)
    inits = [numpy_helper.from_array(w, "shared.weight")]
    nodes = [
        helper.make_node("Identity", ["shared.weight"], ["w_use1"], name="id1"),
        helper.make_node("Identity", ["shared.weight"], ["w_use2"], name="id2"),
        helper.make_node("Identity", ["w_use2"], ["w_use2b"], name="id2b"),  # a chain
        helper.make_node("Constant", [], ["bias"], name="bias_const", value_floats=b.tolist()),
        helper.make_node("MatMul", ["x", "w_use1"], ["h"], name="first"),
        helper.make_node("Add", ["h", "bias"], ["hb"], name="first_bias"),
        helper.make_node("MatMul", ["hb", "w_use2b"], ["y"], name="second"),
    ]
    m = model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", d])], [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", d])], inits)
    conv, rep = quantize_model(m, QuantizeOptions(smooth="off"))
    ops = [n.op_type for n in conv.graph.node]
    assert ops == ["DynQMatMul", "DynQMatMul"], ops
    first = next(n for n in conv.graph.node if n.name == "first")
    assert first.output[0] == "hb" and len(first.input) == 4  # the Constant bias was folded
    second = next(n for n in conv.graph.node if n.name == "second")
    assert first.input[1] == second.input[1]  # one int8 weight
    assert rep.fp32_weight_bytes == w.nbytes
    assert not any(t.name == "shared.weight" for t in conv.graph.initializer)
    x = f32(5, d, scale=1.0)
    want = (x @ w + b) @ w
    got = session(conv).run(None, {"x": x})[0]
    assert cosine(got, want) > 0.999


def test_weights_behind_transpose_and_cast():
    """An unoptimized dynamo export reads a Linear's [N, K] weight through Transpose, and a model
    may keep a weight in float16 behind a Cast to float: both are constants, converted, and the
    Transpose, the Cast and their sources leave the model; the report counts the float16
    source's 2 bytes per value. A Transpose with another permutation (or of a 3-D constant)
    is not a weight the converter reads, and its layer stays as it is."""
    d, n = 32, 24
    w1, w2 = f32(d, n), f32(n, d)
    inits = [numpy_helper.from_array(np.ascontiguousarray(w1.T), "fc1.weight"), numpy_helper.from_array(w2.astype(np.float16), "fc2.weight_f16"),
             numpy_helper.from_array(f32(d, 2, n), "w3d")]
    nodes = [
        helper.make_node("Transpose", ["fc1.weight"], ["w1"], name="t1", perm=[1, 0]),
        helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc1"),
        helper.make_node("Cast", ["fc2.weight_f16"], ["w2"], name="c2", to=TensorProto.FLOAT),
        helper.make_node("MatMul", ["h", "w2"], ["y"], name="fc2"),
        helper.make_node("Transpose", ["w3d"], ["w3"], name="t3", perm=[1, 0, 2]),
        helper.make_node("MatMul", ["x", "w3"], ["z"], name="batched"),
    ]
    outs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", d]), helper.make_tensor_value_info("z", TensorProto.FLOAT, [2, "b", n])]
    m = model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", d])], outs, inits)
    conv, rep = quantize_model(m, QuantizeOptions(smooth="off"))
    assert [r.name for r in rep.converted] == ["fc1", "fc2"], rep.skipped
    assert [nd.op_type for nd in conv.graph.node] == ["DynQMatMul", "DynQMatMul", "Transpose", "MatMul"]
    assert {t.name for t in conv.graph.initializer}.isdisjoint({"fc1.weight", "fc2.weight_f16"})
    assert rep.fp32_weight_bytes == w1.nbytes + w2.nbytes // 2
    x = f32(5, d, scale=1.0)
    y, z = session(conv).run(None, {"x": x})
    y_ref, z_ref = session(m, custom=False).run(None, {"x": x})
    assert cosine(y, y_ref) > 0.999
    np.testing.assert_array_equal(z, z_ref)


def test_tied_embedding_and_output_projection():
    """A language model's output projection tied to its embedding table reads the table through a
    Transpose (dynamo exports): the Gather and the projection are both converted from the one
    table, which leaves the model, and the logits stay close to the float model's."""
    v, d = 200, 32
    table = f32(v, d, scale=1.0)
    nodes = [
        helper.make_node("Gather", ["emb.weight", "ids"], ["e"], name="embed"),
        helper.make_node("MatMul", ["e", "w_h"], ["h"], name="hidden"),
        helper.make_node("Relu", ["h"], ["hr"], name="act"),
        helper.make_node("Transpose", ["emb.weight"], ["emb_t"], name="tie", perm=[1, 0]),
        helper.make_node("MatMul", ["hr", "emb_t"], ["logits"], name="lm_head"),
    ]
    inits = [numpy_helper.from_array(table, "emb.weight"), numpy_helper.from_array(f32(d, d, scale=0.3), "w_h")]
    m = model(nodes, [helper.make_tensor_value_info("ids", TensorProto.INT64, ["b", "s"])], [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["b", "s", v])], inits)
    conv, rep = quantize_model(m, QuantizeOptions(smooth="off"))
    assert [r.name for r in rep.converted] == ["hidden", "lm_head"] and [e[0] for e in rep.embeddings] == ["embed"]
    assert not any(t.name == "emb.weight" for t in conv.graph.initializer)
    assert rep.fp32_weight_bytes == table.nbytes + d * d * 4  # the table counted once
    ids = np.random.default_rng(4).integers(0, v, size=(2, 7)).astype(np.int64)
    got, want = session(conv).run(None, {"ids": ids})[0], session(m, custom=False).run(None, {"ids": ids})[0]
    assert cosine(got, want) > 0.999


def ort_fused_block(d=32, h=64, sln_outputs=1, eps=True, act_before_sln=False, skip_first=False):
    """What ONNX Runtime's transformer optimizer leaves of a BERT FFN: x -> MatMul ->
    com.microsoft.BiasGelu -> MatMul -> com.microsoft.SkipLayerNormalization(h, x, gamma, beta,
    bias), the residual Add, the layer norm and the second bias in one node."""
    r = np.random.default_rng(8)
    inits = [numpy_helper.from_array((r.standard_normal(s) * sc).astype(np.float32), nm) for nm, s, sc in
             [("w1", (d, h), 0.2), ("b1", (h,), 0.5), ("w2", (h, d), 0.2), ("g", (d,), 1.0), ("be", (d,), 0.3), ("b2", (d,), 0.5)]]
    out2 = "h2"
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h1"], name="fc1"),
        helper.make_node("BiasGelu", ["h1", "b1"], ["g1"], name="bias_gelu", domain="com.microsoft"),
        helper.make_node("MatMul", ["g1", "w2"], ["h2"], name="fc2"),
    ]
    if act_before_sln:
        nodes.append(helper.make_node("Relu", ["h2"], ["h2r"], name="relu"))
        out2 = "h2r"
    outs = ["y"] + ["", "", "sum"][: sln_outputs - 1]
    ins = [out2, "x"] if not skip_first else ["x", out2]
    nodes.append(helper.make_node("SkipLayerNormalization", ins + ["g", "be", "b2"], outs, name="sln", domain="com.microsoft", **({"epsilon": 1e-5} if eps else {})))
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", "s", d])]
    if sln_outputs > 1:
        outputs.append(helper.make_tensor_value_info("sum", TensorProto.FLOAT, ["b", "s", d]))
    return model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", "s", d])], outputs, inits)


def test_onnx_runtime_fused_bias_gelu_and_skip_layer_norm_are_folded():
    """BiasGelu after a layer becomes its bias and GELU; SkipLayerNormalization after one becomes
    its residual and layer norm, its bias added to the layer's. Not when the sum output is used,
    the epsilon is not written out, an activation comes before (its bias would be added after
    it), or the layer's output is the skip (the result would take the other input's shape)."""
    m = ort_fused_block()
    q, rep = quantize_model(m, QuantizeOptions(smooth="off"))
    onnx.checker.check_model(q)
    assert [n.op_type for n in q.graph.node] == ["DynQMatMul", "DynQMatMul"]
    fc1, fc2 = rep.converted
    assert (fc1.bias, fc1.activation, fc2.bias, fc2.residual, fc2.layer_norm) == (True, "gelu", True, "x", True)
    x = f32(2, 9, 32, scale=1.0)
    want = session(m, custom=False).run(None, {"x": x})[0]
    assert cosine(session(q).run(None, {"x": x})[0], want) > 0.999
    # The evaluator measures the folded layer alone against the sum the float model normalized.
    ev = evaluate(m, q, [{"x": x}])
    assert [l["name"] for l in ev.layers] == ["fc1", "fc2"] and min(l["isolated_cosine"] for l in ev.layers) > 0.999, ev.table()
    q_off, _ = quantize_model(m, QuantizeOptions(smooth="off", fuse_bias=False, fuse_layer_norm=False))
    assert [n.op_type for n in q_off.graph.node] == ["DynQMatMul", "BiasGelu", "DynQMatMul", "SkipLayerNormalization"]
    for kw in ({"sln_outputs": 4}, {"eps": False}, {"act_before_sln": True}, {"skip_first": True}):
        mm = ort_fused_block(**kw)
        qq, rr = quantize_model(mm, QuantizeOptions(smooth="off"))
        assert "SkipLayerNormalization" in [n.op_type for n in qq.graph.node] and not rr.converted[1].layer_norm, kw
        feeds = {"x": x}
        for a, b in zip(session(mm, custom=False).run(None, feeds), session(qq).run(None, feeds)):
            assert cosine(a, b) > 0.999, kw


def test_quantize_cli_errors(tmp_path):
    r = subprocess.run([sys.executable, "-m", "dynq.onnx", "quantize", str(tmp_path / "missing.onnx"), str(tmp_path / "o.onnx")], cwd=PKG, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": PKG})
    assert r.returncode == 2 and "error" in r.stderr


def test_convert_float16_model():
    """A float16 model (weights, bias, activations): converted without going through a float32
    copy of A; the dynq nodes take and give float16, close to the float32 reference."""
    skip_without_f16_op()
    d, h = 64, 96
    h16 = lambda *s: f32(*s).astype(np.float16)  # noqa: E731
    w1, b1, w2, b2, w3t, c3 = h16(d, h), h16(h), h16(h, d), h16(d), h16(d, d), h16(d)
    f16 = lambda v, name: numpy_helper.from_array(np.array(v, np.float16), name)  # noqa: E731
    inits = [numpy_helper.from_array(v, n) for v, n in [(w1, "w1"), (b1, "b1"), (w2, "w2"), (b2, "b2"), (w3t, "w3t"), (c3, "c3")]]
    inits += [f16(1.4142135, "sqrt2"), f16(1.0, "one"), f16(0.5, "half")]
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h1"], name="fc1"),
        helper.make_node("Add", ["h1", "b1"], ["h1b"], name="fc1_bias"),
        helper.make_node("Div", ["h1b", "sqrt2"], ["g_div"], name="g_div"),
        helper.make_node("Erf", ["g_div"], ["g_erf"], name="g_erf"),
        helper.make_node("Add", ["g_erf", "one"], ["g_add"], name="g_add"),
        helper.make_node("Mul", ["h1b", "g_add"], ["g_mul"], name="g_mul"),
        helper.make_node("Mul", ["g_mul", "half"], ["g"], name="g_half"),
        helper.make_node("MatMul", ["g", "w2"], ["h2"], name="fc2"),
        helper.make_node("Add", ["h2", "b2"], ["h2b"], name="fc2_bias"),
        helper.make_node("Relu", ["h2b"], ["r2"], name="relu2"),
        helper.make_node("Gemm", ["r2", "w3t", "c3"], ["y"], name="fc3", transB=1),
    ]
    m = model(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT16, ["batch", d])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT16, ["batch", d])],
        inits,
    )
    q, rep = quantize_model(m, QuantizeOptions(min_size=64))
    assert sorted(n.op_type for n in q.graph.node) == ["DynQMatMul"] * 3, [n.op_type for n in q.graph.node]
    x = (RNG.standard_normal((40, d))).astype(np.float16)
    y = session(q, threads=2).run(None, {"x": x})[0]
    assert y.dtype == np.float16 and y.shape == (40, d)
    # float32 reference from the same float16 parameters.
    import math

    t = x.astype(np.float32) @ w1.astype(np.float32) + b1.astype(np.float32)
    t = 0.5 * t * (1 + np.vectorize(math.erf)(t / math.sqrt(2)))
    t = np.maximum(t @ w2.astype(np.float32) + b2.astype(np.float32), 0)
    ref = t @ w3t.astype(np.float32).T + c3.astype(np.float32)
    assert cosine(ref, y.astype(np.float32)) > 0.999
    assert rep.fp32_weight_bytes == 2 * (w1.size + w2.size + w3t.size)


def test_float16_layer_norm_is_folded():
    """In a float16 model the residual Add and the LayerNormalization after a layer fold too: its
    float16 scale and bias become float32 initializers (widened exactly), the node gives
    float16, close to the float32 reference."""
    skip_without_f16_op()
    d = 64
    r = np.random.default_rng(3)
    w = (0.1 * r.standard_normal((d, d))).astype(np.float16)
    b = (0.1 * r.standard_normal(d)).astype(np.float16)
    g = (1 + 0.2 * r.standard_normal(d)).astype(np.float16)
    be = (0.1 * r.standard_normal(d)).astype(np.float16)
    inits = [numpy_helper.from_array(v, nm) for v, nm in [(w, "w"), (b, "b"), (g, "g"), (be, "be")]]
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["h"], name="fc"),
        helper.make_node("Add", ["h", "b"], ["hb"], name="fc_bias"),
        helper.make_node("Add", ["hb", "x"], ["s"], name="res"),
        helper.make_node("LayerNormalization", ["s", "g", "be"], ["y"], name="ln", axis=-1),
    ]
    m = model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT16, ["b", "s", d])],
              [helper.make_tensor_value_info("y", TensorProto.FLOAT16, ["b", "s", d])], inits)
    q, rep = quantize_model(m, QuantizeOptions(smooth="off"))
    assert [n.op_type for n in q.graph.node] == ["DynQMatMul"] and rep.converted[0].layer_norm
    node = q.graph.node[0]
    by_name = {t.name: t for t in q.graph.initializer}
    assert [by_name[i].data_type for i in node.input[6:8]] == [TensorProto.FLOAT] * 2
    np.testing.assert_array_equal(numpy_helper.to_array(by_name[node.input[6]]), g.astype(np.float32))
    x = r.standard_normal((3, 20, d)).astype(np.float16)
    y = session(q, threads=2).run(None, {"x": x})[0]
    assert y.dtype == np.float16
    s32 = x.astype(np.float32) @ w.astype(np.float32) + b.astype(np.float32) + x.astype(np.float32)
    mu, var = s32.mean(-1, keepdims=True), s32.var(-1, keepdims=True)
    ref = (s32 - mu) / np.sqrt(var + 1e-5) * g.astype(np.float32) + be.astype(np.float32)
    assert cosine(ref, y.astype(np.float32)) > 0.999


def ln_outlier_model(k=64, n=96, seed=5):
    """LayerNormalization whose scale has a few channels ~30x larger than the rest (the outlier
    channels of transformer LayerNorm outputs), then MatMul + bias, then a second MatMul."""
    r = np.random.default_rng(seed)
    gamma = (1 + 0.1 * r.standard_normal(k)).astype(np.float32)
    gamma[[3, 17, 40]] = [30.0, -25.0, 35.0]
    inits = [
        numpy_helper.from_array(gamma, "g"),
        numpy_helper.from_array((0.1 * r.standard_normal(k)).astype(np.float32), "beta"),
        numpy_helper.from_array((0.1 * r.standard_normal((k, n))).astype(np.float32), "w1"),
        numpy_helper.from_array((0.1 * r.standard_normal(n)).astype(np.float32), "b1"),
        numpy_helper.from_array((0.1 * r.standard_normal((n, k))).astype(np.float32), "w2"),
    ]
    nodes = [
        helper.make_node("LayerNormalization", ["x", "g", "beta"], ["ln"], name="ln", axis=-1),
        helper.make_node("MatMul", ["ln", "w1"], ["h"], name="fc1"),
        helper.make_node("Add", ["h", "b1"], ["hb"], name="fc1_bias"),
        helper.make_node("MatMul", ["hb", "w2"], ["y"], name="fc2"),
    ]
    return model(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", "s", k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        inits,
    )


def test_smoothing_moves_outlier_channels_into_the_weights(tmp_path):
    m = ln_outlier_model()
    on, rep_on = quantize_model(m)  # smooth="auto" is the default
    off, rep_off = quantize_model(m, QuantizeOptions(smooth="off"))
    fc1 = next(n for n in on.graph.node if n.name == "fc1")
    assert len(fc1.input) == 5 and fc1.input[3], fc1.input  # bias folded, then the factors
    sm = numpy_helper.to_array(next(t for t in on.graph.initializer if t.name == fc1.input[4]))
    assert sm.shape == (64,) and sm.dtype == np.float32 and np.all(sm > 0)
    # The outlier channels are scaled down the most.
    assert set(np.argsort(sm)[:3]) == {3, 17, 40}, np.argsort(sm)[:5]
    rec = next(r for r in rep_on.converted if r.name == "fc1")
    assert rec.smooth_alpha is not None and rec.smooth_gain_db >= 0.5
    assert "activation smoothing: " in rep_on.summary()
    for n in on.graph.node:
        if n.op_type == "DynQMatMul" and len(n.input) == 5:
            assert n.input[3], "a zero bias, never an empty middle input (old ONNX Runtime crashes on it)"
    assert all(r.smooth_alpha is None for r in rep_off.converted)
    assert all(len(n.input) <= 4 for n in off.graph.node if n.op_type == "DynQMatMul")
    # On inputs the calibration never saw, the smoothed model is closer to fp32.
    x = (np.random.default_rng(99).standard_normal((3, 20, 64)) * 2).astype(np.float32)
    ref = session(m, custom=False).run(None, {"x": x})[0].astype(np.float64)
    err = lambda q: np.linalg.norm(session(q).run(None, {"x": x})[0] - ref) / np.linalg.norm(ref)  # noqa: E731
    e_on, e_off = err(on), err(off)
    assert e_on < 0.7 * e_off, (e_on, e_off)
    # The evaluator's isolated layer (the C ABI with the factors applied) agrees.
    feeds = [{"x": x}]
    ev_on = evaluate(m, on, feeds)
    ev_off = evaluate(m, off, feeds)
    iso = lambda ev: next(l for l in ev.layers if l["name"] == "fc1")["isolated_sqnr_db"]  # noqa: E731
    assert iso(ev_on) > iso(ev_off) + 2, (iso(ev_on), iso(ev_off))
    # Calibration inputs can be given (CLI: --calibration); --smooth off is honoured.
    npz = tmp_path / "cal.npz"
    np.savez(npz, x=(np.random.default_rng(1).standard_normal((2, 16, 64))).astype(np.float32))
    src = tmp_path / "m.onnx"
    onnx.save_model(m, str(src))
    env = {**os.environ, "PYTHONPATH": PKG}
    for extra, inputs in [(["--calibration", str(npz)], 5), (["--smooth", "off"], 4)]:
        out = tmp_path / "q.onnx"
        r = subprocess.run([sys.executable, "-m", "dynq.onnx", "quantize", str(src), str(out), *extra], cwd=PKG, capture_output=True, text=True, env=env)
        assert r.returncode == 0, r.stderr
        q = onnx.load(str(out))
        assert len(next(n for n in q.graph.node if n.name == "fc1").input) == inputs, extra


def test_smoothing_needs_enough_calibration_rows():
    """Fitted on a few rows and judged on a few others, a smoothing "gain" is noise: with fewer
    than 32 calibration rows a layer is not smoothed, and the report says how many were left
    that way. Inputs generated for a model whose input is one row per sample ([batch, K]) give
    256 rows, not 2."""
    from dynq.onnx.smooth import MIN_ROWS, _calibration_batch

    m = ln_outlier_model()
    few = [{"x": np.random.default_rng(1).standard_normal((1, MIN_ROWS - 1, 64)).astype(np.float32)}]
    q, rep = quantize_model(m, calibration_inputs=few)
    assert all(r.smooth_alpha is None for r in rep.converted) and rep.smooth_few_rows == len(rep.converted) > 0
    assert f"activation smoothing not tried on {len(rep.converted)} layers: fewer than {MIN_ROWS} calibration rows" in rep.summary()
    enough = [{"x": np.random.default_rng(1).standard_normal((1, MIN_ROWS, 64)).astype(np.float32)}]
    _, rep2 = quantize_model(m, calibration_inputs=enough)
    assert rep2.smooth_few_rows == 0 and any(r.smooth_alpha is not None for r in rep2.converted)
    feats = lambda *dims: model([], [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(dims))], [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(dims))])  # noqa: E731
    assert _calibration_batch(feats("b", 40)) == 256
    assert _calibration_batch(feats("b", "s", 40)) == 2
    assert _calibration_batch(feats("b", 3, 224, 224)) == 2
    assert _calibration_batch(feats("b", 16, 40)) == 16
    ids = model([], [helper.make_tensor_value_info("ids", TensorProto.INT64, ["b", "s"])], [helper.make_tensor_value_info("ids", TensorProto.INT64, ["b", "s"])])
    assert _calibration_batch(ids) == 2


def test_smoothing_skipped_with_a_note_when_the_model_cannot_run():
    m = ln_outlier_model()
    q, rep = quantize_model(m, calibration_inputs=[{"not_an_input": np.zeros(3, np.float32)}])
    assert rep.smooth_note and "could not be run" in rep.smooth_note, rep.smooth_note
    assert "activation smoothing not applied" in rep.summary()
    assert all(r.smooth_alpha is None for r in rep.converted) and len(rep.converted) == 2
    x = np.ones((1, 4, 64), np.float32)
    assert session(q).run(None, {"x": x})[0].shape == (1, 4, 64)


def test_smoothing_on_a_float16_model():
    """The calibration run fetches float16 activations as float16 (their inferred type)."""
    m = ln_outlier_model()
    for t in m.graph.initializer:
        t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float16), t.name))
    m.graph.input[0].type.tensor_type.elem_type = TensorProto.FLOAT16
    m.graph.output[0].type.tensor_type.elem_type = TensorProto.FLOAT16
    q, rep = quantize_model(m)
    assert rep.smooth_note is None, rep.smooth_note
    assert sum(r.smooth_alpha is not None for r in rep.converted) >= 1, rep.summary()
    skip_without_f16_op()
    x = np.random.default_rng(3).standard_normal((2, 10, 64)).astype(np.float16)
    ref = session(m, custom=False).run(None, {"x": x})[0].astype(np.float64)
    off, _ = quantize_model(m, QuantizeOptions(smooth="off"))
    err = lambda qm: np.linalg.norm(session(qm).run(None, {"x": x})[0].astype(np.float64) - ref) / np.linalg.norm(ref)  # noqa: E731
    assert err(q) < err(off), (err(q), err(off))


def test_smoothing_option_errors(tmp_path):
    with pytest.raises(ValueError, match="smooth must be one of"):
        quantize_model(ln_outlier_model(), QuantizeOptions(smooth="always"))
    src = tmp_path / "m.onnx"
    onnx.save_model(ln_outlier_model(), str(src))
    r = subprocess.run(
        [sys.executable, "-m", "dynq.onnx", "quantize", str(src), str(tmp_path / "q.onnx"), "--calibration", str(tmp_path / "missing.npz")],
        cwd=PKG, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": PKG},
    )
    assert r.returncode == 2 and "error:" in r.stderr and "missing.npz" in r.stderr, r.stderr


def _vi(name, shape, elem=TensorProto.FLOAT):
    return helper.make_tensor_value_info(name, elem, shape)


def test_outer_tensor_read_in_a_nested_subgraph_is_not_fused_away():
    """A MatMul output read by an If nested in a Loop body (outer scope, two levels down): the
    bias Add after it must not be folded, or the subgraph would read a tensor that is gone."""
    k, n = 16, 12
    then = helper.make_graph([helper.make_node("Add", ["h", "x_in"], ["t"])], "then", [], [_vi("t", [2, 5, n])])
    els = helper.make_graph([helper.make_node("Sub", ["h", "x_in"], ["e"])], "else", [], [_vi("e", [2, 5, n])])
    body = helper.make_graph(
        [helper.make_node("If", ["c_in"], ["x_out"], then_branch=then, else_branch=els), helper.make_node("Not", ["c_in"], ["c_out"])],
        "body",
        [_vi("i", [], TensorProto.INT64), _vi("c_in", [], TensorProto.BOOL), _vi("x_in", [2, 5, n])],
        [_vi("c_out", [], TensorProto.BOOL), _vi("x_out", [2, 5, n])],
    )
    m = model(
        [
            helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"),
            helper.make_node("Add", ["h", "b"], ["hb"], name="mm_bias"),
            helper.make_node("Loop", ["trip", "cond", "hb"], ["y"], name="loop", body=body),
        ],
        [_vi("x", [2, 5, k]), _vi("trip", [], TensorProto.INT64), _vi("cond", [], TensorProto.BOOL)],
        [_vi("y", [2, 5, n])],
        [numpy_helper.from_array(f32(k, n), "w"), numpy_helper.from_array(f32(n), "b")],
    )
    q, rep = quantize_model(m, QuantizeOptions(smooth="off"))
    assert [r.name for r in rep.converted] == ["mm"] and not rep.converted[0].bias
    assert any(x.name == "mm_bias" for x in q.graph.node)
    onnx.checker.check_model(q)
    f = {"x": f32(2, 5, k, scale=1.0), "trip": np.array(3, np.int64), "cond": np.array(True)}
    assert cosine(session(m, custom=False).run(None, f)[0], session(q).run(None, f)[0]) > 0.999


def merged_decoder_like(k=32, n=48):
    """What a merged decoder export looks like: the whole network in both branches of an If
    (with and without a cache), the weights outer initializers that both read; here each branch
    is MatMul + bias + Relu -> MatMul, the second weight read through an Identity in one branch,
    the else branch adding an outer tensor computed before the If."""
    def branch(name, extra):
        nodes = [
            helper.make_node("MatMul", ["x", "w1"], [f"{name}_h"], name=f"{name}_fc1"),
            helper.make_node("Add", [f"{name}_h", "b1"], [f"{name}_hb"], name=f"{name}_bias"),
            helper.make_node("Relu", [f"{name}_hb"], [f"{name}_r"], name=f"{name}_relu"),
        ]
        w2 = "w2"
        if extra:
            nodes.append(helper.make_node("Identity", ["w2"], [f"{name}_w2"], name=f"{name}_id"))
            w2 = f"{name}_w2"
        nodes.append(helper.make_node("MatMul", [f"{name}_r", w2], [f"{name}_y0"], name=f"{name}_fc2"))
        out = f"{name}_y0"
        if extra:
            nodes.append(helper.make_node("Add", [out, "x2"], [f"{name}_y"], name=f"{name}_plus"))
            out = f"{name}_y"
        return helper.make_graph(nodes, name, [], [_vi(out, ["b", k])])

    inits = [numpy_helper.from_array(f32(k, n), "w1"), numpy_helper.from_array(f32(n), "b1"), numpy_helper.from_array(f32(n, k), "w2")]
    nodes = [
        helper.make_node("Mul", ["x", "x"], ["x2"], name="square"),
        helper.make_node("If", ["use_cache"], ["y"], name="branches", then_branch=branch("with_cache", False), else_branch=branch("no_cache", True)),
    ]
    return model(nodes, [_vi("x", ["b", k]), _vi("use_cache", [], TensorProto.BOOL)], [_vi("y", ["b", k])], inits)


def test_evaluator_measures_a_folded_layer_against_its_own_output():
    """A float16 layer whose output is small beside its residual: `(r + p) - r` in float16 keeps
    none of `p`, so the evaluator measures the layer alone against the float model's tensor
    before the residual Add instead (it exists there): the layer's figure is then its own."""
    skip_without_f16_op()
    d = 32
    inits = [numpy_helper.from_array((0.02 * np.random.default_rng(3).standard_normal((d, d))).astype(np.float16), "w"),
             numpy_helper.from_array(np.array(1000, np.float16), "big")]
    nodes = [helper.make_node("MatMul", ["x", "w"], ["p"], name="fc"), helper.make_node("Mul", ["x", "big"], ["r"], name="scale"),
             helper.make_node("Add", ["p", "r"], ["y"], name="res")]
    vi = lambda n: helper.make_tensor_value_info(n, TensorProto.FLOAT16, ["b", d])  # noqa: E731
    m = model(nodes, [vi("x")], [vi("y")], inits)
    q, rep = quantize_model(m, QuantizeOptions(smooth="off"))
    assert rep.converted[0].residual == "r"
    x = np.random.default_rng(4).standard_normal((8, d)).astype(np.float16)
    ev = evaluate(m, q, [{"x": x}])
    assert ev.layers[0]["isolated_cosine"] > 0.999, ev.table()


def test_layers_inside_if_branches_are_converted_and_share_weights():
    """Both branches' layers are converted (bias and ReLU folded), their int8 weights stored once
    in the outer graph, the fp32 weights gone; each branch computes what the float model does,
    and the report says smoothing was not tried inside."""
    m = merged_decoder_like()
    q, rep = quantize_model(m)
    onnx.checker.check_model(q)
    assert sorted(r.name for r in rep.converted) == ["no_cache_fc1", "no_cache_fc2", "with_cache_fc1", "with_cache_fc2"]
    assert all(r.activation == "relu" and r.bias for r in rep.converted if r.name.endswith("fc1"))
    assert {t.name for t in q.graph.initializer}.isdisjoint({"w1", "b1", "w2"})
    assert sum(t.data_type == TensorProto.INT8 for t in q.graph.initializer) == 2  # one per weight
    for br in (q.graph.node[-1].attribute[0].g, q.graph.node[-1].attribute[1].g):
        assert [n.op_type for n in br.node if n.op_type in ("MatMul", "Relu")] == [] and len(br.initializer) == 0
    assert "not for the layers inside subgraphs" in rep.summary()
    # Branches whose nodes have the same names but different weights: the new names differ.
    m2 = merged_decoder_like()
    els = next(a.g for a in m2.graph.node[-1].attribute if a.name == "else_branch")
    for n in els.node:
        n.name = n.name.replace("no_cache", "with_cache")
    m2.graph.initializer.append(numpy_helper.from_array(f32(32, 48), "w1b"))
    for n in els.node:
        n.input[:] = ["w1b" if i == "w1" else i for i in n.input]
    q2, rep2 = quantize_model(m2, QuantizeOptions(smooth="off"))
    onnx.checker.check_model(q2)
    names = [t.name for t in q2.graph.initializer]
    assert len(names) == len(set(names)) and sum(t.data_type == TensorProto.INT8 for t in q2.graph.initializer) == 3
    for c in (True, False):
        f = {"x": f32(3, 32, scale=1.0), "use_cache": np.array(c)}
        assert cosine(session(m2, custom=False).run(None, f)[0], session(q2).run(None, f)[0]) > 0.999, c
    # A weight that is also a graph input (a default the caller may override) is not a constant.
    m3 = merged_decoder_like()
    m3.graph.input.append(_vi("w2", [48, 32]))
    _, rep3 = quantize_model(m3, QuantizeOptions(smooth="off"))
    assert sorted(r.name for r in rep3.converted) == ["no_cache_fc1", "with_cache_fc1"]
    assert rep.fp32_weight_bytes == 2 * 32 * 48 * 4
    x = f32(3, 32, scale=1.0)
    for c in (True, False):
        f = {"x": x, "use_cache": np.array(c)}
        assert cosine(session(m, custom=False).run(None, f)[0], session(q).run(None, f)[0]) > 0.999, c


def loop_model(k, body_nodes):
    """x ([b, k]) -> Loop(trip, cond) whose body turns the state s_in into s_out with
    `body_nodes` (the condition passed on as it is); the weight "w" ([k, k]) an outer
    initializer."""
    body = helper.make_graph(
        body_nodes + [helper.make_node("Identity", ["c_in"], ["c_out"], name="c")],
        "body",
        [_vi("i", [], TensorProto.INT64), _vi("c_in", [], TensorProto.BOOL), _vi("s_in", ["b", k])],
        [_vi("c_out", [], TensorProto.BOOL), _vi("s_out", ["b", k])],
    )
    return model([helper.make_node("Loop", ["trip", "cond", "x"], ["y"], name="loop", body=body)],
                 [_vi("x", ["b", k]), _vi("trip", [], TensorProto.INT64), _vi("cond", [], TensorProto.BOOL)], [_vi("y", ["b", k])],
                 [numpy_helper.from_array(f32(k, k, scale=0.3), "w")])


def test_layers_inside_a_loop_body_are_converted():
    """A Loop body whose layer reads an outer weight and its carried state: converted, and the
    loop still computes the float model's result."""
    k = 16
    m = loop_model(k, [helper.make_node("MatMul", ["s_in", "w"], ["h"], name="body_fc"), helper.make_node("Tanh", ["h"], ["s_out"], name="t")])
    q, rep = quantize_model(m, QuantizeOptions(smooth="off"))
    onnx.checker.check_model(q)
    assert [r.name for r in rep.converted] == ["body_fc"] and not any(t.name == "w" for t in q.graph.initializer)
    f = {"x": f32(2, k, scale=1.0), "trip": np.array(4, np.int64), "cond": np.array(True)}
    assert cosine(session(m, custom=False).run(None, f)[0], session(q).run(None, f)[0]) > 0.999


def test_layers_in_an_if_inside_a_loop_body_are_converted():
    """Two levels down (an If in a Loop body), reading an outer weight and the loop's state:
    converted, the int8 weight in the top graph, and the same result as the float model; a body
    that reads an outer tensor of unknown type is left alone, with the reason reported."""
    k = 16
    then = helper.make_graph([helper.make_node("MatMul", ["s_in", "w"], ["t"], name="inner_fc")], "then", [], [_vi("t", ["b", k])])
    els = helper.make_graph([helper.make_node("Neg", ["s_in"], ["e"], name="neg")], "else", [], [_vi("e", ["b", k])])
    m = loop_model(k, [helper.make_node("If", ["c_in"], ["s_out"], name="pick", then_branch=then, else_branch=els)])
    q, rep = quantize_model(m, QuantizeOptions(smooth="off"))
    onnx.checker.check_model(q)
    assert [r.name for r in rep.converted] == ["inner_fc"]
    assert [t.data_type for t in q.graph.initializer if t.name.endswith("W_int8")] == [TensorProto.INT8]
    for c in (True, False):
        f = {"x": f32(2, k, scale=1.0), "trip": np.array(3, np.int64), "cond": np.array(c)}
        assert cosine(session(m, custom=False).run(None, f)[0], session(q).run(None, f)[0]) > 0.999
    # An outer tensor whose type nothing declares or infers (the output of an op shape inference
    # does not know): the body is skipped with the reason.
    m2 = model([helper.make_node("Unknown", ["x"], ["u"], name="mystery", domain="custom.domain"),
                helper.make_node("If", ["cond"], ["y"], name="br", then_branch=helper.make_graph([helper.make_node("MatMul", ["u", "w"], ["t"], name="fc")], "t", [], [_vi("t", ["b", k])]),
                                 else_branch=helper.make_graph([helper.make_node("Identity", ["u"], ["e"], name="id")], "e", [], [_vi("e", ["b", k])]))],
               [_vi("x", ["b", k]), _vi("cond", [], TensorProto.BOOL)], [_vi("y", ["b", k])], [numpy_helper.from_array(f32(k, k), "w")])
    q2, rep2 = quantize_model(m2, QuantizeOptions(smooth="off"))
    assert not rep2.converted and any("unknown type (u)" in why for _, _, why in rep2.skipped), rep2.skipped


def test_new_initializer_names_do_not_shadow_subgraph_names():
    """Tensors defined inside If branches named like the converter's new initializers: the new
    names must differ (ONNX allows one definition of a name across scopes)."""
    k, n = 16, 12
    then = helper.make_graph([helper.make_node("Neg", ["x"], ["mm_W_int8"]), helper.make_node("Relu", ["mm_W_int8"], ["t"])], "then", [], [_vi("t", [3, k])])
    els = helper.make_graph([helper.make_node("Identity", ["x"], ["mm_W_scale"])], "else", [], [_vi("mm_W_scale", [3, k])])
    m = model(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="mm"), helper.make_node("If", ["c"], ["z"], then_branch=then, else_branch=els)],
        [_vi("x", [3, k]), _vi("c", [], TensorProto.BOOL)],
        [_vi("y", [3, n]), _vi("z", [3, k])],
        [numpy_helper.from_array(f32(k, n), "w")],
    )
    q, rep = quantize_model(m, QuantizeOptions(smooth="off"))
    assert [r.name for r in rep.converted] == ["mm"]
    dq = next(x for x in q.graph.node if x.op_type == "DynQMatMul")
    assert not {"mm_W_int8", "mm_W_scale"} & set(dq.input), dq.input
    onnx.checker.check_model(q)
    for c in (True, False):
        f = {"x": f32(3, k, scale=1.0), "c": np.array(c)}
        ref, got = session(m, custom=False).run(None, f), session(q).run(None, f)
        assert cosine(ref[0], got[0]) > 0.999 and np.array_equal(ref[1], got[1])


@pytest.mark.parametrize("reader", ["graph_output", "other_node"])
def test_gelu_pattern_with_a_shared_intermediate_is_not_fused(reader):
    """PyTorch's erf GELU whose `1 + erf(.)` tensor is also a graph output or read by another
    node: fusing it would delete that tensor, so the GELU stays as it is."""
    k, n = 16, 12
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"),
        helper.make_node("Div", ["h", "sqrt2"], ["d"]),
        helper.make_node("Erf", ["d"], ["e"]),
        helper.make_node("Add", ["e", "one"], ["a"], name="g_add"),
        helper.make_node("Mul", ["h", "a"], ["m1"]),
        helper.make_node("Mul", ["m1", "half"], ["y"]),
    ]
    outputs = [_vi("y", [4, n]), _vi("a", [4, n])]
    if reader == "other_node":
        nodes.append(helper.make_node("Neg", ["a"], ["z"]))
        outputs[1] = _vi("z", [4, n])
    inits = [
        numpy_helper.from_array(f32(k, n), "w"),
        numpy_helper.from_array(np.array(2**0.5, np.float32), "sqrt2"),
        numpy_helper.from_array(np.array(1.0, np.float32), "one"),
        numpy_helper.from_array(np.array(0.5, np.float32), "half"),
    ]
    m = model(nodes, [_vi("x", [4, k])], outputs, inits)
    q, rep = quantize_model(m, QuantizeOptions(smooth="off"))
    assert [(r.name, r.activation) for r in rep.converted] == [("mm", "none")]
    assert any(x.name == "g_add" for x in q.graph.node)
    onnx.checker.check_model(q)
    f = {"x": f32(4, k, scale=1.0)}
    for r, o in zip(session(m, custom=False).run(None, f), session(q).run(None, f)):
        assert cosine(r, o) > 0.999


def test_shared_weight_is_stored_once():
    """One weight read by two MatMuls: one int8 copy (and one scale vector) in the output, and
    the float bytes counted once; the float weight stays while a non-MatMul node reads it."""
    k, n = 64, 48
    w = f32(k, n)
    m = model(
        [
            helper.make_node("MatMul", ["x", "w"], ["h1"], name="mm1"),
            helper.make_node("Relu", ["x"], ["x2"]),
            helper.make_node("MatMul", ["x2", "w"], ["h2"], name="mm2"),
            helper.make_node("Add", ["h1", "h2"], ["y"]),
            helper.make_node("ReduceSum", ["w"], ["wsum"], keepdims=0),
        ],
        [_vi("x", [5, k])],
        [_vi("y", [5, n]), _vi("wsum", [])],
        [numpy_helper.from_array(w, "w")],
    )
    q, rep = quantize_model(m, QuantizeOptions(smooth="off"))
    dq = [x for x in q.graph.node if x.op_type == "DynQMatMul"]
    assert len(dq) == 2 and dq[0].input[1:3] == dq[1].input[1:3]
    int8 = [t for t in q.graph.initializer if t.data_type == TensorProto.INT8]
    assert len(int8) == 1
    assert "w" in {t.name for t in q.graph.initializer}  # still read by ReduceSum
    assert rep.fp32_weight_bytes == 4 * k * n and rep.int8_weight_bytes == k * n + 4 * n
    onnx.checker.check_model(q)
    f = {"x": f32(5, k, scale=1.0)}
    ref, got = session(m, custom=False).run(None, f), session(q).run(None, f)
    assert cosine(ref[0], got[0]) > 0.999 and np.array_equal(ref[1], got[1])


def test_overridable_weight_initializer_is_left_alone():
    """A weight initializer also listed as a graph input (IR >= 4) can be fed at run time: it is
    not a constant, so the MatMul is kept (and the report says why)."""
    k, n = 16, 12
    m = model(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")],
        [_vi("x", [3, k]), _vi("w", [k, n])],
        [_vi("y", [3, n])],
        [numpy_helper.from_array(f32(k, n), "w")],
    )
    q, rep = quantize_model(m, QuantizeOptions(smooth="off"))
    assert not rep.converted and rep.skipped[0][0] == "mm" and "graph input" in rep.skipped[0][2]
    x, w2 = f32(3, k, scale=1.0), f32(k, n)
    np.testing.assert_array_equal(session(q).run(None, {"x": x, "w": w2})[0], session(m, custom=False).run(None, {"x": x, "w": w2})[0])


def residual_block(d=32, x_dims=("b", "s")):
    """x -> fc1 (+bias) -> Add x -> LayerNorm -> y1 -> fc2 (+bias, Relu) -> Add z, where z = 2 * y1
    is computed after fc2 in node order -> fc3 (+bias) -> Add pos (a [s, d] constant: broadcast)."""
    inits = [numpy_helper.from_array(f32(d, d), w) for w in ("w1", "w2", "w3")]
    inits += [numpy_helper.from_array(f32(d), b) for b in ("b1", "b2", "b3")]
    inits += [
        numpy_helper.from_array(np.ones(d, np.float32), "ln_s"),
        numpy_helper.from_array(np.zeros(d, np.float32), "ln_b"),
        numpy_helper.from_array(np.array(2.0, np.float32), "two"),
        numpy_helper.from_array(f32(5, d), "pos"),
    ]
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h1"], name="fc1"),
        helper.make_node("Add", ["h1", "b1"], ["h1b"], name="fc1_bias"),
        helper.make_node("Add", ["h1b", "x"], ["r1"], name="res1"),
        helper.make_node("LayerNormalization", ["r1", "ln_s", "ln_b"], ["y1"], name="ln", axis=-1),
        helper.make_node("MatMul", ["y1", "w2"], ["h2"], name="fc2"),
        helper.make_node("Mul", ["y1", "two"], ["z"], name="late_residual"),
        helper.make_node("Add", ["h2", "b2"], ["h2b"], name="fc2_bias"),
        helper.make_node("Relu", ["h2b"], ["g2"], name="relu2"),
        helper.make_node("Add", ["z", "g2"], ["r2"], name="res2"),
        helper.make_node("MatMul", ["r2", "w3"], ["h3"], name="fc3"),
        helper.make_node("Add", ["h3", "b3"], ["h3b"], name="fc3_bias"),
        helper.make_node("Add", ["h3b", "pos"], ["out"], name="add_pos"),
    ]
    return model(nodes, [_vi("x", [*x_dims, d])], [_vi("out", [*x_dims, d])], inits)


def decomposed_ln_block(opset, d=32, beta=True, pow_exp=2.0):
    """x -> MatMul + bias -> Add x -> LayerNorm as PyTorch exports it below opset 17 (ReduceMean,
    Sub, Pow, ReduceMean, Add eps, Sqrt, Div, Mul, Add) -> y; ReduceMean's axes as the
    attribute, or from opset 18 as an input."""
    r = np.random.default_rng(12)
    inits = [numpy_helper.from_array(f32(d, d), "w"), numpy_helper.from_array(f32(d), "b"),
             numpy_helper.from_array((1 + 0.1 * r.standard_normal(d)).astype(np.float32), "g"),
             numpy_helper.from_array((0.1 * r.standard_normal(d)).astype(np.float32), "be"),
             numpy_helper.from_array(np.array(pow_exp, np.float32), "two"), numpy_helper.from_array(np.array(1e-5, np.float32), "eps"),
             numpy_helper.from_array(np.array([-1], np.int64), "axes")]

    def mean(i, o):
        if opset >= 18:
            return helper.make_node("ReduceMean", [i, "axes"], [o], keepdims=1)
        return helper.make_node("ReduceMean", [i], [o], axes=[-1], keepdims=1)

    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["h"], name="fc"),
        helper.make_node("Add", ["h", "b"], ["hb"]),
        helper.make_node("Add", ["hb", "x"], ["r"]),
        mean("r", "m"),
        helper.make_node("Sub", ["r", "m"], ["dlt"]),
        helper.make_node("Pow", ["dlt", "two"], ["sq"]),
        mean("sq", "var"),
        helper.make_node("Add", ["var", "eps"], ["ve"]),
        helper.make_node("Sqrt", ["ve"], ["sd"]),
        helper.make_node("Div", ["dlt", "sd"], ["nrm"]),
        helper.make_node("Mul", ["nrm", "g"], ["y" if not beta else "yg"]),
    ] + ([helper.make_node("Add", ["yg", "be"], ["y"])] if beta else [])
    g = helper.make_graph(nodes, "g", [_vi("x", ["b", "s", d])], [_vi("y", ["b", "s", d])], inits)
    opsets = [helper.make_opsetid("", opset), helper.make_opsetid("dynq", 1)]
    return helper.make_model(g, opset_imports=opsets, ir_version=8 if opset < 19 else 9)


def test_layer_norm_exported_below_opset_17_is_folded():
    """The layer norm nodes that PyTorch writes below opset 17 fold like LayerNormalization after a
    residual (axes as the attribute or as an input, with or without the bias Add); the result
    agrees with the float model's, and the evaluator measures the layer against the normalized
    sum. A Pow other than 2 is not a layer norm and stays."""
    x = f32(2, 7, 32, scale=1.0)
    for opset, beta in ((13, True), (13, False), (18, True)):
        m = decomposed_ln_block(opset, beta=beta)
        q, rep = quantize_model(m, QuantizeOptions(smooth="off"))
        onnx.checker.check_model(q)
        assert [n.op_type for n in q.graph.node] == ["DynQMatMul"] and rep.converted[0].layer_norm, (opset, beta)
        want = session(m, custom=False).run(None, {"x": x})[0]
        assert cosine(session(q).run(None, {"x": x})[0], want) > 0.999
        ev = evaluate(m, q, [{"x": x}])
        assert ev.layers[0]["isolated_cosine"] > 0.999, ev.table()
    q, rep = quantize_model(decomposed_ln_block(13, pow_exp=3.0), QuantizeOptions(smooth="off"))
    assert "Sqrt" in [n.op_type for n in q.graph.node] and not rep.converted[0].layer_norm


def test_residual_add_is_folded_only_when_shapes_match():
    """The skip-connection Add after a layer (after its bias and activation) becomes the op's
    residual input when shape inference proves both operands have one shape: the result is bit
    for bit that of the unfolded model (one f32 addition either way). The node moves to the
    Add's place, so a residual computed after the MatMul is still defined before use. A
    broadcasting Add and operands of unknown shape are left alone."""
    m = residual_block()
    # The LayerNormalization after res1 stays a node of its own here (folding it is tested below).
    q, rep = quantize_model(m, QuantizeOptions(smooth="off", fuse_layer_norm=False))
    q0, rep0 = quantize_model(m, QuantizeOptions(smooth="off", fuse_residual=False))
    onnx.checker.check_model(q)
    got = {r.name: r.residual for r in rep.converted}
    assert got == {"fc1": "x", "fc2": "z", "fc3": None}, got
    assert all(r.residual is None for r in rep0.converted)
    assert "residual Adds folded: 2" in rep.summary()
    names = [n.name for n in q.graph.node]
    assert "res1" not in names and "res2" not in names and "add_pos" in names, names
    assert names.index("late_residual") < names.index("fc2"), names
    fc2 = next(n for n in q.graph.node if n.name == "fc2")
    assert len(fc2.input) == 6 and fc2.input[5] == "z" and fc2.output[0] == "r2"
    f = {"x": f32(3, 5, 32, scale=1.0)}
    import onnxruntime as ort

    def plain(mm):
        # No graph optimizations: ONNX Runtime would fuse the unfolded Add with the LayerNorm
        # (SkipLayerNormalization), which rounds differently.
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        so.register_custom_ops_library(dynq.library_path())
        return ort.InferenceSession(mm.SerializeToString(), so, providers=["CPUExecutionProvider"])

    np.testing.assert_array_equal(plain(q).run(None, f)[0], plain(q0).run(None, f)[0])
    assert cosine(session(m, custom=False).run(None, f)[0], session(q).run(None, f)[0]) > 0.999
    # Input dimensions without a value or a name: fc1's output and x cannot be proven to have
    # one shape, so res1 stays. fc2's output and z both derive from y1, whose unknown dimensions
    # shape inference names once (unk__N): those are proven equal and folded.
    m2 = residual_block(x_dims=(None, None))
    q2, rep2 = quantize_model(m2, QuantizeOptions(smooth="off", fuse_layer_norm=False))
    got2 = {r.name: r.residual for r in rep2.converted}
    assert got2 == {"fc1": None, "fc2": "z", "fc3": None}, got2
    q20, _ = quantize_model(m2, QuantizeOptions(smooth="off", fuse_residual=False))
    np.testing.assert_array_equal(plain(q2).run(None, f)[0], plain(q20).run(None, f)[0])
    opts = QuantizeOptions(smooth="off", fuse_residual=False)
    assert QuantizeOptions.from_json(opts.to_json()).fuse_residual is False


def test_layer_norm_after_the_residual_is_folded():
    """A LayerNormalization over the last axis that alone reads a folded residual Add becomes the
    op's layer norm (inputs 7 and 8, attribute ln_epsilon): the node then outputs the normalized
    tensor, which agrees with the unfolded model's to float rounding; the end result keeps its
    accuracy. Left alone: a normalization over another axis, one computed in another precision
    (stash_type 0), one whose mean output is used, one whose sum has another reader (pre-LN
    blocks), one whose scale is not a constant, and every one with fuse_layer_norm=False."""
    import onnxruntime as ort

    def with_output(mm, name):
        mm = onnx.ModelProto.FromString(mm.SerializeToString())
        mm.graph.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, ["b", "s", 32]))
        return mm

    m = with_output(residual_block(), "y1")
    q, rep = quantize_model(m, QuantizeOptions(smooth="off"))
    q0, _ = quantize_model(m, QuantizeOptions(smooth="off", fuse_layer_norm=False))
    onnx.checker.check_model(q)
    assert {r.name: r.layer_norm for r in rep.converted} == {"fc1": True, "fc2": False, "fc3": False}
    assert "layer norms folded: 1" in rep.summary()
    assert "ln" not in [n.name for n in q.graph.node]
    fc1 = next(n for n in q.graph.node if n.name == "fc1")
    assert len(fc1.input) == 8 and fc1.output[0] == "y1", fc1
    assert [a.name for a in fc1.attribute if a.name == "ln_epsilon"] == ["ln_epsilon"]
    f = {"x": f32(3, 5, 32, scale=1.0)}
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.register_custom_ops_library(dynq.library_path())
    run = lambda mm: ort.InferenceSession(mm.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(["y1", "out"], f)
    (y1, out), (y10, _) = run(q), run(q0)
    np.testing.assert_allclose(y1, y10, rtol=1e-5, atol=1e-5)
    assert cosine(session(m, custom=False).run(["out"], f)[0], out) > 0.999

    def variant(**change):
        mm = residual_block()
        ln = next(n for n in mm.graph.node if n.name == "ln")
        if "attrs" in change:
            for k, v in change["attrs"].items():
                for a in [a for a in ln.attribute if a.name == k]:
                    ln.attribute.remove(a)
                ln.attribute.append(helper.make_attribute(k, v))
        if change.get("mean_used"):
            ln.output.append("ln_mean")
            mm.graph.output.append(helper.make_tensor_value_info("ln_mean", TensorProto.FLOAT, None))
        if change.get("second_reader"):
            mm.graph.node.append(helper.make_node("Identity", ["r1"], ["r1_copy"], name="reader"))
            mm.graph.output.append(helper.make_tensor_value_info("r1_copy", TensorProto.FLOAT, None))
        if change.get("scale_input"):
            mm.graph.initializer.remove(next(t for t in mm.graph.initializer if t.name == "ln_s"))
            mm.graph.input.append(helper.make_tensor_value_info("ln_s", TensorProto.FLOAT, [32]))
        return mm

    for what, mm in [
        ("axis 1", variant(attrs={"axis": 1})),
        ("stash_type 0", variant(attrs={"stash_type": 0})),
        ("mean used", variant(mean_used=True)),
        ("sum read elsewhere", variant(second_reader=True)),
        ("scale not constant", variant(scale_input=True)),
    ]:
        qq, rr = quantize_model(mm, QuantizeOptions(smooth="off"))
        assert not any(r.layer_norm for r in rr.converted), what
        assert "ln" in [n.name for n in qq.graph.node], what
    _, r0 = quantize_model(m, QuantizeOptions(smooth="off", fuse_layer_norm=False))
    assert not any(r.layer_norm for r in r0.converted)
    assert QuantizeOptions.from_json(QuantizeOptions(fuse_layer_norm=False).to_json()).fuse_layer_norm is False


def attention_output_model(perm=(0, 2, 1, 3), extra_reader=False, h=4, d=8, n=24):
    """ctx [b, h, s, d] -> Transpose(perm) -> Reshape [0, 0, h * d] -> MatMul + bias: how
    attention joins its heads before the output projection."""
    r = np.random.default_rng(11)
    k = h * d
    inits = [
        numpy_helper.from_array((0.2 * r.standard_normal((k, n))).astype(np.float32), "w"),
        numpy_helper.from_array((0.1 * r.standard_normal(n)).astype(np.float32), "b"),
        numpy_helper.from_array(np.array([0, 0, k], np.int64), "shape"),
    ]
    nodes = [
        helper.make_node("Transpose", ["ctx"], ["ctx_t"], name="tr", perm=list(perm)),
        helper.make_node("Reshape", ["ctx_t", "shape"], ["x"], name="rs"),
        helper.make_node("MatMul", ["x", "w"], ["h"], name="dense"),
        helper.make_node("Add", ["h", "b"], ["y"], name="dense_bias"),
    ]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", "s", n])]
    if extra_reader:
        nodes.append(helper.make_node("Identity", ["x"], ["x_copy"], name="reader"))
        outputs.append(helper.make_tensor_value_info("x_copy", TensorProto.FLOAT, ["b", "s", k]))
    return model(nodes, [helper.make_tensor_value_info("ctx", TensorProto.FLOAT, ["b", h, "s", d])], outputs, inits)


def test_layer_reading_heads_keeps_its_split_to_heads():
    """A layer whose input is the joined heads and whose output is split into heads again: the
    op reads one or writes the other in the head layout, not both (it refuses a_layout =
    "heads" with `heads`), so the input side is folded and the Reshape + Transpose after it
    stay. The converted model ran into that refusal at its first call before (found by
    test_convert_random.py)."""
    m = attention_output_model()
    g = m.graph
    g.initializer.append(numpy_helper.from_array(np.array([0, 0, 4, 6], np.int64), "split_shape"))
    g.node.extend([
        helper.make_node("Reshape", ["y", "split_shape"], ["y4"], name="split_rs"),
        helper.make_node("Transpose", ["y4"], ["y_heads"], name="split_tr", perm=[0, 2, 1, 3]),
    ])
    del g.output[:]
    g.output.append(helper.make_tensor_value_info("y_heads", TensorProto.FLOAT, ["b", 4, "s", 6]))
    q, rep = quantize_model(m, QuantizeOptions(smooth="off"))
    onnx.checker.check_model(q)
    assert rep.converted[0].a_heads and rep.converted[0].heads == 0
    assert [n.op_type for n in q.graph.node] == ["DynQMatMul", "Reshape", "Transpose"]
    ctx = np.random.default_rng(5).standard_normal((2, 4, 9, 8)).astype(np.float32)
    got, want = session(q).run(None, {"ctx": ctx})[0], session(m, custom=False).run(None, {"ctx": ctx})[0]
    assert got.shape == want.shape == (2, 4, 9, 6) and cosine(got, want) > 0.999


def test_attention_context_is_read_in_its_head_layout():
    """The Transpose(perm=[0, 2, 1, 3]) + Reshape that join the heads before the output
    projection fold into the layer (a_layout = "heads"): the node reads the context directly,
    the two nodes are gone, and the result is bit for bit the unfolded conversion's; evaluate
    measures the layer in isolation. Another permutation, or a reshaped context that other
    nodes read too, are left alone; so is everything with fuse_heads=False."""
    m = attention_output_model()
    q, rep = quantize_model(m, QuantizeOptions(smooth="off"))
    q0, _ = quantize_model(m, QuantizeOptions(smooth="off", fuse_heads=False))
    onnx.checker.check_model(q)
    assert [n.op_type for n in q.graph.node] == ["DynQMatMul"] and rep.converted[0].a_heads
    node = q.graph.node[0]
    assert node.input[0] == "ctx" and any(a.name == "a_layout" and a.s == b"heads" for a in node.attribute)
    assert "attention contexts read in their head layout (Transpose + Reshape folded): 1" in rep.summary()
    ctx = np.random.default_rng(2).standard_normal((3, 4, 7, 8)).astype(np.float32)
    np.testing.assert_array_equal(session(q, 2).run(None, {"ctx": ctx})[0], session(q0).run(None, {"ctx": ctx})[0])
    ev = evaluate(m, q, [{"ctx": ctx}], per_layer=True)
    assert ev.layers and ev.layers[0]["isolated_cosine"] > 0.999, ev.table()
    for what, mm in [("perm 0,2,3,1", attention_output_model(perm=(0, 2, 3, 1), h=4, d=8)),
                     ("another reader", attention_output_model(extra_reader=True))]:
        qq, rr = quantize_model(mm, QuantizeOptions(smooth="off"))
        assert len(rr.converted) == 1 and not any(r.a_heads for r in rr.converted), what
        assert "tr" in [n.name for n in qq.graph.node], what


def test_residual_of_another_symbolic_shape_is_folded_and_broadcast_at_run_time():
    """A skip connection whose shape shape inference names differently from the layer's output
    (a PyTorch export names an attention block's batch size twice) is folded too: at run time
    the op takes the fused path when the shapes are equal and broadcasts as Add does otherwise;
    either way the bits of the unfolded model (one f32 addition)."""
    d = 32
    inits = [numpy_helper.from_array(f32(d, d), "w1"), numpy_helper.from_array(f32(d), "b1")]
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h1"], name="fc1"),
        helper.make_node("Add", ["h1", "b1"], ["h1b"], name="fc1_bias"),
        helper.make_node("Add", ["h1b", "r"], ["out"], name="res"),
    ]
    m = model(nodes, [_vi("x", ["b", "s", d]), _vi("r", ["rb", "s", d])], [_vi("out", None)], inits)
    q, rep = quantize_model(m, QuantizeOptions(smooth="off"))
    q0, _ = quantize_model(m, QuantizeOptions(smooth="off", fuse_residual=False))
    assert {r.name: r.residual for r in rep.converted} == {"fc1": "r"}
    assert "res" not in [n.name for n in q.graph.node]
    import onnxruntime as ort

    def plain(mm):
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        so.register_custom_ops_library(dynq.library_path())
        return ort.InferenceSession(mm.SerializeToString(), so, providers=["CPUExecutionProvider"])

    for x_b, r_b in [(3, 3), (3, 1), (1, 3)]:
        f = {"x": f32(x_b, 5, d, scale=1.0), "r": f32(r_b, 5, d, scale=1.0)}
        got, want = plain(q).run(None, f)[0], plain(q0).run(None, f)[0]
        assert got.shape == want.shape == (3, 5, d), (x_b, r_b, got.shape)
        np.testing.assert_array_equal(got, want)
    # Known sizes that cannot broadcast, or another rank: left alone.
    m2 = model(nodes, [_vi("x", [2, 5, d]), _vi("r", [3, 5, d])], [_vi("out", None)], inits)
    assert quantize_model(m2, QuantizeOptions(smooth="off"))[1].converted[0].residual is None
    m3 = model(nodes, [_vi("x", ["b", "s", d]), _vi("r", ["s", d])], [_vi("out", None)], inits)
    assert quantize_model(m3, QuantizeOptions(smooth="off"))[1].converted[0].residual is None


def shared_input_model(d=32):
    """q, k, v: three MatMuls (+bias) reading x; g: a fourth reading x, with a Relu (another
    activation); r: a fifth whose output gets a residual Add; then everything summed into one
    output (those Adds of same-shape tensors are folded as residuals too)."""
    inits = [numpy_helper.from_array(f32(d, n), f"w_{nm}") for nm, n in (("q", d), ("k", d), ("v", 24), ("g", d), ("r", d))]
    inits += [numpy_helper.from_array(f32(n), f"b_{nm}") for nm, n in (("q", d), ("k", d), ("v", 24), ("g", d), ("r", d))]
    inits += [numpy_helper.from_array(f32(24, d), "w_o")]
    nodes = []
    for nm in ("q", "k", "v", "g", "r"):
        nodes += [helper.make_node("MatMul", ["x", f"w_{nm}"], [f"{nm}_mm"], name=nm), helper.make_node("Add", [f"{nm}_mm", f"b_{nm}"], [nm + "_out"], name=nm + "_bias")]
    nodes += [
        helper.make_node("Relu", ["g_out"], ["g_act"], name="g_relu"),
        helper.make_node("Add", ["r_out", "x"], ["r_res"], name="r_residual"),
        helper.make_node("MatMul", ["v_out", "w_o"], ["vo"], name="o"),
        helper.make_node("Mul", ["q_out", "k_out"], ["qk"], name="qk"),
        helper.make_node("Add", ["qk", "vo"], ["s1"], name="s1"),
        helper.make_node("Add", ["s1", "g_act"], ["s2"], name="s2"),
        helper.make_node("Add", ["s2", "r_res"], ["y"], name="s3"),
    ]
    return model(nodes, [_vi("x", ["b", "s", d])], [_vi("y", ["b", "s", d])], inits)


def test_layers_reading_one_input_become_one_node(tmp_path):
    """MatMuls reading the same input (Q, K, V) become one node with one output per layer
    (`split`), placed before every reader; each output is bit for bit the separate layer's
    (per-channel weight scales are per column; smoothing off); a layer with another activation
    or a residual to fold stays on its own; evaluate reports every layer under its own name, and
    excluding one by name takes it out of the group."""
    import onnxruntime as ort

    from ortutil import ORT_VERSION

    m = shared_input_model()
    q, rep = quantize_model(m, QuantizeOptions(smooth="off", group_shared_input=True))
    q0, rep0 = quantize_model(m, QuantizeOptions(smooth="off"))  # not grouped by default
    if ORT_VERSION < (1, 18):
        pytest.skip("a node with several outputs read by other nodes needs ONNX Runtime >= 1.18")
    onnx.checker.check_model(q)
    groups = [n for n in q.graph.node if n.op_type == "DynQMatMul" and len(n.output) > 1]
    assert len(groups) == 1, [n.name for n in q.graph.node]
    grp = groups[0]
    attrs = {a.name: helper.get_attribute_value(a) for a in grp.attribute}
    assert list(grp.output) == ["q_out", "k_out", "v_out"] and attrs["split"] == [32, 32, 24]
    assert [v.decode() for v in attrs["layer_names"]] == ["q", "k", "v"]
    assert {r.name: r.group for r in rep.converted} == {"q": "q", "k": "q", "v": "q", "g": None, "r": None, "o": None}
    assert all(r.group is None for r in rep0.converted)
    assert "3 layers in 1 nodes" in rep.summary()

    def plain(mm, outs):
        mm = onnx.ModelProto()
        mm.CopyFrom(q if outs == "q" else q0)
        for o in ("q_out", "k_out", "v_out", "r_res"):
            mm.graph.output.append(_vi(o, None))
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        so.register_custom_ops_library(dynq.library_path())
        return ort.InferenceSession(mm.SerializeToString(), so, providers=["CPUExecutionProvider"])

    f = {"x": f32(2, 7, 32, scale=1.0)}
    for a, b in zip(plain(q, "q").run(None, f), plain(q0, "q0").run(None, f)):
        np.testing.assert_array_equal(a, b)
    assert cosine(session(m, custom=False).run(None, f)[0], session(q).run(None, f)[0]) > 0.999
    # With smoothing, one set of factors for the group (the input is quantized once), unless
    # that costs a layer more held-out SQNR than group_max_loss_db against its own factors.
    qs, reps = quantize_model(m, QuantizeOptions(group_shared_input=True, group_max_loss_db=1e9))
    assert {r.name for r in reps.converted if r.group} == {"q", "k", "v"}
    assert cosine(session(m, custom=False).run(None, f)[0], session(qs).run(None, f)[0]) > 0.999
    _, rep_strict = quantize_model(m, QuantizeOptions(group_shared_input=True, group_max_loss_db=-1e9))
    assert all(r.group is None for r in rep_strict.converted)
    # evaluate: a layer per output, under the original names; mixed precision can exclude one.
    src, out = tmp_path / "m.onnx", tmp_path / "q.onnx"
    onnx.save_model(m, str(src))
    save_model(q, str(out))
    ev = evaluate(str(src), str(out), [f], per_layer=True)
    by = {l["name"]: l for l in ev.layers}
    assert set(by) == {"q", "k", "v", "g", "r", "o"}, set(by)
    assert by["v"]["n"] == 24 and by["v"]["output"] == "v_out" and by["q"]["isolated_cosine"] > 0.999
    qx, repx = quantize_model(m, QuantizeOptions(smooth="off", group_shared_input=True, exclude_nodes=("k",)))
    grp = [n for n in qx.graph.node if n.op_type == "DynQMatMul" and len(n.output) > 1]
    assert len(grp) == 1 and list(grp[0].output) == ["q_out", "v_out"]


def torch_style_attention(d=48, heads=4):
    """attention_model with the Reshape targets computed as PyTorch exports them: Shape of the
    projection's output -> Gather(0), Gather(1) -> Unsqueeze -> Concat with [heads, d / heads]."""
    m = attention_model(d, heads)
    g = m.graph
    g.initializer.extend([numpy_helper.from_array(np.array(v, np.int64), nm) for nm, v in (("i0", 0), ("i1", 1), ("ax0", [0]), ("hd", [heads, d // heads]))])
    for node in list(g.node):
        if node.op_type == "Reshape" and node.name in ("q_reshape", "k_reshape", "v_reshape"):
            nm = node.name[0]
            src = node.input[0]
            g.node.extend(
                [
                    helper.make_node("Shape", [src], [f"{nm}_shape"], name=f"{nm}_shape"),
                    helper.make_node("Gather", [f"{nm}_shape", "i0"], [f"{nm}_b"], name=f"{nm}_g0", axis=0),
                    helper.make_node("Gather", [f"{nm}_shape", "i1"], [f"{nm}_s"], name=f"{nm}_g1", axis=0),
                    helper.make_node("Unsqueeze", [f"{nm}_b", "ax0"], [f"{nm}_b1"], name=f"{nm}_u0"),
                    helper.make_node("Unsqueeze", [f"{nm}_s", "ax0"], [f"{nm}_s1"], name=f"{nm}_u1"),
                    helper.make_node("Concat", [f"{nm}_b1", f"{nm}_s1", "hd"], [f"{nm}_target"], name=f"{nm}_cat", axis=0),
                ]
            )
            node.input[1] = f"{nm}_target"
    # Topological order: the new nodes go right after the bias Add they read.
    order = []
    extra = {n.name: n for n in g.node if n.name.endswith(("_shape", "_g0", "_g1", "_u0", "_u1", "_cat"))}
    for n in g.node:
        if n.name in extra:
            continue
        order.append(n)
        if n.name.endswith("_bias"):
            nm = n.name[0]
            order += [extra[f"{nm}_{t}"] for t in ("shape", "g0", "g1", "u0", "u1", "cat")]
    g.ClearField("node")
    g.node.extend(order)
    return m


def attention_model(d=48, heads=4, shape_q=(0, 0, 4, 12), shape_k=(0, -1, 4, 12), extra_reader=False):
    """Self-attention as exporters write it: q, k, v projections (+bias), each reshaped to
    [batch, seq, heads, d / heads] and transposed (q, v: perm [0, 2, 1, 3]; k: [0, 2, 3, 1]),
    then softmax(q k^T) v and the merge back to [batch, seq, d]. With extra_reader, a second
    node reads v's reshaped tensor (so v's Reshape + Transpose cannot be folded)."""
    dh = d // heads
    inits = [numpy_helper.from_array(f32(d, d), f"w_{nm}") for nm in "qkv"]
    inits += [numpy_helper.from_array(f32(d), f"b_{nm}") for nm in "qkv"]
    inits += [
        numpy_helper.from_array(np.array(shape_q, np.int64), "shape_q"),
        numpy_helper.from_array(np.array(shape_k, np.int64), "shape_k"),
        numpy_helper.from_array(np.array([0, 0, d], np.int64), "shape_merge"),
    ]
    nodes = []
    for nm in "qkv":
        nodes += [
            helper.make_node("MatMul", ["x", f"w_{nm}"], [f"{nm}_mm"], name=nm),
            helper.make_node("Add", [f"{nm}_mm", f"b_{nm}"], [f"{nm}_out"], name=f"{nm}_bias"),
            helper.make_node("Reshape", [f"{nm}_out", "shape_k" if nm == "k" else "shape_q"], [f"{nm}_r"], name=f"{nm}_reshape"),
            helper.make_node("Transpose", [f"{nm}_r"], [f"{nm}_t"], name=f"{nm}_transpose", perm=[0, 2, 3, 1] if nm == "k" else [0, 2, 1, 3]),
        ]
    nodes += [
        helper.make_node("MatMul", ["q_t", "k_t"], ["scores"], name="qk"),
        helper.make_node("Softmax", ["scores"], ["probs"], name="softmax", axis=-1),
        helper.make_node("MatMul", ["probs", "v_t"], ["ctx"], name="ctx"),
        helper.make_node("Transpose", ["ctx"], ["ctx_t"], name="ctx_transpose", perm=[0, 2, 1, 3]),
        helper.make_node("Reshape", ["ctx_t", "shape_merge"], ["y"], name="merge"),
    ]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", "s", d])]
    if extra_reader:
        nodes.append(helper.make_node("ReduceSum", ["v_r"], ["v_sum"], name="v_sum", keepdims=0))
        outputs.append(helper.make_tensor_value_info("v_sum", TensorProto.FLOAT, []))
    return model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", "s", d])], outputs, inits)


def test_attention_head_split_is_folded_into_the_layer():
    """A projection's Reshape to [batch, seq, heads, d] and Transpose(perm=[0, 2, 1, 3]) become
    the op's `heads` output layout (the transposed keys' [0, 2, 3, 1] only with
    fuse_heads_transposed): the model's output is bit for bit that of the unfolded conversion,
    for batches of several sequences whose length is not a multiple of 8; a reshaped tensor
    that something else reads, or fuse_heads=False, leaves the nodes alone; evaluate measures
    each folded layer against its float output in the same layout."""
    m = attention_model()
    q, rep = quantize_model(m, QuantizeOptions(smooth="off"))
    q0, rep0 = quantize_model(m, QuantizeOptions(smooth="off", fuse_heads=False))
    qt, rept = quantize_model(m, QuantizeOptions(smooth="off", fuse_heads_transposed=True))
    onnx.checker.check_model(q)
    assert {r.name: (r.heads, r.heads_transposed) for r in rep.converted} == {"q": (4, False), "k": (0, False), "v": (4, False)}
    assert {r.name: (r.heads, r.heads_transposed) for r in rept.converted} == {"q": (4, False), "k": (4, True), "v": (4, False)}
    assert all(r.heads == 0 for r in rep0.converted)
    names = [n.name for n in q.graph.node]
    assert "q_reshape" not in names and "q_transpose" not in names and "v_transpose" not in names, names
    assert "k_reshape" in names and "k_transpose" in names, names
    assert not any(n.op_type in ("Reshape", "Transpose") and n.name.startswith(("q_", "k_", "v_")) for n in qt.graph.node)
    qn = next(n for n in q.graph.node if n.name == "q")
    assert qn.output[0] == "q_t" and [a.ints for a in qn.attribute if a.name == "heads"] == [[4]]
    f = {"x": f32(3, 13, 48, scale=1.0)}
    want = session(q0).run(None, f)[0]
    for mm in (q, qt):
        for threads in (1, 2):
            np.testing.assert_array_equal(session(mm, threads).run(None, f)[0], want)
    assert cosine(session(m, custom=False).run(None, f)[0], want) > 0.999
    # -1 for the sequence in the target shape is recognised too (k uses it above); a reshaped
    # tensor with a second reader is left alone.
    m2 = attention_model(shape_q=(0, -1, 4, 12), extra_reader=True)
    q2, rep2 = quantize_model(m2, QuantizeOptions(smooth="off"))
    assert {r.name: r.heads for r in rep2.converted} == {"q": 4, "k": 0, "v": 0}
    # A target shape that is [batch, seq, heads, d] only for sequences of 13 (the model's seq is
    # symbolic): not provably the head split, so left alone (and the model still runs).
    m3 = attention_model(shape_q=(-1, 13, 4, 12))  # q and v
    q3, rep3 = quantize_model(m3, QuantizeOptions(smooth="off"))
    assert {r.name: r.heads for r in rep3.converted} == {"q": 0, "k": 0, "v": 0}
    assert cosine(session(m3, custom=False).run(None, f)[0], session(q3).run(None, f)[0]) > 0.999
    ev = evaluate(m, q, feeds_list=[f])
    by = {l["name"]: l for l in ev.layers}
    assert set(by) == {"q", "k", "v"}
    for l in by.values():
        assert l["isolated_cosine"] > 0.999 and l["cosine"] > 0.999, l
    # Grouped (one node, three outputs): each output keeps its own layout.
    from ortutil import ORT_VERSION

    if ORT_VERSION >= (1, 18):
        for o in (QuantizeOptions(smooth="off", group_shared_input=True), QuantizeOptions(smooth="off", group_shared_input=True, fuse_heads_transposed=True)):
            qg, repg = quantize_model(m, o)
            nodes = [n for n in qg.graph.node if n.domain == "dynq"]
            assert len(nodes) == 1 and list(nodes[0].output) == ["q_t", "k_t" if o.fuse_heads_transposed else "k_out", "v_t"], nodes
            heads = {r.name: (r.heads, r.heads_transposed) for r in repg.converted}
            assert heads == {"q": (4, False), "k": (4, True) if o.fuse_heads_transposed else (0, False), "v": (4, False)}, heads
            np.testing.assert_array_equal(session(qg, 2).run(None, f)[0], want)
            evg = evaluate(m, qg, feeds_list=[f])
            assert all(l["isolated_cosine"] > 0.999 for l in evg.layers) and len(evg.layers) == 3
    assert QuantizeOptions.from_json(QuantizeOptions(fuse_heads=False).to_json()).fuse_heads is False


def test_attention_heads_with_shapes_computed_in_the_graph():
    """PyTorch exports compute each Reshape target from the projection's own Shape: shape
    inference with data propagation proves the target, and the Shape nodes read the layer's
    input instead (same batch and sequence sizes; only dimensions 0 and 1 are gathered), so the
    head split is folded all the same, bit for bit."""
    m = torch_style_attention()
    onnx.checker.check_model(m)
    q, rep = quantize_model(m, QuantizeOptions(smooth="off"))
    q0, _ = quantize_model(m, QuantizeOptions(smooth="off", fuse_heads=False))
    assert {r.name: r.heads for r in rep.converted} == {"q": 4, "k": 0, "v": 4}
    # q's and v's target computations read x now, and with their Reshapes gone they are dead
    # and removed; k's stays as it was.
    shapes = {n.name: n.input[0] for n in q.graph.node if n.op_type == "Shape"}
    assert shapes == {"k_shape": "k_out"}, shapes
    f = {"x": f32(2, 11, 48, scale=1.0)}
    want = session(q0).run(None, f)[0]
    np.testing.assert_array_equal(session(q).run(None, f)[0], want)
    assert cosine(session(m, custom=False).run(None, f)[0], want) > 0.999
    # A Shape whose last dimension (N, which the input does not share) is also used keeps its
    # tensor: that projection is left unfolded.
    m2 = torch_style_attention()
    m2.graph.initializer.append(numpy_helper.from_array(np.array(2, np.int64), "i2"))
    m2.graph.node.append(helper.make_node("Gather", ["q_shape", "i2"], ["q_n"], name="q_g2", axis=0))
    m2.graph.output.append(helper.make_tensor_value_info("q_n", TensorProto.INT64, []))
    q2, rep2 = quantize_model(m2, QuantizeOptions(smooth="off"))
    assert {r.name: r.heads for r in rep2.converted} == {"q": 0, "k": 0, "v": 4}
    assert session(q2).run(None, f)[1] == 48


def _mm_model(w, extra_nodes=(), extra_inits=(), out="y", x_shape=("b", 16)):
    """x -> MatMul(x, w) -> h, plus `extra_nodes` (reading h) producing `out`."""
    k, n = w.shape
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h" if extra_nodes else out], name="mm"), *extra_nodes]
    inits = [numpy_helper.from_array(w, "w"), *extra_inits]
    x_shape = (x_shape[0], k)
    return model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x_shape))],
                 [helper.make_tensor_value_info(out, TensorProto.FLOAT, None)], inits)


def test_unloaded_external_data_is_refused(tmp_path):
    """A ModelProto loaded without its external data is refused with a clear message, never read
    from the current directory (which may hold another model's file of the same name)."""
    m = _mm_model(f32(16, 24))
    path = tmp_path / "m.onnx"
    onnx.save_model(m, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location="m.data", size_threshold=0)
    unloaded = onnx.load(str(path), load_external_data=False)
    with pytest.raises(ValueError, match="external data is not loaded"):
        quantize_model(unloaded)
    q, rep = quantize_model(str(path), QuantizeOptions(smooth="off"))
    assert len(rep.converted) == 1


def test_layers_the_op_would_refuse_are_left_alone():
    """Empty weights, non-finite Gemm bias (beta != 0) and already-quantized layers with K > 65536
    or a NaN scale are skipped with a reason (the model still runs); Gemm's C is ignored when
    beta = 0 (as ONNX Runtime does), and a non-finite bias Add stays an Add."""
    # Empty weight.
    m = _mm_model(np.zeros((16, 0), np.float32))
    q, rep = quantize_model(m)
    assert not rep.converted and any(r[2] == "empty weight" for r in rep.skipped), rep.skipped
    # Gemm with beta = 0 and a NaN in C: C is not used.
    c = f32(24)
    c[3] = np.nan
    g = model([helper.make_node("Gemm", ["x", "w", "c"], ["y"], name="g", beta=0.0)],
              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 16])],
              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
              [numpy_helper.from_array(f32(16, 24), "w"), numpy_helper.from_array(c, "c")])
    q, rep = quantize_model(g, QuantizeOptions(smooth="off"))
    x = f32(5, 16, scale=1.0)
    ref, got = session(g, custom=False).run(None, {"x": x})[0], session(q).run(None, {"x": x})[0]
    assert len(rep.converted) == 1 and np.all(np.isfinite(got)) and cosine(ref, got) > 0.999
    # The same with beta = 1: skipped.
    g.graph.node[0].attribute[0].f = 1.0
    q, rep = quantize_model(g, QuantizeOptions(smooth="off"))
    assert not rep.converted and "NaN" in rep.skipped[0][2], rep.skipped
    # A bias Add with a NaN: the Add stays, the model runs and gives ONNX Runtime's NaNs.
    b = f32(24)
    b[1] = np.nan
    m = _mm_model(f32(16, 24), [helper.make_node("Add", ["h", "b"], ["y"], name="bias")], [numpy_helper.from_array(b, "b")])
    q, rep = quantize_model(m, QuantizeOptions(smooth="off"))
    assert len(rep.converted) == 1 and any(n.name == "bias" for n in q.graph.node)
    got = session(q).run(None, {"x": x})[0]
    assert np.array_equal(np.isnan(got), np.isnan(session(m, custom=False).run(None, {"x": x})[0]))
    # DynamicQuantizeMatMul with K > 65536, and with a NaN weight scale: skipped.
    for k, bad_scale in ((65537, False), (32, True)):
        wq = RNG.integers(-127, 128, size=(k, 3)).astype(np.int8)
        s = np.full(3, 0.01, np.float32)
        if bad_scale:
            s[1] = np.nan
        dq = model([helper.make_node("DynamicQuantizeMatMul", ["x", "w", "s"], ["y"], name="dq", domain="com.microsoft")],
                   [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", k])],
                   [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                   [numpy_helper.from_array(wq, "w"), numpy_helper.from_array(s, "s")])
        q, rep = quantize_model(dq)
        assert not rep.converted, (k, rep.converted)
        assert rep.skipped and ("K > 65536" if not bad_scale else "NaN") in rep.skipped[0][2], rep.skipped


def test_negative_quantized_scales_fold_into_the_integers():
    """A negative per-channel weight scale of an already-quantized layer (ONNX allows it) is
    folded into that channel's integers (a -128 becomes a requantized 127 range): the same
    product as ONNX Runtime's DynamicQuantizeMatMul up to quantization error."""
    k, n = 64, 5
    wq = RNG.integers(-128, 128, size=(k, n)).astype(np.int8)
    s = np.full(n, 0.02, np.float32)
    s[2] = -0.02
    s[4] = -0.01
    dq = model([helper.make_node("DynamicQuantizeMatMul", ["x", "w", "s"], ["y"], name="dq", domain="com.microsoft")],
               [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", k])],
               [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
               [numpy_helper.from_array(wq, "w"), numpy_helper.from_array(s, "s")])
    q, rep = quantize_model(dq)
    assert len(rep.converted) == 1
    x = f32(7, k, scale=1.0)
    exact = x.astype(np.float64) @ (wq.astype(np.float64) * s.astype(np.float64))
    assert cosine(exact, session(q).run(None, {"x": x})[0]) > 0.999


def test_options_bytes_gelu_order_and_dead_nodes():
    """A single string where QuantizeOptions expects names is one name; a serialized model is
    accepted; GELU is fused whatever the order of its first two nodes; nodes the model itself
    never uses are neither converted nor removed."""
    m = mlp()
    q, _ = quantize_model(m, QuantizeOptions(include_nodes="fc1", smooth="off"))
    assert [n.name for n in q.graph.node if n.op_type == "DynQMatMul"] == ["fc1"]
    q, _ = quantize_model(m, QuantizeOptions(exclude_nodes="fc1", exclude_op_types="MatMulInteger", smooth="off"))
    conv = {n.name for n in q.graph.node if n.op_type == "DynQMatMul"}
    assert "fc1" not in conv and "fc2" in conv
    with pytest.raises(TypeError, match="ModelProto"):
        quantize_model(42)
    q1, _ = quantize_model(m, QuantizeOptions(smooth="off"))
    q2, _ = quantize_model(m.SerializeToString(), QuantizeOptions(smooth="off"))
    assert q2.SerializeToString() == q1.SerializeToString()
    # GELU with the Mul(0.5) node before the Div.
    w = f32(16, 24)
    consts = [numpy_helper.from_array(np.array(v, np.float32), nm) for nm, v in (("half", 0.5), ("sqrt2", 2**0.5), ("one", 1.0))]
    gelu_nodes = [
        helper.make_node("Mul", ["h", "half"], ["hh"], name="g_half"),
        helper.make_node("Div", ["h", "sqrt2"], ["hd"], name="g_div"),
        helper.make_node("Erf", ["hd"], ["he"], name="g_erf"),
        helper.make_node("Add", ["he", "one"], ["ha"], name="g_add"),
        helper.make_node("Mul", ["hh", "ha"], ["y"], name="g_mul"),
    ]
    gm = _mm_model(w, gelu_nodes, consts)
    q, rep = quantize_model(gm, QuantizeOptions(smooth="off"))
    assert rep.converted[0].activation == "gelu" and [n.op_type for n in q.graph.node] == ["DynQMatMul"]
    x = f32(6, 16, scale=1.0)
    assert cosine(session(gm, custom=False).run(None, {"x": x})[0], session(q).run(None, {"x": x})[0]) > 0.999
    # A dead branch (a Relu and a MatMul nobody reads) and an unused initializer stay as they are.
    dead = [helper.make_node("Relu", ["h"], ["y"], name="relu"), helper.make_node("Relu", ["x"], ["r0"], name="dead_relu"),
            helper.make_node("MatMul", ["r0", "w2"], ["dead_out"], name="dead_mm")]
    dm = _mm_model(w, dead, [numpy_helper.from_array(f32(16, 8), "w2"), numpy_helper.from_array(f32(3), "unused")])
    q, rep = quantize_model(dm, QuantizeOptions(smooth="off"))
    assert [r.name for r in rep.converted] == ["mm"]
    assert ("dead_mm", "MatMul", "its output is not used by the model") in rep.skipped
    assert {"dead_relu", "dead_mm"} <= {n.name for n in q.graph.node}
    assert {"w2", "unused"} <= {t.name for t in q.graph.initializer}


def test_smoothing_runs_on_float16_models_with_com_microsoft_ops():
    """Calibration fetches tensors whose type shape inference cannot give (outputs of
    com.microsoft ops in a float16 model) without declaring a wrong type: the run succeeds and
    smoothing is not skipped."""
    skip_without_f16_op()
    k = 32
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc1"),
        helper.make_node("Gelu", ["h"], ["g"], name="gelu", domain="com.microsoft"),
        helper.make_node("MatMul", ["g", "w2"], ["y"], name="fc2"),
    ]
    m = model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT16, ["b", k])],
              [helper.make_tensor_value_info("y", TensorProto.FLOAT16, None)],
              [numpy_helper.from_array(f32(k, 64).astype(np.float16), "w1"), numpy_helper.from_array(f32(64, 16).astype(np.float16), "w2")])
    m.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    q, rep = quantize_model(m)
    assert rep.smooth_note is None, rep.smooth_note
    assert len(rep.converted) == 2
    x = f32(5, k, scale=1.0).astype(np.float16)
    assert cosine(session(m, custom=False).run(None, {"x": x})[0], session(q).run(None, {"x": x})[0]) > 0.999


def _tanh_gelu_nodes(form, t="h", out="y"):
    """A tanh GELU of `t` as `form` writes it: (nodes, constants as {name: value})."""
    mk = helper.make_node
    if form == "onnx_gelu_tanh":
        return [mk("Gelu", [t], [out], approximate="tanh")], {}
    if form == "fast_gelu":
        return [mk("FastGelu", [t], [out], domain="com.microsoft")], {}
    if form == "gpt2_gelu_new":
        # 0.5 * x * (1.0 + tanh(sqrt(2 / pi) * (x + 0.044715 * pow(x, 3.0)))), as torch exports it.
        return [
            mk("Mul", ["half", t], ["g_hx"]),
            mk("Pow", [t, "three"], ["g_p"]),
            mk("Mul", ["g_p", "kappa"], ["g_kp"]),
            mk("Add", [t, "g_kp"], ["g_s"]),
            mk("Mul", ["beta", "g_s"], ["g_u"]),
            mk("Tanh", ["g_u"], ["g_th"]),
            mk("Add", ["one", "g_th"], ["g_a"]),
            mk("Mul", ["g_hx", "g_a"], [out]),
        ], {"half": 0.5, "three": 3.0, "kappa": 0.044715, "beta": (2 / np.pi) ** 0.5, "one": 1.0}
    if form == "torch_gelu_tanh":
        # F.gelu(x, approximate="tanh") exported below opset 20: x*x*x, and the halving last.
        return [
            mk("Mul", [t, t], ["g_sq"]),
            mk("Mul", [t, "g_sq"], ["g_cube"]),
            mk("Mul", ["kappa", "g_cube"], ["g_kc"]),
            mk("Add", [t, "g_kc"], ["g_s"]),
            mk("Mul", ["beta", "g_s"], ["g_u"]),
            mk("Tanh", ["g_u"], ["g_th"]),
            mk("Add", ["one", "g_th"], ["g_a"]),
            mk("Mul", [t, "g_a"], ["g_m"]),
            mk("Mul", ["half", "g_m"], [out]),
        ], {"half": 0.5, "kappa": 0.044715, "beta": (2 / np.pi) ** 0.5, "one": 1.0}
    raise ValueError(form)


@pytest.mark.parametrize("elem", [np.float32, np.float16])
@pytest.mark.parametrize("form", ["onnx_gelu_tanh", "fast_gelu", "fast_gelu_bias", "gpt2_gelu_new", "torch_gelu_tanh"])
def test_tanh_gelu_is_fused(form, elem):
    """The tanh GELU (GPT-2's gelu_new, PyTorch's approximate="tanh", ONNX Gelu(approximate=
    "tanh"), ONNX Runtime's FastGelu with and without its bias) becomes the op's gelu_tanh
    epilogue, every node of it removed, and the model's output stays that of the float model."""
    if elem == np.float16:
        skip_without_f16_op()
    k, n = 48, 40
    rng = np.random.default_rng(17)
    w = (rng.standard_normal((k, n)) * 0.3).astype(elem)
    b = rng.standard_normal(n).astype(elem)
    if form == "fast_gelu_bias":
        nodes, consts = [helper.make_node("FastGelu", ["h", "b"], ["y"], domain="com.microsoft")], {}
    else:
        nodes, consts = _tanh_gelu_nodes(form)
    inits = [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")]
    inits += [numpy_helper.from_array(np.array(v, elem), nm) for nm, v in consts.items()]
    et = TensorProto.FLOAT if elem == np.float32 else TensorProto.FLOAT16
    m = helper.make_model(
        helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"), *nodes], "g",
                          [helper.make_tensor_value_info("x", et, ["b", k])],
                          [helper.make_tensor_value_info("y", et, ["b", n])], inits),
        opset_imports=[helper.make_opsetid("", 20), helper.make_opsetid("com.microsoft", 1)], ir_version=9)
    q, rep = quantize_model(m, QuantizeOptions(smooth="off"))
    assert [(r.name, r.activation, r.bias) for r in rep.converted] == [("mm", "gelu_tanh", form == "fast_gelu_bias")]
    assert [x.op_type for x in q.graph.node] == ["DynQMatMul"], [x.op_type for x in q.graph.node]
    onnx.checker.check_model(q)
    x = (rng.standard_normal((64, k)) * 2).astype(elem)
    ref, got = session(m, custom=False).run(None, {"x": x})[0], session(q).run(None, {"x": x})[0]
    assert cosine(ref.astype(np.float32), got.astype(np.float32)) > 0.999
    # The fused op applies exactly the library's epilogue to the layer's product.
    p = dynq.PackedWeights.from_float(w.astype(np.float32), layout="kn")
    bias = b.astype(np.float32) if form == "fast_gelu_bias" else None
    want = dynq.gemm(p, x, bias=bias, epilogue="gelu_tanh")
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("change", ["kappa", "beta", "erf_for_tanh", "extra_reader"])
def test_gelu_lookalikes_are_not_fused(change):
    """Element-wise nodes are fused only when they compute a GELU: a wrong constant, an Erf where
    the tanh form has Tanh, or an intermediate read elsewhere leave the nodes as they are."""
    k, n = 16, 12
    nodes, consts = _tanh_gelu_nodes("gpt2_gelu_new")
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)]
    if change == "kappa":
        consts["kappa"] = 0.5
    elif change == "beta":
        consts["beta"] = 1.0
    elif change == "erf_for_tanh":
        nodes = [helper.make_node("Erf", ["g_u"], ["g_th"]) if x.op_type == "Tanh" else x for x in nodes]
    else:
        outputs.append(helper.make_tensor_value_info("g_s", TensorProto.FLOAT, None))
    inits = [numpy_helper.from_array(f32(k, n), "w")] + [numpy_helper.from_array(np.array(v, np.float32), nm) for nm, v in consts.items()]
    m = model([helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"), *nodes], [_vi("x", [4, k])], outputs, inits)
    q, rep = quantize_model(m, QuantizeOptions(smooth="off"))
    assert [(r.name, r.activation) for r in rep.converted] == [("mm", "none")]
    assert len(q.graph.node) == 1 + len(nodes)
    f = {"x": f32(4, k, scale=1.0)}
    for r, o in zip(session(m, custom=False).run(None, f), session(q).run(None, f)):
        assert cosine(r, o) > 0.999


@pytest.mark.parametrize("huge", [False, True])
def test_bias_add_after_a_gemm_with_c_joins_its_bias(huge):
    """Gemm(x, W, C) then Add(b) then a GELU: the Add's b is added to beta * C and the GELU
    folds too (an Add left in between kept the GELU out of the op). Where beta * C + b overflows
    float, the Add stays (the op refuses a non-finite bias) and the model still runs."""
    k, n = 32, 24
    rng = np.random.default_rng(3)
    c = rng.standard_normal(n).astype(np.float32)
    b = rng.standard_normal(n).astype(np.float32)
    if huge:
        c[:] = 1.5e38  # beta * C = 3e38 is finite, + b is not
        b[:] = 3e38
    nodes = [
        helper.make_node("Gemm", ["x", "w", "c"], ["h"], name="gemm", beta=2.0),
        helper.make_node("Add", ["h", "b"], ["hb"], name="bias_add"),
        helper.make_node("Gelu", ["hb"], ["y"], approximate="tanh"),
    ]
    inits = [numpy_helper.from_array(f32(k, n), "w"), numpy_helper.from_array(c, "c"), numpy_helper.from_array(b, "b")]
    m = helper.make_model(
        helper.make_graph(nodes, "g", [_vi("x", [5, k])], [_vi("y", [5, n])], inits),
        opset_imports=[helper.make_opsetid("", 20)], ir_version=9)
    q, rep = quantize_model(m, QuantizeOptions(smooth="off"))
    assert [r.name for r in rep.converted] == ["gemm"]
    onnx.checker.check_model(q)
    if huge:
        assert rep.converted[0].activation == "none" and any(x.name == "bias_add" for x in q.graph.node)
        return
    assert rep.converted[0].activation == "gelu_tanh" and [x.op_type for x in q.graph.node] == ["DynQMatMul"]
    bias = numpy_helper.to_array(next(t for t in q.graph.initializer if t.name == q.graph.node[0].input[3]))
    np.testing.assert_allclose(bias, 2 * c + b, rtol=1e-6)
    x = f32(5, k, scale=1.0)
    assert cosine(session(m, custom=False).run(None, {"x": x})[0], session(q).run(None, {"x": x})[0]) > 0.999


def _attention_model(mask="none", attention_bias=False, bias=True, sizes=None, weights_const=True, past=False,
                     present_used=False, mask_rank1_batch="b", **attrs):
    """x [b, 6, 32] -> com.microsoft.Attention (4 heads) -> MatMul -> y, as ONNX Runtime's
    transformer optimizer writes a BERT block's attention."""
    rng = np.random.default_rng(23)
    d, s, heads = 32, 6, 4
    sizes = sizes or [d, d, d]
    w = (rng.standard_normal((d, sum(sizes))) * 0.3).astype(np.float32)
    b = (rng.standard_normal(sum(sizes)) * 0.1).astype(np.float32)
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", s, d])]
    inits = [numpy_helper.from_array(f32(sizes[2], 16), "wo")]
    if weights_const:
        inits.append(numpy_helper.from_array(w, "qkv_w"))
    else:
        inputs.append(helper.make_tensor_value_info("qkv_w", TensorProto.FLOAT, list(w.shape)))
    if bias:
        inits.append(numpy_helper.from_array(b, "qkv_b"))
    ins = ["x", "qkv_w", "qkv_b" if bias else ""]
    if mask == "1d":
        inputs.append(helper.make_tensor_value_info("mask", TensorProto.INT32, [mask_rank1_batch]))
    elif mask == "2d":
        inputs.append(helper.make_tensor_value_info("mask", TensorProto.INT32, ["b", s]))
    elif mask == "3d":
        inputs.append(helper.make_tensor_value_info("mask", TensorProto.INT32, ["b", s, s]))
    ins.append("mask" if mask != "none" else "")
    if past:
        inputs.append(helper.make_tensor_value_info("past", TensorProto.FLOAT, [2, "b", heads, 3, d // heads]))
    ins.append("past" if past else "")
    if attention_bias:
        # One per batch row: ONNX Runtime 1.17.3 reads past a bias of batch 1 broadcast over a
        # larger batch, in Attention itself too (NaNs that change from run to run).
        inputs.append(helper.make_tensor_value_info("ab", TensorProto.FLOAT, ["b", heads, s, s]))
    ins.append("ab" if attention_bias else "")
    while ins[-1] == "":
        ins.pop()
    if sizes != [d, d, d]:
        attrs["qkv_hidden_sizes"] = sizes
    outs = ["ctx", "present"] if present_used or past else ["ctx"]
    nodes = [
        helper.make_node("Attention", ins, outs, name="attn", domain="com.microsoft", num_heads=heads, **attrs),
        helper.make_node("MatMul", ["ctx", "wo"], ["y"], name="out_proj"),
    ]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", s, 16])]
    if present_used or past:
        outputs.append(helper.make_tensor_value_info("present", TensorProto.FLOAT, [2, "b", heads, "t", d // heads]))
    m = helper.make_model(helper.make_graph(nodes, "g", inputs, outputs, inits),
                          opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)], ir_version=8)
    return m


def _attention_feeds(m, batch=3):
    rng = np.random.default_rng(5)
    f = {"x": rng.standard_normal((batch, 6, 32)).astype(np.float32)}
    names = {i.name: i for i in m.graph.input}
    if "mask" in names:
        rank = len(names["mask"].type.tensor_type.shape.dim)
        if rank == 1:
            f["mask"] = np.array([6, 4, 1][:batch], np.int32)
        elif rank == 2:
            mk = np.ones((batch, 6), np.int32)
            mk[1, 3:] = 0
            mk[2, 0] = 0
            f["mask"] = mk
        else:
            mk = (rng.random((batch, 6, 6)) > 0.3).astype(np.int32)
            mk[:, :, 0] = 1
            f["mask"] = mk
    if "ab" in names:
        f["ab"] = rng.standard_normal((batch, 4, 6, 6)).astype(np.float32)
    return f


@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"mask": "1d"},
        {"mask": "2d", "mask_filter_value": -3.4028234663852886e38},
        {"mask": "3d", "unidirectional": 1},
        {"mask": "2d", "attention_bias": True, "scale": 0.3},
        {"sizes": [32, 32, 16]},
    ],
    # (Not without a bias: ONNX Runtime's CPU Attention kernel crashes on that, 1.17.3 and 1.31.1.)
    ids=["plain", "mask_1d", "mask_2d", "mask_3d_unidirectional", "attention_bias_scale", "v_size_16"],
)
def test_attention_is_split_into_converted_layers(kw):
    """com.microsoft.Attention becomes its Q, K and V products (converted layers, the bias
    folded) and com.microsoft.MultiHeadAttention with the same mask, attention bias and
    attributes: the float split alone gives the Attention node's results (the same bits on the
    runtimes tested), the converted model stays within quantization error, and the evaluator
    measures the three new layers."""
    from dynq.onnx.convert import _infer, decompose_attention

    m = _attention_model(**kw)
    f = _attention_feeds(m)
    split = onnx.ModelProto()
    split.CopyFrom(m)
    _infer(split)
    assert decompose_attention(split) == {"attn": ["attn/q_proj", "attn/k_proj", "attn/v_proj"]}
    assert [n.op_type for n in split.graph.node if n.domain == "com.microsoft"] == ["MultiHeadAttention"]
    assert "qkv_w" not in {t.name for t in split.graph.initializer}
    ref = session(m, custom=False).run(None, f)[0]
    np.testing.assert_allclose(session(split, custom=False).run(None, f)[0], ref, rtol=1e-6, atol=1e-6)
    q, rep = quantize_model(m, QuantizeOptions(smooth="off"))
    assert sorted(r.name for r in rep.converted) == ["attn/k_proj", "attn/q_proj", "attn/v_proj", "out_proj"]
    assert all(r.bias for r in rep.converted if r.name != "out_proj")
    assert rep.attention_split == 1 and "MultiHeadAttention" in rep.summary()
    assert sorted(n.op_type for n in q.graph.node) == ["DynQMatMul"] * 4 + ["MultiHeadAttention"]
    assert {t.name for t in q.graph.initializer}.isdisjoint({"qkv_w", "qkv_b"})
    onnx.checker.check_model(q)
    assert cosine(ref, session(q).run(None, f)[0]) > 0.999
    ev = evaluate(m, q, [f])
    assert sorted(l["name"] for l in ev.layers) == ["attn/k_proj", "attn/q_proj", "attn/v_proj", "out_proj"]
    assert min(l["isolated_cosine"] for l in ev.layers) > 0.999, ev.table()


@pytest.mark.parametrize(
    "kw,why",
    [
        ({"past": True}, "Attention with past state"),
        ({"present_used": True}, "Attention whose present state is used"),
        ({"weights_const": False}, "Attention weights are not a constant"),
        ({"mask": "1d", "mask_rank1_batch": "n"}, "Attention mask index of rank 1 that may hold 2 * batch values"),
        ({"do_rotary": 1}, "Attention with rotary embedding or a shared past buffer"),
        ({"sizes": [32, 16, 32]}, "Attention with Q/K/V sizes that do not split its weights"),
    ],
    ids=["past", "present_used", "weights_input", "mask_1d_other", "rotary", "qk_sizes_differ"],
)
def test_attention_kept_whole_with_a_reason(kw, why):
    """Attention nodes the split would not reproduce stay as they are, listed with the reason;
    the rest of the model is converted."""
    m = _attention_model(**kw)
    q, rep = quantize_model(m, QuantizeOptions(smooth="off"))
    assert ("attn", "Attention", why) in rep.skipped, rep.skipped
    assert [r.name for r in rep.converted] == ["out_proj"] and rep.attention_split == 0
    assert any(n.op_type == "Attention" for n in q.graph.node)


def test_attention_options():
    """convert_attention=False and exclude_nodes keep the node; include_nodes naming it converts
    its three products (and only what it names)."""
    m = _attention_model(mask="2d")
    for opts in (QuantizeOptions(smooth="off", convert_attention=False), QuantizeOptions(smooth="off", exclude_nodes=("attn",))):
        q, rep = quantize_model(m, opts)
        assert [r.name for r in rep.converted] == ["out_proj"] and any(n.op_type == "Attention" for n in q.graph.node)
    o = QuantizeOptions(smooth="off", include_nodes=("attn",))
    q, rep = quantize_model(m, o)
    assert sorted(r.name for r in rep.converted) == ["attn/k_proj", "attn/q_proj", "attn/v_proj"]
    assert o.include_nodes == ("attn",)  # the caller's options are not changed
    f = _attention_feeds(m)
    assert cosine(session(m, custom=False).run(None, f)[0], session(q).run(None, f)[0]) > 0.999
    # Grouped: the three products share their input, one node computes them (its 'split'
    # outputs need ONNX Runtime 1.18).
    q, rep = quantize_model(m, QuantizeOptions(smooth="off", group_shared_input=True))
    assert [len(n.output) for n in q.graph.node if n.op_type == "DynQMatMul"] == [3, 1]
    from ortutil import ORT_VERSION

    if ORT_VERSION >= (1, 18):
        assert cosine(session(m, custom=False).run(None, f)[0], session(q).run(None, f)[0]) > 0.999


def _embed_ln_model(v=300, with_segment=True, opset=13):
    """ids -> com.microsoft.EmbedLayerNormalization (word, position, segment tables, mask) ->
    MatMul, as ONNX Runtime's transformer optimizer writes a BERT's embeddings."""
    rng = np.random.default_rng(31)
    d, p = 16, 32
    inits = [
        numpy_helper.from_array(rng.standard_normal((v, d)).astype(np.float32), "wemb"),
        numpy_helper.from_array(rng.standard_normal((p, d)).astype(np.float32) * 0.1, "pemb"),
        numpy_helper.from_array(rng.standard_normal((2, d)).astype(np.float32) * 0.1, "semb"),
        numpy_helper.from_array((1 + rng.standard_normal(d) * 0.1).astype(np.float32), "gamma"),
        numpy_helper.from_array((rng.standard_normal(d) * 0.1).astype(np.float32), "beta"),
        numpy_helper.from_array(f32(d, 8), "w"),
    ]
    inputs = [helper.make_tensor_value_info("ids", TensorProto.INT32, ["b", "s"]),
              helper.make_tensor_value_info("mask", TensorProto.INT32, ["b", "s"])]
    if with_segment:
        inputs.append(helper.make_tensor_value_info("seg", TensorProto.INT32, ["b", "s"]))
    nodes = [
        helper.make_node("EmbedLayerNormalization",
                         ["ids", "seg" if with_segment else "", "wemb", "pemb", "semb" if with_segment else "", "gamma", "beta", "mask"],
                         ["emb", "mask_index"], name="embed", domain="com.microsoft", epsilon=1e-12),
        helper.make_node("MatMul", ["emb", "w"], ["y"], name="mm"),
    ]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", "s", 8]),
               helper.make_tensor_value_info("mask_index", TensorProto.INT32, ["b"])]
    return helper.make_model(helper.make_graph(nodes, "g", inputs, outputs, inits),
                             opset_imports=[helper.make_opsetid("", opset), helper.make_opsetid("com.microsoft", 1)],
                             ir_version=7)


def _embed_ln_feeds(batch, seq, v=300, with_segment=True):
    rng = np.random.default_rng(batch * 100 + seq)
    mask = np.ones((batch, seq), np.int32)
    mask[0, seq // 2 + 1:] = 0
    f = {"ids": rng.integers(0, v, (batch, seq)).astype(np.int32), "mask": mask}
    if with_segment:
        f["seg"] = rng.integers(0, 2, (batch, seq)).astype(np.int32)
    return f


@pytest.mark.parametrize("with_segment", [True, False])
def test_embed_layer_norm_word_table_becomes_int8(with_segment):
    """EmbedLayerNormalization's word table (most of a BERT's bytes once its layers are int8)
    is read through a Gather the converter turns into an int8 table; the node keeps its position
    and segment tables, layer norm and mask index. The float split alone gives the node's bits;
    converted, the mask index is unchanged and the embeddings are within quantization error."""
    from dynq.onnx.convert import split_embed_layer_norm

    m = _embed_ln_model(with_segment=with_segment)
    split = onnx.ModelProto()
    split.CopyFrom(m)
    assert split_embed_layer_norm(split) == ["embed/word_gather"]
    q, rep = quantize_model(m, QuantizeOptions(smooth="off"))
    assert rep.embeddings == [("embed/word_gather", 300, 16)] and [r.name for r in rep.converted] == ["mm"]
    assert "wemb" not in {t.name for t in q.graph.initializer}
    onnx.checker.check_model(q)
    s_ref, s_split, s_q = session(m, custom=False), session(split, custom=False), session(q)
    for batch, seq in ((2, 7), (1, 1), (3, 32)):
        f = _embed_ln_feeds(batch, seq, with_segment=with_segment)
        ref, sp, got = s_ref.run(None, f), s_split.run(None, f), s_q.run(None, f)
        for a, b in zip(ref, sp):
            assert np.array_equal(a, b)
        assert np.array_equal(ref[1], got[1])
        assert cosine(ref[0], got[0]) > 0.999
    # Out-of-range ids are an error, as with the node's own table.
    f = _embed_ln_feeds(1, 4, with_segment=with_segment)
    f["ids"][0, 1] = 300
    with pytest.raises(Exception):
        s_q.run(None, f)


def test_embed_layer_norm_options():
    """quantize_embeddings=False, exclude_nodes naming the node, a table below 1024 values and an
    opset below 11 keep the node as it is."""
    m = _embed_ln_model()
    for opts in (QuantizeOptions(smooth="off", quantize_embeddings=False), QuantizeOptions(smooth="off", exclude_nodes=("embed",))):
        q, rep = quantize_model(m, opts)
        assert not rep.embeddings and "wemb" in {t.name for t in q.graph.initializer}
    q, rep = quantize_model(_embed_ln_model(v=60), QuantizeOptions(smooth="off"))
    assert not rep.embeddings
    q, rep = quantize_model(_embed_ln_model(opset=10), QuantizeOptions(smooth="off"))
    assert not rep.embeddings
    o = QuantizeOptions(smooth="off", include_nodes=("embed",))
    q, rep = quantize_model(m, o)
    assert [e[0] for e in rep.embeddings] == ["embed/word_gather"] and not rep.converted and o.include_nodes == ("embed",)


@pytest.mark.parametrize("elem", [np.float32, np.float16])
@pytest.mark.parametrize("form", ["silu", "silu_swapped", "quick_nodes", "quick_op"])
def test_silu_and_quick_gelu_are_fused(form, elem):
    """SiLU (`x * Sigmoid(x)`, LLaMA's MLP gate as PyTorch exports it) and QuickGELU (CLIP's
    `x * Sigmoid(1.702 * x)`, or com.microsoft.QuickGelu with its default alpha) become the op's
    epilogue, bit for bit the library's."""
    if elem == np.float16:
        skip_without_f16_op()
        if form == "quick_op":
            pytest.skip("ONNX Runtime's QuickGelu takes float only on the CPU")
    k, n = 48, 40
    rng = np.random.default_rng(19)
    w = (rng.standard_normal((k, n)) * 0.3).astype(elem)
    mk = helper.make_node
    consts = {}
    if form == "silu":
        nodes = [mk("Sigmoid", ["h"], ["s"]), mk("Mul", ["h", "s"], ["y"])]
    elif form == "silu_swapped":
        nodes = [mk("Sigmoid", ["h"], ["s"]), mk("Mul", ["s", "h"], ["y"])]
    elif form == "quick_nodes":
        nodes = [mk("Mul", ["h", "alpha"], ["ha"]), mk("Sigmoid", ["ha"], ["s"]), mk("Mul", ["h", "s"], ["y"])]
        consts = {"alpha": 1.702}
    else:
        nodes = [mk("QuickGelu", ["h"], ["y"], domain="com.microsoft")]
    et = TensorProto.FLOAT if elem == np.float32 else TensorProto.FLOAT16
    inits = [numpy_helper.from_array(w, "w")] + [numpy_helper.from_array(np.array(v, elem), nm) for nm, v in consts.items()]
    m = helper.make_model(
        helper.make_graph([mk("MatMul", ["x", "w"], ["h"], name="mm"), *nodes], "g",
                          [helper.make_tensor_value_info("x", et, ["b", k])],
                          [helper.make_tensor_value_info("y", et, ["b", n])], inits),
        opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)], ir_version=8)
    kind = "silu" if form.startswith("silu") else "quick_gelu"
    q, rep = quantize_model(m, QuantizeOptions(smooth="off"))
    assert [(r.name, r.activation) for r in rep.converted] == [("mm", kind)]
    assert [x.op_type for x in q.graph.node] == ["DynQMatMul"]
    onnx.checker.check_model(q)
    x = (rng.standard_normal((64, k)) * 2).astype(elem)
    ref, got = session(m, custom=False).run(None, {"x": x})[0], session(q).run(None, {"x": x})[0]
    assert cosine(ref.astype(np.float32), got.astype(np.float32)) > 0.999
    p = dynq.PackedWeights.from_float(w.astype(np.float32), layout="kn")
    np.testing.assert_array_equal(got, dynq.gemm(p, x, epilogue=kind))


def test_quick_gelu_with_another_alpha_is_not_fused():
    """com.microsoft.QuickGelu with an alpha other than 1.702 stays a node (the epilogue has that
    alpha only)."""
    w = f32(16, 24)
    m = _mm_model(w, [helper.make_node("QuickGelu", ["h"], ["y"], domain="com.microsoft", alpha=1.0)])
    m.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    q, rep = quantize_model(m, QuantizeOptions(smooth="off"))
    assert [(r.name, r.activation) for r in rep.converted] == [("mm", "none")]
    assert [x.op_type for x in q.graph.node] == ["DynQMatMul", "QuickGelu"]


def test_attention_weights_behind_identity_leave_no_float_copy():
    """Attention weights read through an Identity: once split and converted, neither the float
    weights nor the Identity stay in the model."""
    m = _attention_model(mask="2d")
    att = next(n for n in m.graph.node if n.op_type == "Attention")
    att.input[1] = "qkv_w_id"
    m.graph.node.insert(0, helper.make_node("Identity", ["qkv_w"], ["qkv_w_id"], name="id"))
    q, rep = quantize_model(m, QuantizeOptions(smooth="off"))
    assert rep.attention_split == 1 and len(rep.converted) == 4
    assert "qkv_w" not in {t.name for t in q.graph.initializer} and "Identity" not in [n.op_type for n in q.graph.node]
    f = _attention_feeds(m)
    assert cosine(session(m, custom=False).run(None, f)[0], session(q).run(None, f)[0]) > 0.999

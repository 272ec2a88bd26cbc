"""The converter on many random models built from the patterns exporters emit.

Each model is a chain of 1 to 4 layers over an input of rank 1 to 4, drawn from a seeded
generator: MatMul or Gemm (transB, alpha, beta, C of several shapes), the weight as an
initializer, behind an Identity, in a Constant node, as the Transpose of an [N, K] initializer
or the Cast of one in the other float type, sometimes shared with an earlier layer; a bias Add
in either operand order and of several broadcast shapes; an activation (ReLU, the erf GELU as
PyTorch's nodes or the Gelu op, the tanh GELU as GPT-2's or PyTorch's nodes or the Gelu op,
either as ONNX Runtime's com.microsoft.Gelu and FastGelu, tanh, SiLU); a com.microsoft.Attention
node before the chain (split by the converter into three layers and MultiHeadAttention); a residual Add in either order; a
LayerNormalization or its nodes as PyTorch exports it below opset 17; layers that read one
input side by side (as Q, K and V do); the attention context joined from its heads before a
layer, and a layer's output split into heads; tensors in the middle that are also graph
outputs; nodes without names and tensors named as PyTorch names them; the whole chain in both
branches of an If (as a merged decoder has it). float32 and float16 models, opsets 13, 17
and 20. The options vary too: weight and activation granularity,
activation type, 7-bit weights, grouping, smoothing.

For every model: the converter replaces every layer, the result passes the ONNX checker, loads
in ONNX Runtime with the dynq library and gives, on inputs of two shapes (batch and sequence
sizes the converter did not see), every graph output close to the float model's: a layer whose
bias, activation, residual, scale or transposition were folded wrongly would be far off. Close,
not equal: the layers are quantized. The evaluator then finds every converted layer and measures
each alone.
"""

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from dynq.onnx import QuantizeOptions, evaluate, quantize_model
from ortutil import ORT_F16_OP, ORT_VERSION, session

# The first ONNX Runtime that takes a custom op's variadic outputs ('split' groups).
ORT_GROUPS = (1, 18)
# ONNX Runtime 1.17.3 aborts while creating a session for some float models whose
# LayerNormalization has no bias input (an assertion in its graph optimizer; seen after the
# erf GELU pattern); 1.31.1 does not. Older runtimes get a bias on every layer norm.
ORT_LN_WITHOUT_BIAS = (1, 31)

MODELS = 200


class Builder:
    """A graph under construction; names are unique per model."""

    def __init__(self, rng, elem, opset, rng_ms=None):
        self.rng, self.elem, self.opset = rng, elem, opset
        # ONNX Runtime's fused ops (com.microsoft) are drawn from a generator of their own, so
        # that adding them left the rest of each seed's model as it was.
        self.rng_ms = rng_ms if rng_ms is not None else np.random.default_rng(0)
        self.ms = False  # the model uses com.microsoft ops
        self.np = np.float16 if elem == TensorProto.FLOAT16 else np.float32
        self.nodes, self.inits, self.outputs = [], [], []
        self.count = 0
        self.weights = {}  # (k, n) -> an initializer name, for sharing
        self.expected = 0  # layers the converter must replace
        self.gelus = 0  # GELUs and SiLUs right after a layer (or its bias), which must be folded into it

    def name(self, base):
        """A unique name; some in the style of PyTorch exports ("/layers.0/MatMul_output_0",
        "onnx::MatMul_12")."""
        self.count += 1
        style = self.rng.integers(0, 4)
        if style == 0:
            return f"/layers.{self.count}/{base}output_0"
        if style == 1:
            return f"onnx::{base}{self.count}"
        return f"{base}{self.count}"

    def node_name(self, op):
        """Exporters leave many node names empty."""
        return "" if self.rng.random() < 0.3 else self.name(op)

    def const(self, arr, base):
        n = self.name(base)
        self.inits.append(numpy_helper.from_array(np.asarray(arr, self.np), n))
        return n

    def scalar(self, v):
        return self.const(np.array(v), "c")

    def ints(self, v):
        n = self.name("shape")
        self.inits.append(numpy_helper.from_array(np.asarray(v, np.int64), n))
        return n

    def node(self, op, ins, **attrs):
        out = self.name(op.lower() + "_")
        self.nodes.append(helper.make_node(op, ins, [out], name=self.node_name(op), **attrs))
        return out

    def weight(self, k, n, scale):
        """A weight [k, n]: new or shared; an initializer, behind an Identity, in a Constant,
        the Transpose of an [n, k] initializer (unoptimized dynamo exports) or the Cast of one
        in the other float type."""
        r = self.rng
        if (k, n) in self.weights and r.random() < 0.3:
            return self.weights[(k, n)]
        w = (r.standard_normal((k, n)) * scale).astype(self.np)
        how = r.choice(["init", "init", "init", "identity", "constant", "transpose", "cast"])
        if how == "constant":
            out = self.name("wconst_")
            self.nodes.append(helper.make_node("Constant", [], [out], name=self.node_name("Constant"), value=numpy_helper.from_array(w, out + "_value")))
            return out
        if how == "transpose":
            return self.node("Transpose", [self.const(w.T, "wt")], **({"perm": [1, 0]} if r.random() < 0.5 else {}))
        if how == "cast":
            other = np.float32 if self.np == np.float16 else np.float16
            name = self.name("wc")
            self.inits.append(numpy_helper.from_array(w.astype(other), name))
            return self.node("Cast", [name], to=self.elem)
        name = self.const(w, "w")
        self.weights[(k, n)] = name
        return self.node("Identity", [name]) if how == "identity" else name


def activation(b, x):
    r = b.rng
    kind = r.choice(["none", "none", "relu", "gelu_erf", "gelu_op", "gelu_tanh", "gelu_tanh_op", "tanh", "silu"])
    if b.elem == TensorProto.FLOAT16 and kind in ("gelu_erf", "gelu_op", "gelu_tanh_op"):
        kind = "relu"  # ONNX Runtime's CPU kernels for Erf and Gelu take float only
    if kind in ("gelu_op", "gelu_tanh_op") and b.opset < 20:
        kind = {"gelu_op": "gelu_erf", "gelu_tanh_op": "gelu_tanh"}[kind]  # the Gelu op is opset 20
    if kind == "relu":
        return b.node("Relu", [x]), kind
    if kind == "tanh":
        return b.node("Tanh", [x]), kind
    if kind == "silu":
        return b.node("Mul", [x, b.node("Sigmoid", [x])]), kind
    if kind in ("gelu_erf", "gelu_tanh") and b.elem == TensorProto.FLOAT and b.rng_ms.random() < 0.25:
        # As ONNX Runtime's optimizer leaves them: com.microsoft.Gelu and FastGelu.
        b.ms = True
        return b.node("Gelu" if kind == "gelu_erf" else "FastGelu", [x], domain="com.microsoft"), kind
    if kind == "gelu_op":
        return b.node("Gelu", [x]), kind
    if kind == "gelu_tanh_op":
        return b.node("Gelu", [x], approximate="tanh"), kind
    if kind == "gelu_tanh":
        # 0.5 * x * (1 + tanh(sqrt(2/pi) * (x + 0.044715 * x^3))): x^3 as Pow (float only on
        # ONNX Runtime's CPU) or x*x*x, constants on either side, the halving first or last.
        if b.elem == TensorProto.FLOAT and r.random() < 0.5:
            cube = b.node("Pow", [x, b.scalar(3.0)])
        else:
            cube = b.node("Mul", [x, b.node("Mul", [x, x])])
        kc = b.node("Mul", [cube, b.scalar(0.044715)] if r.random() < 0.5 else [b.scalar(0.044715), cube])
        u = b.node("Mul", [b.scalar((2 / np.pi) ** 0.5), b.node("Add", [x, kc])])
        e = b.node("Add", [b.scalar(1.0), b.node("Tanh", [u])])
        if r.random() < 0.5:
            return b.node("Mul", [b.scalar(0.5), b.node("Mul", [x, e])]), kind
        return b.node("Mul", [b.node("Mul", [b.scalar(0.5), x]), e]), kind
    if kind == "gelu_erf":
        d = b.node("Div", [x, b.scalar(2**0.5)])
        e = b.node("Add", [b.node("Erf", [d]), b.scalar(1.0)])
        if r.random() < 0.5:
            return b.node("Mul", [b.node("Mul", [x, e]), b.scalar(0.5)]), kind
        return b.node("Mul", [b.node("Mul", [x, b.scalar(0.5)]), e]), kind
    return x, kind


def layer(b, x, rank, k, last):
    """One layer reading x (last dimension k); returns (output, its last dimension). A layer of
    one output (a regression head) comes last only: one value in the middle, a dot product
    that may cancel to near 0, would carry its relative error into every later value."""
    r = b.rng
    n = int(r.choice([4, 16, 24, 33, 64, max(k, 4)] + ([1] if last else [])))
    if rank == 2 and r.random() < 0.4:
        # Gemm: W as [K, N] or, with transB, [N, K]; alpha scales the product, beta the bias C.
        trans_b = int(r.random() < 0.5)
        alpha = float(r.choice([1.0, 1.0, 0.5]))
        beta = float(r.choice([1.0, 1.0, 0.0, 2.0]))
        w = (r.standard_normal((k, n)) / np.sqrt(k)).astype(b.np)
        ins = [x, b.const(w.T if trans_b else w, "g")]
        c_shape = r.choice(["none", "n", "1n", "1"])
        if c_shape != "none":
            shape = {"n": (n,), "1n": (1, n), "1": (1,)}[c_shape]
            ins.append(b.const(r.standard_normal(shape) * 0.5, "gc"))
        y = b.node("Gemm", ins, transB=trans_b, alpha=alpha, beta=beta)
    else:
        y = b.node("MatMul", [x, b.weight(k, n, 1 / np.sqrt(k))])
    b.expected += 1
    foldable = True
    if r.random() < 0.15:
        b.outputs.append(y)  # read by the graph's caller too: nothing after it can be folded
        foldable = False
    if r.random() < 0.6:
        shape = (n,) if r.random() < 0.5 else (1,) * (max(rank, 1) - 1) + (n,)
        bias = b.const(r.standard_normal(shape) * 0.5, "b")
        y = b.node("Add", [y, bias] if r.random() < 0.5 else [bias, y])
    y, kind = activation(b, y)
    if foldable and (kind.startswith("gelu") or kind == "silu"):
        b.gelus += 1
    if n == k and r.random() < 0.4:
        y = b.node("Add", [y, x] if r.random() < 0.5 else [x, y])
    if n >= 16 and kind != "relu" and r.random() < 0.25:
        # (Over a handful of values, or rows that a ReLU left nearly all zero, a layer norm
        # divides by a near-zero spread and magnifies the quantization error past any fixed
        # bound; real layers normalize hundreds of varied values.)
        g = b.const(1 + r.standard_normal(n) * 0.1, "ln_g")
        with_bias = r.random() < 0.7 or ORT_VERSION < ORT_LN_WITHOUT_BIAS
        beta = b.const(r.standard_normal(n) * 0.1, "ln_b") if with_bias else None
        if b.opset >= 17 and r.random() < 0.7:
            y = b.node("LayerNormalization", [y, g] + ([beta] if beta else []), axis=-1, epsilon=1e-5)
        else:
            y = decomposed_layer_norm(b, y, g, beta)
    return y, n


def decomposed_layer_norm(b, x, g, beta):
    """PyTorch's LayerNorm below opset 17 (and the same nodes at any opset)."""
    axes = {"axes": [-1]} if b.opset < 18 else {}
    def mean(t):
        ins = [t] if b.opset < 18 else [t, b.ints([-1])]
        return b.node("ReduceMean", ins, keepdims=1, **axes)
    d = b.node("Sub", [x, mean(x)])
    v = mean(b.node("Pow", [d, b.scalar(2.0)]))
    s = b.node("Sqrt", [b.node("Add", [v, b.scalar(1e-5)])])
    y = b.node("Mul", [b.node("Div", [d, s]), g])
    return b.node("Add", [y, beta]) if beta else y


def side_by_side(b, x, rank, k):
    """Two or three MatMuls reading x (as Q, K and V do), their outputs summed."""
    r = b.rng
    n = int(r.choice([8, 32, k]))
    outs = []
    for _ in range(int(r.integers(2, 4))):
        y = b.node("MatMul", [x, b.weight(k, n, 1 / np.sqrt(k))])
        b.expected += 1
        if r.random() < 0.5:
            y = b.node("Add", [y, b.const(r.standard_normal(n) * 0.5, "b")])
        outs.append(y)
    s = outs[0]
    for o in outs[1:]:
        s = b.node("Add", [s, o])
    return s, n


def heads_out(b, x, k):
    """A projection to attention heads: MatMul [+ bias] to h * d values, Reshape to [.., h, d]
    and Transpose to [b, h, s, d] (or [b, h, d, s], keys as some exporters lay them out)."""
    r = b.rng
    h, d = int(r.choice([2, 4])), int(r.choice([8, 16]))
    y = b.node("MatMul", [x, b.weight(k, h * d, 1 / np.sqrt(k))])
    b.expected += 1
    if r.random() < 0.7:
        y = b.node("Add", [y, b.const(r.standard_normal(h * d) * 0.5, "b")])
    y = b.node("Reshape", [y, b.ints([0, 0, h, d])])
    return b.node("Transpose", [y], perm=[0, 2, 1, 3] if r.random() < 0.6 else [0, 2, 3, 1])


def attention(b, x, k):
    """com.microsoft.Attention on x [batch, seq, k] (its fused Q/K/V weight and bias, 2 or 4
    heads, sometimes causal), as ONNX Runtime's transformer optimizer writes a BERT block's
    attention: the converter splits it into three layers and MultiHeadAttention."""
    r = b.rng_ms
    h, d = int(r.choice([2, 4])), int(r.choice([4, 8, 16]))
    w = (r.standard_normal((k, 3 * h * d)) / np.sqrt(k)).astype(np.float32)
    bias = (r.standard_normal(3 * h * d) * 0.2).astype(np.float32)
    attrs = {"unidirectional": 1} if r.random() < 0.3 else {}
    b.ms = True
    b.expected += 3
    return b.node("Attention", [x, b.const(w, "qkv_w"), b.const(bias, "qkv_b")], domain="com.microsoft", num_heads=h, **attrs), h * d


def random_model(seed):
    """(model, input shape with names for the dimensions fed at run time, options, layers)."""
    r = np.random.default_rng(seed)
    elem = TensorProto.FLOAT16 if r.random() < 0.2 else TensorProto.FLOAT
    # Older exports too: opset 13 (IR 7) and 17 (IR 8) beside 20 (IR 9).
    opset = int(r.choice([13, 17, 20, 20]))
    b = Builder(r, elem, opset, np.random.default_rng(10**6 + seed))
    rank = int(r.choice([1, 2, 2, 3, 3, 3, 4]))
    k = int(r.choice([1, 3, 16, 17, 40, 64]))
    x_shape = ["batch", "seq", "heads"][: rank - 1] + [k]
    x = "x"
    if rank == 3 and r.random() < 0.3:
        # The attention context in its head layout [b, h, s, d], brought to [b, s, h * d].
        h, d = int(r.choice([2, 4])), int(r.choice([8, 16]))
        x_shape = ["batch", h, "seq", d]
        x = b.node("Transpose", [x], perm=[0, 2, 1, 3])
        x = b.node("Reshape", [x, b.ints([0, 0, h * d])])
        k = h * d
    out_rank = {}
    if rank == 3 and elem == TensorProto.FLOAT and b.rng_ms.random() < 0.3:
        x, k = attention(b, x, k)
    layers = int(r.integers(1, 5))
    for i in range(layers):
        if rank == 3 and r.random() < 0.15:
            # Heads end the chain (the next layer would read the head layout).
            out_rank[heads_out(b, x, k)] = 4
            break
        if r.random() < 0.2:
            x, k = side_by_side(b, x, rank, k)
        else:
            x, k = layer(b, x, rank, k, i == layers - 1)
        if r.random() < 0.15:
            b.outputs.append(x)
    else:
        b.outputs.append(x)
    outs = list(dict.fromkeys(b.outputs + list(out_rank)))
    g = helper.make_graph(
        b.nodes,
        f"random{seed}",
        [helper.make_tensor_value_info("x", elem, x_shape)],
        [helper.make_tensor_value_info(o, elem, [None] * out_rank.get(o, rank)) for o in outs],
        b.inits,
    )
    opsets = [helper.make_opsetid("", opset)] + ([helper.make_opsetid("com.microsoft", 1)] if b.ms else [])
    m = helper.make_model(g, opset_imports=opsets, ir_version={13: 7, 17: 8, 20: 9}[opset])
    opts = QuantizeOptions(
        weight_granularity=str(r.choice(["per_channel", "per_channel", "per_tensor"])),
        act_granularity=str(r.choice(["per_row", "per_row", "per_tensor"])),
        act_type=str(r.choice(["asymmetric_u8", "asymmetric_u8", "symmetric_i8"])),
        group_shared_input=bool(r.random() < 0.5 and ORT_VERSION >= ORT_GROUPS),
        fuse_heads_transposed=bool(r.random() < 0.5),
        smooth=str(r.choice(["auto", "off"])),
        weight_qmax=int(r.choice([127, 127, 64])),
    )
    if r.random() < 0.15:
        # The chain in both branches of an If, as a merged decoder export has its network: the
        # weights stay outer initializers that both branches read.
        return in_if_branches(m, b.inits), x_shape, opts, 2 * b.expected, 2 * b.gelus
    return m, x_shape, opts, b.expected, b.gelus


def in_if_branches(m, inits):
    """`m`'s nodes as both branches of an If on a new boolean input "cond" (names made unique per
    branch), its initializers outer ones."""
    g = m.graph
    outs = [o.name for o in g.output]

    def branch(tag):
        names = {o: f"{o}_{tag}" for n in g.node for o in n.output}
        nodes = []
        for n in g.node:
            c = onnx.NodeProto()
            c.CopyFrom(n)
            c.input[:] = [names.get(i, i) for i in n.input]
            c.output[:] = [names[o] for o in n.output]
            if c.name:
                c.name = f"{c.name}_{tag}"
            nodes.append(c)
        return helper.make_graph(nodes, tag, [], [helper.make_tensor_value_info(names[o.name], o.type.tensor_type.elem_type, [None] * len(o.type.tensor_type.shape.dim)) for o in g.output])

    node = helper.make_node("If", ["cond"], outs, name="branches", then_branch=branch("then"), else_branch=branch("else"))
    inputs = list(g.input) + [helper.make_tensor_value_info("cond", TensorProto.BOOL, [])]
    g2 = helper.make_graph([node], g.name, inputs, list(g.output), inits)
    return helper.make_model(g2, opset_imports=list(m.opset_import), ir_version=m.ir_version)


def feeds(x_shape, elem, lead, seed, cond=None):
    """x with its named dimensions from `lead` (batch, seq, heads in turn); and the If's
    condition for models that have one."""
    sizes = iter(lead)
    shape = tuple(d if isinstance(d, int) else next(sizes) for d in x_shape)
    dt = np.float16 if elem == TensorProto.FLOAT16 else np.float32
    f = {"x": np.random.default_rng(seed).standard_normal(shape).astype(dt)}
    if cond is not None:
        f["cond"] = np.array(cond)
    return f


def compare(ref, got, label):
    ref, got = ref.astype(np.float64), got.astype(np.float64)
    assert ref.shape == got.shape, (label, ref.shape, got.shape)
    assert np.all(np.isfinite(got)), label
    # Every tensor of these models has values of order 1 (unit inputs, weights of 1 / sqrt(K),
    # biases of 0.5) before cancellation: an output of a few values can be near 0 (a dot product
    # of 32 terms summing to 0.08, say), and its error is then judged against 0.25 (0.5 for
    # fewer than 8 values, a regression head's one), not its size.
    scale = max(np.sqrt(np.mean(ref * ref)), 0.25 if ref.size >= 8 else 0.5)
    rms = np.sqrt(np.mean((ref - got) ** 2)) / scale
    assert rms <= 0.15, f"{label}: rms error {rms:.3g} of {scale:.3g}"


@pytest.mark.parametrize("seed", range(MODELS))
def test_random_model_converts_and_matches_float(seed):
    m, x_shape, opts, expected, gelus = random_model(seed)
    onnx.checker.check_model(m)
    elem = m.graph.input[0].type.tensor_type.elem_type
    if elem == TensorProto.FLOAT16 and ORT_VERSION < ORT_F16_OP:
        pytest.skip("float16 DynQMatMul needs a newer ONNX Runtime")
    conv, rep = quantize_model(m, opts)
    assert len(rep.converted) == expected, (opts, rep.summary(), rep.skipped)
    left = [nd.op_type for nd in conv.graph.node if nd.op_type in ("MatMul", "Gemm")]
    assert not left, left
    # Every GELU (erf and tanh forms alike) and SiLU right after a layer is folded into it.
    folded = sum(c.activation in ("gelu", "gelu_tanh", "silu") for c in rep.converted)
    assert folded == gelus, (folded, gelus, [(c.name, c.activation) for c in rep.converted])
    onnx.checker.check_model(conv)
    s_ref, s_q = session(m, custom=False), session(conv)
    names = [o.name for o in m.graph.output]
    assert [o.name for o in conv.graph.output] == names
    branches = any(i.name == "cond" for i in m.graph.input)
    for lead, fs in (((2, 5, 3), 1), ((1, 1, 1), 2)):
        f = feeds(x_shape, elem, lead, seed * 10 + fs, cond=(fs == 1) if branches else None)
        for name, ref, got in zip(names, s_ref.run(names, f), s_q.run(names, f)):
            compare(ref, got, f"model {seed} ({opts}), output {name}, x {f['x'].shape}")
    # The evaluator finds every converted layer and measures each alone (the float model's input
    # to it, through the op): over 300 models the lowest such cosine was 0.9995. (Layers inside
    # the If branches are measured only through the model's outputs.)
    ev = evaluate(m, conv, [feeds(x_shape, elem, (2, 5, 3), seed * 10 + 3, cond=True if branches else None)])
    assert len(ev.layers) == (0 if branches else len(rep.converted)), (len(ev.layers), len(rep.converted))
    for layer in ev.layers:
        # (A layer of a few outputs per row, or one, gives the cosine of a handful of values:
        # 0.996-0.9975 seen.)
        assert layer["isolated_cosine"] > (0.998 if layer["n"] >= 8 else 0.99), (seed, layer)

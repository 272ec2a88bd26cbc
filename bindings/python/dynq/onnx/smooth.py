"""Activation smoothing (SmoothQuant without a calibration set).

Per-row activation quantization gives every value of a row (a token) one range. When a few
input channels are much larger than the rest (the outlier channels that LayerNorm outputs of
transformers have), that range is set by them and the other channels keep only a few levels.
Smoothing divides channel ``k`` of the activations by ``s[k]`` and multiplies row ``k`` of the
weight by it, which leaves the product unchanged and moves part of the outlier range into the
weights (whose int8 scales are per output channel, so they absorb it better).

``s[k] = max|a_k|^alpha / max|w_k|^(1 - alpha)`` (normalized to a geometric mean of 1). The
activation maxima come from one run of the fp32 model on inputs generated from its signature
(:func:`dynq.onnx.make_inputs`) or on sample inputs given by the caller; no data set is needed.

Smoothing does not help every layer (the input of a transformer's second FFN matrix, after GELU,
usually gets worse), so each layer is checked: factors fitted on half of the calibration rows
are judged on the other half, whose product is computed in numpy with dynq's quantization (the
options' weight and activation schemes) with and without smoothing, for a few ``alpha``; the
best is kept only if it improves the layer's SQNR on those held-out rows by at least
``QuantizeOptions.smooth_min_gain_db``. A layer with fewer than ``MIN_ROWS`` calibration rows
is not smoothed (the generated inputs give 256 rows: 2 sequences of 128, or a batch of 256
feature rows). The op receives ``1 / s`` as its
``smooth`` input and multiplies A by it before quantizing (one f32 multiplication per value).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import numpy as np
import onnx

ALPHAS = (0.2, 0.3, 0.4)
# Rows of calibration activations kept per tensor, and output columns used for the SQNR check
# (with per-channel weights every column is quantized on its own, so a subset estimates well).
MAX_ROWS = 512
MAX_COLS = 768
# Fewest calibration rows (tokens) a layer is smoothed with: half fit the factors, half judge
# them, and with a few rows that judgement is noise. (A random-model test found a layer of
# K = 4 smoothed on one row each way, "+14 dB", whose output on other inputs was then 2x off.)
MIN_ROWS = 32
# Factors are kept within this ratio of their geometric mean.
MAX_FACTOR = 1e4
# Activation tensors fetched per run of the float model.
CHUNK = 48


@dataclass
class Choice:
    smooth: np.ndarray  # float32 [K]: the op's input (1 / s)
    alpha: float
    gain_db: float


def _calibration_batch(model: onnx.ModelProto, rows: int = 256, seq_len: int = 128) -> int:
    """The batch size for generated calibration inputs that gives the layers about `rows` rows:
    2 for sequence models (2 x 128 tokens), up to `rows` where a sample is one row ([batch, K]
    features)."""
    inits = {t.name for t in model.graph.initializer}
    per_item = 1
    for vi in model.graph.input:
        if vi.name in inits or not vi.type.tensor_type.HasField("shape"):
            continue
        t = vi.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else seq_len for d in t.shape.dim][1:]
        # A float input's last dimension is its features; an integer one (token ids) is all rows.
        if t.elem_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE, onnx.TensorProto.BFLOAT16):
            dims = dims[:-1]
        per_item = max(per_item, int(np.prod(dims, dtype=np.int64)) if dims else 1)
    return int(min(rows, max(2, -(-rows // per_item))))


class Calibration:
    """Activations of the float model's MatMul/Gemm inputs on sample inputs, computed on first use.

    ``feeds``: sample inputs (dicts keyed by input name); generated from the model's signature
    when None. ``wanted``: the tensor names whose activations are needed.
    """

    def __init__(self, model: onnx.ModelProto, wanted: Sequence[str], feeds: Optional[List[Dict[str, np.ndarray]]] = None):
        self._model = model
        self._wanted = list(dict.fromkeys(wanted))
        self._feeds = feeds
        self._acts: Optional[Dict[str, np.ndarray]] = None
        self.error: Optional[str] = None

    def _run(self):
        self._acts = {}
        try:
            import onnxruntime as ort

            from .evaluate import make_inputs

            feeds = self._feeds if self._feeds is not None else make_inputs(self._model, batch=_calibration_batch(self._model), seq_len=128, samples=1, seed=1)
            inputs = {i.name for i in self._model.graph.input}
            names = [n for n in self._wanted if n not in inputs]
            # Element types of the tensors asked for (float16 models give float16 activations).
            try:
                inferred = onnx.shape_inference.infer_shapes(self._model, strict_mode=False)
                types = {v.name: v.type.tensor_type.elem_type for v in inferred.graph.value_info}
            except Exception:
                types = {}
            m = onnx.ModelProto()
            m.CopyFrom(self._model)
            have = {o.name for o in m.graph.output}
            for n in names:
                if n not in have:
                    # A type shape inference could not give (outputs of com.microsoft ops, which
                    # float16 models from ONNX Runtime's optimizer contain) is left out: ONNX
                    # Runtime takes the tensor's own type (declaring float there failed the run).
                    t = types.get(n)
                    m.graph.output.append(onnx.helper.make_tensor_value_info(n, t, None) if t else onnx.ValueInfoProto(name=n))
            if m.ByteSize() >= 1_800_000_000:
                self.error = "model over 1.8 GB: smoothing needs a run of it (not done)"
                return
            so = ort.SessionOptions()
            so.log_severity_level = 3
            # Basic optimizations only: fusions must not remove the tensors we ask for.
            so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
            sess = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
            valid = {i.name for i in sess.get_inputs()}
            rng = np.random.default_rng(0)
            # A few tensors per run, each cut to MAX_ROWS rows right away: memory stays bounded
            # for models with hundreds of layers (at the price of one model run per chunk).
            for c in range(0, max(len(names), 1), CHUNK):
                chunk = names[c : c + CHUNK]
                parts: Dict[str, List[np.ndarray]] = {n: [] for n in chunk}
                if c == 0:
                    parts.update({n: [] for n in self._wanted if n in inputs})
                for f in feeds:
                    f = {k: v for k, v in f.items() if k in valid}
                    if chunk:
                        for n, v in zip(chunk, sess.run(chunk, f)):
                            parts[n].append(np.asarray(v))
                    for n in parts:
                        if n in inputs and n in f:
                            parts[n].append(np.asarray(f[n]))
                for n, vs in parts.items():
                    if not vs or any(v.ndim < 1 or not np.issubdtype(v.dtype, np.floating) for v in vs):
                        continue
                    k = vs[0].shape[-1]
                    if any(v.shape[-1] != k for v in vs):
                        continue
                    a = np.concatenate([v.reshape(-1, k) for v in vs])
                    if a.shape[0] > MAX_ROWS:
                        a = a[np.sort(rng.choice(a.shape[0], MAX_ROWS, replace=False))]
                    a = a.astype(np.float32)
                    if np.all(np.isfinite(a)):
                        self._acts[n] = a
        except Exception as e:  # a model the generator or ONNX Runtime cannot run
            self.error = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]

    def activations(self, name: str) -> Optional[np.ndarray]:
        if self._acts is None:
            self._run()
        return self._acts.get(name)


def _quant_w(w: np.ndarray, granularity: str, qmax: int = 127) -> np.ndarray:
    """Dequantized int8 weights [K, N] (symmetric, max|w| / qmax per column or per tensor)."""
    amax = np.abs(w).max(axis=0, keepdims=True) if granularity == "per_channel" else np.abs(w).max(keepdims=True)
    sc = np.where(amax > 0, amax / qmax, 1.0)
    return np.clip(np.round(w / sc), -qmax, qmax) * sc


def _quant_a(a: np.ndarray, granularity: str, act_type: str) -> np.ndarray:
    """Dequantized activations [M, K] as dynq quantizes them (per row or per tensor)."""
    axis = 1 if granularity == "per_row" else None
    keep = granularity == "per_row"
    if act_type == "symmetric_i8":
        amax = np.abs(a).max(axis=axis, keepdims=keep)
        sc = np.where(amax > 0, amax / 127.0, 1.0)
        return np.clip(np.round(a / sc), -127, 127) * sc
    lo = np.minimum(a.min(axis=axis, keepdims=keep), 0.0)
    hi = np.maximum(a.max(axis=axis, keepdims=keep), 0.0)
    sc = np.where(hi > lo, (hi - lo) / 255.0, 1.0)
    zp = np.clip(np.round(-lo / sc), 0, 255)
    return (np.clip(np.round(a / sc) + zp, 0, 255) - zp) * sc


def _sqnr(ref: np.ndarray, y: np.ndarray) -> float:
    err = float(np.sum((ref.astype(np.float64) - y) ** 2))
    sig = float(np.sum(ref.astype(np.float64) ** 2))
    if err == 0.0:
        return float("inf")
    return 10.0 * np.log10(max(sig, 1e-300) / err)


def factors(a_max: np.ndarray, w_max: np.ndarray, alpha: float) -> np.ndarray:
    """``s = a_max^alpha / w_max^(1 - alpha)``, geometric mean 1, within ``MAX_FACTOR`` of it."""
    a_max = np.maximum(a_max.astype(np.float64), max(float(a_max.max()), 1e-30) * 1e-6)
    w_max = np.maximum(w_max.astype(np.float64), max(float(w_max.max()), 1e-30) * 1e-6)
    s = a_max**alpha / w_max ** (1.0 - alpha)
    s = s / np.exp(np.mean(np.log(s)))
    return np.clip(s, 1.0 / MAX_FACTOR, MAX_FACTOR)


def choose(
    a: np.ndarray, w: np.ndarray, weight_granularity: str, act_granularity: str, act_type: str, min_gain_db: float, weight_qmax: int = 127
) -> Optional[Choice]:
    """The best smoothing of the layer ``a [M, K] @ w [K, N]``, or None if none gains enough.

    The factors are fitted on the even rows of ``a`` and judged on the odd ones (held out), so
    that a gain that only fits the calibration sample does not count; the factors kept are then
    fitted on all rows."""
    if a.shape[0] < MIN_ROWS:
        return None
    # float32 products: the SQNR estimate needs far less precision than that, and they are
    # several times faster than float64 on models with thousands of channels.
    fit, held = a[0::2], a[1::2].astype(np.float32)
    w32 = w.astype(np.float32)
    n = w32.shape[1]
    cols = np.arange(n) if n <= MAX_COLS else np.sort(np.random.default_rng(1).choice(n, MAX_COLS, replace=False))
    ref = held.astype(np.float64) @ w32[:, cols].astype(np.float64)

    def sqnr_with(ws: np.ndarray, xs: np.ndarray) -> float:
        """SQNR of the held-out product with weight `ws` (before int8) and activations `xs`."""
        if weight_granularity == "per_tensor":
            wq = _quant_w(ws, weight_granularity, weight_qmax)[:, cols]
        else:
            wq = _quant_w(ws[:, cols], weight_granularity, weight_qmax)
        return _sqnr(ref, _quant_a(xs, act_granularity, act_type) @ wq)

    def smooth_for(rows: np.ndarray, alpha: float):
        """The op's factors fitted on `rows`, and the weight as the converter stores it before
        int8 (divided by them); None if either is not finite."""
        sm = (1.0 / factors(np.abs(rows).max(axis=0), np.abs(w32).max(axis=1), alpha)).astype(np.float32)
        if not (np.all(np.isfinite(sm)) and np.all(sm > 0)):
            return None
        with np.errstate(over="ignore", invalid="ignore"):
            ws = (w32 / sm[:, None]).astype(np.float32)
        return (sm, ws) if np.all(np.isfinite(ws)) else None

    base = sqnr_with(w32, held)
    best: Optional[Choice] = None
    for alpha in ALPHAS:
        fitted = smooth_for(fit, alpha)
        if fitted is None:
            continue
        sm, ws = fitted
        # The activations as the op quantizes them: multiplied by the factors in f32.
        gain = sqnr_with(ws, held * sm) - base
        if np.isfinite(gain) and (best is None or gain > best.gain_db):
            best = Choice(sm, alpha, float(gain))
    if best is None or best.gain_db < min_gain_db:
        return None
    final = smooth_for(a, best.alpha)
    return Choice(final[0], best.alpha, best.gain_db) if final is not None else None


def held_out_sqnr(
    a: np.ndarray, w: np.ndarray, smooth: Optional[np.ndarray], weight_granularity: str, act_granularity: str, act_type: str, weight_qmax: int = 127
) -> float:
    """SQNR (dB) of ``a @ w`` on the odd (held-out) rows of ``a`` as dynq computes it: the op's
    factors ``smooth`` (or none) applied to the activations and divided out of the weight."""
    held = a[1::2].astype(np.float32)
    if held.shape[0] == 0:
        return float("nan")
    w32 = w.astype(np.float32)
    n = w32.shape[1]
    cols = np.arange(n) if n <= MAX_COLS else np.sort(np.random.default_rng(1).choice(n, MAX_COLS, replace=False))
    ref = held.astype(np.float64) @ w32[:, cols].astype(np.float64)
    if smooth is not None:
        held = held * smooth.astype(np.float32)
        w32 = (w32 / smooth.astype(np.float32)[:, None]).astype(np.float32)
    if weight_granularity == "per_tensor":
        wq = _quant_w(w32, weight_granularity, weight_qmax)[:, cols]
    else:
        wq = _quant_w(w32[:, cols], weight_granularity, weight_qmax)
    return _sqnr(ref, _quant_a(held, act_granularity, act_type) @ wq)

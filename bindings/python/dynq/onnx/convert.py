"""The converter: fp32 (or ONNX Runtime dynamically quantized) ONNX models to ``dynq.DynQMatMul``.

What it rewrites (everything else is kept as it was):

- ``MatMul(X, W)`` and ``Gemm(X, W[, C])`` whose weight ``W`` is a constant 2-D float initializer
  (not also a graph input, which would make it overridable), with a following ``Add`` of a
  constant bias of N values folded in, and optionally a following ReLU or GELU fused into the
  op's epilogue: ``Relu``; the erf GELU (``Gelu``, ``com.microsoft.Gelu`` and ``BiasGelu``, or
  element-wise nodes such as PyTorch's ``Div/Erf/Add/Mul/Mul``); the tanh GELU (``Gelu`` with
  ``approximate="tanh"``, ``com.microsoft.FastGelu``, or element-wise nodes such as GPT-2's
  ``gelu_new``); SiLU (``x * Sigmoid(x)``); QuickGELU (``com.microsoft.QuickGelu``,
  ``x * Sigmoid(1.702 * x)``).
- Models already quantized by ONNX Runtime's ``quantize_dynamic``: ``DynamicQuantizeLinear`` +
  ``MatMulInteger`` + ``Cast`` + scale ``Mul``, ``com.microsoft.DynamicQuantizeMatMul`` and
  ``com.microsoft.MatMulIntegerToFloat`` with constant int8 or uint8 weights. The integer weights
  and their scales are reused (no round trip through fp32): ``q - zero_point`` when it fits int8
  (always for symmetric int8 weights), else that channel is requantized from those integers.
- ``com.microsoft.Attention`` (ONNX Runtime's fused attention, Q/K/V product included): split
  into its three products, converted as above, and ``com.microsoft.MultiHeadAttention``; see
  :func:`decompose_attention`.
- Optionally (on by default) embedding tables (including the word table that
  ``com.microsoft.EmbedLayerNormalization`` reads, see :func:`split_embed_layer_norm`):
  ``Gather(table, ids)`` on a constant float
  ``[V, D]`` table becomes an int8 table with one scale per row, gathered and dequantized
  (``Cast`` and ``Mul``).

Weights are quantized exactly as the dynq library does (symmetric int8, ``scale = max|w|/127``,
round half to even); see :func:`dynq.quantize_weights`.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .. import _weight_qmax, quantize_weights

DOMAIN = "dynq"
OP = "DynQMatMul"
METADATA_KEY = "dynq.quantize_options"


@dataclass
class QuantizeOptions:
    """Options of :func:`quantize_model` (the CLI flags have the same names)."""

    weight_granularity: str = "per_channel"  # or "per_tensor"
    act_granularity: str = "per_row"  # or "per_tensor"
    act_type: str = "asymmetric_u8"  # or "symmetric_i8"
    op_types: Tuple[str, ...] = ("MatMul", "Gemm")  # float ops to convert
    include_nodes: Tuple[str, ...] = ()  # if given, only these node names (exact names)
    exclude_nodes: Tuple[str, ...] = ()
    exclude_op_types: Tuple[str, ...] = ()
    min_size: int = 0  # skip weights with fewer than this many elements (K * N)
    fuse_bias: bool = True
    fuse_activation: bool = True
    fuse_residual: bool = True  # fold a following Add of a same-rank tensor (the skip connection)
    fuse_layer_norm: bool = True  # ... and a LayerNormalization after that Add (post-LN transformer blocks)
    fuse_heads: bool = True  # fold a following Reshape to attention heads and Transpose(perm=[0, 2, 1, 3])
    fuse_heads_transposed: bool = False  # ... and Transpose(perm=[0, 2, 3, 1]) (transposed keys); see README
    group_shared_input: bool = False  # one node ('split' outputs) for MatMuls reading one input; ONNX Runtime >= 1.18
    group_max_loss_db: float = 0.2  # ... unless the group's shared smoothing costs a layer more SQNR than this
    convert_quantized: bool = True  # MatMulInteger / DynamicQuantizeMatMul / MatMulIntegerToFloat
    quantize_embeddings: bool = True  # Gather on a constant float [V, D] table
    convert_attention: bool = True  # com.microsoft.Attention: its Q/K/V product as layers, see decompose_attention
    smooth: str = "auto"  # "auto": activation smoothing where it measurably helps (see smooth.py); "off"
    smooth_min_gain_db: float = 0.5  # a layer is smoothed only if its SQNR improves at least this much
    weight_qmax: int = 127  # weights in [-qmax, qmax]; 64 (reduce_range) runs faster on AVX2 CPUs without VNNI

    def __post_init__(self):
        self._names_as_tuples()

    def _names_as_tuples(self):
        # A single name given where a tuple of names is expected is one name, not its letters
        # (`include_nodes="fc1"` would otherwise select nodes named "f", "c" or "1").
        for f in ("op_types", "include_nodes", "exclude_nodes", "exclude_op_types"):
            v = getattr(self, f)
            if isinstance(v, str):
                setattr(self, f, (v,))
            elif not isinstance(v, tuple):
                setattr(self, f, tuple(v))

    def to_json(self) -> str:
        d = asdict(self)
        return json.dumps({k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}, sort_keys=True)

    @classmethod
    def from_json(cls, s: str) -> "QuantizeOptions":
        d = json.loads(s)
        known = {f for f in cls.__dataclass_fields__}
        d = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items() if k in known}
        return cls(**d)

    def check(self):
        self._names_as_tuples()  # also for fields assigned after construction
        for name, value, allowed in (
            ("weight_granularity", self.weight_granularity, ("per_channel", "per_tensor")),
            ("act_granularity", self.act_granularity, ("per_row", "per_tensor")),
            ("act_type", self.act_type, ("asymmetric_u8", "symmetric_i8")),
            ("smooth", self.smooth, ("auto", "off")),
        ):
            if value not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
        self.weight_qmax = _weight_qmax(self.weight_qmax)
        bad = set(self.op_types) - {"MatMul", "Gemm"}
        if bad:
            raise ValueError(f"op_types may contain MatMul and Gemm, got {sorted(bad)}")


@dataclass
class LayerRecord:
    """One converted layer."""

    name: str  # name of the new node (the original MatMul/Gemm/... node's name)
    source: str  # "MatMul", "Gemm", "MatMulInteger", "DynamicQuantizeMatMul", ...
    output: str  # output tensor name (the same name as in the original model)
    input: str  # activation input tensor name
    k: int
    n: int
    bias: bool
    activation: str
    weight_granularity: str
    requantized_channels: int = 0  # uint8/asymmetric sources: channels rescaled to fit int8
    smooth_alpha: Optional[float] = None  # activation smoothing applied (its alpha), or None
    smooth_gain_db: Optional[float] = None  # the layer's SQNR gain measured on calibration data
    fused_nodes: List[str] = field(default_factory=list)
    residual: Optional[str] = None  # the tensor added after the activation (a folded skip-connection Add)
    layer_norm: bool = False  # a LayerNormalization after the residual Add is folded too
    a_heads: bool = False  # the input is read from the attention-head layout (a folded Transpose + Reshape)
    heads: int = 0  # > 0: the output is written split into this many attention heads (folded Reshape + Transpose)
    heads_transposed: bool = False  # ... as [batch, heads, d, seq] rather than [batch, heads, seq, d]
    group: Optional[str] = None  # the dynq node computing this layer with others that read the same input


@dataclass
class Report:
    converted: List[LayerRecord] = field(default_factory=list)
    skipped: List[Tuple[str, str, str]] = field(default_factory=list)  # (node, op_type, reason)
    embeddings: List[Tuple[str, int, int]] = field(default_factory=list)  # (node, V, D)
    fp32_weight_bytes: int = 0
    int8_weight_bytes: int = 0
    smooth_note: Optional[str] = None  # why smoothing was not tried, if it was asked for
    smooth_few_rows: int = 0  # layers not smoothed: fewer calibration rows than smooth.MIN_ROWS
    attention_split: int = 0  # com.microsoft.Attention nodes whose Q/K/V product became layers

    def summary(self) -> str:
        lines = [
            f"converted {len(self.converted)} layers to dynq.{OP}"
            + (f", {len(self.embeddings)} embedding tables to int8" if self.embeddings else "")
            + f"; weights {self.fp32_weight_bytes / 1e6:.1f} MB fp32 -> {self.int8_weight_bytes / 1e6:.1f} MB int8"
        ]
        fused = sum(1 for r in self.converted if r.bias)
        nres = sum(1 for r in self.converted if r.residual)
        groups = {r.group for r in self.converted if r.group}
        acts = {}
        for r in self.converted:
            if r.activation != "none":
                acts[r.activation] = acts.get(r.activation, 0) + 1
        lines.append(
            f"  bias folded: {fused}; activations fused: "
            + (", ".join(f"{k} {v}" for k, v in sorted(acts.items())) or "none")
            + f"; residual Adds folded: {nres}"
            + f"; layer norms folded: {sum(1 for r in self.converted if r.layer_norm)}"
        )
        if self.attention_split:
            lines.append(
                f"  com.microsoft.Attention nodes split into their Q, K, V layers and MultiHeadAttention: {self.attention_split}"
            )
        nh = sum(1 for r in self.converted if r.a_heads)
        if nh:
            lines.append(f"  attention contexts read in their head layout (Transpose + Reshape folded): {nh}")
        if groups:
            ng = sum(1 for r in self.converted if r.group)
            lines.append(f"  layers sharing an input, computed together: {ng} layers in {len(groups)} nodes (input quantized once)")
        sm = [r for r in self.converted if r.smooth_alpha is not None]
        if sm:
            gains = sorted(r.smooth_gain_db for r in sm)
            lines.append(
                f"  activation smoothing: {len(sm)} of {len(self.converted)} layers "
                f"(SQNR gain on calibration data {gains[0]:.1f} to {gains[-1]:.1f} dB, median {gains[len(gains) // 2]:.1f})"
            )
        if self.smooth_note:
            lines.append(f"  activation smoothing not applied: {self.smooth_note}")
        if self.smooth_few_rows:
            from .smooth import MIN_ROWS

            lines.append(
                f"  activation smoothing not tried on {self.smooth_few_rows} layers: fewer than {MIN_ROWS} calibration rows "
                "(pass calibration inputs with more rows)"
            )
        req = [r for r in self.converted if r.requantized_channels]
        if req:
            lines.append(
                f"  {len(req)} pre-quantized layers had channels outside int8 after removing the zero point "
                f"({sum(r.requantized_channels for r in req)} channels requantized from their integers)"
            )
        if self.skipped:
            by_reason: Dict[str, int] = {}
            for _, _, why in self.skipped:
                by_reason[why] = by_reason.get(why, 0) + 1
            lines.append("  skipped: " + "; ".join(f"{v} x {k}" for k, v in sorted(by_reason.items())))
        return "\n".join(lines)


class _Progress:
    def __init__(self, total: int, enabled: bool, what: str = "quantize"):
        self.total = max(total, 1)
        self.enabled = enabled
        self.what = what
        self.tty = enabled and sys.stderr.isatty()
        self.last_pct = -1
        self.t0 = time.time()

    def update(self, done: int, label: str = ""):
        if not self.enabled:
            return
        pct = int(100 * done / self.total)
        if self.tty:
            sys.stderr.write(f"\r{self.what}: {done}/{self.total} ({pct}%) {label[:60]:<60}")
            sys.stderr.flush()
        elif pct // 10 != self.last_pct // 10 or done == self.total:
            sys.stderr.write(f"{self.what}: {done}/{self.total} ({pct}%) {time.time() - self.t0:.1f}s\n")
            sys.stderr.flush()
        self.last_pct = pct

    def close(self):
        if self.enabled and self.tty:
            sys.stderr.write("\n")


def _tensor_nbytes(t) -> int:
    """Bytes of the values of a TensorProto (or a `_Derived`), from its dims and type."""
    return int(np.prod(list(t.dims), dtype=np.int64)) * np.dtype(helper.tensor_dtype_to_np_dtype(t.data_type)).itemsize


@dataclass
class _Derived:
    """A constant computed from constant `src` when read: its transpose, or its cast to
    `data_type`; `data_type` and `dims` are those of the result."""

    src: str
    op: str  # "transpose" or "cast"
    data_type: int
    dims: List[int]


class _Graph:
    """Indexes of one graph: producers, consumers, constants."""

    def __init__(self, model: onnx.ModelProto):
        self.model = model
        g = model.graph
        self.g = g
        self.inits = {t.name: t for t in g.initializer}
        self.graph_inputs = {i.name for i in g.input}
        self.graph_outputs = {o.name for o in g.output}
        self.const_nodes = {}
        for n in g.node:
            if n.op_type == "Constant" and n.domain in ("", "ai.onnx") and len(n.output) == 1:
                for a in n.attribute:
                    if a.name == "value" and a.type == onnx.AttributeProto.TENSOR:
                        self.const_nodes[n.output[0]] = a.t
                    elif a.name == "value_float":
                        self.const_nodes[n.output[0]] = numpy_helper.from_array(np.array(a.f, np.float32))
                    elif a.name == "value_floats":
                        self.const_nodes[n.output[0]] = numpy_helper.from_array(np.array(a.floats, np.float32))
        # Identity of a constant is that constant (PyTorch's exporter reads a parameter used in
        # several places through one Identity per use). So is the Transpose of a 2-D one (the
        # dynamo exporter, unoptimized, reads a Linear's [N, K] weight through one), and the
        # Cast of a float or float16 one to float or float16 (weights kept in half precision).
        # `alias` maps such an output to the tensor it derives from, so that a shared weight is
        # counted once.
        self.alias: Dict[str, str] = {}
        changed = True
        while changed:
            changed = False
            for n in g.node:
                if n.domain not in ("", "ai.onnx") or len(n.input) != 1 or len(n.output) != 1:
                    continue
                if n.op_type not in ("Identity", "Transpose", "Cast"):
                    continue
                src, out = n.input[0], n.output[0]
                if out in self.alias or out in self.graph_outputs or out in self.inits or out in self.const_nodes:
                    continue
                if src in self.graph_inputs or not (src in self.inits or src in self.const_nodes):
                    continue
                t = self.inits[src] if src in self.inits else self.const_nodes[src]
                # Derived values are computed when read (`const`), not here: a large model has a
                # Transpose per weight, and a copy of each would double its memory.
                if n.op_type == "Transpose":
                    perm = [int(v) for v in _attr(n, "perm", [1, 0])]
                    if len(t.dims) != 2 or perm != [1, 0]:
                        continue
                    t = _Derived(src, "transpose", t.data_type, list(reversed(t.dims)))
                elif n.op_type == "Cast":
                    floats = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16)
                    to = _attr(n, "to")
                    if t.data_type not in floats or to not in floats:
                        continue
                    t = _Derived(src, "cast", int(to), list(t.dims))
                self.alias[out] = self.alias.get(src, src)
                self.const_nodes[out] = t
                changed = True
        self.producer = {}
        self.consumers: Dict[str, List[onnx.NodeProto]] = {}
        for n in g.node:
            for o in n.output:
                if o:
                    self.producer[o] = n
            for i in n.input:
                if i:
                    self.consumers.setdefault(i, []).append(n)
        # Names used by subgraphs (If/Loop/Scan bodies, at any depth) count as consumers we cannot
        # rewrite.
        self.subgraph_uses = set()
        for sg in _subgraphs(g):
            for sn in sg.node:
                self.subgraph_uses.update(sn.input)
        self._counted: set = set()
        self.ranks: Dict[str, int] = {}
        # (element type, dims) where every dim is known: a value, or a symbol (dim_param).
        self.shapes: Dict[str, Tuple[int, Tuple]] = {}
        for vi in list(g.value_info) + list(g.input) + list(g.output):
            t = vi.type.tensor_type
            if t.HasField("shape"):
                self.ranks[vi.name] = len(t.shape.dim)
                dims = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in t.shape.dim)
                if all(d is not None and d != 0 for d in dims):
                    self.shapes[vi.name] = (t.elem_type, dims)
        for t in g.initializer:
            if t.name not in self.graph_inputs:
                self.shapes[t.name] = (t.data_type, tuple(t.dims))

    def const(self, name: str) -> Optional[np.ndarray]:
        """The value of a constant (initializer that is not a graph input, Constant node, or the
        Identity, Transpose or Cast of one)."""
        if name in self.graph_inputs:
            return None
        t = self.inits.get(name)
        if t is None:
            t = self.const_nodes.get(name)
        if t is None:
            return None
        if isinstance(t, _Derived):
            v = self.const(t.src)
            if v is None:
                return None
            return v.T if t.op == "transpose" else v.astype(onnx.helper.tensor_dtype_to_np_dtype(t.data_type))
        return numpy_helper.to_array(t)

    def source_nbytes(self, name: str) -> int:
        """Bytes the source model stores for constant `name`: those of the tensor it derives
        from through Identity, Transpose or Cast (a float16 weight cast to float is 2 bytes per
        value there)."""
        root = self.alias.get(name, name)
        t = self.inits.get(root)
        if t is None:
            t = self.const_nodes.get(root)
        return _tensor_nbytes(t) if t is not None else 0

    def first_use(self, name: str) -> bool:
        """True the first time a weight `name` is counted (a weight shared by several layers is
        stored once in the source model)."""
        name = self.alias.get(name, name)
        if name in self._counted:
            return False
        self._counted.add(name)
        return True

    def is_const(self, name: str) -> bool:
        return name not in self.graph_inputs and (name in self.inits or name in self.const_nodes)

    def sole_consumer(self, name: str) -> Optional[onnx.NodeProto]:
        """The only consumer of `name` when it has exactly one and is not a graph output."""
        if name in self.graph_outputs or name in self.subgraph_uses:
            return None
        c = self.consumers.get(name, [])
        return c[0] if len(c) == 1 else None

    def internal(self, name: str) -> bool:
        return name not in self.graph_outputs and name not in self.subgraph_uses


# com.microsoft ops whose first output has the type and shape of their first input.
_MS_SAME_SHAPE = ("Gelu", "FastGelu", "BiasGelu", "SkipLayerNormalization", "SkipSimplifiedLayerNormalization", "QuickGelu")


def _subgraphs(g: onnx.GraphProto):
    """Every subgraph nested in the nodes of `g` (If branches, Loop/Scan bodies, at any depth)."""
    stack = [a for n in g.node for a in n.attribute]
    while stack:
        a = stack.pop()
        for sg in ([a.g] if a.HasField("g") else []) + list(a.graphs):
            yield sg
            stack.extend(sa for sn in sg.node for sa in sn.attribute)


def _subgraph_names(g: onnx.GraphProto) -> set:
    """Every tensor name that appears in a subgraph of `g` (new outer names must not shadow them:
    ONNX wants one definition per name across scopes)."""
    names = set()
    for sg in _subgraphs(g):
        names.update(i.name for i in sg.input)
        names.update(o.name for o in sg.output)
        names.update(t.name for t in sg.initializer)
        for sn in sg.node:
            names.update(sn.input)
            names.update(sn.output)
    names.discard("")
    return names


def _attr(node: onnx.NodeProto, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _scalar(arr: Optional[np.ndarray]) -> Optional[float]:
    if arr is None or arr.size != 1:
        return None
    return float(arr.reshape(()))


def _other_input(node: onnx.NodeProto, name: str) -> Optional[str]:
    ins = [i for i in node.input]
    if len(ins) != 2 or ins.count(name) != 1:
        return None
    return ins[1] if ins[0] == name else ins[0]


def _f32_vector(v: Optional[np.ndarray], n: int, broadcast: bool = False) -> Optional[np.ndarray]:
    """Constant `v` as f32 [n] when it holds N finite float or float16 values (with `broadcast`:
    shaped [..., 1, N], an operand broadcast along the last axis only), else None."""
    if v is None or v.dtype not in (np.float32, np.float16) or v.size != n:
        return None
    if broadcast and (v.shape[-1:] != (n,) or any(d != 1 for d in v.shape[:-1])):
        return None
    if not np.all(np.isfinite(v)):
        return None
    return np.ascontiguousarray(v.reshape(n), dtype=np.float32)


def _match_bias(G: _Graph, out: str, n: int, x_name: str) -> Optional[Tuple[onnx.NodeProto, np.ndarray]]:
    """A following `Add(out, const)` whose constant is a bias of N values broadcast along the last
    axis only (and does not raise the rank of the result)."""
    add = G.sole_consumer(out)
    if add is None or add.op_type != "Add" or add.domain not in ("", "ai.onnx"):
        return None
    other = _other_input(add, out)
    if other is None:
        return None
    b = G.const(other)
    vec = _f32_vector(b, n, broadcast=True)  # a non-finite bias stays an Add: the op refuses it
    if vec is None:
        return None
    if b.ndim > 1:
        xr = G.ranks.get(x_name)
        if xr is None or xr < b.ndim:
            return None
    return add, vec


def _match_residual(G: _Graph, out: str) -> Optional[Tuple[onnx.NodeProto, str]]:
    """A following `Add(out, r)` where `r` has the type and rank of `out`: the skip connection of
    a transformer block. Their dimensions are the same values or symbols, or may differ only
    where shape inference cannot tell (different symbols: a PyTorch export names the batch size
    of a block's output and of its input differently) or where one is 1; the op adds a residual
    of another shape with ONNX's broadcasting (the fused path runs when the shapes are equal)."""
    add = G.sole_consumer(out)
    if add is None or add.op_type != "Add" or add.domain not in ("", "ai.onnx"):
        return None
    other = _other_input(add, out)
    if other is None or other in G.subgraph_uses:
        return None
    so, sr = G.shapes.get(out), G.shapes.get(other)
    if so is None or sr is None or so[0] != sr[0] or so[0] not in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16):
        return None
    if len(so[1]) != len(sr[1]):
        return None
    for a, b in zip(so[1], sr[1]):
        if isinstance(a, int) and isinstance(b, int) and a != b and 1 not in (a, b):
            return None
    return add, other


def _match_input_heads(G: _Graph, x: str, k: int) -> Optional[str]:
    """`x` = Reshape(Transpose(ctx, perm=[0, 2, 1, 3])) to [batch, seq, K], read only by the layer:
    how attention joins its heads before the output projection. Returns `ctx` ([batch, heads,
    seq, d], heads * d = K, float or float16), which the op then reads directly (its
    `a_layout = "heads"`); the Reshape and Transpose are left unread. Shape inference must show
    that the Reshape keeps batch and seq (the same values or symbols)."""
    if len(G.consumers.get(x, [])) != 1 or not G.internal(x):
        return None
    rs = G.producer.get(x)
    if rs is None or rs.op_type != "Reshape" or rs.domain not in ("", "ai.onnx") or _attr(rs, "allowzero", 0):
        return None
    tr = G.producer.get(rs.input[0])
    if tr is None or tr.op_type != "Transpose" or tr.domain not in ("", "ai.onnx"):
        return None
    if [int(v) for v in _attr(tr, "perm", [])] != [0, 2, 1, 3]:
        return None
    ctx = tr.input[0]
    si, so = G.shapes.get(ctx), G.shapes.get(x)
    if si is None or so is None or len(si[1]) != 4 or len(so[1]) != 3 or si[0] != so[0]:
        return None
    if si[0] not in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16):
        return None
    h, d = si[1][1], si[1][3]
    if not (isinstance(h, int) and isinstance(d, int) and h * d == k and so[1][2] == k):
        return None
    for a, b in ((si[1][0], so[1][0]), (si[1][2], so[1][1])):
        if a is None or a == "" or a != b:
            return None
    return ctx


def _match_layer_norm(G: _Graph, out: str, n: int) -> Optional[Tuple[List[onnx.NodeProto], np.ndarray, Optional[np.ndarray], float, str]]:
    """A following `LayerNormalization` of `out` over its last axis alone (N values), computed in
    f32 (`stash_type` 1), with constant scale and bias of N values and only its first output
    used: ([node], scale, bias or None, epsilon, output), the scale and bias as f32 (an f16
    model's widen exactly), as `_match_decomposed_layer_norm` gives them."""
    ln = G.sole_consumer(out)
    if ln is None or ln.op_type != "LayerNormalization" or ln.domain not in ("", "ai.onnx") or ln.input[0] != out:
        return None
    if any(o and (G.consumers.get(o) or o in G.graph_outputs or o in G.subgraph_uses) for o in list(ln.output)[1:]):
        return None
    if int(_attr(ln, "stash_type", 1)) != 1:
        return None
    axis = int(_attr(ln, "axis", -1))
    shape = G.shapes.get(out)
    if axis != -1 and not (shape is not None and axis == len(shape[1]) - 1):
        return None
    if len(ln.input) < 2 or not ln.input[1]:
        return None
    gamma = _f32_vector(G.const(ln.input[1]), n)
    beta = None
    if len(ln.input) > 2 and ln.input[2]:
        beta = _f32_vector(G.const(ln.input[2]), n)
        if beta is None:
            return None
    if gamma is None:
        return None
    eps = float(_attr(ln, "epsilon", 1e-5))
    if not (np.isfinite(eps) and eps >= 0):
        return None
    return [ln], gamma, beta, eps, ln.output[0]


def _reduces_last_axis(G: _Graph, node: onnx.NodeProto, x: str) -> bool:
    """`node` is a ReduceMean of `x` over its last axis alone, keeping it (axes as the attribute,
    or from opset 18 as a constant second input)."""
    if node.op_type != "ReduceMean" or node.domain not in ("", "ai.onnx") or not node.input or node.input[0] != x:
        return False
    if int(_attr(node, "keepdims", 1)) != 1:
        return False
    axes = _attr(node, "axes")
    if axes is None and len(node.input) > 1 and node.input[1]:
        a = G.const(node.input[1])
        axes = None if a is None else [int(v) for v in np.asarray(a).reshape(-1)]
    if axes is None or len(axes) != 1:
        return False
    rank = G.ranks.get(x)
    return int(axes[0]) == -1 or (rank is not None and int(axes[0]) == rank - 1)


def _match_decomposed_layer_norm(G: _Graph, x: str, n: int):
    """PyTorch's LayerNorm exported below opset 17, normalizing float `x` (N values per row):
    ReduceMean -> Sub -> Pow(2) -> ReduceMean -> Add(eps) -> Sqrt -> Div -> Mul(scale) [->
    Add(bias)], each node the only reader of what it reads but `x` and the difference. Returns
    (its nodes, scale, bias or None, epsilon, output), the parameters as f32."""
    if not G.internal(x) or G.shapes.get(x, (None,))[0] != onnx.TensorProto.FLOAT:
        return None
    cons = G.consumers.get(x, [])
    if len(cons) != 2:
        return None
    rm = next((c for c in cons if _reduces_last_axis(G, c, x)), None)
    sub = next((c for c in cons if c.op_type == "Sub" and c.domain in ("", "ai.onnx")), None)
    if rm is None or sub is None or list(sub.input) != [x, rm.output[0]] or G.sole_consumer(rm.output[0]) is not sub:
        return None
    d = sub.output[0]
    dc = G.consumers.get(d, [])
    if not G.internal(d) or len(dc) != 2:
        return None
    sq = next((c for c in dc if c.op_type == "Pow" and c.input[0] == d and _close(_scalar(G.const(c.input[1])), 2.0, 0.0)), None)
    div = next((c for c in dc if c.op_type == "Div" and c.input[0] == d), None)
    if sq is None or div is None:
        return None
    rv = G.sole_consumer(sq.output[0])
    if rv is None or not _reduces_last_axis(G, rv, sq.output[0]):
        return None
    add_eps = G.sole_consumer(rv.output[0])
    if add_eps is None or add_eps.op_type != "Add":
        return None
    eps = _scalar(G.const(_other_input(add_eps, rv.output[0]) or ""))
    sqrt = G.sole_consumer(add_eps.output[0])
    if eps is None or not (np.isfinite(eps) and eps >= 0) or sqrt is None or sqrt.op_type != "Sqrt":
        return None
    if list(div.input) != [d, sqrt.output[0]] or G.sole_consumer(sqrt.output[0]) is not div:
        return None
    mul = G.sole_consumer(div.output[0])
    if mul is None or mul.op_type != "Mul":
        return None
    nodes = [rm, sub, sq, rv, add_eps, sqrt, div, mul]
    gamma = _f32_vector(G.const(_other_input(mul, div.output[0]) or ""), n, broadcast=True)
    beta = None
    out = mul.output[0]
    add_b = G.sole_consumer(out)
    if add_b is not None and add_b.op_type == "Add" and G.is_const(_other_input(add_b, out) or ""):
        beta = _f32_vector(G.const(_other_input(add_b, out)), n, broadcast=True)
        if beta is None:
            return None
        nodes.append(add_b)
        out = add_b.output[0]
    if gamma is None or any(nd.domain not in ("", "ai.onnx") for nd in nodes):
        return None
    return nodes, gamma, beta, float(eps), out


def _match_bias_gelu(G: _Graph, out: str, n: int) -> Optional[Tuple[onnx.NodeProto, np.ndarray, str]]:
    """A following `com.microsoft.BiasGelu(out, bias)` or `com.microsoft.FastGelu(out, bias)`
    (ONNX Runtime's optimizer writes a bias Add and an erf GELU, or a tanh GELU, that way) with a
    constant bias of N values: (node, bias as f32, "gelu" or "gelu_tanh")."""
    c = G.sole_consumer(out)
    if c is None or c.domain != "com.microsoft" or len(c.input) != 2 or c.input[0] != out:
        return None
    kind = {"BiasGelu": "gelu", "FastGelu": "gelu_tanh"}.get(c.op_type)
    if kind is None:
        return None
    b = _f32_vector(G.const(c.input[1]), n, broadcast=True)
    return (c, b, kind) if b is not None else None


def _match_skip_layer_norm(G: _Graph, out: str, n: int):
    """A following `com.microsoft.SkipLayerNormalization(out, skip, gamma[, beta[, bias]])` (ONNX
    Runtime's optimizer writes a residual Add and the LayerNormalization after it that way)
    with constant gamma, beta and bias of N values, an explicit epsilon and only its first
    output used: (node, skip tensor, gamma, beta or None, bias or None, epsilon). `out` must be
    its first input, whose shape the result has (the skip broadcasts onto it, as in the op's
    residual); the parameters as f32."""
    c = G.sole_consumer(out)
    if c is None or c.op_type != "SkipLayerNormalization" or c.domain != "com.microsoft" or len(c.input) < 3:
        return None
    if c.input[0] != out or not c.input[1] or c.input[1] == out or c.input[1] in G.subgraph_uses:
        return None
    if any(o and (G.consumers.get(o) or o in G.graph_outputs or o in G.subgraph_uses) for o in list(c.output)[1:]):
        return None
    if not any(a.name == "epsilon" for a in c.attribute):
        return None  # its default differs between ONNX Runtime versions' documentation; not guessed
    eps = float(_attr(c, "epsilon"))
    if not (np.isfinite(eps) and eps >= 0):
        return None
    params = []
    for i in (2, 3, 4):
        if len(c.input) <= i or not c.input[i]:
            params.append(None)
            continue
        v = _f32_vector(G.const(c.input[i]), n)
        if v is None:
            return None
        params.append(v)
    if params[0] is None:
        return None
    return c, c.input[1], params[0], params[1], params[2], eps


def _match_heads(G: _Graph, out: str, n: int, transposed_ok: bool) -> Optional[Tuple[List[onnx.NodeProto], str, int, bool, List[onnx.NodeProto]]]:
    """A following `Reshape` of `out` ([batch, seq, n], known from shape inference) to
    [batch, seq, heads, n / heads], then `Transpose(perm=[0, 2, 1, 3])` (or `[0, 2, 3, 1]` when
    `transposed_ok`), each the only reader of its input: how a transformer splits its query, key
    and value projections into attention heads. Returns (the two nodes, the Transpose's output,
    heads, transposed, the `Shape` nodes that also read `out`)."""
    so = G.shapes.get(out)
    if so is None or len(so[1]) != 3 or so[1][2] != n or not G.internal(out):
        return None
    # Besides the Reshape, `Shape` nodes may read `out` for its batch and sequence sizes (PyTorch
    # exports compute the Reshape target that way); they can read the layer's input instead.
    readers = [c for c in G.consumers.get(out, []) if not (c.op_type == "Shape" and c.domain in ("", "ai.onnx"))]
    shapes = [c for c in G.consumers.get(out, []) if c not in readers]
    if len(readers) != 1 or not all(_reads_leading_dims(G, sh, 3) for sh in shapes):
        return None
    rs = readers[0]
    if rs.op_type != "Reshape" or rs.domain not in ("", "ai.onnx") or len(rs.input) < 2 or _attr(rs, "allowzero", 0):
        return None
    tr = G.sole_consumer(rs.output[0])
    if tr is None or tr.op_type != "Transpose" or tr.domain not in ("", "ai.onnx"):
        return None
    perm = [int(v) for v in (_attr(tr, "perm", None) or [])]
    if perm != [0, 2, 1, 3] and not (transposed_ok and perm == [0, 2, 3, 1]):
        return None
    b, t = so[1][0], so[1][1]
    heads = None
    sr = G.shapes.get(rs.output[0])
    if sr is not None and len(sr[1]) == 4 and sr[1][:2] == (b, t) and all(isinstance(v, int) and v > 0 for v in sr[1][2:]):
        if sr[1][2] * sr[1][3] == n:
            heads = sr[1][2]
    else:
        # The target shape as a constant: [batch or 0, seq or 0, heads, d], at most one -1
        # standing for a dimension the others fix.
        shape = G.const(rs.input[1])
        if shape is not None and shape.ndim == 1 and shape.size == 4 and shape.dtype == np.int64:
            s0, s1, h, d = (int(v) for v in shape)
            # 0 copies the dimension, a value must equal it, -1 is inferred (once at most).
            fits = lambda v, dim: v in (0, -1) or (isinstance(dim, int) and v == dim)  # noqa: E731
            if h > 0 and n % h == 0 and d in (n // h, -1) and fits(s0, b) and fits(s1, t) and [s0, s1, d].count(-1) <= 1:
                heads = h
    if heads is None:
        return None
    return [rs, tr], tr.output[0], heads, perm == [0, 2, 3, 1], shapes


def _reads_leading_dims(G: _Graph, sh: onnx.NodeProto, rank: int) -> bool:
    """Whether a `Shape` node of a rank-`rank` tensor is only used for dimensions before the
    last (by its start/end attributes, or by `Gather`s of constant indices), which a MatMul's
    output shares with its input."""
    start, end = _attr(sh, "start", None), _attr(sh, "end", None)
    if start is not None or end is not None:
        lo = int(start or 0)
        hi = rank if end is None else int(end)
        lo, hi = (lo + rank if lo < 0 else lo), (hi + rank if hi < 0 else hi)
        return 0 <= lo and hi <= rank - 1
    o = sh.output[0]
    if not G.internal(o):
        return False
    for c in G.consumers.get(o, []):
        if c.op_type != "Gather" or c.domain not in ("", "ai.onnx") or int(_attr(c, "axis", 0)) != 0 or c.input[0] != o:
            return False
        idx = G.const(c.input[1]) if len(c.input) > 1 else None
        if idx is None or idx.dtype.kind not in "iu":
            return False
        if not all(-rank <= int(i) < rank - 1 and int(i) != -1 for i in np.ravel(idx)):
            return False
    return True


def _close(v: Optional[float], target: float, tol: float = 1e-3) -> bool:
    return v is not None and abs(v - target) <= tol * abs(target)


def _match_activation(G: _Graph, t: str) -> Optional[Tuple[str, List[onnx.NodeProto], str]]:
    """An activation consuming tensor `t` alone: returns (kind, nodes to remove, output name);
    kind is "relu", "gelu" (erf form), "gelu_tanh" (tanh form), "silu" or "quick_gelu"."""
    if not G.internal(t):
        return None
    cons = G.consumers.get(t, [])
    if len(cons) == 1:
        c = cons[0]
        if c.op_type == "Relu" and c.domain in ("", "ai.onnx"):
            return "relu", [c], c.output[0]
        if c.op_type == "Gelu" and c.domain in ("", "ai.onnx"):
            approximate = _attr(c, "approximate", b"none")
            approximate = approximate.decode() if isinstance(approximate, bytes) else approximate
            kind = {"none": "gelu", "tanh": "gelu_tanh"}.get(approximate)
            return (kind, [c], c.output[0]) if kind else None
        if c.op_type == "Gelu" and c.domain == "com.microsoft":
            return "gelu", [c], c.output[0]
        if c.op_type == "FastGelu" and c.domain == "com.microsoft" and len([i for i in c.input if i]) == 1:
            return "gelu_tanh", [c], c.output[0]
        if c.op_type == "QuickGelu" and c.domain == "com.microsoft" and _close(float(_attr(c, "alpha", 1.702)), 1.702, 1e-6):
            return "quick_gelu", [c], c.output[0]
    return _match_decomposed_gelu(G, t)


# Element-wise ops (default domain) a decomposed activation is written with, and their input
# counts.
_GELU_OPS = {"Mul": 2, "Add": 2, "Sub": 2, "Div": 2, "Pow": 2, "Tanh": 1, "Erf": 1, "Neg": 1, "Sqrt": 1, "Sigmoid": 1}
_GELU_MAX_NODES = 12


@functools.lru_cache(maxsize=1)
def _gelu_samples() -> Tuple[np.ndarray, Dict[str, np.ndarray]]:
    """The sample inputs a decomposed activation is evaluated on, and the values there of the
    activations the op's epilogue computes (other than ReLU): computed once."""
    x = np.concatenate([np.linspace(-8.0, 8.0, 321), [-30.0, -12.0, 12.0, 30.0]])
    x.flags.writeable = False
    erf = np.vectorize(math.erf, otypes=[np.float64])
    return x, {
        "gelu": 0.5 * x * (1.0 + erf(x / math.sqrt(2.0))),
        "gelu_tanh": 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3))),
        "silu": x / (1.0 + np.exp(-x)),
        "quick_gelu": x / (1.0 + np.exp(-1.702 * x)),
    }


def _match_decomposed_gelu(G: _Graph, t: str) -> Optional[Tuple[str, List[onnx.NodeProto], str]]:
    """A GELU, SiLU or QuickGELU written as element-wise nodes on `t` and scalar constants, in any
    order or form: PyTorch's erf export (`Div(sqrt 2)` or `Mul(1/sqrt 2)`, `Erf`, `Add(1)`,
    `Mul`, `Mul(0.5)`), the tanh form of GPT-2's `gelu_new` and of PyTorch's
    `gelu(approximate="tanh")` export (`Pow(3)` or `x*x*x`, `Mul(0.044715)`, `Add`,
    `Mul(sqrt(2/pi))`, `Tanh`, ...), `x * Sigmoid(x)` and `x * Sigmoid(1.702 * x)`. The nodes
    reachable from `t` are taken one at a time while every input is `t`, an earlier node's output
    or a scalar constant; each time they form a closed region (every tensor they make but one
    is read only inside it), the region is evaluated in float64 on sample values and compared
    with each form of `_gelu_samples`: (kind, nodes, output) of the first region within
    2e-3 * max(1, |x|) of one form, the closest one."""
    avail = {t}
    region: List[onnx.NodeProto] = []
    in_region: set = set()
    consts: Dict[str, float] = {}

    def usable(c: onnx.NodeProto) -> bool:
        if c.domain not in ("", "ai.onnx") or _GELU_OPS.get(c.op_type) != len(c.input) or len(c.output) != 1:
            return False
        if c.attribute:
            return False
        for i in c.input:
            if i in avail:
                continue
            v = G.const(i) if G.is_const(i) else None
            if v is None or v.size != 1 or v.ndim > 1 or v.dtype.kind != "f":
                return False
            consts[i] = float(v.reshape(()))
        return True

    while len(region) < _GELU_MAX_NODES:
        nxt = None
        for name in [t] + [nd.output[0] for nd in region]:
            for c in G.consumers.get(name, []):
                if id(c) not in in_region and usable(c):
                    nxt = c
                    break
            if nxt is not None:
                break
        if nxt is None:
            return None
        region.append(nxt)
        in_region.add(id(nxt))
        avail.add(nxt.output[0])
        # Closed: `t` and every output but one are read only by the region.
        escaping = []
        closed = True
        for name in [t] + [nd.output[0] for nd in region]:
            outside = [c for c in G.consumers.get(name, []) if id(c) not in in_region]
            if name == t:
                if outside or not G.internal(t):
                    closed = False
            elif outside or not G.internal(name):
                escaping.append(name)
        if not closed or len(escaping) != 1 or escaping[0] != nxt.output[0] or len(region) < 2:
            continue
        kind = _region_gelu_kind(region, t, consts)
        if kind is not None:
            return kind, list(region), nxt.output[0]
    return None


def _region_gelu_kind(region: List[onnx.NodeProto], t: str, consts: Dict[str, float]) -> Optional[str]:
    """Which GELU form the nodes compute from `t` (in order), if any (see `_match_decomposed_gelu`)."""
    x, forms = _gelu_samples()
    vals: Dict[str, np.ndarray] = {t: x}
    with np.errstate(all="ignore"):
        for nd in region:
            a = [vals[i] if i in vals else np.float64(consts[i]) for i in nd.input]
            op = nd.op_type
            if op == "Mul":
                r = a[0] * a[1]
            elif op == "Add":
                r = a[0] + a[1]
            elif op == "Sub":
                r = a[0] - a[1]
            elif op == "Div":
                r = a[0] / a[1]
            elif op == "Pow":
                r = np.power(a[0], a[1])
            elif op == "Tanh":
                r = np.tanh(a[0])
            elif op == "Erf":
                r = np.vectorize(math.erf, otypes=[np.float64])(a[0])
            elif op == "Neg":
                r = -a[0]
            elif op == "Sigmoid":
                r = 1.0 / (1.0 + np.exp(-a[0]))
            else:  # Sqrt
                r = np.sqrt(a[0])
            vals[nd.output[0]] = np.broadcast_to(np.asarray(r, dtype=np.float64), x.shape)
    y = vals[region[-1].output[0]]
    if not np.all(np.isfinite(y)):
        return None
    errs = {k: float(np.max(np.abs(y - f) / np.maximum(1.0, np.abs(x)))) for k, f in forms.items()}
    kind = min(errs, key=errs.get)
    return kind if errs[kind] <= 2e-3 else None


def _infer(model: onnx.ModelProto):
    """Replaces the graph's value_info by ONNX shape inference's, with data propagation (shapes
    computed in the graph, as PyTorch exports Reshape targets), or without it if that fails.
    ONNX does not know ONNX Runtime's fused ops: the types of their first outputs are added
    (see `_ms_output_types`) and inference runs again, so that what follows them gets shapes."""
    # Each round starts again from the model's own value_info and the fused ops' types found so
    # far: a shapeless type inferred in an earlier round would not be refined.
    given = list(model.graph.value_info)
    hints: List[onnx.ValueInfoProto] = []
    for _ in range(4):
        model.graph.ClearField("value_info")
        model.graph.value_info.extend(given + hints)
        for data_prop in (True, False):
            try:
                inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False, data_prop=data_prop)
                model.graph.ClearField("value_info")
                model.graph.value_info.extend(inferred.graph.value_info)
                break
            except Exception:
                continue
        new = _ms_output_types(model.graph)
        if [h.SerializeToString() for h in new] == [h.SerializeToString() for h in hints]:
            return
        hints = new


def _ms_output_types(g: onnx.GraphProto) -> List[onnx.ValueInfoProto]:
    """Types of the first outputs of ONNX Runtime's fused ops (com.microsoft) that are not graph
    outputs, from their inputs' types in the graph's value_info (those of earlier fused ops as
    computed here): the input's for the element-wise and layer-norm ops, `[batch, seq, v_hidden]`
    for Attention and MultiHeadAttention, `[batch, seq, hidden]` for EmbedLayerNormalization."""
    ms_outputs = {n.output[0] for n in g.node if n.domain == "com.microsoft" and n.output and n.output[0]}
    graph_outputs = {o.name for o in g.output}
    known = {
        vi.name: vi
        for vi in list(g.value_info) + list(g.input) + list(g.output)
        if vi.type.HasField("tensor_type") and (vi.name not in ms_outputs or vi.name in graph_outputs)
    }
    for t in g.initializer:
        if t.name not in known:
            known[t.name] = helper.make_tensor_value_info(t.name, t.data_type, list(t.dims))
    dims = lambda vi: list(vi.type.tensor_type.shape.dim) if vi.type.tensor_type.HasField("shape") else None  # noqa: E731
    value = lambda d: d.dim_value if d.HasField("dim_value") else (d.dim_param or None)  # noqa: E731
    out = []
    for n in g.node:
        if n.domain != "com.microsoft" or not n.output or not n.output[0] or n.output[0] in known or not n.input:
            continue
        src = known.get(n.input[0])
        if n.op_type in _MS_SAME_SHAPE:
            if src is None:
                continue
            vi = onnx.ValueInfoProto()
            vi.CopyFrom(src)
            vi.name = n.output[0]
        elif n.op_type in ("Attention", "MultiHeadAttention", "EmbedLayerNormalization"):
            if n.op_type == "EmbedLayerNormalization":
                ids, table = known.get(n.input[0]), known.get(n.input[2]) if len(n.input) > 2 else None
                if ids is None or table is None or dims(ids) is None or dims(table) is None or len(dims(ids)) != 2:
                    continue
                shape = [value(d) for d in dims(ids)] + [value(dims(table)[-1])]
                elem = table.type.tensor_type.elem_type
            else:
                if src is None or dims(src) is None or len(dims(src)) != 3:
                    continue
                width = None
                if n.op_type == "Attention":
                    w = known.get(n.input[1]) if len(n.input) > 1 else None
                    sizes = list(_attr(n, "qkv_hidden_sizes", []) or [])
                    if sizes:
                        width = int(sizes[2])
                    elif w is not None and dims(w) is not None and value(dims(w)[-1]) is not None:
                        width = int(value(dims(w)[-1])) // 3
                else:
                    v = known.get(n.input[2]) if len(n.input) > 2 and n.input[2] else None
                    width = value(dims(v)[-1]) if v is not None and dims(v) is not None and len(dims(v)) == 3 else None
                shape = [value(d) for d in dims(src)[:2]] + [width]
                elem = src.type.tensor_type.elem_type
            vi = helper.make_tensor_value_info(n.output[0], elem, shape)
        else:
            continue
        known[vi.name] = vi
        out.append(vi)
    return out


def _namer(G: _Graph):
    """A function giving names no tensor, node or subgraph name of `G`'s graph has, nor any name
    it gave before: `base`, else `base_1`, `base_2`, ..."""
    g = G.g
    taken = set(G.inits) | set(G.producer) | {i.name for i in g.input} | _subgraph_names(g) | {n.name for n in g.node if n.name}

    def fresh(base: str) -> str:
        name, i = base, 1
        while name in taken:
            name, i = f"{base}_{i}", i + 1
        taken.add(name)
        return name

    return fresh


def split_embed_layer_norm(
    model: onnx.ModelProto, min_size: int = 0, include: Sequence[str] = (), exclude: Sequence[str] = ()
) -> List[str]:
    """Rewrites, in place, each `com.microsoft.EmbedLayerNormalization` node of the main graph
    whose word-embedding table is a constant float32 [V, D] table (of at least `min_size` and
    1024 values, all finite) so that the table is read by an ordinary `Gather(table, input_ids)`,
    which the converter then turns into an int8 table: the node keeps everything else (position
    and segment embeddings, the layer norm, the mask index) and reads the gathered rows as its
    word table, `[batch * seq, D]`, indexed by `0 .. batch * seq - 1` in the shape of the ids.
    The float results are the same bits (onnxruntime 1.17.3 and 1.31.1, tested). Needs opset 11
    (`Range`). Returns the names of the new Gather nodes."""
    g = model.graph
    if not any(n.op_type == "EmbedLayerNormalization" and n.domain == "com.microsoft" for n in g.node):
        return []
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if opset < 11:
        return []
    G = _Graph(model)
    fresh = _namer(G)

    gathers: List[str] = []
    new_nodes: List[onnx.NodeProto] = []
    for n in g.node:
        name = n.name or n.output[0]
        table = G.const(n.input[2]) if n.op_type == "EmbedLayerNormalization" and n.domain == "com.microsoft" \
            and len(n.input) > 2 and n.input[0] and G.is_const(n.input[2]) and name not in exclude \
            and (not include or name in include) else None
        if (
            table is None
            or table.dtype != np.float32
            or table.ndim != 2
            or table.size < max(min_size, 1024)
            or not np.all(np.isfinite(table))
        ):
            new_nodes.append(n)
            continue
        ids, d = n.input[0], int(table.shape[1])

        def const(base: str, v) -> str:
            t = fresh(f"{name}/{base}")
            g.initializer.append(numpy_helper.from_array(np.asarray(v), t))
            return t

        rows, tab, shp, cnt, rng, rng32, ids2 = (fresh(f"{name}/{x}") for x in ("word_rows", "word_table", "ids_shape", "ids_count", "ids_range", "ids_range_int32", "row_ids"))
        gname = fresh(f"{name}/word_gather")
        new_nodes += [
            helper.make_node("Gather", [n.input[2], ids], [rows], name=gname, axis=0),
            helper.make_node("Reshape", [rows, const("word_table_shape", np.array([-1, d], np.int64))], [tab], name=fresh(f"{name}/word_reshape")),
            helper.make_node("Shape", [ids], [shp], name=fresh(f"{name}/ids_shape_node")),
            helper.make_node("ReduceProd", [shp], [cnt], name=fresh(f"{name}/ids_count_node"), keepdims=0),
            helper.make_node("Range", [const("zero", np.array(0, np.int64)), cnt, const("one", np.array(1, np.int64))], [rng],
                             name=fresh(f"{name}/ids_range_node")),
            helper.make_node("Cast", [rng], [rng32], name=fresh(f"{name}/ids_cast"), to=TensorProto.INT32),
            helper.make_node("Reshape", [rng32, shp], [ids2], name=fresh(f"{name}/row_ids_node")),
        ]
        e = onnx.NodeProto()
        e.CopyFrom(n)
        e.input[0] = ids2
        e.input[2] = tab
        new_nodes.append(e)
        gathers.append(gname)
    if gathers:
        del g.node[:]
        g.node.extend(new_nodes)
    return gathers


def decompose_attention(
    model: onnx.ModelProto,
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
    exclude_op_types: Sequence[str] = (),
    skipped: Optional[List[Tuple[str, str, str]]] = None,
) -> Dict[str, List[str]]:
    """Rewrites, in place, each `com.microsoft.Attention` node of the main graph (ONNX Runtime's
    transformer optimizer fuses a BERT block's Q/K/V product and the attention into one) as three
    `MatMul` + `Add` (the Q, K and V projections, with their part of the weight and bias) and a
    `com.microsoft.MultiHeadAttention` on their outputs, with the node's mask, attention bias,
    `num_heads`, `scale`, `mask_filter_value` and `unidirectional`. The float results are the
    same (ONNX Runtime 1.17.3 and 1.31.1 give the same bits for every mask form taken here); the
    three products can then be converted as any other layer. Taken only where that holds:
    a constant float32 weight and bias; no past state, rotary embedding or used `present`
    output; a mask absent, of rank 2 or 3, or of rank 1 when it is one value per batch row
    (`EmbedLayerNormalization`'s mask index, or a length equal to the input's batch dimension).
    Others are listed in `skipped` with the reason. Names are derived from the node's, the same
    on every call, so that the evaluator can split the float model as the converter did. Returns
    {Attention node name: the three MatMul node names}."""
    g = model.graph
    if not any(n.op_type == "Attention" and n.domain == "com.microsoft" for n in g.node):
        return {}
    if skipped is None:
        skipped = []
    G = _Graph(model)
    fresh = _namer(G)

    shapes = {}
    for vi in list(g.value_info) + list(g.input) + list(g.output):
        t = vi.type.tensor_type
        if t.HasField("shape"):
            shapes[vi.name] = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in t.shape.dim]

    def reason(n: onnx.NodeProto) -> Optional[str]:
        if len(n.input) < 2 or not G.is_const(n.input[1]):
            return "Attention weights are not a constant"
        w = G.const(n.input[1])
        if w is None or w.dtype != np.float32 or w.ndim != 2:
            return "Attention weights are not a 2-D float32 constant"
        if len(n.input) > 2 and n.input[2]:
            b = G.const(n.input[2]) if G.is_const(n.input[2]) else None
            if b is None or b.dtype != np.float32 or b.shape != (w.shape[1],):
                return "Attention bias is not a float32 constant of the weights' width"
        if any(len(n.input) > i and n.input[i] for i in (4, 6)):
            return "Attention with past state"
        if any(o and (G.consumers.get(o) or o in G.graph_outputs or o in G.subgraph_uses) for o in list(n.output)[1:]):
            return "Attention whose present state is used"
        if int(_attr(n, "do_rotary", 0)) or int(_attr(n, "past_present_share_buffer", 0)):
            return "Attention with rotary embedding or a shared past buffer"
        heads = int(_attr(n, "num_heads", 0))
        sizes = list(_attr(n, "qkv_hidden_sizes", []) or [])
        if not sizes and w.shape[1] % 3 == 0:
            sizes = [w.shape[1] // 3] * 3
        if len(sizes) != 3 or sizes[0] != sizes[1] or sum(sizes) != w.shape[1] or min(sizes) <= 0:
            return "Attention with Q/K/V sizes that do not split its weights"
        if heads <= 0 or sizes[0] % heads or sizes[2] % heads:
            return "Attention whose sizes are not multiples of num_heads"
        mask = n.input[3] if len(n.input) > 3 else ""
        prod = G.producer.get(mask) if mask else None
        per_row = (
            prod is not None
            and prod.op_type == "EmbedLayerNormalization"
            and prod.domain == "com.microsoft"
            and len(prod.output) > 1
            and prod.output[1] == mask
        )
        if mask and not per_row:
            ms = shapes.get(mask)
            if ms is None:
                return "Attention mask of unknown shape"
            if len(ms) == 1:
                xs = shapes.get(n.input[0])
                if not (xs and ms[0] is not None and ms[0] == xs[0]):
                    return "Attention mask index of rank 1 that may hold 2 * batch values"
            elif len(ms) not in (2, 3):
                return f"Attention mask of rank {len(ms)}"
        return None

    split: Dict[str, List[str]] = {}
    new_nodes: List[onnx.NodeProto] = []
    dropped: set = set()
    for n in g.node:
        if n.op_type != "Attention" or n.domain != "com.microsoft":
            new_nodes.append(n)
            continue
        name = n.name or n.output[0]
        if (include and name not in include) or name in exclude or "Attention" in exclude_op_types:
            new_nodes.append(n)
            continue
        why = reason(n)
        if why is not None:
            skipped.append((name, "Attention", why))
            new_nodes.append(n)
            continue
        w = G.const(n.input[1])
        b = G.const(n.input[2]) if len(n.input) > 2 and n.input[2] else None
        sizes = list(_attr(n, "qkv_hidden_sizes", []) or []) or [w.shape[1] // 3] * 3
        bounds = np.cumsum([0] + sizes)
        outs, mms = [], []
        for t, lo, hi in zip("qkv", bounds[:-1], bounds[1:]):
            wt = fresh(f"{name}/{t}_proj/weight")
            g.initializer.append(numpy_helper.from_array(np.ascontiguousarray(w[:, lo:hi]), wt))
            mm = fresh(f"{name}/{t}_proj")
            y = fresh(f"{name}/{t}_proj/MatMul_output" if b is not None else f"{name}/{t}")
            new_nodes.append(helper.make_node("MatMul", [n.input[0], wt], [y], name=mm))
            mms.append(mm)
            if b is not None:
                bt = fresh(f"{name}/{t}_proj/bias")
                g.initializer.append(numpy_helper.from_array(np.ascontiguousarray(b[lo:hi]), bt))
                y2 = fresh(f"{name}/{t}")
                new_nodes.append(helper.make_node("Add", [y, bt], [y2], name=fresh(f"{name}/{t}_proj/Add")))
                y = y2
            outs.append(y)
        ins = outs + ["", n.input[3] if len(n.input) > 3 else "", n.input[5] if len(n.input) > 5 else ""]
        while ins[-1] == "":
            ins.pop()
        attrs = {"num_heads": int(_attr(n, "num_heads"))}
        for a in ("scale", "mask_filter_value"):
            if any(x.name == a for x in n.attribute):
                attrs[a] = float(_attr(n, a))
        if int(_attr(n, "unidirectional", 0)):
            attrs["unidirectional"] = 1
        new_nodes.append(helper.make_node("MultiHeadAttention", ins, [n.output[0]], name=fresh(f"{name}/MultiHeadAttention"),
                                          domain="com.microsoft", **attrs))
        dropped.update(i for i in n.input[1:3] if i)
        split[name] = mms
    if not split:
        return split
    del g.node[:]
    g.node.extend(new_nodes)
    # The fused weights and biases, where nothing else reads them.
    still = {i for nd in g.node for i in nd.input} | G.subgraph_uses | G.graph_outputs
    keep = [t for t in g.initializer if t.name not in dropped or t.name in still]
    del g.initializer[:]
    g.initializer.extend(keep)
    return split


def _all_tensors(g: onnx.GraphProto):
    """The initializers and Constant-node tensors of a graph and of its subgraphs."""
    yield from g.initializer
    for n in g.node:
        for a in n.attribute:
            if a.type == onnx.AttributeProto.TENSOR:
                yield a.t
            elif a.type == onnx.AttributeProto.TENSORS:
                yield from a.tensors
            elif a.type == onnx.AttributeProto.GRAPH:
                yield from _all_tensors(a.g)
            elif a.type == onnx.AttributeProto.GRAPHS:
                for sg in a.graphs:
                    yield from _all_tensors(sg)


def _int_weights_to_int8(q: np.ndarray, zp: Optional[np.ndarray], scale: np.ndarray) -> Tuple[np.ndarray, np.ndarray, int]:
    """Integer weights `[K, N]` (int8 or uint8) with zero points (None, scalar or [N]) and scales
    (scalar or [N]) to symmetric int8 `[K, N]` and scales: `q - zp` when it fits int8, otherwise
    that channel is requantized from those integers. Returns (q8, scales, requantized channels)."""
    k, n = q.shape
    d = q.astype(np.int32)
    if zp is not None:
        z = np.asarray(zp).astype(np.int32).reshape(-1)
        if z.size not in (1, n):
            raise ValueError(f"weight zero point has {z.size} values, expected 1 or {n}")
        d = d - (z[np.newaxis, :] if z.size == n else z[0])
    s = np.asarray(scale, dtype=np.float32).reshape(-1)
    if s.size not in (1, n):
        raise ValueError(f"weight scale has {s.size} values, expected 1 or {n}")
    if not np.all(np.isfinite(s)):
        raise _Skip("weight scale has NaN or infinity")
    if (s < 0).any():
        # W = s * d = (-s) * (-d): the sign goes into the integers (the op takes scales >= 0;
        # a -128 that becomes 128 is requantized below like any channel out of int8's range).
        neg = s < 0
        if s.size == 1:
            d = -d
        else:
            d[:, neg] = -d[:, neg]
        s = np.where(neg, -s, s).astype(np.float32)
    lo, hi = d.min(axis=0), d.max(axis=0)
    bad = (lo < -128) | (hi > 127)
    if not bad.any():
        return d.astype(np.int8), s.copy(), 0
    # Rescale the offending channels to [-127, 127] (per channel from here on).
    s = np.broadcast_to(s, (n,)).astype(np.float32).copy()
    amax = np.maximum(np.abs(lo), np.abs(hi)).astype(np.float64)
    cols = np.nonzero(bad)[0]
    f = 127.0 / amax[cols]
    d = d.astype(np.float64)
    d[:, cols] = np.clip(np.round(d[:, cols] * f[np.newaxis, :]), -127, 127)
    s[cols] = (s[cols].astype(np.float64) / f).astype(np.float32)
    return d.astype(np.int8), s, int(bad.sum())


def _dedupe_name(used: set, base: str) -> str:
    name = base
    i = 1
    while name in used:
        name = f"{base}_{i}"
        i += 1
    used.add(name)
    return name


def quantize_model(
    model: "onnx.ModelProto | str | os.PathLike",
    options: Optional[QuantizeOptions] = None,
    progress: bool = False,
    calibration_inputs: Optional[List[Dict[str, np.ndarray]]] = None,
    _reserved: Optional[set] = None,
) -> Tuple[onnx.ModelProto, Report]:
    """Converts a model (a ModelProto or a path; external data is loaded) and returns the new
    model and a :class:`Report`. The input ModelProto is not modified.

    Layers inside subgraphs (`If` branches, `Loop` and `Scan` bodies: a merged decoder keeps
    its whole network in the two branches of an `If`) are converted too, without smoothing
    (their activations cannot be asked of the float model); the int8 weights they share are
    stored once, in the outer graph. (`_reserved`: names the new ones must not take, for the
    conversion of a subgraph.)

    With ``options.smooth == "auto"`` the float model is run once (ONNX Runtime) on
    ``calibration_inputs`` (sample inputs keyed by input name), or on inputs generated from its
    signature when None, to choose each layer's activation smoothing (see :mod:`dynq.onnx.smooth`)."""
    opts = options or QuantizeOptions()
    opts.check()
    if isinstance(model, (str, os.PathLike)):
        model = onnx.load(os.fspath(model), load_external_data=True)
    elif isinstance(model, (bytes, bytearray, memoryview)):
        model = onnx.load_from_string(bytes(model))
    elif isinstance(model, onnx.ModelProto):
        m2 = onnx.ModelProto()
        m2.CopyFrom(model)
        model = m2
    else:
        raise TypeError(f"expected an onnx.ModelProto, a path or the serialized model, got {type(model).__name__}")
    # A ModelProto loaded without its external data only names the files that hold its
    # weights, relative to a directory it does not know: reading them from the current
    # directory could take another model's weights.
    unloaded = [t.name for t in _all_tensors(model.graph) if t.data_location == TensorProto.EXTERNAL]
    if unloaded:
        raise ValueError(
            f"the model's external data is not loaded ({len(unloaded)} tensors, e.g. {unloaded[0]!r}): pass the "
            "model's path, or load it with onnx.load(path, load_external_data=True) (or "
            "onnx.external_data_helper.load_external_data_for_model(model, base_dir)) first"
        )
    # Shapes of intermediate tensors decide which following nodes can be folded (bias, residual,
    # attention heads). data_prop also propagates shapes computed in the graph (Shape -> Gather
    # -> Concat, as PyTorch exports Reshape targets), so the tensors they shape get known shapes;
    # without it if that fails.
    _infer(model)
    report = Report()
    # Nodes and initializers the model itself never uses stay as they are (only what the
    # conversion makes unused, the splits below included, is removed).
    dead_outputs, unused_inits = _unused(model.graph)
    if opts.quantize_embeddings and "Gather" not in opts.exclude_op_types:
        gathers = split_embed_layer_norm(model, opts.min_size, opts.include_nodes, opts.exclude_nodes)
        if gathers and opts.include_nodes:
            opts = QuantizeOptions.from_json(opts.to_json())  # the caller's options stay as they were
            opts.include_nodes = opts.include_nodes + tuple(gathers)
    if opts.convert_attention and "MatMul" in opts.op_types:
        split = decompose_attention(model, opts.include_nodes, opts.exclude_nodes, opts.exclude_op_types, report.skipped)
        report.attention_split = len(split)
        if split:
            opts = QuantizeOptions.from_json(opts.to_json())  # the caller's options stay as they were
            if opts.include_nodes:
                opts.include_nodes = opts.include_nodes + tuple(n for names in split.values() for n in names)
            _infer(model)
    G = _Graph(model)
    g = model.graph
    calib = None
    if opts.smooth == "auto":
        from .smooth import Calibration

        xs = [
            n.input[0]
            for n in g.node
            if n.op_type in opts.op_types and n.domain in ("", "ai.onnx") and len(n.input) > 1 and G.is_const(n.input[1])
        ]
        calib = Calibration(model, xs, calibration_inputs) if xs else None
        if calib is not None and progress:
            # The run happens before the first layer is converted; it can take a while on a
            # large model, so say what is going on.
            print(f"smoothing: running the float model on sample inputs ({len(set(xs))} activation tensors)", file=sys.stderr)
    removed = set()  # ids of nodes to drop
    replacement: Dict[int, List[onnx.NodeProto]] = {}  # id(node) -> nodes to put in its place
    new_inits: List[onnx.TensorProto] = []
    used_names = set(G.inits) | set(G.producer) | {i.name for i in g.input} | _subgraph_names(g) | (_reserved or set())
    node_names = {n.name for n in g.node if n.name}
    include = set(opts.include_nodes)
    exclude = set(opts.exclude_nodes)
    def selected(node: onnx.NodeProto) -> Optional[str]:
        # A node without a name is known by its first output (the name its dynq node gets, and
        # the one `evaluate` reports and mixed precision passes back here).
        key = node.name or node.output[0]
        if any(o in dead_outputs for o in node.output):
            return "its output is not used by the model"
        if include and key not in include:
            return "not in --include-nodes"
        if key in exclude:
            return "excluded by name"
        if node.op_type in opts.exclude_op_types:
            return "excluded by op type"
        return None

    def add_init(base: str, arr: np.ndarray) -> str:
        name = _dedupe_name(used_names, base)
        new_inits.append(numpy_helper.from_array(arr, name))
        return name

    # Quantized weights already emitted, by content: layers sharing one weight (tied or reused
    # matrices) share its int8 initializers instead of storing them once per layer.
    emitted_w: Dict[Tuple, Tuple[str, str]] = {}

    def emit(anchor: onnx.NodeProto, rec: LayerRecord, x: str, q: np.ndarray, scales: np.ndarray, bias, dead: List[onnx.NodeProto], smooth=None, residual=None):
        base = rec.name or rec.output
        if residual is not None:
            # The node takes the place of the residual Add, where the residual tensor is sure to
            # exist (it may be computed after the MatMul); the MatMul's place is then empty.
            dead = [d for d in dead if d is not residual[0]] + [anchor]
            node_anchor = residual[0]
        else:
            node_anchor = anchor
        scales = np.ascontiguousarray(scales, dtype=np.float32)
        q = np.ascontiguousarray(q)
        key = (q.shape, q.dtype.str, hashlib.blake2b(q.data, digest_size=32).digest(), scales.shape, scales.tobytes())
        shared = key in emitted_w
        if not shared:
            emitted_w[key] = (add_init(base + "_W_int8", q), add_init(base + "_W_scale", scales))
        inputs = [x, *emitted_w[key]]
        if bias is not None:
            inputs.append(add_init(base + "_bias", bias.astype(np.float32)))
        if smooth is not None or residual is not None:
            if bias is None:
                # A zero bias rather than an empty optional input: ONNX Runtime up to 1.21 at least
                # crashes creating a session whose custom-op node leaves a middle input empty.
                inputs.append(add_init(base + "_bias", np.zeros(q.shape[1], np.float32)))
            # Likewise factors of 1 (the op skips them: x * 1 == x) rather than no factors.
            inputs.append(add_init(base + "_smooth", (smooth if smooth is not None else np.ones(q.shape[0])).astype(np.float32)))
        attrs = {}
        if residual is not None:
            inputs.append(residual[1])
            ln = residual[2] if len(residual) > 2 else None
            if ln is not None:
                # Only behind a residual: an empty residual input before them would crash ONNX
                # Runtime 1.17-1.21 (see above).
                _, gamma, beta, eps = ln
                inputs.append(add_init(base + "_ln_scale", gamma))
                if beta is not None:
                    inputs.append(add_init(base + "_ln_bias", beta))
                attrs["ln_epsilon"] = eps
                rec.layer_norm = True
        if opts.act_granularity != "per_row":
            attrs["act_granularity"] = opts.act_granularity
        if opts.act_type != "asymmetric_u8":
            attrs["act_type"] = opts.act_type
        if rec.activation != "none":
            attrs["activation"] = rec.activation
        if rec.a_heads:
            attrs["a_layout"] = "heads"
        if rec.output in head_layouts:
            rec.heads, rec.heads_transposed = head_layouts[rec.output]
            attrs["heads"] = [rec.heads]
            if rec.heads_transposed:
                attrs["heads_transposed"] = [1]
        name = rec.name
        if not name:
            # Named after the replaced node's output (see `selected`), unless a node has that name.
            name = anchor.output[0]
            while name in node_names:
                name += "_dynq"
            node_names.add(name)
        node = helper.make_node(OP, inputs, [rec.output], name=name, domain=DOMAIN, **attrs)
        node.doc_string = f"dynq: from {rec.source} " + ", ".join(rec.fused_nodes)
        replacement[id(node_anchor)] = [node]
        for d in dead:
            removed.add(id(d))
        report.converted.append(rec)
        report.int8_weight_bytes += (0 if shared else q.size + 4 * scales.size) + (4 * smooth.size if smooth is not None else 0)


    # Outputs written in the attention-head layout (a folded Reshape + Transpose): name -> (heads, transposed).
    head_layouts: Dict[str, Tuple[int, bool]] = {}

    def fuse_tail(out: str, n: int, x: str, bias: Optional[np.ndarray] = None, heads_ok: bool = True):
        """Bias Add, activation and residual Add after `out`: (bias, activation, final output,
        nodes fused, (residual Add, residual tensor) or None). A bias Add after a node that
        has one already (Gemm's C, DynamicQuantizeMatMul's B) is added to it."""
        fused: List[onnx.NodeProto] = []

        def plus(extra: np.ndarray) -> Optional[np.ndarray]:
            """The bias with `extra` added, or None where the sum overflows (the op refuses a
            non-finite bias; the node stays)."""
            with np.errstate(over="ignore"):
                total = extra if bias is None else (bias + extra).astype(np.float32)
            return total if np.all(np.isfinite(total)) else None

        if opts.fuse_bias:
            mb = _match_bias(G, out, n, x)
            if mb is not None and plus(mb[1]) is not None:
                bias = plus(mb[1])
                fused.append(mb[0])
                out = mb[0].output[0]
        act = "none"
        if opts.fuse_activation:
            ma = _match_activation(G, out)
            if ma is not None:
                act, nodes, out = ma
                fused.extend(nodes)
            elif opts.fuse_bias:
                mg = _match_bias_gelu(G, out, n)
                if mg is not None and plus(mg[1]) is not None:
                    bias = plus(mg[1])
                    act = mg[2]
                    fused.append(mg[0])
                    out = mg[0].output[0]
        residual = None
        if opts.fuse_residual:
            mr = _match_residual(G, out)
            # An Add of two layers' outputs is folded into the first of them only.
            if mr is not None and id(mr[0]) not in removed and id(mr[0]) not in replacement:
                ml = None
                if opts.fuse_layer_norm:
                    s_out = mr[0].output[0]
                    ml = _match_layer_norm(G, s_out, n) or _match_decomposed_layer_norm(G, s_out, n)
                # (the Add, the residual tensor, the layer norm's (nodes, scale, bias, epsilon) or None)
                residual = (*mr, ml[:4] if ml is not None else None)
                fused.append(mr[0])
                out = mr[0].output[0]
                if ml is not None:
                    fused.extend(ml[0])
                    out = ml[4]
            elif opts.fuse_layer_norm:
                ms = _match_skip_layer_norm(G, out, n)
                # Its bias is added after the activation: folded only where there is none.
                if ms is not None and (ms[4] is None or (act == "none" and opts.fuse_bias and plus(ms[4]) is not None)):
                    sln, skip, gamma, beta, sbias, eps = ms
                    if sbias is not None:
                        bias = plus(sbias)
                    residual = (sln, skip, ([sln], gamma, beta, eps))
                    fused.append(sln)
                    out = sln.output[0]
        if residual is None and opts.fuse_heads and heads_ok:
            mh = _match_heads(G, out, n, opts.fuse_heads_transposed)
            if mh is not None:
                nodes, out, h, transposed, shape_nodes = mh
                fused.extend(nodes)
                head_layouts[out] = (h, transposed)
                # They read the layer's input instead, whose leading dimensions are the same.
                for sh in shape_nodes:
                    sh.input[0] = x
        return bias, act, out, fused, residual

    def emit_group(members: List[onnx.NodeProto], recs: List[LayerRecord], x: str, q: np.ndarray, scales: np.ndarray, bias: np.ndarray, dead: List[onnx.NodeProto], smooth=None):
        """One node for layers that read the same input: their weights side by side along N,
        one output per layer (`split`). It takes the place of the first of them in node order,
        before every consumer of any of their outputs."""
        anchor = members[0]
        base = (recs[0].name or recs[0].output) + "_group"
        inputs = [x, add_init(base + "_W_int8", np.ascontiguousarray(q)), add_init(base + "_W_scale", np.ascontiguousarray(scales, np.float32))]
        inputs.append(add_init(base + "_bias", bias.astype(np.float32)))
        if smooth is not None:
            inputs.append(add_init(base + "_smooth", smooth.astype(np.float32)))
        attrs = {"split": [r.n for r in recs], "layer_names": [r.name or r.output for r in recs]}
        if opts.act_granularity != "per_row":
            attrs["act_granularity"] = opts.act_granularity
        if opts.act_type != "asymmetric_u8":
            attrs["act_type"] = opts.act_type
        if recs[0].activation != "none":
            attrs["activation"] = recs[0].activation
        layouts = [head_layouts.get(r.output, (0, False)) for r in recs]
        if any(h for h, _ in layouts):
            attrs["heads"] = [h for h, _ in layouts]
            if any(t for _, t in layouts):
                attrs["heads_transposed"] = [int(t) for _, t in layouts]
            for r, (h, t) in zip(recs, layouts):
                r.heads, r.heads_transposed = h, t
        name = anchor.name or anchor.output[0]
        while name in node_names and name != anchor.name:
            name += "_dynq"
        node_names.add(name)
        node = helper.make_node(OP, inputs, [r.output for r in recs], name=name, domain=DOMAIN, **attrs)
        node.doc_string = "dynq: from " + ", ".join(f"{r.source} {r.name or r.output}" for r in recs)
        replacement[id(anchor)] = [node]
        for d in dead:
            removed.add(id(d))
        for r in recs:
            r.group = name
        report.converted.extend(recs)
        report.int8_weight_bytes += q.size + 4 * scales.size + (4 * smooth.size if smooth is not None else 0)

    # Layers reading one input, candidates for one node: float MatMuls with a constant 2-D weight
    # of the same K, selected for conversion, per-channel weights (their scales are per column,
    # so the concatenated weight quantizes exactly as the separate ones).
    groups: Dict[int, List[onnx.NodeProto]] = {}
    if opts.group_shared_input and opts.weight_granularity == "per_channel" and "MatMul" in opts.op_types:
        by_input: Dict[Tuple[str, int], List[onnx.NodeProto]] = {}
        for nd in g.node:
            if nd.op_type != "MatMul" or nd.domain not in ("", "ai.onnx") or len(nd.input) != 2 or selected(nd):
                continue
            w = G.const(nd.input[1])
            if w is None or w.dtype not in (np.float32, np.float16) or w.ndim != 2 or w.size < max(opts.min_size, 1):
                continue
            if w.shape[0] > 65536 or not np.all(np.isfinite(w)):
                continue
            by_input.setdefault((nd.input[0], w.shape[0]), []).append(nd)
        for members in by_input.values():
            if len(members) > 1:
                groups[id(members[0])] = members
    grouped = set()  # ids of MatMuls converted as part of a group

    candidates = [n for n in g.node if n.op_type in ("MatMul", "Gemm", "MatMulInteger", "DynamicQuantizeMatMul", "MatMulIntegerToFloat", "Gather")]
    prog = _Progress(len(candidates), progress)
    done = 0
    for node in list(g.node):
        if node.op_type not in ("MatMul", "Gemm", "MatMulInteger", "DynamicQuantizeMatMul", "MatMulIntegerToFloat", "Gather"):
            continue
        done += 1
        prog.update(done, node.name)
        if id(node) in removed or id(node) in grouped:
            continue
        if id(node) in groups:
            done_ids = _convert_group(groups[id(node)], G, opts, report, emit_group, fuse_tail, calib)
            grouped.update(done_ids)
            if id(node) in grouped:
                continue
        dom_std = node.domain in ("", "ai.onnx")
        why = selected(node)
        try:
            if node.op_type in ("MatMul", "Gemm") and dom_std:
                if node.op_type not in opts.op_types:
                    report.skipped.append((node.name, node.op_type, "op type not selected"))
                    continue
                if why:
                    report.skipped.append((node.name, node.op_type, why))
                    continue
                _convert_float(node, G, opts, report, emit, fuse_tail, calib)
            elif node.op_type == "MatMulInteger" and dom_std and opts.convert_quantized:
                if why:
                    report.skipped.append((node.name, node.op_type, why))
                    continue
                _convert_matmulinteger(node, G, opts, report, emit, fuse_tail, removed)
            elif node.op_type in ("DynamicQuantizeMatMul", "MatMulIntegerToFloat") and node.domain == "com.microsoft" and opts.convert_quantized:
                if why:
                    report.skipped.append((node.name, node.op_type, why))
                    continue
                _convert_ms_quantized(node, G, opts, report, emit, fuse_tail)
            elif node.op_type == "Gather" and dom_std and opts.quantize_embeddings:
                if why:
                    continue
                _convert_gather(node, G, opts, report, replacement, add_init, used_names, node_names)
        except _Skip as s:
            report.skipped.append((node.name, node.op_type, str(s)))
    prog.close()
    if calib is not None and calib.error:
        report.smooth_note = f"the float model could not be run on sample inputs ({calib.error}); pass calibration inputs"

    # Rebuild the node list: replacements in place, fused nodes dropped.
    new_nodes = []
    for n in g.node:
        if id(n) in replacement:
            new_nodes.extend(replacement[id(n)])
        elif id(n) not in removed:
            new_nodes.append(n)
    del g.node[:]
    g.node.extend(new_nodes)
    g.initializer.extend(new_inits)
    _remove_dead(model, dead_outputs, unused_inits)
    if _convert_subgraphs(model, opts, report, used_names | {n for n in _subgraph_names(g)} | {t.name for t in g.initializer}):
        _remove_dead(model, dead_outputs, unused_inits)
    if report.converted and not any(o.domain == DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(DOMAIN, 1))
    if report.embeddings and not any(o.domain in ("", "ai.onnx") for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("", 13))
    # Value infos of replaced tensors stay valid (same names, same shapes); drop the rest.
    model.graph.ClearField("value_info")
    meta = {p.key: p for p in model.metadata_props}
    if METADATA_KEY in meta:
        meta[METADATA_KEY].value = opts.to_json()
    else:
        model.metadata_props.append(onnx.StringStringEntryProto(key=METADATA_KEY, value=opts.to_json()))
    return model, report


def _graph_reads(g: onnx.GraphProto) -> Tuple[set, set]:
    """(names read by the nodes of `g` and of its subgraphs, names defined in them: inputs,
    initializers, node outputs)."""
    reads, defined = set(), set()
    for gg in [g, *_subgraphs(g)]:
        defined.update(i.name for i in gg.input)
        defined.update(t.name for t in gg.initializer)
        for n in gg.node:
            reads.update(i for i in n.input if i)
            defined.update(o for o in n.output if o)
        reads.update(o.name for o in gg.output)
    return reads, defined


def _rename_reads(g: onnx.GraphProto, names: Dict[str, str]):
    """Replaces the names read by the nodes and outputs of `g` and of its subgraphs."""
    for gg in [g, *_subgraphs(g)]:
        for n in gg.node:
            for i, x in enumerate(n.input):
                if x in names:
                    n.input[i] = names[x]


def _convert_subgraphs(model: onnx.ModelProto, opts: QuantizeOptions, report: Report, reserved: set) -> bool:
    """Converts the layers in the subgraphs of the top-level nodes of `model` (each body as a
    model of its own, whose constants are the outer initializers it reads and whose inputs are
    the other outer tensors it reads), in place; the new initializers move to the outer graph,
    one copy per distinct content. Returns whether anything was converted."""
    g = model.graph
    subs = [(n, a) for n in g.node for a in n.attribute if a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)]
    if not subs:
        return False
    # Initializers that are also graph inputs can be fed (defaults, not constants): like the
    # outer graph's own layers, the bodies' layers that read them stay.
    outer_inits = {t.name: t for t in g.initializer if t.name not in {i.name for i in g.input}}
    # Types of the outer tensors a body may read (from shape inference of the whole model).
    types: Dict[str, onnx.ValueInfoProto] = {}
    try:
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
        for vi in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output):
            types[vi.name] = vi
    except Exception:
        pass
    for vi in list(g.value_info) + list(g.input) + list(g.output):
        types.setdefault(vi.name, vi)
    sub_opts = QuantizeOptions.from_json(opts.to_json())
    sub_opts.smooth = "off"
    changed = False
    by_content: Dict[Tuple, str] = {}  # the new initializers moved out, by content
    fp32_seen = set()
    for node, attr in subs:
        bodies = [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)
        for body in bodies:
            reads, defined = _graph_reads(body)
            free = sorted(reads - defined)
            consts = [n for n in free if n in outer_inits]
            others = [n for n in free if n not in outer_inits]
            if not any(nd.op_type in ("MatMul", "Gemm", "MatMulInteger", "DynamicQuantizeMatMul", "MatMulIntegerToFloat") for gg in [body, *_subgraphs(body)] for nd in gg.node):
                continue
            untyped = [n for n in others if n not in types or not types[n].type.HasField("tensor_type")]
            if untyped:
                report.skipped.append((node.name, node.op_type, f"subgraph {body.name!r} reads outer tensors of unknown type ({untyped[0]}): not converted"))
                continue
            sg = onnx.GraphProto()
            sg.CopyFrom(body)
            sg.input.extend(types[n] for n in others)
            sg.initializer.extend(outer_inits[n] for n in consts)
            sm = helper.make_model(sg, opset_imports=list(model.opset_import), ir_version=model.ir_version)
            conv, rep = quantize_model(sm, sub_opts, _reserved=reserved)
            if not rep.converted and not rep.embeddings:
                report.skipped.extend(rep.skipped)
                continue
            cg = conv.graph
            # The outer names are the outer graph's again; what the conversion added moves out.
            outer_inputs, own_inits = set(others), {x.name for x in body.initializer}
            keep_inputs = [i for i in cg.input if i.name not in outer_inputs]
            del cg.input[:]
            cg.input.extend(keep_inputs)
            still_read, _ = _graph_reads(cg)
            new_inits = [t for t in cg.initializer if t.name not in outer_inits and t.name not in own_inits]
            kept = [t for t in cg.initializer if t.name in own_inits]
            for name in consts:
                # The weights the conversion replaced (2-D; biases are not counted, as above).
                if name not in still_read and name not in fp32_seen and len(outer_inits[name].dims) == 2:
                    fp32_seen.add(name)
                    report.fp32_weight_bytes += _tensor_nbytes(outer_inits[name])
            renames: Dict[str, str] = {}
            for t in new_inits:
                data = numpy_helper.to_array(t)
                key = (t.data_type, tuple(t.dims), hashlib.blake2b(np.ascontiguousarray(data).tobytes(), digest_size=32).digest())
                if key in by_content:
                    renames[t.name] = by_content[key]
                    if t.data_type == TensorProto.INT8:
                        report.int8_weight_bytes -= data.size
                else:
                    by_content[key] = t.name
                    g.initializer.append(t)
                    reserved.add(t.name)
            del cg.initializer[:]
            cg.initializer.extend(kept)
            _rename_reads(cg, renames)
            cg.ClearField("value_info")
            body.CopyFrom(cg)
            reserved.update(_graph_reads(body)[1])
            report.converted.extend(rep.converted)
            report.skipped.extend(rep.skipped)
            report.embeddings.extend(rep.embeddings)
            report.int8_weight_bytes += rep.int8_weight_bytes
            if opts.smooth == "auto" and not report.smooth_note:
                report.smooth_note = "not for the layers inside subgraphs (the float model cannot be asked for their activations)"
            changed = True
    return changed


def _check_weight_shape(k: int, n: int, opts: "QuantizeOptions"):
    """Skips a layer whose weight is empty, too small for the options or longer than the exact
    int32 sums allow."""
    if k == 0 or n == 0:
        raise _Skip("empty weight")
    if k * n < opts.min_size:
        raise _Skip("below --min-size")
    if k > 65536:
        raise _Skip("K > 65536")


class _Skip(Exception):
    pass


def _convert_group(members, G: _Graph, opts: QuantizeOptions, report: Report, emit_group, fuse_tail, calib=None) -> set:
    """Converts MatMuls that read one input as one node (see `emit_group`); returns the ids of
    the nodes it converted. Layers with a residual to fold, or whose activation differs from
    the first's, are left for the one-by-one conversion; so is everything when fewer than two
    remain."""
    x = members[0].input[0]
    tails = []
    src_bytes = {}  # each weight's size in the source model (float16 ones are widened here)
    for nd in members:
        w0 = G.const(nd.input[1])
        src_bytes[id(nd)] = G.source_nbytes(nd.input[1])
        w = w0.astype(np.float32)
        bias, act, final, fused, residual = fuse_tail(nd.output[0], w.shape[1], x)
        if residual is None:
            tails.append((nd, w, bias, act, final, fused))
    tails = [t for t in tails if t[3] == tails[0][3]] if tails else []
    # One node for all: every output must be free to move to the first member's place, which
    # holds as each output's readers follow its own (later) MatMul.
    if len(tails) < 2:
        return set()
    k = tails[0][1].shape[0]
    choice = None
    acts = _calibration_rows(calib, x, k, report, len(tails))
    if acts is not None:
        from .smooth import choose, held_out_sqnr

        mode = (opts.weight_granularity, opts.act_granularity, opts.act_type)
        # One factor per input channel for the whole group (the input is quantized once), fitted
        # against all its weights together. A layer that this costs more than
        # group_max_loss_db of held-out SQNR, against the smoothing it would get alone, leaves
        # the group (and is converted alone); the factors are then fitted again without it.
        own = {}
        for t in tails:
            c = choose(acts, t[1], *mode, opts.smooth_min_gain_db, opts.weight_qmax)
            own[id(t[0])] = held_out_sqnr(acts, t[1], c.smooth if c else None, *mode, opts.weight_qmax)
        while len(tails) >= 2:
            choice = choose(acts, np.concatenate([t[1] for t in tails], axis=1), *mode, opts.smooth_min_gain_db, opts.weight_qmax)
            sm = choice.smooth if choice else None
            loss = {id(t[0]): own[id(t[0])] - held_out_sqnr(acts, t[1], sm, *mode, opts.weight_qmax) for t in tails}
            worst = max(tails, key=lambda t: loss[id(t[0])])
            if not loss[id(worst[0])] > opts.group_max_loss_db:
                break
            tails = [t for t in tails if t is not worst]
        if len(tails) < 2:
            return set()
    w = np.concatenate([t[1] for t in tails], axis=1)
    if choice is not None:
        w = (w / choice.smooth[:, None]).astype(np.float32)
    bias = np.concatenate([t[2] if t[2] is not None else np.zeros(t[1].shape[1], np.float32) for t in tails])
    for nd, wi, *_ in tails:
        if G.first_use(nd.input[1]):
            report.fp32_weight_bytes += src_bytes[id(nd)]
    q, scales = quantize_weights(w, opts.weight_granularity, layout="kn", weight_qmax=opts.weight_qmax)
    recs = [
        LayerRecord(
            name=nd.name,
            source="MatMul",
            output=final,
            input=x,
            k=int(k),
            n=int(wi.shape[1]),
            bias=b is not None,
            activation=act,
            weight_granularity=opts.weight_granularity,
            fused_nodes=[f.name or f.op_type for f in fused],
            smooth_alpha=choice.alpha if choice else None,
            smooth_gain_db=choice.gain_db if choice else None,
        )
        for nd, wi, b, act, final, fused in tails
    ]
    dead = [t[0] for t in tails[1:]] + [f for t in tails for f in t[5]]
    emit_group([t[0] for t in tails], recs, x, q, scales, bias, dead, choice.smooth if choice else None)
    return {id(t[0]) for t in tails}


def _calibration_rows(calib, x: str, k: int, report: Report, layers: int) -> Optional[np.ndarray]:
    """The calibration activations of input `x` ([rows, k]) if there are enough to choose a
    smoothing from; counts the `layers` reading it as not smoothed when there are too few."""
    acts = calib.activations(x) if calib is not None else None
    if acts is None or acts.shape[1] != k:
        return None
    from .smooth import MIN_ROWS

    if acts.shape[0] < MIN_ROWS:
        report.smooth_few_rows += layers
        return None
    return acts


def _convert_float(node, G: _Graph, opts: QuantizeOptions, report: Report, emit, fuse_tail, calib=None):
    x, wname = node.input[0], node.input[1]
    w = G.const(wname)
    if w is None:
        if wname in G.inits and wname in G.graph_inputs:
            # ONNX Runtime lets such an initializer be fed (IR >= 4): it is a default, not a constant.
            # IR < 4 lists every initializer as an input; those models are left as they are too.
            if G.model.ir_version < 4:
                raise _Skip("weight initializer is also a graph input (IR version < 4 model), not converted")
            raise _Skip("weight initializer is also a graph input (overridable), so not a constant")
        raise _Skip("weight is not a constant initializer")
    if w.dtype not in (np.float32, np.float16) or w.ndim != 2:
        raise _Skip(f"weight is not a 2-D float or float16 tensor ({w.dtype} {list(w.shape)})")
    # float16 models: the weight is widened exactly and quantized like a float one; A and Y stay
    # float16 (the op takes and gives A's type).
    w_bytes = G.source_nbytes(wname)
    w = w.astype(np.float32)
    bias_from_gemm = None
    if node.op_type == "Gemm":
        if _attr(node, "transA", 0):
            raise _Skip("Gemm with transA=1")
        alpha = float(_attr(node, "alpha", 1.0))
        beta = float(_attr(node, "beta", 1.0))
        if _attr(node, "transB", 0):
            w = w.T
        if alpha != 1.0:
            w = (w * np.float32(alpha)).astype(np.float32)
        if len(node.input) > 2 and node.input[2]:
            c = G.const(node.input[2])
            n = w.shape[1]
            if c is None or c.dtype not in (np.float32, np.float16) or c.size not in (1, n) or (c.ndim == 2 and c.shape[0] != 1):
                raise _Skip("Gemm bias C is not a constant of N values")
            if beta != 0.0:  # beta = 0: C is not used (ONNX Runtime ignores it, NaN or not)
                bias_from_gemm = (np.broadcast_to(c.reshape(-1).astype(np.float32), (n,)) * np.float32(beta)).astype(np.float32)
                if not np.all(np.isfinite(bias_from_gemm)):
                    raise _Skip("Gemm bias beta * C has NaN or infinity")
    k, n = w.shape
    _check_weight_shape(k, n, opts)
    if not np.all(np.isfinite(w)):
        raise _Skip("weight has NaN or infinity")
    out = node.output[0]
    if G.first_use(wname):
        report.fp32_weight_bytes += w_bytes
    # The attention context read in its head layout (the Transpose + Reshape before it unread).
    ctx = _match_input_heads(G, x, k) if opts.fuse_heads and node.op_type == "MatMul" else None
    # The op reads its input or writes its output in the head layout, not both: a layer whose
    # input is folded keeps a Reshape to heads after it as it is.
    bias, act, final, fused, residual = fuse_tail(out, n, x, bias_from_gemm, heads_ok=ctx is None)
    choice = None
    acts = _calibration_rows(calib, x, k, report, 1)
    if acts is not None:
        from .smooth import choose

        choice = choose(acts, w, opts.weight_granularity, opts.act_granularity, opts.act_type, opts.smooth_min_gain_db, opts.weight_qmax)
        if choice is not None:
            # The op multiplies A by `smooth`; the weight rows are divided by it (same product).
            w = (w / choice.smooth[:, None]).astype(np.float32)
    q, scales = quantize_weights(w, opts.weight_granularity, layout="kn", weight_qmax=opts.weight_qmax)
    rec = LayerRecord(
        name=node.name,
        source=node.op_type,
        output=final,
        input=ctx or x,
        k=int(k),
        n=int(n),
        bias=bias is not None,
        activation=act,
        weight_granularity=opts.weight_granularity,
        fused_nodes=[f.name or f.op_type for f in fused],
        smooth_alpha=choice.alpha if choice else None,
        smooth_gain_db=choice.gain_db if choice else None,
        residual=residual[1] if residual else None,
        a_heads=ctx is not None,
    )
    emit(node, rec, ctx or x, q, scales, bias, fused, choice.smooth if choice else None, residual)


def _convert_matmulinteger(node, G: _Graph, opts, report: Report, emit, fuse_tail, removed):
    """DynamicQuantizeLinear(X) -> MatMulInteger(Xq, Wq, Xzp, Wzp) -> Cast -> Mul(., Xscale*Wscale)."""
    ins = list(node.input) + [""] * (4 - len(node.input))
    aq, wname, azp, wzp = ins[:4]
    dql = G.producer.get(aq)
    if dql is None or dql.op_type != "DynamicQuantizeLinear" or list(dql.output)[0] != aq:
        raise _Skip("activation is not produced by DynamicQuantizeLinear")
    if azp and azp != dql.output[2]:
        raise _Skip("activation zero point is not the DynamicQuantizeLinear's")
    x = dql.input[0]
    q = G.const(wname)
    if q is None or q.ndim != 2 or q.dtype not in (np.int8, np.uint8):
        raise _Skip("weight is not a constant 2-D int8/uint8 tensor")
    zp = None
    if wzp:
        zp = G.const(wzp)
        if zp is None:
            raise _Skip("weight zero point is not constant")
    cast = G.sole_consumer(node.output[0])
    if cast is None or cast.op_type != "Cast" or _attr(cast, "to") != TensorProto.FLOAT:
        raise _Skip("MatMulInteger output is not Cast to float")
    mul = G.sole_consumer(cast.output[0])
    if mul is None or mul.op_type != "Mul":
        raise _Skip("no scale Mul after the Cast")
    sname = _other_input(mul, cast.output[0])
    smul = G.producer.get(sname or "")
    wscale = None
    if smul is not None and smul.op_type == "Mul" and dql.output[1] in smul.input:
        wscale = G.const(_other_input(smul, dql.output[1]) or "")
    if wscale is None:
        raise _Skip("scale is not DynamicQuantizeLinear scale x constant weight scale")
    k, n = q.shape
    _check_weight_shape(k, n, opts)
    q8, scales, nreq = _int_weights_to_int8(q, zp, wscale)
    out = mul.output[0]
    bias, act, final, fused, residual = fuse_tail(out, n, x)
    rec = LayerRecord(
        name=node.name,
        source="MatMulInteger",
        output=final,
        input=x,
        k=int(k),
        n=int(n),
        bias=bias is not None,
        activation=act,
        weight_granularity="per_channel" if scales.size > 1 else "per_tensor",
        requantized_channels=nreq,
        fused_nodes=[f.name or f.op_type for f in [cast, mul] + fused],
        residual=residual[1] if residual else None,
    )
    if G.first_use(wname):
        report.fp32_weight_bytes += q.size * 4
    # The scale Mul (shared between layers of one DynamicQuantizeLinear? no: one per MatMulInteger)
    dead = [cast, mul] + fused
    if G.sole_consumer(smul.output[0]) is mul:
        dead.append(smul)
    emit(node, rec, x, q8, scales, bias, dead, residual=residual)


def _convert_ms_quantized(node, G: _Graph, opts, report: Report, emit, fuse_tail):
    ins = list(node.input)
    if node.op_type == "DynamicQuantizeMatMul":
        # A, B, b_scale, b_zero_point?, bias?
        ins += [""] * (5 - len(ins))
        x, wname, sname, zname, bname = ins[:5]
    else:
        # MatMulIntegerToFloat: A(uint8 from DQL), B, a_scale, b_scale, a_zp?, b_zp?, bias?
        ins += [""] * (7 - len(ins))
        aq, wname, asc, sname, azp, zname, bname = ins[:7]
        dql = G.producer.get(aq)
        if dql is None or dql.op_type != "DynamicQuantizeLinear" or dql.output[0] != aq or asc != dql.output[1]:
            raise _Skip("activation is not produced by DynamicQuantizeLinear")
        x = dql.input[0]
    q = G.const(wname)
    if q is None or q.ndim != 2 or q.dtype not in (np.int8, np.uint8):
        raise _Skip("weight is not a constant 2-D int8/uint8 tensor")
    s = G.const(sname)
    if s is None:
        raise _Skip("weight scale is not constant")
    zp = None
    if zname:
        zp = G.const(zname)
        if zp is None:
            raise _Skip("weight zero point is not constant")
    k, n = q.shape
    _check_weight_shape(k, n, opts)
    q8, scales, nreq = _int_weights_to_int8(q, zp, s)
    bias = None
    if bname:
        b = G.const(bname)
        if b is None or b.size != n:
            raise _Skip("bias is not a constant of N values")
        if not np.all(np.isfinite(b)):
            raise _Skip("bias has NaN or infinity")
        bias = b.reshape(n).astype(np.float32)
    out = node.output[0]
    bias, act, out, fused, residual = fuse_tail(out, n, x, bias)
    rec = LayerRecord(
        name=node.name,
        source=node.op_type,
        output=out,
        input=x,
        k=int(k),
        n=int(n),
        bias=bias is not None,
        activation=act,
        weight_granularity="per_channel" if scales.size > 1 else "per_tensor",
        requantized_channels=nreq,
        fused_nodes=[f.name or f.op_type for f in fused],
        residual=residual[1] if residual else None,
    )
    if G.first_use(wname):
        report.fp32_weight_bytes += q.size * 4
    emit(node, rec, x, q8, scales, bias, fused, residual=residual)


def _convert_gather(node, G: _Graph, opts, report: Report, replacement, add_init, used_names, node_names):
    table = G.const(node.input[0])
    if table is None or table.dtype != np.float32 or table.ndim != 2:
        return
    if int(_attr(node, "axis", 0)) != 0:
        return
    v, d = table.shape
    if table.size < max(opts.min_size, 1024):
        return
    if not np.all(np.isfinite(table)):
        return
    # One symmetric int8 scale per row (per token id): [V, D] as "nk" layout with N = V rows.
    q, scales = quantize_weights(table, "per_channel", layout="nk")
    base = node.name or node.output[0]
    qn = add_init(base + "_table_int8", q)
    sn = add_init(base + "_table_scale", scales.reshape(v, 1).astype(np.float32))
    ids = node.input[1]
    t_q = _dedupe_name(used_names, base + "_q")
    t_s = _dedupe_name(used_names, base + "_s")
    t_f = _dedupe_name(used_names, base + "_f")
    nodes = [
        helper.make_node("Gather", [qn, ids], [t_q], name=_dedupe_name(node_names, base + "_gather_int8"), axis=0),
        helper.make_node("Gather", [sn, ids], [t_s], name=_dedupe_name(node_names, base + "_gather_scale"), axis=0),
        helper.make_node("Cast", [t_q], [t_f], name=_dedupe_name(node_names, base + "_cast"), to=TensorProto.FLOAT),
        helper.make_node("Mul", [t_f, t_s], [node.output[0]], name=_dedupe_name(node_names, base + "_dequant")),
    ]
    replacement[id(node)] = nodes
    report.embeddings.append((node.name, int(v), int(d)))
    if G.first_use(node.input[0]):
        report.fp32_weight_bytes += table.size * 4
    report.int8_weight_bytes += q.size + 4 * v


def _live_nodes(g: onnx.GraphProto, keep_outputs=frozenset()) -> Tuple[List[onnx.NodeProto], set]:
    """The nodes of `g` whose outputs the graph's outputs or its subgraphs use (transitively),
    with those that have an output in `keep_outputs` (and what they read); and the names these
    nodes, the outputs and the subgraphs read."""
    outputs = {o.name for o in g.output}
    sub_uses = set()
    for sg in _subgraphs(g):
        for sn in sg.node:
            sub_uses.update(sn.input)
    changed = True
    nodes = list(g.node)
    while changed:
        changed = False
        used = set(outputs) | sub_uses
        for n in nodes:
            used.update(i for i in n.input if i)
        keep = [n for n in nodes if any(o in used or o in keep_outputs for o in n.output if o) or not any(n.output)]
        if len(keep) != len(nodes):
            nodes = keep
            changed = True
    used = set(outputs) | sub_uses
    for n in nodes:
        used.update(i for i in n.input if i)
    return nodes, used


def _unused(g: onnx.GraphProto) -> Tuple[set, set]:
    """Output names of the nodes, and names of the initializers, that the model never uses."""
    live, used = _live_nodes(g)
    live_outputs = {o for n in live for o in n.output if o}
    dead_outputs = {o for n in g.node for o in n.output if o and o not in live_outputs}
    return dead_outputs, {t.name for t in g.initializer if t.name not in used}


def _remove_dead(model: onnx.ModelProto, keep_outputs=frozenset(), keep_inits=frozenset()):
    """Drops nodes whose outputs nobody uses and initializers nobody reads (the fp32 weights),
    except the nodes with an output in `keep_outputs` and the initializers in `keep_inits`
    (what the source model already left unused)."""
    g = model.graph
    nodes, used = _live_nodes(g, keep_outputs)
    del g.node[:]
    g.node.extend(nodes)
    inputs = {i.name for i in g.input}
    keep = [t for t in g.initializer if t.name in used or t.name in inputs or t.name in keep_inits]
    del g.initializer[:]
    g.initializer.extend(keep)


def save_model(model: onnx.ModelProto, path: str, external_data: Optional[bool] = None):
    """Saves a model; weights go to a side file ``<path>.data`` when asked, or automatically when
    the model would not fit in one protobuf (2 GB)."""
    path = os.fspath(path)
    if external_data is None:
        external_data = model.ByteSize() > 1_800_000_000
    if external_data:
        loc = os.path.basename(path) + ".data"
        target = os.path.join(os.path.dirname(os.path.abspath(path)), loc)
        if os.path.exists(target):
            os.remove(target)
        onnx.save_model(model, path, save_as_external_data=True, all_tensors_to_one_file=True, location=loc, size_threshold=1024)
    else:
        onnx.save_model(model, path)

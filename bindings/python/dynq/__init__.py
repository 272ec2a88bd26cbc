"""dynq: dynamic int8 quantization for the linear layers of neural networks.

A numpy wrapper over the C ABI of ``libdynq.so`` (loaded with ctypes), plus the ONNX tools in
:mod:`dynq.onnx` (``python -m dynq.onnx quantize|evaluate``).

The library is found, in this order, at ``$DYNQ_LIBRARY``, next to this package
(``dynq/libdynq.so``), or in the source tree's ``target/release`` (``cargo build --release``).

Example::

    import numpy as np, dynq
    w = np.random.randn(3072, 768).astype(np.float32)      # [K, N], ONNX MatMul layout
    packed = dynq.PackedWeights.from_float(w, layout="kn")
    y = dynq.gemm(packed, np.random.randn(16, 3072).astype(np.float32))   # [16, 768]

The same ``libdynq.so`` is an ONNX Runtime custom-op library::

    so = onnxruntime.SessionOptions()
    so.register_custom_ops_library(dynq.library_path())
"""

from __future__ import annotations

import ctypes
import os
import struct
import threading
from pathlib import Path
from typing import Optional, Sequence, Tuple, Union

import numpy as np

__all__ = [
    "DynqError",
    "PackedWeights",
    "gemm",
    "gemm_split",
    "library_path",
    "version",
    "active_isa",
    "ort_cache_stats",
    "quantize_weights",
]

STATUS_NAMES = {
    0: "OK",
    1: "NULL_POINTER",
    2: "INVALID_ARGUMENT",
    3: "SIZE_OVERFLOW",
    4: "NON_FINITE",
    5: "UNSUPPORTED",
    6: "CORRUPT_DATA",
    7: "BUFFER_TOO_SMALL",
    8: "OUT_OF_MEMORY",
    9: "INTERNAL",
}

_LAYOUTS = {"nk": 0, "kn": 1}
_WEIGHT_GRANULARITY = {"per_channel": 0, "per_tensor": 1}
_ACT_GRANULARITY = {"per_row": 0, "per_tensor": 1}
_ACT_TYPE = {"asymmetric_u8": 0, "symmetric_i8": 1}
_EPILOGUE = {"none": 0, "relu": 1, "gelu": 2, "gelu_tanh": 3, "silu": 4, "quick_gelu": 5}


class DynqError(RuntimeError):
    """A failed dynq call: ``status`` is the C ABI status name, ``message`` the library's detail."""

    def __init__(self, status: int, message: str):
        self.status = STATUS_NAMES.get(status, str(status))
        self.code = status
        self.message = message
        super().__init__(f"dynq: {self.status}: {message}")


class _PackConfig(ctypes.Structure):
    _fields_ = [
        ("struct_size", ctypes.c_uint32),
        ("granularity", ctypes.c_uint32),
        ("isa", ctypes.c_uint32),
        ("weight_qmax", ctypes.c_uint32),
    ]


class _GemmConfig(ctypes.Structure):
    _fields_ = [
        ("struct_size", ctypes.c_uint32),
        ("act_granularity", ctypes.c_uint32),
        ("act_type", ctypes.c_uint32),
        ("epilogue", ctypes.c_uint32),
        ("num_threads", ctypes.c_uint32),
    ]


class _Output(ctypes.Structure):
    _fields_ = [("y", ctypes.c_void_p), ("ldy", ctypes.c_size_t), ("cols", ctypes.c_size_t)]


class _Heads(ctypes.Structure):
    _fields_ = [("heads", ctypes.c_size_t), ("seq", ctypes.c_size_t), ("transposed", ctypes.c_uint32), ("reserved", ctypes.c_uint32)]


class _Info(ctypes.Structure):
    _fields_ = [
        ("struct_size", ctypes.c_uint32),
        ("granularity", ctypes.c_uint32),
        ("isa", ctypes.c_uint32),
        ("layout_version", ctypes.c_uint32),
        ("n", ctypes.c_size_t),
        ("k", ctypes.c_size_t),
        ("bytes", ctypes.c_size_t),
        ("serialized_bytes", ctypes.c_size_t),
        ("mr", ctypes.c_uint32),
        ("nr", ctypes.c_uint32),
        ("kr", ctypes.c_uint32),
        ("reserved", ctypes.c_uint32),
        ("kernel_name", ctypes.c_char_p),
    ]


_lib = None
_lib_path: Optional[str] = None
_lock = threading.Lock()


def _candidates():
    env = os.environ.get("DYNQ_LIBRARY")
    if env:
        yield Path(env)
        return
    here = Path(__file__).resolve().parent
    yield here / "libdynq.so"
    # Source tree: bindings/python/dynq -> repository root.
    root = here.parent.parent.parent
    yield root / "target" / "release" / "libdynq.so"
    yield root / "target" / "debug" / "libdynq.so"


def library_path() -> str:
    """Path of the ``libdynq.so`` this package uses (also the ONNX Runtime custom-op library)."""
    for c in _candidates():
        if c.is_file():
            return str(c)
    tried = ", ".join(str(c) for c in _candidates())
    raise FileNotFoundError(
        f"libdynq.so not found (tried {tried}); build it with `cargo build --release` or set DYNQ_LIBRARY"
    )


def _load():
    global _lib, _lib_path
    if _lib is not None:
        return _lib
    with _lock:
        if _lib is not None:
            return _lib
        path = library_path()
        lib = ctypes.CDLL(path)
        P = ctypes.c_void_p
        sz = ctypes.c_size_t
        u32 = ctypes.c_uint32
        lib.dynq_version.restype = ctypes.c_char_p
        lib.dynq_abi_version.restype = u32
        lib.dynq_status_str.restype = ctypes.c_char_p
        lib.dynq_status_str.argtypes = [u32]
        lib.dynq_last_error_message.restype = sz
        lib.dynq_last_error_message.argtypes = [ctypes.c_char_p, sz]
        lib.dynq_active_isa.restype = u32
        lib.dynq_active_isa.argtypes = [ctypes.POINTER(u32)]
        lib.dynq_isa_name.restype = ctypes.c_char_p
        lib.dynq_isa_name.argtypes = [u32]
        lib.dynq_pack_config_init_sized.restype = u32
        lib.dynq_pack_config_init_sized.argtypes = [ctypes.POINTER(_PackConfig), sz]
        lib.dynq_gemm_config_init.restype = u32
        lib.dynq_gemm_config_init.argtypes = [ctypes.POINTER(_GemmConfig)]
        lib.dynq_pack_weights.restype = u32
        lib.dynq_pack_weights.argtypes = [P, sz, sz, u32, ctypes.POINTER(_PackConfig), ctypes.POINTER(P)]
        lib.dynq_pack_quantized_weights.restype = u32
        lib.dynq_pack_quantized_weights.argtypes = [P, sz, sz, u32, P, sz, ctypes.POINTER(_PackConfig), ctypes.POINTER(P)]
        lib.dynq_packed_weights_get_info.restype = u32
        lib.dynq_packed_weights_get_info.argtypes = [P, ctypes.POINTER(_Info)]
        lib.dynq_packed_weights_free.restype = None
        lib.dynq_packed_weights_free.argtypes = [P]
        lib.dynq_packed_weights_serialize.restype = u32
        lib.dynq_packed_weights_serialize.argtypes = [P, P, sz, ctypes.POINTER(sz)]
        lib.dynq_packed_weights_deserialize.restype = u32
        lib.dynq_packed_weights_deserialize.argtypes = [P, sz, ctypes.POINTER(_PackConfig), ctypes.POINTER(P)]
        lib.dynq_gemm.restype = u32
        lib.dynq_gemm.argtypes = [P, P, sz, sz, P, P, sz, ctypes.POINTER(_GemmConfig)]
        lib.dynq_gemm_ex.restype = u32
        lib.dynq_gemm_ex.argtypes = [P, P, u32, sz, sz, P, P, u32, sz, ctypes.POINTER(_GemmConfig)]
        lib.dynq_gemm_smoothed.restype = u32
        lib.dynq_gemm_smoothed.argtypes = [P, P, u32, sz, sz, P, P, P, u32, sz, ctypes.POINTER(_GemmConfig)]
        lib.dynq_gemm_residual.restype = u32
        lib.dynq_gemm_residual.argtypes = [P, P, u32, sz, sz, P, P, P, sz, P, u32, sz, ctypes.POINTER(_GemmConfig)]
        lib.dynq_gemm_split.restype = u32
        lib.dynq_gemm_split.argtypes = [P, P, u32, sz, sz, P, P, ctypes.POINTER(_Output), sz, u32, ctypes.POINTER(_GemmConfig)]
        if hasattr(lib, "dynq_gemm_split_heads"):  # absent from libraries built before it was added
            lib.dynq_gemm_split_heads.restype = u32
            lib.dynq_gemm_split_heads.argtypes = [
                P, P, u32, sz, sz, P, P, ctypes.POINTER(_Output), ctypes.POINTER(_Heads), sz, u32, ctypes.POINTER(_GemmConfig)
            ]
        if hasattr(lib, "dynq_gemm_layer_norm"):  # likewise
            lib.dynq_gemm_layer_norm.restype = u32
            lib.dynq_gemm_layer_norm.argtypes = [
                P, P, u32, sz, sz, P, P, P, sz, P, P, ctypes.c_float, P, u32, sz, ctypes.POINTER(_GemmConfig)
            ]
        if hasattr(lib, "dynq_ort_weight_cache_stats"):
            lib.dynq_ort_weight_cache_stats.restype = None
            lib.dynq_ort_weight_cache_stats.argtypes = [ctypes.POINTER(sz), ctypes.POINTER(sz)] + [
                ctypes.POINTER(ctypes.c_uint64)
            ] * 2
        _lib, _lib_path = lib, path
        return lib


def _check(status: int):
    if status != 0:
        lib = _load()
        n = lib.dynq_last_error_message(None, 0)
        buf = ctypes.create_string_buffer(n + 1)
        lib.dynq_last_error_message(buf, n + 1)
        raise DynqError(status, buf.value.decode("utf-8", "replace"))


def _enum(table: dict, value: str, what: str) -> int:
    try:
        return table[value]
    except KeyError:
        raise ValueError(f"{what} must be one of {sorted(table)}, got {value!r}") from None


def version() -> str:
    """The library version, e.g. ``"0.1.0"``."""
    return _load().dynq_version().decode()


def active_isa() -> str:
    """Name of the kernel family used when none is forced (``"avx512_vnni"``, ``"avx2"``, ...)."""
    lib = _load()
    isa = ctypes.c_uint32()
    _check(lib.dynq_active_isa(ctypes.byref(isa)))
    return lib.dynq_isa_name(isa.value).decode()


def ort_cache_stats() -> dict:
    """Counters of the ONNX Runtime op's shared packed-weight cache in this process."""
    lib = _load()
    live, nbytes = ctypes.c_size_t(), ctypes.c_size_t()
    hits, misses = ctypes.c_uint64(), ctypes.c_uint64()
    lib.dynq_ort_weight_cache_stats(ctypes.byref(live), ctypes.byref(nbytes), ctypes.byref(hits), ctypes.byref(misses))
    return {"live": live.value, "bytes": nbytes.value, "hits": hits.value, "misses": misses.value}


def _weight_qmax(weight_qmax) -> int:
    """A checked ``weight_qmax``: an integer in 1..127."""
    if not isinstance(weight_qmax, (int, np.integer)) or not 1 <= int(weight_qmax) <= 127:
        raise ValueError(f"weight_qmax must be an integer in 1..127, got {weight_qmax!r}")
    return int(weight_qmax)


def quantize_weights(
    w: np.ndarray, granularity: str = "per_channel", layout: str = "kn", weight_qmax: int = 127
) -> Tuple[np.ndarray, np.ndarray]:
    """Quantizes f32 weights exactly as the library does (symmetric int8 in
    ``[-weight_qmax, weight_qmax]``, ``scale = max|w| / weight_qmax``, round half to even), in
    numpy. Returns ``(q, scales)`` with ``q`` in the given layout and one scale per output
    channel (``per_channel``) or a single scale (``per_tensor``).

    ``layout="kn"``: ``w`` is ``[K, N]`` (ONNX MatMul); ``"nk"``: ``[N, K]`` (PyTorch Linear).
    """
    qmax = np.float32(_weight_qmax(weight_qmax))
    w = np.asarray(w, dtype=np.float32)
    if w.ndim != 2:
        raise ValueError(f"weights must be 2-D, got shape {w.shape}")
    if not np.all(np.isfinite(w)):
        raise ValueError("weights contain NaN or infinity")
    axis = 0 if layout == "kn" else 1  # the K axis
    if granularity == "per_channel":
        amax = np.max(np.abs(w), axis=axis).astype(np.float32)
    elif granularity == "per_tensor":
        amax = np.array([np.max(np.abs(w))], dtype=np.float32)
    else:
        raise ValueError(f"granularity must be 'per_channel' or 'per_tensor', got {granularity!r}")
    scales = (amax / qmax).astype(np.float32)
    tiny = np.float32(1e-45)
    scales = np.where((scales == 0) & (amax != 0), tiny, scales).astype(np.float32)
    safe = np.where(scales == 0, np.float32(1.0), scales).astype(np.float32)
    if granularity == "per_tensor":
        div = safe[0]
    else:
        div = safe[np.newaxis, :] if layout == "kn" else safe[:, np.newaxis]
    with np.errstate(over="ignore", invalid="ignore"):
        q = np.clip(np.round(w / div), -qmax, qmax)
    if granularity == "per_tensor":
        if scales[0] == 0:
            q[:] = 0
    else:
        zero = scales == 0
        if zero.any():
            if layout == "kn":
                q[:, zero] = 0
            else:
                q[zero, :] = 0
    return q.astype(np.int8), scales


class PackedWeights:
    """Int8 weights packed for this CPU (immutable; usable from any number of threads)."""

    def __init__(self, handle: int):
        self._h = ctypes.c_void_p(handle)
        info = _Info()
        info.struct_size = ctypes.sizeof(_Info)
        _check(_load().dynq_packed_weights_get_info(self._h, ctypes.byref(info)))
        self.n = int(info.n)
        self.k = int(info.k)
        self.granularity = "per_channel" if info.granularity == 0 else "per_tensor"
        self.kernel = info.kernel_name.decode()
        self.bytes = int(info.bytes)

    @staticmethod
    def _config(granularity: str = "per_channel", weight_qmax: int = 127) -> _PackConfig:
        cfg = _PackConfig()
        _check(_load().dynq_pack_config_init_sized(ctypes.byref(cfg), ctypes.sizeof(_PackConfig)))
        cfg.granularity = _enum(_WEIGHT_GRANULARITY, granularity, "granularity")
        cfg.weight_qmax = _weight_qmax(weight_qmax)
        return cfg

    @classmethod
    def from_float(
        cls, w: np.ndarray, layout: str = "kn", granularity: str = "per_channel", weight_qmax: int = 127
    ) -> "PackedWeights":
        """Quantizes and packs f32 weights. ``layout``: ``"kn"`` (``[K, N]``, ONNX MatMul) or
        ``"nk"`` (``[N, K]``, PyTorch Linear / Gemm transB=1). ``weight_qmax``: the largest
        quantized magnitude, 127 (8-bit weights) by default; 64 (ONNX Runtime's ``reduce_range``)
        halves the weights' resolution and lets AVX2 CPUs without VNNI run a faster kernel, with
        the same results on every CPU."""
        w = np.ascontiguousarray(w, dtype=np.float32)
        if w.ndim != 2:
            raise ValueError(f"weights must be 2-D, got shape {w.shape}")
        lay = _enum(_LAYOUTS, layout, "layout")
        k, n = w.shape if layout == "kn" else w.shape[::-1]
        cfg = cls._config(granularity, weight_qmax)
        out = ctypes.c_void_p()
        _check(_load().dynq_pack_weights(w.ctypes.data, n, k, lay, ctypes.byref(cfg), ctypes.byref(out)))
        return cls(out.value)

    @classmethod
    def from_quantized(cls, q: np.ndarray, scales: Union[np.ndarray, Sequence[float], float], layout: str = "kn") -> "PackedWeights":
        """Packs int8 weights quantized elsewhere, ``W = scale * q`` with 1 or N scales."""
        q = np.ascontiguousarray(q, dtype=np.int8)
        if q.ndim != 2:
            raise ValueError(f"weights must be 2-D, got shape {q.shape}")
        s = np.ascontiguousarray(np.atleast_1d(np.asarray(scales, dtype=np.float32)).ravel())
        lay = _enum(_LAYOUTS, layout, "layout")
        k, n = q.shape if layout == "kn" else q.shape[::-1]
        cfg = cls._config()
        out = ctypes.c_void_p()
        _check(
            _load().dynq_pack_quantized_weights(
                q.ctypes.data, n, k, lay, s.ctypes.data, s.size, ctypes.byref(cfg), ctypes.byref(out)
            )
        )
        return cls(out.value)

    @classmethod
    def deserialize(cls, blob: bytes) -> "PackedWeights":
        """Loads a blob written by :meth:`serialize` (on any CPU)."""
        buf = ctypes.create_string_buffer(bytes(blob), len(blob))
        out = ctypes.c_void_p()
        _check(_load().dynq_packed_weights_deserialize(ctypes.addressof(buf), len(blob), None, ctypes.byref(out)))
        return cls(out.value)

    def serialize(self) -> bytes:
        """The portable blob (see the README for its format)."""
        lib = _load()
        need = ctypes.c_size_t()
        _check(lib.dynq_packed_weights_serialize(self._h, None, 0, ctypes.byref(need)))
        buf = ctypes.create_string_buffer(need.value)
        _check(lib.dynq_packed_weights_serialize(self._h, ctypes.addressof(buf), need.value, ctypes.byref(need)))
        return buf.raw[: need.value]

    def quantized(self) -> Tuple[np.ndarray, np.ndarray]:
        """``(q, scales)``: the int8 weights as ``[N, K]`` and their 1 or N scales."""
        blob = self.serialize()
        n, k, gran = struct.unpack_from("<QQI", blob, 24)
        ns = n if gran == 0 else 1
        scales = np.frombuffer(blob, dtype="<f4", count=ns, offset=48).copy()
        q = np.frombuffer(blob, dtype=np.int8, count=n * k, offset=48 + 4 * ns).reshape(n, k).copy()
        return q, scales

    def close(self):
        if self._h is not None and self._h.value:
            _load().dynq_packed_weights_free(self._h)
        self._h = None

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    def __repr__(self):
        return f"PackedWeights(n={self.n}, k={self.k}, {self.granularity}, kernel={self.kernel})"


def _gemm_config(act_granularity: str, act_type: str, epilogue: str, num_threads: int) -> _GemmConfig:
    cfg = _GemmConfig()
    _check(_load().dynq_gemm_config_init(ctypes.byref(cfg)))
    cfg.act_granularity = _enum(_ACT_GRANULARITY, act_granularity, "act_granularity")
    cfg.act_type = _enum(_ACT_TYPE, act_type, "act_type")
    cfg.epilogue = _enum(_EPILOGUE, epilogue, "epilogue")
    cfg.num_threads = int(num_threads)
    return cfg


def gemm(
    packed: PackedWeights,
    a: np.ndarray,
    bias: Optional[np.ndarray] = None,
    act_granularity: str = "per_row",
    act_type: str = "asymmetric_u8",
    epilogue: str = "none",
    num_threads: int = 0,
    smooth: Optional[np.ndarray] = None,
    residual: Optional[np.ndarray] = None,
    layer_norm: Optional[Tuple[np.ndarray, Optional[np.ndarray], float]] = None,
) -> np.ndarray:
    """``Y = dequant(quant(A) x W) + bias`` then the epilogue (``"none"``, ``"relu"``, ``"gelu"``
    (erf form), ``"gelu_tanh"`` (tanh form), ``"silu"`` or ``"quick_gelu"``).
    ``a`` has shape ``[..., K]``; the result has shape ``[..., N]`` and the type of ``a`` when it
    is float16 (widened exactly, computed as float32, rounded to nearest-even), else float32.

    ``smooth`` (K positive finite values): per-input-channel smoothing factors; ``a * smooth``
    is what gets quantized (``dynq_gemm_smoothed``; see :mod:`dynq.onnx.smooth`).

    ``residual`` (the result's shape): added after the epilogue, ``act(A W + bias) + residual``
    with one f32 addition per element (``dynq_gemm_residual``): the skip connection of a
    transformer block, fused. It is converted to the result's type first.

    ``layer_norm`` (``(scale, bias or None, epsilon)``, N values each): each output row is then
    normalized, ``LayerNorm(act(A W + bias) + residual) * scale + bias`` over its N values
    (``dynq_gemm_layer_norm``; dynq's fixed arithmetic, the same bits on every CPU)."""
    if packed._h is None:
        raise ValueError("packed weights were closed")
    half = isinstance(a, np.ndarray) and a.dtype == np.float16
    a = np.ascontiguousarray(a, dtype=np.float16 if half else np.float32)
    if a.ndim < 1 or a.shape[-1] != packed.k:
        raise ValueError(f"a must have shape [..., {packed.k}], got {a.shape}")
    m = int(np.prod(a.shape[:-1], dtype=np.int64)) if a.ndim > 1 else 1
    y = np.empty(a.shape[:-1] + (packed.n,), dtype=a.dtype)
    b = None
    if bias is not None:
        b = np.ascontiguousarray(bias, dtype=np.float32).ravel()
    lib = _load()
    cfg = _gemm_config(act_granularity, act_type, epilogue, num_threads)
    a_ptr, b_ptr, y_ptr = (a.ctypes.data if m else None), (b.ctypes.data if b is not None else None), (y.ctypes.data if m else None)
    sm = None
    if smooth is not None:
        sm = np.ascontiguousarray(smooth, dtype=np.float32).ravel()
        if sm.size != packed.k:
            raise ValueError(f"smooth must have {packed.k} values, got {sm.size}")
    r = None
    if residual is not None:
        r = np.ascontiguousarray(residual, dtype=y.dtype)
        if r.shape != y.shape:
            raise ValueError(f"residual must have the result's shape {y.shape}, got {r.shape}")
    dt = 1 if half else 0  # DYNQ_DTYPE_F16 / _F32
    sm_ptr = sm.ctypes.data if sm is not None else None
    r_ptr = r.ctypes.data if (r is not None and m) else None
    if layer_norm is not None:
        if not hasattr(lib, "dynq_gemm_layer_norm"):
            raise DynqError(2, f"layer_norm needs a libdynq with dynq_gemm_layer_norm ({library_path()} has none)")
        scale, lbias, eps = layer_norm
        g = np.ascontiguousarray(scale, dtype=np.float32).ravel()
        lb = None if lbias is None else np.ascontiguousarray(lbias, dtype=np.float32).ravel()
        if g.size != packed.n or (lb is not None and lb.size != packed.n):
            raise ValueError(f"layer_norm scale and bias must have {packed.n} values")
        _check(lib.dynq_gemm_layer_norm(
            packed._h, a_ptr, dt, m, packed.k, sm_ptr, b_ptr, r_ptr, packed.n, g.ctypes.data,
            lb.ctypes.data if lb is not None else None, float(eps), y_ptr, dt, packed.n, ctypes.byref(cfg)))
        return y
    if r is not None:
        _check(lib.dynq_gemm_residual(
            packed._h, a_ptr, dt, m, packed.k, sm_ptr, b_ptr, r_ptr, packed.n, y_ptr, dt, packed.n, ctypes.byref(cfg)))
        return y
    if sm is not None:
        _check(lib.dynq_gemm_smoothed(packed._h, a_ptr, dt, m, packed.k, sm_ptr, b_ptr, y_ptr, dt, packed.n, ctypes.byref(cfg)))
        return y
    if half:
        f16 = 1  # DYNQ_DTYPE_F16
        _check(lib.dynq_gemm_ex(packed._h, a_ptr, f16, m, packed.k, b_ptr, y_ptr, f16, packed.n, ctypes.byref(cfg)))
    else:
        _check(lib.dynq_gemm(packed._h, a_ptr, m, packed.k, b_ptr, y_ptr, packed.n, ctypes.byref(cfg)))
    return y


def gemm_split(
    packed: PackedWeights,
    a: np.ndarray,
    widths: Sequence[int],
    bias: Optional[np.ndarray] = None,
    act_granularity: str = "per_row",
    act_type: str = "asymmetric_u8",
    epilogue: str = "none",
    num_threads: int = 0,
    smooth: Optional[np.ndarray] = None,
    heads: Optional[Sequence[Optional[Tuple[int, bool]]]] = None,
) -> list:
    """:func:`gemm` with the result's columns returned as several arrays (``dynq_gemm_split``):
    the first ``widths[0]`` columns, then the next ``widths[1]``, ... (``sum(widths) == n``),
    each bit for bit those columns of :func:`gemm`. Layers that read one input (Q, K, V packed
    side by side as one weight) then run as one call, with A quantized once.

    ``heads`` (``dynq_gemm_split_heads``): per output, None for ``[..., width]`` or
    ``(h, transposed)`` for attention heads; ``a`` is then ``[batch, seq, K]`` and that output
    is ``[batch, h, seq, width // h]`` (``transposed``: ``[batch, h, width // h, seq]``), the same
    values as reshaping and transposing the plain output."""
    if packed._h is None:
        raise ValueError("packed weights were closed")
    half = isinstance(a, np.ndarray) and a.dtype == np.float16
    a = np.ascontiguousarray(a, dtype=np.float16 if half else np.float32)
    if a.ndim < 1 or a.shape[-1] != packed.k:
        raise ValueError(f"a must have shape [..., {packed.k}], got {a.shape}")
    widths = [int(w) for w in widths]
    m = int(np.prod(a.shape[:-1], dtype=np.int64)) if a.ndim > 1 else 1
    layouts = list(heads) if heads is not None else [None] * len(widths)
    if len(layouts) != len(widths):
        raise ValueError(f"heads has {len(layouts)} entries for {len(widths)} outputs")
    if any(lay is not None for lay in layouts) and a.ndim != 3:
        raise ValueError(f"head layouts need a of shape [batch, seq, {packed.k}], got {a.shape}")
    ys = []
    for w, lay in zip(widths, layouts):
        if lay is None:
            ys.append(np.empty(a.shape[:-1] + (w,), dtype=a.dtype))
            continue
        h, transposed = int(lay[0]), bool(lay[1])
        if h <= 0 or w % h:
            raise ValueError(f"{w} columns do not split into {h} heads")
        batch, seq = a.shape[0], a.shape[1]
        ys.append(np.empty((batch, h, w // h, seq) if transposed else (batch, h, seq, w // h), dtype=a.dtype))
    hs = (_Heads * max(len(ys), 1))()
    for g, lay in enumerate(layouts):
        if lay is not None:
            hs[g].heads, hs[g].seq, hs[g].transposed = int(lay[0]), a.shape[1], int(bool(lay[1]))
    outs = (_Output * max(len(ys), 1))()
    for g, (y, w) in enumerate(zip(ys, widths)):
        outs[g].y = y.ctypes.data if m and y.size else None
        outs[g].ldy = w
        outs[g].cols = w
    b = np.ascontiguousarray(bias, dtype=np.float32).ravel() if bias is not None else None
    sm = np.ascontiguousarray(smooth, dtype=np.float32).ravel() if smooth is not None else None
    if sm is not None and sm.size != packed.k:
        raise ValueError(f"smooth must have {packed.k} values, got {sm.size}")
    lib = _load()
    cfg = _gemm_config(act_granularity, act_type, epilogue, num_threads)
    dt = 1 if half else 0  # DYNQ_DTYPE_F16 / _F32
    args = (packed._h, a.ctypes.data if m else None, dt, m, packed.k, sm.ctypes.data if sm is not None else None,
            b.ctypes.data if b is not None else None, outs)
    if all(lay is None for lay in layouts):
        _check(lib.dynq_gemm_split(*args, len(ys), dt, ctypes.byref(cfg)))
    elif not hasattr(lib, "dynq_gemm_split_heads"):
        raise DynqError(5, f"this libdynq ({_lib_path}) has no dynq_gemm_split_heads; head layouts need a newer build")
    else:
        _check(lib.dynq_gemm_split_heads(*args, hs, len(ys), dt, ctypes.byref(cfg)))
    return ys

#!/usr/bin/env python3
"""dynq beside ONNX Runtime on GEMM shapes, timed interleaved in one process on the same data.

For each shape and thread count it times, in turn within every repetition:
  - ONNX Runtime fp32 MatMul,
  - ONNX Runtime com.microsoft.DynamicQuantizeMatMul (its MLAS int8 path; int8 weights with one
    scale per column, per-tensor uint8 activations),
  - dynq (direct C ABI call through ctypes) on the same int8 weights and scales, in per-tensor
    uint8 mode (the same arithmetic as DynamicQuantizeMatMul) and in its default per-row mode,
and reports medians, plus this machine's limits measured in the same run (`dynq peak`: the
vpdpbusd peak and the read bandwidth for a buffer of the weights' size). Each timed call follows
untimed calls of the same function (at least 1 ms of them: a woken pool thread can take a few
hundred microseconds to arrive in a VM), so every library runs as a model's layers run, back
to back: its pool's threads awake and its weights where its previous calls left them (in cache
where they fit); the functions' order changes in every repetition. --no-warm times the calls
in turn without them: each library's threads then wake for every call (each pool stops
spinning while the others run) and large weights come from memory, as after a pause.

    python3 bench/compare_ort.py                 # default shapes, 1 and 2 threads
    python3 bench/compare_ort.py --shapes 1x4096x4096,128x768x768 --threads 1 --reps 50
    python3 bench/compare_ort.py --weight-qmax 64   # weights in [-64, 64] for both (reduce_range)

With --weight-qmax 64 both libraries get 7-bit weights (ONNX Runtime's reduce_range): ONNX
Runtime's vpmaddubsw kernels are then exact on CPUs without VNNI, and dynq runs its
narrow-weight kernel there; the two compute the same thing, exactly.

Needs `pip install onnxruntime==1.31.1 onnx numpy` and `cargo build --release`.
"""
import argparse
import ctypes
import json
import os
import subprocess
import sys
import time

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_SHAPES = "1x4096x4096,4x4096x4096,16x4096x11008,128x768x768,128x768x3072,128x3072x768,512x1024x4096,32x256x256"


class GemmConfig(ctypes.Structure):
    _fields_ = [(n, ctypes.c_uint32) for n in ("struct_size", "act_granularity", "act_type", "epilogue", "num_threads")]


def load_dynq():
    lib = ctypes.CDLL(os.path.join(ROOT, "target", "release", "libdynq.so"))
    lib.dynq_pack_quantized_weights.restype = ctypes.c_int
    lib.dynq_pack_quantized_weights.argtypes = [
        ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t, ctypes.c_uint32, ctypes.c_void_p, ctypes.c_size_t,
        ctypes.c_void_p, ctypes.POINTER(ctypes.c_void_p)]
    lib.dynq_gemm.restype = ctypes.c_int
    lib.dynq_gemm.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t, ctypes.c_void_p,
                              ctypes.c_void_p, ctypes.c_size_t, ctypes.POINTER(GemmConfig)]
    lib.dynq_packed_weights_free.argtypes = [ctypes.c_void_p]
    return lib


def session(model, threads):
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # ONNX Runtime's workers spin after each run by default; timed interleaved with dynq, those
    # spinning threads would take the cores dynq's workers need (and the reverse).
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def fp32_model(w):
    k, n = w.shape
    g = helper.make_graph(
        [helper.make_node("MatMul", ["A", "W"], ["Y"])], "fp32",
        [helper.make_tensor_value_info("A", TensorProto.FLOAT, ["M", k])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["M", n])],
        [onnx.numpy_helper.from_array(w, "W")])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)


def dqmm_model(wq, scales):
    k, n = wq.shape
    g = helper.make_graph(
        [helper.make_node("DynamicQuantizeMatMul", ["A", "B", "b_scale", "b_zp"], ["Y"], domain="com.microsoft")],
        "dqmm",
        [helper.make_tensor_value_info("A", TensorProto.FLOAT, ["M", k])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["M", n])],
        [onnx.numpy_helper.from_array(wq, "B"), onnx.numpy_helper.from_array(scales, "b_scale"),
         onnx.numpy_helper.from_array(np.zeros(n, np.int8), "b_zp")])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)],
                             ir_version=9)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default=DEFAULT_SHAPES)
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--reps", type=int, default=0, help="repetitions (default: adaptive, ~1 s per shape)")
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--no-warm", action="store_true", help="no untimed call before each timed one (see above)")
    ap.add_argument("--weight-qmax", type=int, default=127, help="int8 weights in [-Q, Q] for both libraries (default 127; 64 = reduce_range)")
    args = ap.parse_args()
    if not 1 <= args.weight_qmax <= 127:
        ap.error("--weight-qmax must be in 1..127")
    qmax = float(args.weight_qmax)

    lib = load_dynq()
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    threads = [int(t) for t in args.threads.split(",")]
    sizes = sorted({n * k for _, n, k in shapes})
    peak = json.loads(subprocess.check_output(
        [os.path.join(ROOT, "target", "release", "dynq"), "peak", "--bytes", ",".join(map(str, sizes))]
        + (["--narrow"] if args.weight_qmax <= 64 else []), text=True))
    print(f"onnxruntime {ort.__version__}; dynq ISA {peak['isa']}, kernel {peak.get('kernel')}; int8 weights in "
          f"[-{args.weight_qmax}, {args.weight_qmax}]; measured dot-product peak "
          f"{peak['dot_product_gops']} GOPS (1 thread); "
          + ("calls timed in turn, weights from wherever the others' calls left them" if args.no_warm
             else "each timed call after >= 1 ms of untimed calls of the same function (weights in cache where they fit)"))
    rng = np.random.default_rng(7)
    rows = []
    # dynq runs twice: per-tensor (ONNX Runtime's own arithmetic, so "vs ORT int8" compares like
    # with like) and per-row (dynq's default: the GOPS, % of the limits and "vs ORT fp32").
    hdr = ("| MxNxK | thr | ORT fp32 ms | ORT int8 ms | dynq ms (per-tensor) | dynq ms (per-row) "
           "| dynq GOPS (per-row) | % peak (per-row) | W GB/s (per-row) | % bw (per-row) "
           "| vs ORT int8 (per-tensor) | vs ORT fp32 (per-row) | rel.err ORT int8 | rel.err dynq (per-tensor) |")
    print(hdr)
    print("|" + "---|" * (hdr.count("|") - 1))
    for (m, n, k) in shapes:
        a = rng.standard_normal((m, k), dtype=np.float32)
        w = (rng.standard_normal((k, n), dtype=np.float32) / np.sqrt(k)).astype(np.float32)
        scales = (np.abs(w).max(axis=0) / qmax).astype(np.float32)
        wq = np.clip(np.rint(w / scales), -qmax, qmax).astype(np.int8)
        packed = ctypes.c_void_p()
        st = lib.dynq_pack_quantized_weights(wq.ctypes.data, n, k, 1, scales.ctypes.data, n, None, ctypes.byref(packed))
        assert st == 0, f"pack failed: {st}"
        y = np.zeros((m, n), np.float32)
        y64 = a.astype(np.float64) @ w.astype(np.float64)
        for t in threads:
            s32, sq = session(fp32_model(w), t), session(dqmm_model(wq, scales), t)
            cfg_t = GemmConfig(ctypes.sizeof(GemmConfig), 1, 0, 0, t)
            cfg_r = GemmConfig(ctypes.sizeof(GemmConfig), 0, 0, 0, t)

            # The buffers' addresses once (numpy's .ctypes builds an object at every access).
            a_ptr, y_ptr = a.ctypes.data, y.ctypes.data

            def run_dynq(cfg):
                st = lib.dynq_gemm(packed, a_ptr, m, k, None, y_ptr, n, ctypes.byref(cfg))
                assert st == 0, st

            def noop():
                # The same call with m = 0: the ctypes and argument-checking cost of a dynq call
                # from Python, which a direct call from C, C++ or Rust does not pay.
                st = lib.dynq_gemm(packed, None, 0, k, None, None, n, ctypes.byref(cfg_r))
                assert st == 0, st

            fns = {
                "fp32": lambda: s32.run(None, {"A": a}),
                "ort8": lambda: sq.run(None, {"A": a}),
                "dq_t": lambda: run_dynq(cfg_t),
                "dq_r": lambda: run_dynq(cfg_r),
                "dq_0": noop,
            }
            for f in fns.values():  # warm up
                f()
            reps = args.reps or max(5, min(200, int(0.25 / max(1e-5, timeit(fns["fp32"])))))
            times = {key: [] for key in fns}
            items = list(fns.items())
            order_rng = np.random.default_rng(1)
            for _ in range(reps):
                # A new order in every repetition, so that no function always follows the same
                # one: in a fixed order dynq's per-tensor call, always after ONNX Runtime's,
                # measured 1.3-1.5x its per-row call (which followed it) on decoding shapes, the
                # same call alone (its weights stay in the last-level cache only after a
                # second pass over them on this machine).
                for i in order_rng.permutation(len(items)):
                    key, f = items[i]
                    if not args.no_warm:
                        # At least 1 ms of untimed calls: a sleeping pool thread woken by the
                        # first may arrive a few hundred microseconds later (in a VM).
                        w0 = time.perf_counter()
                        f()
                        while time.perf_counter() - w0 < 1e-3:
                            f()
                    t0 = time.perf_counter()
                    f()
                    times[key].append(time.perf_counter() - t0)
            med = {key: float(np.median(v)) for key, v in times.items()}
            # Accuracy against the float64 product of the fp32 inputs: ONNX Runtime's int8 path and
            # dynq's per-tensor mode compute the same thing, and differ only where one is not exact
            # (ONNX Runtime's int16-saturating vpmaddubsw kernels on x86 CPUs without VNNI).
            run_dynq(cfg_t)
            err_dq, err_ort = rel_err(y, y64), rel_err(sq.run(None, {"A": a})[0], y64)
            gops = 2 * m * n * k / med["dq_r"] / 1e9
            wgbs = n * k / med["dq_r"] / 1e9
            bw = peak["read_gbs"][str(n * k)]
            pk = peak["dot_product_gops"]
            r = dict(shape=f"{m}x{n}x{k}", threads=t, ort_fp32_ms=med["fp32"] * 1e3, ort_int8_ms=med["ort8"] * 1e3,
                     dynq_ms=med["dq_t"] * 1e3, dynq_per_row_ms=med["dq_r"] * 1e3, dynq_gops=gops,
                     pct_peak=100 * gops / pk / t if pk else None, weight_gbs=wgbs, pct_bw=100 * wgbs / bw,
                     vs_ort_int8=med["ort8"] / med["dq_t"], vs_ort_fp32=med["fp32"] / med["dq_r"], rel_err_ort_int8=err_ort, rel_err_dynq=err_dq,
                     ctypes_call_ms=med["dq_0"] * 1e3)
            rows.append(r)
            print(f"| {r['shape']} | {t} | {r['ort_fp32_ms']:.3f} | {r['ort_int8_ms']:.3f} | {r['dynq_ms']:.3f} | "
                  f"{r['dynq_per_row_ms']:.3f} | {gops:.0f} | "
                  f"{pct(r['pct_peak'])} | "
                  f"{wgbs:.1f} | {r['pct_bw']:.0f}% | {r['vs_ort_int8']:.2f}x | {r['vs_ort_fp32']:.2f}x | "
                  f"{err_ort:.2e} | {err_dq:.2e} |")
        lib.dynq_packed_weights_free(packed)
    print("\nA dynq call from Python pays ctypes: the same call with m = 0 (timed interleaved with the "
          "others) measures that cost; a direct call from C, C++ or Rust is the per-row time less it "
          "(ONNX Runtime's session call is timed from Python as it is used):")
    print("| MxNxK | thr | dynq ms (per-row) | ctypes call ms | direct call ms | vs ORT int8 session call |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        direct = r["dynq_per_row_ms"] - r["ctypes_call_ms"]
        print(f"| {r['shape']} | {r['threads']} | {r['dynq_per_row_ms']:.4f} | {r['ctypes_call_ms']:.4f} | "
              f"{direct:.4f} | {r['ort_int8_ms'] / direct:.2f}x |")
    print("\n% peak: dynq GOPS (per-row, its default) / (measured 1-thread peak x threads). % bw: int8 weight bytes "
          "per second (per-row) / measured 1-thread read bandwidth for a buffer of that size (the limit for small M). "
          "vs ORT int8: against dynq's per-tensor mode, the same arithmetic as DynamicQuantizeMatMul; vs ORT fp32: "
          "against dynq's default per-row mode. rel.err: ||Y - A W|| / ||A W|| (Frobenius, against the float64 "
          "product of the fp32 inputs) for DynamicQuantizeMatMul and for dynq's per-tensor mode on the same int8 "
          "weights: the same arithmetic, equal errors unless one of them is not exact (ONNX Runtime's int16-saturating "
          "kernels on x86 CPUs without VNNI).")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(peak=peak, onnxruntime=ort.__version__, weight_qmax=args.weight_qmax, warm=not args.no_warm,
                           rows=rows), f, indent=1)


def rel_err(y, ref):
    return float(np.linalg.norm(y.astype(np.float64) - ref) / np.linalg.norm(ref))


def pct(v):
    return "-" if v is None else f"{v:.0f}%"


def timeit(f):
    t0 = time.perf_counter()
    f()
    return time.perf_counter() - t0


if __name__ == "__main__":
    sys.exit(main())

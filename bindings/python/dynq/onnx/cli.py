"""``python -m dynq.onnx quantize|evaluate`` (also installed as the ``dynq-onnx`` command)."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time


def _names(values):
    out = []
    for v in values or []:
        if v.startswith("@"):
            with open(v[1:], encoding="utf-8") as f:
                out.extend(line.strip() for line in f if line.strip())
        else:
            out.append(v)
    return tuple(out)


def _quantize(args) -> int:
    from .convert import QuantizeOptions, quantize_model, save_model

    opts = QuantizeOptions(
        weight_granularity=args.weight_granularity,
        weight_qmax=args.weight_qmax,
        act_granularity=args.act_granularity,
        act_type=args.act_type,
        op_types=tuple(t for t in args.op_types.split(",") if t),
        include_nodes=_names(args.include_nodes),
        exclude_nodes=_names(args.exclude_nodes),
        exclude_op_types=tuple(t for t in (args.exclude_op_types or "").split(",") if t),
        min_size=args.min_size,
        fuse_bias=not args.no_fuse_bias,
        fuse_activation=not args.no_fuse_activation,
        fuse_residual=not args.no_fuse_residual,
        fuse_layer_norm=not args.no_fuse_layer_norm,
        fuse_heads=not args.no_fuse_heads,
        fuse_heads_transposed=args.fuse_heads_transposed,
        group_shared_input=args.group,
        group_max_loss_db=args.group_max_loss_db,
        convert_quantized=not args.no_convert_quantized,
        quantize_embeddings=not args.no_embeddings,
        convert_attention=not args.no_attention,
        smooth=args.smooth,
        smooth_min_gain_db=args.smooth_min_gain_db,
    )
    t0 = time.time()
    if not args.quiet:
        print(f"loading {args.input}", file=sys.stderr)
    calibration = None
    if args.calibration:
        from .evaluate import load_inputs

        calibration = load_inputs(args.calibration)
    model, report = quantize_model(args.input, opts, progress=not args.quiet, calibration_inputs=calibration)
    ext = True if args.external_data else (False if args.no_external_data else None)
    save_model(model, args.output, external_data=ext)
    size_in = _size(args.input)
    size_out = _size(args.output)
    if not args.quiet:
        print(report.summary())
        print(
            f"wrote {args.output}: {size_out / 1e6:.1f} MB ({100 * size_out / max(size_in, 1):.1f}% of {size_in / 1e6:.1f} MB) "
            f"in {time.time() - t0:.1f}s"
        )
    if args.report_json:
        with open(args.report_json, "w", encoding="utf-8") as f:
            json.dump(
                {
                    "converted": [r.__dict__ for r in report.converted],
                    "skipped": [{"node": n, "op_type": t, "reason": w} for n, t, w in report.skipped],
                    "embeddings": [{"node": n, "rows": v, "cols": d} for n, v, d in report.embeddings],
                    "input_bytes": size_in,
                    "output_bytes": size_out,
                },
                f,
                indent=2,
            )
    if not report.converted and not report.embeddings:
        print("warning: nothing was converted (no MatMul/Gemm with a constant float weight matched)", file=sys.stderr)
    return 0


def _size(path: str) -> int:
    total = os.path.getsize(path)
    try:
        import onnx

        m = onnx.load(path, load_external_data=False)
        locs = set()
        for t in m.graph.initializer:
            if t.data_location == onnx.TensorProto.EXTERNAL:
                for e in t.external_data:
                    if e.key == "location":
                        locs.add(e.value)
        for loc in locs:
            p = os.path.join(os.path.dirname(os.path.abspath(path)), loc)
            if os.path.exists(p):
                total += os.path.getsize(p)
    except Exception:
        pass
    return total


def _evaluate(args) -> int:
    from .evaluate import evaluate, load_inputs, make_inputs

    feeds = load_inputs(args.inputs) if args.inputs else make_inputs(
        args.fp32, batch=args.batch, seq_len=args.seq_len, samples=args.samples, seed=args.seed
    )
    log = (lambda m: print(m, file=sys.stderr)) if not args.quiet else None
    ev = evaluate(
        args.fp32,
        args.converted,
        feeds,
        per_layer=not args.no_per_layer,
        threads=args.threads,
        min_cosine=args.min_cosine,
        mixed_precision_out=args.mixed_precision,
        log=log,
    )
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            f.write(ev.to_json())
    if not args.quiet:
        print(ev.table())
    if ev.gate is None:
        return 0
    if ev.gate["passed"]:
        return 0
    if ev.mixed_precision and ev.mixed_precision["passed"]:
        return 0
    print(
        f"accuracy gate failed: final cosine {ev.gate['final_cosine']:.6f} < {ev.gate['min_cosine']}"
        + (" even with every layer in fp32" if ev.mixed_precision else ""),
        file=sys.stderr,
    )
    return 3


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m dynq.onnx", description="Convert ONNX models to dynq int8 and check them.")
    sub = p.add_subparsers(dest="cmd", required=True)

    q = sub.add_parser("quantize", help="replace MatMul/Gemm (and ONNX Runtime quantized matmuls) by dynq.DynQMatMul")
    q.add_argument("input")
    q.add_argument("output")
    q.add_argument("--weight-granularity", choices=["per_channel", "per_tensor"], default="per_channel")
    q.add_argument(
        "--weight-qmax",
        type=int,
        default=127,
        metavar="Q",
        help="quantize float weights to [-Q, Q] (default 127; 64 = ONNX Runtime's reduce_range: half the resolution, "
        "a faster kernel on AVX2 CPUs without VNNI, the same results on every CPU)",
    )
    q.add_argument("--act-granularity", choices=["per_row", "per_tensor"], default="per_row")
    q.add_argument("--act-type", choices=["asymmetric_u8", "symmetric_i8"], default="asymmetric_u8")
    q.add_argument("--op-types", default="MatMul,Gemm", help="float op types to convert (default MatMul,Gemm)")
    q.add_argument("--include-nodes", action="append", metavar="NAME", help="convert only these nodes (repeatable; @file reads names)")
    q.add_argument("--exclude-nodes", action="append", metavar="NAME", help="keep these nodes in fp32 (repeatable; @file reads names)")
    q.add_argument("--exclude-op-types", metavar="T1,T2", help="op types to leave alone (e.g. Gemm, Gather, MatMulInteger)")
    q.add_argument("--min-size", type=int, default=0, help="skip weights with fewer than this many elements (K*N)")
    q.add_argument("--no-fuse-bias", action="store_true", help="do not fold a following bias Add")
    q.add_argument("--no-fuse-layer-norm", action="store_true", help="do not fold a LayerNormalization that follows a folded residual Add")
    q.add_argument("--no-fuse-residual", action="store_true", help="do not fold a following Add of a tensor of the same rank (the skip connection; the op broadcasts it at run time if the shapes differ)")
    q.add_argument("--no-fuse-heads", action="store_true", help="do not fold a following Reshape to attention heads and Transpose(perm=[0,2,1,3]) into the layer's output")
    q.add_argument("--fuse-heads-transposed", action="store_true", help="fold Transpose(perm=[0,2,3,1]) (transposed keys) too; off by default: measured no faster than ONNX Runtime's Transpose")
    q.add_argument("--group", action="store_true", help="one node with several outputs for layers that read the same input (Q, K, V); the model then needs ONNX Runtime 1.18 or later")
    q.add_argument("--group-max-loss-db", type=float, default=0.2, metavar="DB", help="leave a layer out of its group if the shared smoothing costs it more held-out SQNR than this (default 0.2)")
    q.add_argument("--no-fuse-activation", action="store_true", help="do not fuse a following Relu/GELU")
    q.add_argument("--no-convert-quantized", action="store_true", help="leave MatMulInteger/DynamicQuantizeMatMul as they are")
    q.add_argument("--no-embeddings", action="store_true", help="keep embedding tables (Gather) in fp32")
    q.add_argument(
        "--no-attention",
        action="store_true",
        help="keep com.microsoft.Attention nodes whole (by default their Q/K/V product is converted, the attention runs as MultiHeadAttention)",
    )
    q.add_argument(
        "--smooth",
        choices=["auto", "off"],
        default="auto",
        help="activation smoothing (SmoothQuant) on the layers where a run of the float model on sample inputs shows a gain (default auto)",
    )
    q.add_argument("--smooth-min-gain-db", type=float, default=0.5, help="smooth a layer only if its SQNR gains at least this (default 0.5)")
    q.add_argument("--calibration", action="append", metavar="NPZ", help="sample inputs for smoothing, .npz keyed by input name (repeatable; default: generated from the model's signature)")
    q.add_argument("--external-data", action="store_true", help="write weights to <output>.data")
    q.add_argument("--no-external-data", action="store_true", help="never write external data")
    q.add_argument("--report-json", metavar="PATH", help="write what was converted or skipped as JSON")
    q.add_argument("--quiet", action="store_true")
    q.set_defaults(fn=_quantize)

    e = sub.add_parser("evaluate", help="compare a converted model with its fp32 original")
    e.add_argument("fp32")
    e.add_argument("converted")
    e.add_argument("--inputs", action="append", metavar="NPZ", help="a sample as .npz keyed by input name (repeatable)")
    e.add_argument("--samples", type=int, default=4, help="generated samples (default 4)")
    e.add_argument("--batch", type=int, default=1)
    e.add_argument("--seq-len", type=int, default=16)
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--threads", type=int, default=0, help="ONNX Runtime intra-op threads (0: its default)")
    e.add_argument("--no-per-layer", action="store_true", help="only the final outputs")
    e.add_argument("--json", metavar="PATH", help="write the results as JSON")
    e.add_argument("--min-cosine", type=float, help="accuracy gate: exit 3 if the final-output cosine is below this")
    e.add_argument(
        "--mixed-precision",
        metavar="OUT.onnx",
        help="if the gate fails, keep the most sensitive layers in fp32 until it passes and write that model here",
    )
    e.add_argument("--quiet", action="store_true")
    e.set_defaults(fn=_evaluate)

    args = p.parse_args(argv)
    try:
        return args.fn(args)
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

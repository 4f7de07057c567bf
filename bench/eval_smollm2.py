"""Benchmark: zero-shot multiple-choice accuracy of SmolLM2-135M, full precision vs quantized vs recovered.

Two steps, one command (`all`), or each alone:
    search  the fp model on every BIG-bench candidate task (`edge_recover.tasks.BIGBENCH_TASKS`), at most
            `--search-limit` examples each; a task joins the suite when its accuracy is at least `--z`
            standard errors above chance and it has at least `--min-examples` examples
            -> docs/results/eval-candidates-smollm2.{json,md}
    table   the paper-style table on the suite (`--tasks`, default the suite chosen by `search` in the
            same run, else edge_recover.tasks.DEFAULT_SUITE): fp, plain W4 (GPTQ, 4-bit block 64), W4/W2-GateUp
            unrecovered (GPTQ, 4-bit block 64, 2-bit block 128), and each recovered model given:
            `--adapter LABEL=DIR` (Recover-LoRA side-car on the W4/W2 checkpoint) or `--checkpoint LABEL=DIR`
            (a recovered quantized checkpoint, e.g. integer-exact recovery); recovery share per task against
            the W4/W2 row -> docs/results/eval-smollm2.{json,md,png}

The quantized checkpoints are made once under `--work` (slim) and reused, so that a recovery run can train
on the very same integers (`edge-recover recover smollm2 --quantized WORK/w4w2gateup ...`).

    # on the GPU machine (bench/gpu/env.sh), every example of every task:
    python bench/eval_smollm2.py all --work /tmp/eval --device cuda
    # on a 2-core CPU: the suite only, at most 100 examples per task (GPTQ twice, then about 1,600 questions)
    python bench/eval_smollm2.py table --limit 100
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "docs" / "results"
BLOCKS = "4:64,2:128"


def _say(msg: str) -> None:
    print(f"[eval] {msg}", file=sys.stderr, flush=True)


def _quantized(lm, name: str, work: Path, progress: bool):
    """The slim GPTQ checkpoint WORK/NAME (made now if absent), loaded on the teacher."""
    from edge_recover.checkpoint import save_quantized
    from edge_recover.models import LoadedModel
    from edge_recover.recovery.student import load_student_checkpoint, quantize_student
    from edge_recover.scheme import load_scheme

    path = work / name
    if not (path / "config.json").is_file():
        t0 = time.time()
        model, report = quantize_student(lm, load_scheme(name, block_size=BLOCKS), "gptq", calibration=32,
                                         progress=progress)
        save_quantized(LoadedModel(model, lm.tokenizer, lm.source, lm.source_hash), path, report, slim=True)
        _say(f"quantized {name} in {time.time() - t0:.0f} s -> {path}")
        del model
    model, _, scheme = load_student_checkpoint(path, lm, None)
    return model, path, scheme


def _head(scheme) -> str:
    """The lm_head's format in `scheme`, in words ("float" or e.g. "8-bit b64")."""
    cfg = scheme.resolve("lm_head")
    return "float" if isinstance(cfg, str) else cfg.describe()


def search(lm, args, dev) -> tuple[dict, list[str]]:
    from edge_recover.recovery.task_eval import TorchLoglikelihood
    from edge_recover.tasks import BIGBENCH_TASKS, resolve_task
    from edge_recover.tasks_report import model_row, task_report
    from edge_recover.tasks_score import score_tasks

    tasks = [resolve_task(n).subset(args.search_limit or None) for n in BIGBENCH_TASKS]
    full = {n: len(resolve_task(n).examples) for n in BIGBENCH_TASKS}
    ll = TorchLoglikelihood(lm.model, lm.tokenizer, dev)
    results = score_tasks(tasks, ll, progress=False, label="fp", questions_per_call=args.questions_per_call)
    rows = []
    for t, r in zip(tasks, results):
        z = {k: (getattr(r, k) - r.chance) / getattr(r, f"{k}_stderr") if getattr(r, f"{k}_stderr") > 0 else 0.0
             for k in ("acc", "acc_norm")}
        metric = max(args.metrics, key=z.get)  # the better one on the fp model: the task's headline metric
        rows.append({"task": t.name, "examples": full[t.name], "scored": r.examples, "chance": r.chance, "acc": r.acc,
                     "acc_stderr": r.acc_stderr, "acc_norm": r.acc_norm, "z_acc": z["acc"], "z_acc_norm": z["acc_norm"],
                     "metric": metric, "z": z[metric], "seconds": r.seconds,
                     "selected": bool(z[metric] >= args.z and full[t.name] >= args.min_examples)})
    rows.sort(key=lambda row: -row["z"])
    chosen = [f"{row['task']}:{row['metric']}" for row in rows if row["selected"]]
    rep = task_report(tasks, [model_row("fp", f"{lm.source} (full precision)", results)],
                      settings={"limit": args.search_limit, "rule": f"z >= {args.z}, examples >= {args.min_examples}"})
    rep["candidates"] = rows
    rep["suite"] = chosen
    lines = [f"# Candidate BIG-bench tasks for SmolLM2-135M ({rep['created']})", "",
             f"Full-precision model, zero-shot, at most {args.search_limit} examples per task (a fixed random subset). "
             f"z = (metric - chance) / standard error, for acc and acc_norm; the task's headline metric is the one "
             f"of {', '.join(args.metrics)} with the larger z. Selected: z >= {args.z} and at least {args.min_examples} examples in the task.", "",
             "| task | examples | scored | chance % | acc % | ± s.e. | acc_norm % | z acc | z acc_norm | selected |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for row in rows:
        lines.append(f"| {row['task']} | {row['examples']} | {row['scored']} | {100 * row['chance']:.1f} | "
                     f"{100 * row['acc']:.1f} | {100 * row['acc_stderr']:.1f} | {100 * row['acc_norm']:.1f} | "
                     f"{row['z_acc']:.1f} | {row['z_acc_norm']:.1f} | {row['metric'] if row['selected'] else ''} |")
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "eval-candidates-smollm2.json").write_text(json.dumps(rep, indent=1))
    (out / "eval-candidates-smollm2.md").write_text("\n".join(lines) + "\n")
    _say(f"suite: {', '.join(chosen)}")
    return rep, chosen


def table(lm, args, dev, suite: list[str]) -> dict:
    from edge_recover.recovery.student import load_adapter, load_student_checkpoint
    from edge_recover.recovery.task_eval import TorchLoglikelihood
    from edge_recover.tasks import resolve_tasks
    from edge_recover.tasks_report import model_row, task_report, write_report_files
    from edge_recover.tasks_score import score_tasks

    from dataclasses import replace

    specs = [s.split(":") if ":" in s else (s, None) for s in suite]  # NAME[:METRIC]
    tasks = [replace(t, metric=m) if m else t for t, (_, m) in zip(resolve_tasks([n for n, _ in specs]), specs)]
    tasks = [t.subset(args.limit) for t in tasks]
    work = Path(args.work)
    rows, recoveries = [], []

    reuse = {}
    if args.reuse and Path(args.reuse).is_file():  # rows scored by an earlier run on the very same examples
        prev = json.loads(Path(args.reuse).read_text())
        same = [(t["name"], t["examples"]) for t in prev["tasks"]] == [(t.name, len(t.examples)) for t in tasks]
        reuse = {m["label"]: m for m in prev["models"]} if same else {}
        _say(f"reusing rows {', '.join(reuse) or 'none (other tasks)'} from {args.reuse}")

    def score(label: str, what: str, model) -> None:
        if label in reuse:
            rows.append(reuse[label])
            return
        t0 = time.time()
        ll = TorchLoglikelihood(model.to(dev), lm.tokenizer, dev, max_length=lm.model.config.max_position_embeddings)
        rows.append(model_row(label, what, score_tasks(tasks, ll, progress=False, label=label,
                                                        questions_per_call=args.questions_per_call)))
        _say(f"{label}: mean acc {sum(r['acc'] for r in rows[-1]['results']) / len(tasks):.3f} ({time.time() - t0:.0f} s)")

    score("fp", "SmolLM2-135M full precision (the teacher)", lm.model)
    if "W4" not in reuse:
        w4, _, w4_scheme = _quantized(lm, "w4", work, False)
        score("W4", f"GPTQ, 4-bit block 64, lm_head {_head(w4_scheme)} (unrecovered)", w4)
        del w4
    else:
        score("W4", "", None)
    w4w2, w4w2_path, w4w2_scheme = _quantized(lm, "w4w2gateup", work, False)
    score("W4/W2", f"W4/W2-GateUp GPTQ, 4-bit block 64, gate/up 2-bit block 128, lm_head {_head(w4w2_scheme)} (unrecovered)", w4w2)
    for spec in args.adapter:
        label, path = spec.split("=", 1)
        peft = load_adapter(w4w2, path, lm.source_hash, w4w2_scheme)
        score(label, f"W4/W2 + Recover-LoRA side-car adapter ({Path(path).name})", peft)
        recoveries.append(("fp", "W4/W2", label))
        w4w2 = peft.unload()
    for spec in args.checkpoint:
        label, path = spec.split("=", 1)
        model, manifest, _ = load_student_checkpoint(path, lm, None)
        score(label, f"recovered checkpoint {Path(path).name} ({manifest.get('recovery', {}).get('mode', 'recovered')})", model)
        recoveries.append(("fp", "W4/W2", label))
    rep = task_report(tasks, rows, recoveries, settings={"limit": args.limit, "device": str(dev),
                                                        "quantized": str(w4w2_path)})
    out = Path(args.out_dir)
    write_report_files(rep, out / "eval-smollm2.json", out / "eval-smollm2.md", out / "eval-smollm2.png")
    _say(f"wrote {out / 'eval-smollm2'}.{{json,md,png}}")
    return rep


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("step", choices=["search", "table", "all"])
    ap.add_argument("--model", default=os.environ.get("SMOLLM2_GGUF", "smollm2"))
    ap.add_argument("--tasks", default=None, help="comma-separated NAME[:METRIC] suite for `table` (default: "
                                                  "search's choice, else DEFAULT_SUITE)")
    ap.add_argument("--limit", type=int, default=None, help="at most this many examples per task in `table`")
    ap.add_argument("--search-limit", type=int, default=1000, help="examples per task in `search` (0: all)")
    ap.add_argument("--z", type=float, default=3.0)
    ap.add_argument("--metrics", default="acc", help="headline metrics a task may get in `search`: `acc` (the "
                                                     "committed run) or `acc,acc_norm` (the better z on the fp model)")
    ap.add_argument("--min-examples", type=int, default=200)
    ap.add_argument("--adapter", action="append", default=[], help="LABEL=DIR: a Recover-LoRA adapter on W4/W2")
    ap.add_argument("--checkpoint", action="append", default=[], help="LABEL=DIR: a recovered quantized checkpoint")
    ap.add_argument("--work", default=str(ROOT / "out" / "eval-smollm2"))
    ap.add_argument("--reuse", default=None, help="an earlier eval-smollm2.json: keep its rows (same tasks and "
                                                  "examples) and score only the models it lacks")
    ap.add_argument("--out-dir", default=str(RESULTS))
    ap.add_argument("--device", default="auto")
    ap.add_argument("--questions-per-call", type=int, default=None, help="default: 16 on a GPU, 1 on the CPU")
    args = ap.parse_args(argv)
    args.metrics = [m.strip() for m in args.metrics.split(",") if m.strip() in ("acc", "acc_norm")] or ["acc"]
    from edge_recover.pipeline import resolve_model
    from edge_recover.tasks import DEFAULT_METRICS, DEFAULT_SUITE, fetch_bigbench

    dev = torch.device("cuda" if (args.device == "auto" and torch.cuda.is_available()) else
                       (args.device if args.device != "auto" else "cpu"))
    args.questions_per_call = args.questions_per_call or (16 if dev.type == "cuda" else 1)
    fetch_bigbench()
    lm = resolve_model(args.model)
    lm.model.to(dev).eval()
    suite = [f"{n}:{DEFAULT_METRICS.get(n, 'acc')}" for n in DEFAULT_SUITE]
    if args.step in ("search", "all"):
        _, suite = search(lm, args, dev)
    if args.tasks:
        suite = [s.strip() for s in args.tasks.split(",") if s.strip()]
    if args.step in ("table", "all"):
        if not suite:
            raise SystemExit("no suite: run `search` first or pass --tasks")
        rep = table(lm, args, dev, suite)
        for rec in rep["recovery"]:
            _say(f"{rec['recovered']}: {rec['reach']} of {len(rec['rows'])} tasks reach 80 %")


if __name__ == "__main__":
    main()

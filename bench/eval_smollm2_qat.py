"""Benchmark: a recovered quantized checkpoint (integer-exact recovery, `recover --mode qat`) on the task suite,
scored on this CPU on a subset of each task, beside the rows of the GPU table (docs/results/eval-smollm2.json)
sliced to the same examples.

The qat checkpoint starts from min-max (RTN) integers, not the table's GPTQ ones, so its own unrecovered
start is scored too (`W4/W2 RTN`: the same scheme quantized with rtn, no calibration), and its recovery share
is taken against that start; the LoRA row keeps its share against the GPTQ W4/W2 row. The fp and GPTQ rows
come from the GPU run (same examples; GPU and CPU numerics can flip a near tie, rarely).

    python bench/eval_smollm2_qat.py --checkpoint /tmp/qat --tasks metaphor_boolean --limit 200
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "docs" / "results"


def _say(msg: str) -> None:
    print(f"[eval-qat] {msg}", file=sys.stderr, flush=True)


def _slice(row: dict, keep: dict[str, list[int]], tasks) -> dict:
    """A model row of the GPU report restricted to the subset's examples (outcomes and their means)."""
    from edge_recover.tasks_score import mean_stderr

    results = []
    for r in row["results"]:
        if r["task"] not in keep:
            continue
        idx = keep[r["task"]]
        c, cn = [r["correct"][i] for i in idx], [r["correct_norm"][i] for i in idx]
        (a, ase), (an, anse) = mean_stderr(c), mean_stderr(cn)
        results.append({**r, "examples": len(idx), "acc": a, "acc_stderr": ase, "acc_norm": an,
                        "acc_norm_stderr": anse, "correct": c, "correct_norm": cn})
    order = [t.name for t in tasks]
    results.sort(key=lambda r: order.index(r["task"]))
    return {**row, "what": row["what"] + " (GPU run, same examples)", "results": results}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True, help="the recovered (qat) quantized checkpoint folder")
    ap.add_argument("--label", default="QAT")
    ap.add_argument("--gpu-report", default=str(RESULTS / "eval-smollm2.json"))
    ap.add_argument("--tasks", default="metaphor_boolean")
    ap.add_argument("--limit", type=int, default=200)
    ap.add_argument("--out", default=str(RESULTS / "eval-smollm2-qat"))
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    from edge_recover.pipeline import resolve_model
    from edge_recover.recovery.student import load_student_checkpoint, quantize_student
    from edge_recover.recovery.task_eval import TorchLoglikelihood
    from edge_recover.tasks import resolve_tasks
    from edge_recover.tasks_report import model_row, task_report, write_report_files
    from edge_recover.tasks_score import score_tasks

    gpu = json.loads(Path(args.gpu_report).read_text())
    full = resolve_tasks(args.tasks)
    keep = {}
    for t in full:  # the very indices Task.subset keeps
        n = len(t.examples)
        keep[t.name] = (sorted(np.random.RandomState(1234).choice(n, args.limit, replace=False).tolist())
                        if args.limit < n else list(range(n)))
    tasks = [t.subset(args.limit) for t in full]
    metrics = {t["name"]: t.get("metric", "acc") for t in gpu["tasks"]}
    tasks = [replace(t, metric=metrics.get(t.name, t.metric)) for t in tasks]
    rows = [_slice(m, keep, tasks) for m in gpu["models"]]
    lm = resolve_model("smollm2")
    qat, manifest, scheme = load_student_checkpoint(args.checkpoint, lm, None)
    for label, what, model in (
            ("W4/W2 RTN", f"{scheme.name} min-max (rtn), the qat run's start, unrecovered", None),
            (args.label, f"integer-exact recovery (recover --mode qat), checkpoint {Path(args.checkpoint).name}", qat)):
        if model is None:
            model, _ = quantize_student(lm, scheme, "rtn", calibration=0, progress=False)
        t0 = time.time()
        res = score_tasks(tasks, TorchLoglikelihood(model.eval(), lm.tokenizer), progress=True, label=label)
        rows.append(model_row(label, what, res))
        _say(f"{label}: {[round(r.acc, 3) for r in res]} ({time.time() - t0:.0f} s)")
    labels = [m["label"] for m in rows]
    recoveries = [("fp", "W4/W2", lab) for lab in labels if lab not in ("fp", "W4", "W4/W2", "W4/W2 RTN", args.label)]
    recoveries.append(("fp", "W4/W2 RTN", args.label))
    rep = task_report(tasks, rows, recoveries, settings={"limit": args.limit, "device": "cpu (qat, rtn rows); "
                                                         "cuda (the other rows, from the GPU run)"})
    out = Path(args.out)
    write_report_files(rep, out.with_suffix(".json"), out.with_suffix(".md"), out.with_suffix(".png"))
    _say(f"wrote {out}.{{json,md,png}}")


if __name__ == "__main__":
    main()

"""`edge-recover eval --tasks ...`: task accuracy from the command line (recovery/cli.py's `eval` hands over
here when `--tasks` or `--package` is given). Torch-free at import: a package is scored through the runtime's
backend (registered by runtimes/cli.py, opened by name) and the torch models through `task_eval`, imported
only when asked for.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Callable, Optional

from edge_recover.errors import require
from edge_recover.options import defaults

__all__ = ["eval_tasks_cmd", "format_table"]


def _cell(r: dict, key: str) -> str:
    se = "" if math.isnan(r[f"{key}_stderr"]) else f"±{100 * r[f'{key}_stderr']:.1f}"
    return f"{100 * r[key]:.1f}{se}"


def format_table(data: dict) -> list[str]:
    """Plain-text lines: each task's headline metric ± s.e. per model, then the recovery shares."""
    models, tasks = data["models"], data["tasks"]
    width = max([len(t["name"]) for t in tasks] + [8]) + 2
    lines = [f"{'task':<{width}}{'metric':>9}{'n':>6}{'chance':>8}" + "".join(f"{m['label']:>16}" for m in models)]
    for i, t in enumerate(tasks):
        key = t.get("metric", "acc")
        lines.append(f"{t['name']:<{width}}{key:>9}{t['examples']:>6}{100 * t['chance']:>8.1f}"
                     + "".join(f"{_cell(m['results'][i], key):>16}" for m in models))
    for rec in data.get("recovery", []):
        shares = ", ".join(f"{row['task']} " + ("no gap" if math.isnan(row["share"]) else f"{100 * row['share']:.0f} %")
                           for row in rec["rows"])
        lines.append(f"recovery share ({rec['recovered']} over {rec['quantized']}): {shares}; "
                     f"{rec['reach']} of {len(rec['rows'])} tasks reach {100 * rec['bar']:.0f} %")
    return lines


def eval_tasks_cmd(model: Optional[str], tasks: Optional[str], *, package: Optional[Path] = None,
                   provider: str = "cpu", threads: Optional[int] = None, limit: Optional[int] = None, scheme=None,
                   adapter: Optional[Path] = None, quantized: Optional[Path] = None, method: Optional[str] = None,
                   calibration: int = defaults("eval").calibration, device: str = "auto", report: Optional[Path] = None,
                   json_out: Optional[Path] = None, fp: bool = True, student: bool = True, batch_size: int = 1,
                   echo: Callable[[str], None] = print) -> dict:
    """Resolve the tasks (before loading anything), score them on the package or on the torch models, print the
    table and write the report; returns the report dict."""
    from edge_recover.atomic import check_new_dir, write_json_atomic
    from edge_recover.tasks import resolve_tasks
    from edge_recover.tasks_report import model_row, task_report, write_report
    from edge_recover.tasks_score import open_backend, score_tasks

    require(tasks is not None, "`--package` scores multiple-choice tasks; pass `--tasks` (names, JSON files or `default`)")
    require(batch_size >= 1, f"`--batch-size` must be >= 1, got {batch_size}; try 1 (a GPU: 16)")
    if report is not None:
        check_new_dir(report)
    task_list = [t.subset(limit) for t in resolve_tasks(tasks)]
    if package is not None:
        require(model is None, f"pass either MODEL ({model!r}) or `--package`, not both: a package is scored alone")
        require(adapter is None and quantized is None, "`--adapter` / `--quantized` are for torch models; a package "
                                                       "carries its own integers and adapters")
        require(batch_size == 1, "`--batch-size` is for torch models; a package scores one question's choices at a "
                                 "time: leave it out")
        ll = open_backend("package", package, provider, threads=threads)
        rows = [model_row(Path(package).name, f"package {package} through ONNX Runtime ({ll.lm.choice.describe()})",
                          score_tasks(task_list, ll, label=Path(package).name))]
        data = task_report(task_list, rows, settings={"limit": limit, "backend": "onnxruntime", "provider": provider})
    else:
        require(model is not None, "MODEL is missing; pass the full-precision teacher (HF folder, .gguf or `smollm2`) "
                                   "or `--package PKG`")
        from .task_eval import evaluate_tasks

        data = evaluate_tasks(model, task_list, scheme, quantized=quantized, adapter=adapter, method=method,
                              calibration=calibration, device=device, fp=fp,
                              student=student, questions_per_call=batch_size)
        data["settings"].update({"limit": limit, "backend": "torch"})
    for line in format_table(data):
        echo(line)
    if report is not None:
        write_report(data, report)
        echo(f"wrote {report}")
    if json_out is not None:
        write_json_atomic(json_out, json.dumps(data, indent=1))
    return data

"""`edge-recover eval --tasks humaneval`: code tasks from the command line (recovery/cli.py's `eval` hands over
here when `--tasks` names a code task). Torch-free at import: a package is run through the runtime's
generator (registered by runtimes/cli.py as `package-code`, opened by name) and the torch models through
`code_eval`, imported only when asked for.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Optional

from edge_recover.errors import require
from edge_recover.options import defaults

__all__ = ["eval_code_cmd", "has_code_task"]


def _items(tasks: str) -> list[str]:
    return [s.strip() for s in tasks.split(",") if s.strip()]


def has_code_task(tasks: Optional[str]) -> bool:
    """Whether `--tasks` names a code task (`humaneval` or a .jsonl problem file)."""
    from edge_recover.humaneval import is_code_task

    return tasks is not None and any(is_code_task(s) for s in _items(tasks))


def _identity(package: Optional[Path]) -> str:
    """What a journal line is keyed by for a package: its manifest's bytes (so a re-exported package at the same
    path starts over); "torch" for the torch models, whose key the models' own arguments extend."""
    if package is None:
        return "torch"
    import hashlib

    manifest = Path(package) / "manifest.json"
    digest = hashlib.sha256(manifest.read_bytes()).hexdigest()[:16] if manifest.is_file() else "no-manifest"
    return f"package {digest}"


def eval_code_cmd(model: Optional[str], tasks: str, *, package: Optional[Path] = None, provider: str = "cpu",
                  threads: Optional[int] = None, limit: Optional[int] = None, scheme=None,
                  adapter: Optional[Path] = None, quantized: Optional[Path] = None, method: Optional[str] = None,
                  calibration: int = defaults("eval").calibration,
                  device: str = "auto", report: Optional[Path] = None, json_out: Optional[Path] = None,
                  options=None, fp: bool = True, student: bool = True, echo: Callable[[str], None] = print) -> dict:
    """Resolve the code tasks (before loading anything), generate and test an answer per problem on the package
    or the torch models, print the table and write the report; returns the report dict."""
    from edge_recover.atomic import check_new_dir, write_json_atomic
    from edge_recover.code_report import code_model_row, code_report, format_code_table, write_code_report
    from edge_recover.humaneval import CodeEvalOptions, Journal, is_code_task, resolve_code_task, score_code_tasks
    from edge_recover.tasks_score import open_backend

    options = options or CodeEvalOptions()
    items = _items(tasks)
    other = [s for s in items if not is_code_task(s)]
    require(not other, f"`--tasks` mixes code tasks with multiple-choice ones ({', '.join(other)}); score them in "
                       "two `eval` calls")
    if report is not None:
        check_new_dir(report)
    task_list = [resolve_code_task(s).head(limit) for s in items]
    names = [t.name for t in task_list]
    dup = sorted({n for n in names if names.count(n) > 1})
    require(not dup, f"`--tasks` names {', '.join(dup)} more than once; give each task once")
    settings = {"limit": limit}
    journal = None
    if report is not None:  # answers journaled beside the report: a stopped run resumes where it stopped
        journal = Journal(Path(report).with_name(Path(report).name + ".progress.jsonl"),
                          _identity(package))
        echo(f"resuming from {journal.path} (answers of the same model and settings are not generated again)"
             if journal.path.is_file() else f"answers journaled to {journal.path}: a stopped run resumes from it")
    if package is not None:
        require(model is None, f"pass either MODEL ({model!r}) or `--package`, not both: a package is scored alone")
        require(adapter is None and quantized is None, "`--adapter` / `--quantized` are for torch models; a package "
                                                       "carries its own integers and adapters")
        require(options.batch_size == 1, "`--batch-size` is for torch models; a package answers one problem at a "
                                         "time: leave it out")
        gen = open_backend("package-code", package, provider, threads=threads)
        label = Path(package).name
        rows = [code_model_row(label, gen.describe(), score_code_tasks(task_list, gen, options, label=label, journal=journal))]
        data = code_report(task_list, rows, options, settings={**settings, "backend": "onnxruntime",
                                                               "provider": provider,
                                                               "prompt": "chat template" if gen.chat else
                                                               "raw completion (no chat template)"})
    else:
        require(model is not None, "MODEL is missing; pass the full-precision model (HF folder, .gguf or a fetched "
                                   "name) or `--package PKG`")
        from .code_eval import evaluate_code

        data = evaluate_code(model, task_list, scheme, quantized=quantized, adapter=adapter, method=method,
                             calibration=calibration,
                             device=device, options=options, fp=fp, student=student, journal=journal and journal.scoped(
                                 f"{model} | scheme={scheme} | quantized={quantized} | adapter={adapter} | "
                                 f"method={method} | calibration={calibration}"))
        data["settings"].update(settings)
    for line in format_code_table(data):
        echo(line)
    if report is not None:
        write_code_report(data, report)
        journal.remove()
        echo(f"wrote {report}")
    if json_out is not None:
        write_json_atomic(json_out, json.dumps(data, indent=1))
    return data

"""Task-accuracy reports: one dict (report.json), rendered as Markdown and a PNG bar chart.

Like the profiler's reports (runtimes/report.py), everything renders from the dict alone, so a report
collected elsewhere renders again: `write_report(json.load(open("report.json")), "out/again")`. The dict
holds each model's per-example outcomes too, so recovery shares (and their paired-bootstrap errors) can be
recomputed from it.
"""

from __future__ import annotations

import datetime
import json
import math
from pathlib import Path
from typing import Optional, Sequence

from .atomic import atomic_dir
from .tasks import Task
from .tasks_score import REACH, TaskResult, reach, recovery_table

__all__ = ["model_row", "task_report", "render_markdown", "plot_report", "write_report", "write_report_files"]

PLOT = "accuracy.png"


def model_row(label: str, what: str, results: Sequence[TaskResult]) -> dict:
    """One model's entry of a report: a short `label`, what it is, and its per-task results."""
    return {"label": label, "what": what, "results": [r.to_json() for r in results]}


def task_report(tasks: Sequence[Task], models: Sequence[dict], recoveries: Sequence[tuple[str, str, str]] = (),
                settings: Optional[dict] = None) -> dict:
    """The report dict from `model_row`s and the (fp, quantized, recovered) label triples whose recovery
    share to compute per task.

    Example:
        >>> rep = task_report(tasks, [model_row("fp", "SmolLM2", fp_results)])  # doctest: +SKIP
    """
    by_label = {m["label"]: [TaskResult.from_json(r) for r in m["results"]] for m in models}
    rec = []
    for f, q, r in recoveries:
        rows = recovery_table(by_label[f], by_label[q], by_label[r], [t.metric for t in tasks])
        rec.append({"fp": f, "quantized": q, "recovered": r, "rows": rows, "reach": reach(rows), "bar": REACH})
    return {"kind": "edge-recover-task-eval", "format_version": 1,
            "created": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "settings": {"acc_norm": "log-prob / characters of the choice (leading whitespace not counted)",
                         "shots": 0, **(settings or {})},
            "tasks": [{"name": t.name, "examples": len(t.examples), "chance": t.chance, "source": t.source,
                       "metric": t.metric} for t in tasks],
            "models": list(models), "recovery": rec}


def _pct(x: float) -> str:
    return "n/a" if x is None or math.isnan(x) else f"{100 * x:.1f}"


def _acc(r: dict, key: str = "acc") -> str:
    se = r[f"{key}_stderr"]
    return f"{_pct(r[key])} ± {_pct(se)}" if not math.isnan(se) else _pct(r[key])


def render_markdown(data: dict) -> str:
    """report.md: accuracy per task and model (± standard error), acc_norm, and the recovery shares."""
    models, tasks = data["models"], data["tasks"]
    st = data["settings"]
    lines = [f"# Task accuracy ({data['created']})", "",
             f"Zero-shot log-likelihood multiple choice; accuracy in % ± standard error; `acc_norm`: "
             f"{st['acc_norm']}."
             + (f" At most {st['limit']} examples per task (a fixed random subset)." if st.get("limit") else ""), ""]
    lines += [f"- `{m['label']}`: {m['what']}" for m in models]
    lines += ["", "Each task in its headline metric (`metric`; both metrics are in report.json and below):", "",
              "| task | metric | n | chance | " + " | ".join(m["label"] for m in models) + " |",
              "| --- | --- | ---: | ---: | " + " | ".join("---:" for _ in models) + " |"]
    for i, t in enumerate(tasks):
        metric = t.get("metric", "acc")
        cells = [_acc(m["results"][i], metric) for m in models]
        lines.append(f"| {t['name']} | {metric} | {t['examples']} | {_pct(t['chance'])} | " + " | ".join(cells) + " |")
    means = [sum(m["results"][i][t.get("metric", "acc")] for i, t in enumerate(tasks)) / max(len(tasks), 1)
             for m in models]
    lines.append("| **mean** | | | " + _pct(sum(t["chance"] for t in tasks) / max(len(tasks), 1)) + " | "
                 + " | ".join(f"**{_pct(x)}**" for x in means) + " |")
    for key in ("acc", "acc_norm"):
        lines += ["", f"`{key}`:", "", "| task | " + " | ".join(m["label"] for m in models) + " |",
                  "| --- | " + " | ".join("---:" for _ in models) + " |"]
        for i, t in enumerate(tasks):
            lines.append(f"| {t['name']} | " + " | ".join(_acc(m["results"][i], key) for m in models) + " |")
    for rec in data.get("recovery", []):
        lines += ["", f"Recovery share of `{rec['recovered']}` over `{rec['quantized']}` (against `{rec['fp']}`), "
                      f"(acc_recovered - acc_quantized) / (acc_fp - acc_quantized), ± paired-bootstrap standard "
                      f"error: **{rec['reach']} of {len(rec['rows'])} tasks reach {100 * rec['bar']:.0f} %**.", "",
                  "| task | metric | fp | quantized | recovered | recovery share % |",
                  "| --- | --- | ---: | ---: | ---: | ---: |"]
        for row in rec["rows"]:
            share = ("no gap" if math.isnan(row["share"]) else
                     f"{_pct(row['share'])} ± {_pct(row['share_stderr'])}")
            lines.append(f"| {row['task']} | {row.get('metric', 'acc')} | {_pct(row['fp'])} | {_pct(row['quantized'])} "
                         f"| {_pct(row['recovered'])} | {share} |")
    return "\n".join(lines) + "\n"


def plot_report(data: dict, path: str | Path) -> None:
    """A grouped bar chart: accuracy per task, one bar per model, standard error as error bars, chance as ticks."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    tasks, models = data["tasks"], data["models"]
    x = np.arange(len(tasks))
    width = 0.8 / max(len(models), 1)
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(tasks) + 2), 4.2))
    keys = [t.get("metric", "acc") for t in tasks]
    for j, m in enumerate(models):
        acc = [100 * r[k] for r, k in zip(m["results"], keys)]
        se = [0 if math.isnan(r[f"{k}_stderr"]) else 100 * r[f"{k}_stderr"] for r, k in zip(m["results"], keys)]
        ax.bar(x - 0.4 + width * (j + 0.5), acc, width, yerr=se, capsize=2, label=m["label"])
    ax.scatter(x, [100 * t["chance"] for t in tasks], marker="_", s=900, color="black", zorder=3, label="chance")
    ax.set_xticks(x, [t["name"] + ("\n(acc_norm)" if k == "acc_norm" else "") for t, k in zip(tasks, keys)],
                  rotation=20, ha="right")
    ax.set_ylabel("accuracy % (± s.e.), headline metric")
    ax.set_title("Zero-shot multiple-choice accuracy")
    ax.legend(fontsize=8, ncol=min(len(models) + 1, 4))
    fig.tight_layout()
    fig.savefig(path, dpi=110, format="png")
    plt.close(fig)


def write_report_files(data: dict, json_path: str | Path, md_path: str | Path, png_path: str | Path) -> None:
    """The three files of a report at the given paths (each written aside, then renamed)."""
    from .atomic import atomic_file

    for path in (json_path, md_path, png_path):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(json_path) as tmp:
        tmp.write_text(json.dumps(data, indent=1))
    with atomic_file(md_path) as tmp:
        tmp.write_text(render_markdown(data))
    with atomic_file(png_path) as tmp:
        plot_report(data, tmp)


def write_report(data: dict, folder: str | Path, overwrite: bool = False) -> Path:
    """A report folder: report.json, report.md and accuracy.png, all or nothing.

    Example:
        >>> write_report(report, "out/eval")  # doctest: +SKIP
    """
    with atomic_dir(folder, overwrite=overwrite) as tmp:
        (tmp / "report.json").write_text(json.dumps(data, indent=1))
        (tmp / "report.md").write_text(render_markdown(data))
        plot_report(data, tmp / PLOT)
    return Path(folder)

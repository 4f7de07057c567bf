"""Code-task reports (HumanEval pass@1): one dict (report.json), rendered as Markdown and a PNG bar chart.

The same three files as the multiple-choice reports (tasks_report.py), and like them rendered from the dict
alone: `write_code_report(json.load(open("report.json")), "out/again")`. The dict keeps every problem's
outcome and the model's answer, so a failure can be read back without running the model again.
"""

from __future__ import annotations

import datetime
import json
import math
from pathlib import Path
from typing import Optional, Sequence

from .atomic import atomic_dir
from .humaneval import STATUSES, CodeEvalOptions, CodeResult, CodeTask
from .tasks_report import PLOT

__all__ = ["code_model_row", "code_report", "render_code_markdown", "plot_code_report", "write_code_report",
           "format_code_table", "REPORT_KIND"]

REPORT_KIND = "edge-recover-code-eval"


def code_model_row(label: str, what: str, results: Sequence[CodeResult]) -> dict:
    """One model's entry of a report: a short `label`, what it is, and its per-task results."""
    return {"label": label, "what": what, "results": [r.to_json() for r in results]}


def code_report(tasks: Sequence[CodeTask], models: Sequence[dict], options: CodeEvalOptions,
                settings: Optional[dict] = None) -> dict:
    """The report dict of code tasks from `code_model_row`s.

    Example:
        >>> rep = code_report([task], [code_model_row("pkg", "out/pkg", results)], CodeEvalOptions())  # doctest: +SKIP
    """
    from .humaneval import INSTRUCTION, RESPONSE_PREFIX
    from .sandbox import network_isolation

    isolation = network_isolation() if options.limits.isolate_network else ()
    return {"kind": REPORT_KIND, "format_version": 1,
            "created": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "settings": {"metric": "pass@1", "decoding": "greedy", "samples_per_problem": 1,
                         "max_new_tokens": options.max_new_tokens, "batch_size": options.batch_size,
                         "instruction": INSTRUCTION,
                         "response_prefix": RESPONSE_PREFIX, "sandbox": options.limits.to_json(),
                         "network": " ".join([Path(isolation[0]).name, *isolation[1:]]) if isolation else "reachable",
                         **(settings or {})},
            "tasks": [{"name": t.name, "problems": len(t.problems), "source": t.source, "metric": "pass@1"}
                      for t in tasks],
            "models": list(models)}


def _pct(x: float) -> str:
    return "n/a" if x is None or math.isnan(x) else f"{100 * x:.1f}"


def _cell(r: dict) -> str:
    se = r["pass_at_1_stderr"]
    return _pct(r["pass_at_1"]) + ("" if math.isnan(se) else f" ± {_pct(se)}")


def render_code_markdown(data: dict) -> str:
    """report.md: pass@1 per task and model (± standard error), then the outcomes and the failures' reasons."""
    models, tasks, st = data["models"], data["tasks"], data["settings"]
    box = st["sandbox"]
    lines = [f"# Code generation: pass@1 ({data['created']})", "",
             f"One greedy answer per problem (at most {st['max_new_tokens']} new tokens), run against the "
             f"problem's tests in a child process (wall clock {box['timeout_s']:g} s, address space "
             f"{box['memory_bytes'] / 2 ** 30:g} GiB, network: {st['network']}); pass@1 in % ± standard error "
             "sqrt(p (1 - p) / n)." + (f" The first {st['limit']} problems." if st.get("limit") else ""), ""]
    lines += [f"- `{m['label']}`: {m['what']}" for m in models]
    lines += ["", "| task | n | " + " | ".join(m["label"] for m in models) + " |",
              "| --- | ---: | " + " | ".join("---:" for _ in models) + " |"]
    for i, t in enumerate(tasks):
        lines.append(f"| {t['name']} | {t['problems']} | " + " | ".join(_cell(m["results"][i]) for m in models) + " |")
    lines += ["", "Outcomes (`failed`: the tests ran and raised; `error`: the program did not reach them):", "",
              "| model | task | " + " | ".join(STATUSES) + " | mean tokens | stopped at max tokens |",
              "| --- | --- | " + " | ".join("---:" for _ in STATUSES) + " | ---: | ---: |"]
    for m in models:
        for r in m["results"]:
            tokens = [s["tokens"] for s in r["samples"]]
            capped = sum(s["stop"] == "max_new_tokens" for s in r["samples"])
            lines.append(f"| {m['label']} | {r['task']} | " + " | ".join(str(r["counts"].get(s, 0)) for s in STATUSES)
                         + f" | {sum(tokens) / max(len(tokens), 1):.0f} | {capped} |")
    for m in models:
        for r in m["results"]:
            bad = [s for s in r["samples"] if s["status"] != "passed"][:10]
            if not bad:
                continue
            lines += ["", f"First problems not passed by `{m['label']}` on {r['task']}:", ""]
            lines += [f"- {s['task_id']}: {s['status']}" + (f" ({s['detail'][:120]})" if s["detail"] else "")
                      for s in bad]
    return "\n".join(lines) + "\n"


def format_code_table(data: dict) -> list[str]:
    """Plain-text lines for the terminal: pass@1 ± s.e. per task and model, then each model's outcomes."""
    models, tasks = data["models"], data["tasks"]
    width = max([len(t["name"]) for t in tasks] + [8]) + 2
    lines = [f"{'task':<{width}}{'metric':>9}{'n':>6}" + "".join(f"{m['label']:>16}" for m in models)]
    for i, t in enumerate(tasks):
        lines.append(f"{t['name']:<{width}}{'pass@1':>9}{t['problems']:>6}"
                     + "".join(f"{_cell(m['results'][i]).replace(' ', ''):>16}" for m in models))
    for m in models:
        for r in m["results"]:
            lines.append(f"{m['label']} on {r['task']}: " + ", ".join(f"{s} {r['counts'].get(s, 0)}" for s in STATUSES))
    return lines


def plot_code_report(data: dict, path: str | Path) -> None:
    """A grouped bar chart: pass@1 per task, one bar per model, standard error as error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    tasks, models = data["tasks"], data["models"]
    x = np.arange(len(tasks))
    width = 0.8 / max(len(models), 1)
    fig, ax = plt.subplots(figsize=(max(5, 1.2 * len(tasks) + 3), 4.2))
    for j, m in enumerate(models):
        value = [100 * r["pass_at_1"] for r in m["results"]]
        se = [0 if math.isnan(r["pass_at_1_stderr"]) else 100 * r["pass_at_1_stderr"] for r in m["results"]]
        ax.bar(x - 0.4 + width * (j + 0.5), value, width, yerr=se, capsize=2, label=m["label"])
    ax.set_xticks(x, [f"{t['name']}\n(n = {t['problems']})" for t in tasks])
    ax.set_ylim(0, 100)
    ax.set_ylabel("pass@1 % (± s.e.), greedy")
    ax.set_title("Code generation: pass@1")
    ax.legend(fontsize=8, ncol=min(len(models), 4))
    fig.tight_layout()
    fig.savefig(path, dpi=110, format="png")
    plt.close(fig)


def write_code_report(data: dict, folder: str | Path, overwrite: bool = False) -> Path:
    """A report folder: report.json, report.md and accuracy.png, all or nothing.

    Example:
        >>> write_code_report(report, "out/humaneval")  # doctest: +SKIP
    """
    with atomic_dir(folder, overwrite=overwrite) as tmp:
        (tmp / "report.json").write_text(json.dumps(data, indent=1))
        (tmp / "report.md").write_text(render_code_markdown(data))
        plot_code_report(data, tmp / PLOT)
    return Path(folder)

"""`edge-recover report compare`: profile reports from different machines or runs, side by side.

    runs (report folders, report.json or report.jsonl files)
      -> lab rows (report_fields.lab_rows; a .jsonl file already is rows)
      -> match rows by (package, provider, n_prompt, n_gen, n_threads)
      -> per matched row and run: decode / prefill tok/s, TTFT, peak RSS, perplexity, and the ratio of its
         decode and prefill medians to the baseline run's (the first run, or `baseline`)
      -> compare.json, compare.md, compare_decode.png

Across machines there are no rounds to pair, so a ratio here is the ratio of the two runs' medians for the
same row (inside one run, the report's own `decode_vs_first` is the paired one, and the table shows it
beside). `ignore_threads` matches rows without the thread count (machines with different cores; each
run's threads are shown). A row that some runs lack is listed under "not in every run"; a run that shares no row with the
baseline is an error (the runs do not measure the same thing), as is a file that is not a profile report.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Sequence

from edge_recover.atomic import atomic_dir
from edge_recover.errors import EdgeRecoverError

from .report import _opt
from .report_fields import LAB_FIELDS, lab_rows

__all__ = ["KEY", "load_rows", "compare_reports", "render_compare", "write_compare", "COMPARE_KIND"]

KEY = ("package", "provider", "n_prompt", "n_gen", "n_threads")
COMPARE_KIND = "edge-recover-compare"
_VALUES = ("n_threads", "decode_tok_s", "decode_stddev_ts", "prefill_tok_s", "ttft_s", "peak_rss_bytes", "perplexity",
           "decode_vs_first", "cpu_model", "build_commit")


def load_rows(source: str | Path) -> list[dict]:
    """The lab rows of one run: a report folder (its report.json), a report.json, or a report.jsonl.

    Example:
        >>> load_rows("docs/results/profile-smollm2")[0]["n_prompt"]  # doctest: +SKIP
        128
    """
    path = Path(source)
    if path.is_dir():
        path = path / "report.json"
    if not path.is_file():
        raise EdgeRecoverError(f"{str(source)!r} is not a profile report: no report.json there; pass a folder "
                               f"written by `edge-recover profile` or its report.json / report.jsonl")
    try:
        if path.suffix == ".jsonl":
            rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        else:
            data = json.loads(path.read_text())
            if not isinstance(data, dict) or data.get("kind") != "edge-recover-profile":
                raise EdgeRecoverError(f"{str(source)!r} is not a profile report (kind "
                                       f"{data.get('kind') if isinstance(data, dict) else type(data).__name__!r}, "
                                       f"expected 'edge-recover-profile'); pass a report written by `edge-recover profile`")
            rows = lab_rows(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise EdgeRecoverError(f"{str(source)!r} is not a profile report ({type(exc).__name__}: {exc}); pass a "
                               f"report.json or report.jsonl written by `edge-recover profile`") from None
    except (KeyError, TypeError) as exc:
        raise EdgeRecoverError(f"{str(source)!r} is not a complete profile report (missing {exc}); pass a report "
                               f"written by `edge-recover profile`") from None
    missing = sorted({k for r in rows for k in (*KEY, "decode_tok_s", "prefill_tok_s") if not isinstance(r, dict) or k not in r})
    if not rows or missing:
        raise EdgeRecoverError(f"{str(source)!r} is not a profile report ("
                               f"{'no rows' if not rows else 'rows lack ' + ', '.join(missing)}); pass a report.jsonl "
                               f"written by `edge-recover profile`")
    return rows


def _name(source: str | Path) -> str:
    path = Path(source)
    return path.parent.name if path.is_file() and path.stem == "report" else (path.stem if path.is_file() else path.name)


def compare_reports(sources: Sequence[str | Path], baseline: Optional[str] = None,
                    ignore_threads: bool = False) -> dict:
    """Match the runs' rows and take each run's ratios to the baseline run (the first, or the one named
    `baseline`); `ignore_threads`: match without the thread count. Returns the compare.json dict.

    Example:
        >>> cmp = compare_reports(["lab/host-a-cpu", "lab/host-b-cpu"])  # doctest: +SKIP
        >>> cmp["rows"][0]["runs"]["host-b-cpu"]["decode_vs_baseline"]  # doctest: +SKIP
        1.74
    """
    if len(sources) < 2:
        raise EdgeRecoverError("give at least two reports to compare (folders, report.json or report.jsonl)")
    names: list[str] = []
    for s in sources:
        base, n = _name(s), 2
        name = base
        while name in names:
            name, n = f"{base}-{n}", n + 1
        names.append(name)
    runs = {name: load_rows(s) for name, s in zip(names, sources)}
    if baseline is None:
        baseline = names[0]
    if baseline not in runs:
        raise EdgeRecoverError(f"`--baseline` {baseline!r} is not one of the runs ({', '.join(names)}); pass one of "
                               f"those names")
    key_fields = tuple(k for k in KEY if not (ignore_threads and k == "n_threads"))
    keyed = {}
    for name, rows in runs.items():
        table = {}
        for r in rows:
            key = tuple(r[k] for k in key_fields)
            if key in table:
                raise EdgeRecoverError(f"run {name!r} has two rows for {dict(zip(key_fields, key))}; compare reports "
                                       f"of one profile each")
            table[key] = r
        keyed[name] = table
    base = keyed[baseline]
    for name, table in keyed.items():
        if name != baseline and not set(table) & set(base):
            raise EdgeRecoverError(f"run {name!r} shares no row with the baseline {baseline!r} by "
                                   f"({', '.join(key_fields)}); compare runs of the same packages, prompt lengths, "
                                   f"new tokens and threads (or pass --ignore-threads)")
    order: list[tuple] = []
    for table in keyed.values():
        order += [k for k in table if k not in order]
    rows, partial = [], []
    for key in order:
        present = [n for n in names if key in keyed[n]]
        (rows if len(present) == len(names) else partial).append(key)
    out_rows = []
    for key in rows:
        b = base[key]
        per_run = {}
        for name in names:
            r = keyed[name][key]
            per_run[name] = {**{k: r.get(k) for k in _VALUES},
                             "decode_vs_baseline": r["decode_tok_s"] / b["decode_tok_s"],
                             "prefill_vs_baseline": r["prefill_tok_s"] / b["prefill_tok_s"]}
        out_rows.append({**dict(zip(KEY, (b[k] for k in KEY))), "runs": per_run})
    meta = []
    for name, s in zip(names, sources):
        first = runs[name][0]
        meta.append({"name": name, "source": str(s), "cpu_model": first.get("cpu_model"),
                     "build_version": first.get("build_version"), "build_commit": first.get("build_commit"),
                     "onnxruntime": first.get("onnxruntime"), "created": first.get("created"), "rows": len(runs[name])})
    return {"kind": COMPARE_KIND, "format_version": 1, "baseline": baseline, "key": list(key_fields), "runs": meta,
            "rows": out_rows, "not_in_every_run": [{**dict(zip(key_fields, k)), "runs": [n for n in names if k in keyed[n]]}
                                                   for k in partial],
            "fields": list(LAB_FIELDS)}


def render_compare(cmp: dict) -> str:
    """compare.md: the runs, then one table row per matched (package, provider, prompt, new tokens, threads)."""
    names = [r["name"] for r in cmp["runs"]]
    lines = ["# Profile comparison", "",
             f"Baseline `{cmp['baseline']}`. Ratios are the run's median over the baseline's median for the same "
             f"row (runs on different machines have no rounds to pair); `in-run` is the report's own paired ratio "
             f"to its first package.", "",
             "| run | CPU | edge-recover | commit | onnxruntime | created | rows |", "| --- | --- | --- | --- | --- | --- | ---: |"]
    for r in cmp["runs"]:
        lines.append(f"| {r['name']} | {r['cpu_model']} | {r['build_version']} | {r['build_commit'] or '-'} | "
                     f"{r['onnxruntime']} | {r['created']} | {r['rows']} |")
    lines += ["", "| package | provider | n_prompt | n_gen | threads | run | decode tok/s (sd) | vs baseline | in-run "
                  "| prefill tok/s | vs baseline | TTFT ms | peak RSS MB | perplexity |",
              "| --- | --- | ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for row in cmp["rows"]:
        for name in names:
            v = row["runs"][name]
            cells = [row["package"], row["provider"], row["n_prompt"], row["n_gen"], v["n_threads"], name,
                     f"{_opt(v['decode_tok_s'], 1.0, '.1f')} ({_opt(v['decode_stddev_ts'], 1.0, '.1f')})",
                     f"{v['decode_vs_baseline']:.2f}x", f"{_opt(v['decode_vs_first'], 1.0, '.2f')}x",
                     _opt(v["prefill_tok_s"], 1.0, ".1f"), f"{v['prefill_vs_baseline']:.2f}x",
                     _opt(v["ttft_s"], 1e3, ".0f"), _opt(v["peak_rss_bytes"], 1e-6, ".1f"), _opt(v["perplexity"], 1.0, ".2f")]
            lines.append("| " + " | ".join(map(str, cells)) + " |")
    if cmp["not_in_every_run"]:
        lines += ["", "Not in every run (not compared): " + "; ".join(
            f"{r['package']} {r['provider']} {r['n_prompt']}/{r['n_gen']}"
            f"{'/' + str(r['n_threads']) + ' threads' if 'n_threads' in r else ''} ({', '.join(r['runs'])})"
            for r in cmp["not_in_every_run"])]
    return "\n".join(lines + ["", "![decode vs baseline](compare_decode.png)", ""])


def _plot(cmp: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    names = [r["name"] for r in cmp["runs"]]
    labels = [f"{r['package']}\n{r['n_prompt']}/{r['n_gen']}, {r['n_threads']}t" for r in cmp["rows"]]
    x = np.arange(len(labels))
    width = 0.8 / len(names)
    fig, ax = plt.subplots(figsize=(max(6.4, 0.9 * len(labels) * len(names)), 4.0), dpi=100)
    for i, name in enumerate(names):
        ax.bar(x + i * width, [row["runs"][name]["decode_vs_baseline"] for row in cmp["rows"]], width, label=name)
    ax.axhline(1.0, color="grey", linewidth=0.8)
    ax.set_xticks(x + width * (len(names) - 1) / 2, labels, fontsize=7)
    ax.set_ylabel(f"decode tok/s vs {cmp['baseline']}")
    ax.set_title("Decode speed against the baseline run")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_compare(cmp: dict, output: str | Path, overwrite: bool = False) -> Path:
    """compare.json, compare.md and compare_decode.png in a new folder `output` (all or nothing)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise EdgeRecoverError("the comparison's plot needs matplotlib, which is not installed; "
                               "`pip install matplotlib` and run again") from None
    with atomic_dir(output, overwrite) as tmp:
        (tmp / "compare.json").write_text(json.dumps(cmp, indent=1))
        (tmp / "compare.md").write_text(render_compare(cmp))
        _plot(cmp, tmp / "compare_decode.png")
    return Path(output)

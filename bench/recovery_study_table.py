"""One GPU recovery study as a table: JSON, Markdown and a PNG plot (docs/results/<study>/).

Reads what `bash bench/gpu/recovery_modes.sh collect none` brought back (results.json: each run's
bench/recovery_modes.py JSON, log tail and metrics) and writes, per run, the perplexity of the fp teacher, the
unrecovered start and the recovered model on each held-out text, in torch (every window of the text, on the
GPU) and through ONNX Runtime on the shipped package (`--ort-eval`: the first `--ort-windows` windows, on the
GPU machine's CPU). CE-gap recovery = (CE_start - CE) / (CE_start - CE_fp). The ORT rows need CE_fp on their
own windows: `--teacher MODEL` computes it here (torch, fp32, CPU) and stores it in the output JSON, so later
runs of this script read it instead.

    python bench/recovery_study_table.py docs/results/recovery-qwen05-study-8 --teacher qwen2.5-coder-0.5b \\
        --title "Qwen2.5-Coder-0.5B, study 8"
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

TEXTS = {"prose": ("Hamlet + Macbeth", "", "ppl_ort", "tokens"), "code": ("rich 13.9.4 sources", "code", "ppl_ort_code", "tokens_code")}


def _share(ce_fp: float, ce_start: float, ce: float) -> float:
    return float("nan") if ce_start <= ce_fp else 100.0 * (ce_start - ce) / (ce_start - ce_fp)


def _fp_ort_windows(teacher: str, windows: int) -> dict:
    """CE of the fp teacher (torch, CPU) on the first `windows` 512-token windows of each text."""
    from edge_recover.evaluate import evaluate, token_windows
    from edge_recover.fetch import eval_text
    from edge_recover.heldout import code_text
    from edge_recover.pipeline import resolve_model

    lm = resolve_model(teacher)
    out = {}
    for key, text in (("prose", eval_text()), ("code", code_text())):
        r = evaluate(lm.model, token_windows(lm.tokenizer, text, 512, windows), batch_size=2, device="cpu")
        out[key] = {"ce_fp": r.cross_entropy, "ppl_fp": math.exp(r.cross_entropy), "windows": windows}
    return out


def rows(study: dict, fp_ort: dict | None) -> list[dict]:
    """One row per (run, text): torch and ORT figures side by side."""
    runs = {t: r["result"] for t, r in study["runs"].items() if r.get("result")}
    start_ort = {}  # the unrecovered start's ORT figures, by block layout (a run may leave its start to another)
    for res in runs.values():
        for label, row in (res.get("ort") or {}).items():
            if label.startswith("unrecovered"):
                start_ort[res["block_size"]] = row
    out = []
    for tag, res in runs.items():
        for key, (name, sub, ort_key, tok_key) in TEXTS.items():
            fig = res.get(sub, {}) if sub else res
            if not fig:
                continue
            row = {"run": tag, "variant": res["variant"], "text": name,
                   "block_size": "4:64 (no 2-bit)" if res["variant"] == "w4" else res.get("block_size"),
                   "chat_share": (res.get("settings") or {}).get("chat_share", 0.0),
                   "ppl_fp": fig.get("ppl_fp"), "minutes": res.get("minutes"), "codes_moved": res.get("codes_moved"),
                   "kl_holdout": [res.get("kl_holdout_before"), res.get("kl_holdout_after")]}
            if res["variant"] == "w4":
                row.update({"ppl_recovered": fig.get("ppl_w4"), "ppl_start": None, "recovery_pct": None})
                ort = (res.get("ort") or {}).get(next(iter(res.get("ort") or {}), ""), {})
                row["ort_recovered"] = ort.get(ort_key)
            else:
                row.update({"ppl_start": fig.get("ppl_quant"), "ppl_recovered": fig.get("ppl_recovered"),
                            "recovery_pct": fig.get("recovery_pct")})
                row["ort_recovered"] = (res.get("ort") or {}).get("integer-exact", {}).get(ort_key)
                row["ort_start"] = start_ort.get(res.get("block_size"), {}).get(ort_key)
                if fp_ort and row["ort_recovered"] and row["ort_start"]:
                    row["ort_recovery_pct"] = _share(fp_ort[key]["ce_fp"], math.log(row["ort_start"]),
                                                     math.log(row["ort_recovered"]))
            if fp_ort:
                row["ort_fp"] = fp_ort[key]["ppl_fp"]
            out.append(row)
    return out


def markdown(table: list[dict], title: str) -> str:
    f = lambda x, d=2: "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{d}f}"  # noqa: E731
    lines = [f"# {title}", "",
             "| run | text | 2-bit block | chat share | fp (torch) | start (torch) | recovered (torch) | CE-gap recovery (torch) "
             "| fp (ORT windows) | start (ORT) | recovered (ORT) | CE-gap recovery (ORT) | codes moved | held-out KL | minutes |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|"]
    for r in table:
        kl, moved = r["kl_holdout"], r["codes_moved"]
        lines.append(f"| `{r['run']}` | {r['text']} | {r['block_size'] or '-'} | {r['chat_share']:g} | {f(r['ppl_fp'])} | "
                     f"{f(r.get('ppl_start'))} | {f(r['ppl_recovered'])} | {f(r.get('recovery_pct'), 1)} % | "
                     f"{f(r.get('ort_fp'))} | {f(r.get('ort_start'))} | {f(r.get('ort_recovered'))} | "
                     f"{f(r.get('ort_recovery_pct'), 1)} % | "
                     f"{'-' if moved is None else format(100 * moved, '.2f') + ' %'} | "
                     f"{'-' if kl[0] is None else format(kl[0], '.3f') + ' -> ' + format(kl[1], '.3f')} | {f(r['minutes'], 1)} |")
    return "\n".join(lines) + "\n"


def plot(table: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    texts = sorted({r["text"] for r in table})
    fig, axes = plt.subplots(1, len(texts), figsize=(6 * len(texts), 4))
    for ax, text in zip(axes if len(texts) > 1 else [axes], texts):
        rs = [r for r in table if r["text"] == text]
        labels = [r["run"] for r in rs]
        ax.bar(labels, [r["ppl_recovered"] for r in rs], label="recovered / W4 (torch)")
        starts = [r.get("ppl_start") or 0 for r in rs]
        ax.scatter(labels, starts, color="red", marker="_", s=400, label="unrecovered start")
        ax.axhline(rs[0]["ppl_fp"], color="black", linestyle="--", label="fp teacher")
        ax.set_yscale("log")
        ax.set_title(text)
        ax.set_ylabel("perplexity (log)")
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("study", type=Path, help="folder with gpu-results.json (what `collect` brought back)")
    ap.add_argument("--teacher", default=None, help="fp model for CE_fp on the ORT windows (computed once, stored)")
    ap.add_argument("--ort-windows", type=int, default=16)
    ap.add_argument("--title", default="recovery study")
    args = ap.parse_args(argv)
    study = json.loads((args.study / "gpu-results.json").read_text())
    out_json = args.study / "table.json"
    fp_ort = json.loads(out_json.read_text()).get("fp_ort") if out_json.is_file() else None
    if fp_ort is None and args.teacher:
        fp_ort = _fp_ort_windows(args.teacher, args.ort_windows)
    table = rows(study, fp_ort)
    out_json.write_text(json.dumps({"title": args.title, "fp_ort": fp_ort, "rows": table}, indent=2) + "\n")
    (args.study / "table.md").write_text(markdown(table, args.title))
    plot(table, args.study / "table.png", args.title)
    print(markdown(table, args.title))


if __name__ == "__main__":
    main()

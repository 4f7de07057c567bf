"""A GPU recovery study's training curves and held-out KL, from what `recovery_modes.sh collect` brought back.

For runs whose scoring did not finish inside the lease (no result JSON), the log's `[bench]` lines still hold
the held-out KL before and after training and the minutes; the metrics file holds the loss per logged step.
Writes, into the study folder: curves.png (training loss per step, every run), kl.json and kl.md (per run:
held-out KL before -> after, minutes, steps, final loss, and the ONNX Runtime perplexity of any package that was
scored), and one `TAG.metrics.jsonl` per run.

    python bench/recovery_curves.py docs/results/recovery-qwen05-study-10 --title "Qwen2.5-Coder-0.5B, study 10"
    python bench/recovery_curves.py docs/results/latent-update-cpu --run adamw=out/demo/recovered --run layer-sgd=out/ab/sgd
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

_KL = re.compile(r"\[bench\] (\S+): ([\d.]+) min \(generate (\d+) s, train (\d+) s\); kl holdout ([\d.]+) -> ([\d.]+)")
_ORT = re.compile(r"\[bench\] (\S+): (.+?): ([\d.]+)\s*$", re.M)


def local_runs(specs: list[str]) -> dict:
    """results.json's `runs` from local `recover` outputs, `TAG=OUTPUT_FOLDER`: its metrics and the figures of its
    recovery report (where a GPU run's come from its log)."""
    out = {}
    for spec in specs:
        tag, folder = spec.split("=", 1)
        rep = json.loads((Path(folder) / "recovery_report.json").read_text())
        out[tag] = {"metrics": (Path(folder) / "metrics.jsonl").read_text(),
                    "report": {"kl_before": rep["kl_before"], "kl_after": rep["kl_after"],
                               "train_seconds": round(rep["train_seconds"]), "minutes": round(rep["train_seconds"] / 60, 2),
                               "codes_moved": rep.get("codes_moved")}}
    return out


def runs(study: Path) -> dict:
    """tag -> {kl_before, kl_after, minutes, train_seconds, steps, final_loss, metrics, ort} from results.json."""
    res = json.loads((study / "gpu-results.json").read_text())["runs"]
    out = {}
    for tag, run in res.items():
        metrics = [json.loads(line) for line in run.get("metrics", "").splitlines() if line.strip()]
        row: dict = {"metrics": metrics, "ort": {}}
        log = run.get("log_tail", "")
        for m in _KL.finditer(log):
            row.update(minutes=float(m[2]), generate_seconds=int(m[3]), train_seconds=int(m[4]),
                       kl_before=float(m[5]), kl_after=float(m[6]))
        for m in _ORT.finditer(log):
            if m[1] == tag and "min (" not in m[2] and "torch" not in m[2]:
                row["ort"][m[2]] = float(m[3])
        row.update({k: v for k, v in run.get("report", {}).items() if v is not None})
        steps = [m for m in metrics if "loss" in m]
        if steps:
            row.update(steps=steps[-1]["step"], final_loss=steps[-1]["loss"])
        out[tag] = row
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("study", type=Path)
    ap.add_argument("--title", default="")
    ap.add_argument("--run", action="append", default=[], help="TAG=OUTPUT: a local `recover` output instead of a GPU "
                                                                "study's results (written to STUDY/gpu-results.json)")
    args = ap.parse_args(argv)
    if args.run:
        args.study.mkdir(parents=True, exist_ok=True)
        (args.study / "gpu-results.json").write_text(json.dumps({"runs": local_runs(args.run)}, indent=2) + "\n")
    table = runs(args.study)
    for tag, row in table.items():
        (args.study / f"{tag}.metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in row["metrics"]))
    slim = {t: {k: v for k, v in r.items() if k != "metrics"} for t, r in table.items()}
    (args.study / "kl.json").write_text(json.dumps(slim, indent=2) + "\n")
    lines = [f"# {args.title}".rstrip(), "", "| run | held-out KL before -> after | codes moved | steps | final loss | train s | "
             "minutes | ORT ppl (prose) |", "|---|---|---:|---:|---:|---:|---:|---|"]
    for tag, r in slim.items():
        ort = "; ".join(f"{k} {v:.2f}" for k, v in r["ort"].items()) or "not scored"
        kl = f"{r['kl_before']:.4f} -> {r['kl_after']:.4f}" if "kl_after" in r else "-"
        moved = f"{100 * r['codes_moved']:.2f} %" if r.get("codes_moved") is not None else "-"
        lines.append(f"| `{tag}` | {kl} | {moved} | {r.get('steps', '-')} | {r.get('final_loss', float('nan')):.4f} | "
                     f"{r.get('train_seconds', '-')} | {r.get('minutes', '-')} | {ort} |")
    (args.study / "kl.md").write_text("\n".join(lines) + "\n")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for tag, row in table.items():
        steps = [m for m in row["metrics"] if "loss" in m]
        ax.plot([m["step"] for m in steps], [m["loss"] for m in steps], label=f"{tag} (held-out KL {row.get('kl_after', float('nan')):.3f})")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training KL (per token)")
    ax.set_title(args.title or args.study.name)
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.study / "curves.png", dpi=120)
    print("\n".join(lines))


if __name__ == "__main__":
    main()

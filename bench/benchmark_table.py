"""Collect profiler reports into the benchmark table of docs/export.md and docs/runtime.md.

    python bench/benchmark_table.py docs/results/profile-smollm2 docs/results/profile-qwen3-1.7b-shape ...

Each report folder is one interleaved run (bench/profile_models.py); ratios are taken only inside a run
(against the run's `w4` package, or the first package when there is none), never across runs. Writes
docs/results/benchmark.json, docs/results/benchmark.md and docs/results/benchmark_decode.png.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "docs" / "results"


def _rows(report_dir: Path) -> list[dict]:
    data = json.loads((report_dir / "report.json").read_text())
    pkgs = {p["label"]: p for p in data["packages"]}
    base_label = "w4" if "w4" in pkgs else data["packages"][0]["label"]
    base = {r["prompt_length"]: r["decode_tok_s"] for r in data["results"] if r["package"] == base_label}
    rows = []
    for r in data["results"]:
        p = pkgs[r["package"]]
        rows.append({
            "run": report_dir.name, "package": r["package"], "prompt_length": r["prompt_length"],
            "new_tokens": r["new_tokens"], "size_mb": round(p["size_bytes"] / 1e6, 1),
            "weight_mb_per_token": round(p["weight_bytes_per_token"] / 1e6, 1),
            "prefill_tok_s": round(r["prefill_tok_s"], 2), "decode_tok_s": round(r["decode_tok_s"], 2),
            "ttft_s": round(r["ttft_s"], 3), "roofline_tok_s": round(r["roofline_tok_s"], 2),
            "roofline_share": round(r["roofline_share"], 3),
            "decode_vs_base": round(r["decode_tok_s"] / base[r["prompt_length"]], 3), "base": base_label,
            "bandwidth_gb_s": round(data["bandwidth_bytes_s"] / 1e9, 2),
        })
    return rows


def _markdown(rows: list[dict]) -> str:
    out = []
    for run in dict.fromkeys(r["run"] for r in rows):
        rs = [r for r in rows if r["run"] == run]
        out += [f"### {run} (read bandwidth {rs[0]['bandwidth_gb_s']} GB/s, {rs[0]['new_tokens']} new tokens)", "",
                f"| package | MB | MB/token | prompt | prefill tok/s | TTFT s | decode tok/s | decode vs {rs[0]['base']} "
                "| roofline tok/s | share |",
                "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for r in rs:
            out.append(f"| {r['package']} | {r['size_mb']} | {r['weight_mb_per_token']} | {r['prompt_length']} | "
                       f"{r['prefill_tok_s']:.1f} | {r['ttft_s']:.2f} | {r['decode_tok_s']:.2f} | "
                       f"{r['decode_vs_base']:.2f}x | {r['roofline_tok_s']:.1f} | {100 * r['roofline_share']:.0f} % |")
        out.append("")
    return "\n".join(out)


def _plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = list(dict.fromkeys(r["run"] for r in rows))
    fig, axes = plt.subplots(1, len(runs), figsize=(5 * len(runs), 4), squeeze=False)
    for ax, run in zip(axes[0], runs):
        rs = [r for r in rows if r["run"] == run]
        for pkg in dict.fromkeys(r["package"] for r in rs):
            pr = [r for r in rs if r["package"] == pkg]
            line = ax.plot([r["prompt_length"] for r in pr], [r["decode_tok_s"] for r in pr], marker="o", label=pkg)[0]
            ax.plot([r["prompt_length"] for r in pr], [r["roofline_tok_s"] for r in pr], ls="--", color=line.get_color(),
                    alpha=0.5)
        ax.set_title(run, fontsize=9)
        ax.set_xlabel("prompt length")
        ax.set_ylabel("decode tok/s (dashed: roofline)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("reports", nargs="+")
    args = ap.parse_args()
    rows = [r for d in args.reports for r in _rows(Path(d))]
    (OUT / "benchmark.json").write_text(json.dumps(rows, indent=1))
    (OUT / "benchmark.md").write_text("# Benchmark (bench/benchmark_table.py)\n\n" + _markdown(rows))
    _plot(rows, OUT / "benchmark_decode.png")
    print(_markdown(rows))


if __name__ == "__main__":
    main()

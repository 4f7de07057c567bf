"""Write a profile as a folder: report.json (for device labs to collect), report.md, PNG plots, and the lab
fields (report_fields.py) as report.csv and report.jsonl, one row per (package, prompt length).

Everything here works from the report dict alone (report.json round-trips), so a lab can re-render a
report collected elsewhere: `write_report(json.load(open("report.json")), "out/again")`.
"""

from __future__ import annotations

import json
from pathlib import Path

from edge_recover.atomic import atomic_dir

__all__ = ["write_report", "render_markdown", "plot_report", "paired_ratio", "write_rows", "PLOTS", "TABLES"]

PLOTS = ("decode_tok_s.png", "prefill_tok_s.png")
TABLES = ("report.csv", "report.jsonl")


def _probes(data: dict) -> str:
    """' (median of N probes, LO-HI)' when the report has bandwidth probes (older reports have one)."""
    probes = data.get("bandwidth_probes_bytes_s") or []
    if len(probes) < 2:
        return ""
    return f" (median of {len(probes)} probes, {min(probes) / 1e9:.1f}-{max(probes) / 1e9:.1f})"


def paired_ratio(data: dict, package: str, length: int, metric: str = "decode") -> float:
    """`package` against the first package at `length`: the median over repeat rounds of the ratio of the two
    runs of the same round (`metric` decode or prefill tokens/s).

    The runs of one round are seconds apart, so a shared machine's slow and fast minutes (neighbours, memory
    placement) hit both sides of each ratio; on our 2-core VM decode tok/s swings by up to 25 % between
    rounds, and this median moved by 0.05 between two runs where the ratio of medians moved by 0.2.

    Example:
        >>> paired_ratio(json.load(open("report.json")), "w4w2gateup", 128)  # doctest: +SKIP
        1.21
    """
    import statistics

    def runs(label: str) -> list[dict]:
        return next(r["runs"] for r in data["results"] if r["package"] == label and r["prompt_length"] == length)

    def speed(run: dict) -> float:
        return run["decode_tok_s"] if metric == "decode" else length / run["prefill_s"]

    base, mine = runs(data["packages"][0]["label"]), runs(package)
    return statistics.median(speed(m) / speed(b) for b, m in zip(base, mine))


def _pages(data: dict) -> str:
    """Which memory pages the sessions and the bandwidth probe used (older reports: 4 KiB, not recorded)."""
    thp = data["device"].get("transparent_huge_pages", "unknown")
    if data["settings"].get("huge_pages"):
        return f"weights and probe on transparent huge pages where granted (kernel mode `{thp}`)"
    return f"4 KiB pages (transparent huge pages `{thp}`, not asked for)"


def _mb(n: float) -> str:
    return f"{n / 1e6:.1f}"


def _opt(value, scale: float, fmt: str) -> str:
    """`value * scale` formatted, or `-` when the report does not have it (older reports, no held-out text)."""
    return "-" if value is None else format(value * scale, fmt)


def _threads(data: dict) -> str:
    """How many threads the run used: one count, or a sweep's counts (each package once per count)."""
    sweep = data["settings"].get("thread_sweep") or ()
    if sweep:
        return f"thread sweep {', '.join(map(str, sweep))} (every package once per count; probes with {max(sweep)})"
    return f"{data['device']['threads_used']} threads used"


def render_markdown(data: dict) -> str:
    """report.md: device, packages, and per prompt length a table with ratios against the first package."""
    dev, st = data["device"], data["settings"]
    lines = [f"# Throughput profile ({data['created']})", "",
             f"{dev['cpu_model']}, {dev['physical_cores']} cores ({dev['logical_cores']} logical), "
             f"{_threads(data)}, {dev['memory_gb']} GiB, {dev['os']}; onnxruntime "
             f"{dev['onnxruntime']}; measured read bandwidth {data['bandwidth_bytes_s'] / 1e9:.1f} GB/s{_probes(data)}.", "",
             f"Provider `{st['provider']}` (options {st['provider_options'] or 'default'}); prompt lengths "
             f"{', '.join(map(str, st['prompt_lengths']))}; {st['new_tokens']} new tokens; {st['repeats']} "
             f"interleaved repeats (medians), {st['warmup']} warm-up round(s); {_pages(data)}. Ratios are "
             f"against `{data['packages'][0]['label']}`, paired: the median over rounds of the two packages' "
             f"ratio within a round.", "",
             "| package | scheme | provider | threads | size MB | weights read/token MB | KV cache KB/position | "
             "MatMulNBits bits | peak RSS MB | parameters M | load s | perplexity |",
             "| --- | --- | --- | ---: | ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: |"]
    for p in data["packages"]:
        bits = ", ".join(f"{b}-bit x{n}" for b, n in p["matmulnbits_bits"].items()) or "none"
        config = ", ".join(f"{k}={v}" for k, v in (p.get("session_config") or {}).items())
        provider = p.get("provider", "") + (f" ({config})" if config else "")
        lines.append(f"| {p['label']} | {p['scheme']} | {provider} | {p.get('threads') or '-'} | {_mb(p['size_bytes'])} | "
                     f"{_mb(p['weight_bytes_per_token'])} | {p.get('kv_bytes_per_position', 0) / 1024:.1f} | {bits} | "
                     f"{_mb(p.get('peak_rss_bytes', 0))} | {_opt(p.get('parameters'), 1e-6, '.1f')} | "
                     f"{_opt(p.get('load_s'), 1, '.2f')} | {_opt((p.get('perplexity') or {}).get('perplexity'), 1, '.2f')} |")
    ppl = next((p["perplexity"] for p in data["packages"] if p.get("perplexity")), None)
    if ppl:
        lines += ["", f"Perplexity: {ppl['windows']} windows x {ppl['seq_len']} tokens of `{ppl['text']}`, each package "
                      f"through its own engine ({ppl['method']})."]
    if any(p.get("fell_back") for p in data["packages"]):
        lines += ["", "**Fell back to the CPU provider:** " +
                  "; ".join(f"{p['label']}: {p['fallback_reason']}" for p in data["packages"] if p.get("fell_back"))]
    first = data["packages"][0]["label"]
    for length in st["prompt_lengths"]:
        rows = [r for r in data["results"] if r["prompt_length"] == length]
        lines += ["", f"## Prompt {length} tokens", "",
                  "| package | prefill tok/s | vs first | decode tok/s | vs first | TTFT ms | p50 ms | p95 ms "
                  "| roofline tok/s | roofline share |",
                  "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for r in rows:
            lines.append(f"| {r['package']} | {r['prefill_tok_s']:.1f} | {paired_ratio(data, r['package'], length, 'prefill'):.2f}x "
                         f"| {r['decode_tok_s']:.1f} | {paired_ratio(data, r['package'], length):.2f}x "
                         f"| {1e3 * r['ttft_s']:.0f} | {1e3 * r['latency_p50_s']:.1f} | {1e3 * r['latency_p95_s']:.1f} "
                         f"| {r['roofline_tok_s']:.1f} | {100 * r['roofline_share']:.0f} % |")
    lines += ["", "Roofline: read bandwidth / (weight bytes per token + KV bytes at the mean decode context).", "",
              "![decode tokens/s](decode_tok_s.png) ![prefill tokens/s](prefill_tok_s.png)", ""]
    return "\n".join(lines)


def plot_report(data: dict, folder: str | Path) -> list[Path]:
    """decode_tok_s.png (with each package's roofline dashed) and prefill_tok_s.png, against prompt length."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = []
    for key, fname, title in (("decode_tok_s", PLOTS[0], "Decode tokens/s"),
                              ("prefill_tok_s", PLOTS[1], "Prefill tokens/s")):
        fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=100)
        for i, p in enumerate(data["packages"]):
            rows = sorted((r for r in data["results"] if r["package"] == p["label"]), key=lambda r: r["prompt_length"])
            xs = [r["prompt_length"] for r in rows]
            line, = ax.plot(xs, [r[key] for r in rows], marker="o", label=p["label"])
            if key == "decode_tok_s":
                ax.plot(xs, [r["roofline_tok_s"] for r in rows], linestyle="--", color=line.get_color(),
                        alpha=0.5, label=f"{p['label']} roofline")
        ax.set_xlabel("prompt length (tokens)")
        ax.set_ylabel("tokens/s")
        ax.set_title(f"{title} ({data['settings']['provider']}, {data['device']['threads_used']} threads)")
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = Path(folder) / fname
        fig.savefig(path)
        plt.close(fig)
        out.append(path)
    return out


def write_rows(rows: list[dict], folder: str | Path, stem: str = "report") -> list[Path]:
    """`rows` (dicts with the same keys) as STEM.csv and STEM.jsonl in `folder`; None is an empty CSV cell."""
    import csv

    folder = Path(folder)
    with open(folder / f"{stem}.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else [])
        writer.writeheader()
        writer.writerows(rows)
    (folder / f"{stem}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return [folder / f"{stem}.csv", folder / f"{stem}.jsonl"]


def write_report(data: dict, output: str | Path, overwrite: bool = False) -> Path:
    """Write report.json, report.md, report.csv, report.jsonl and the plots into a new folder `output`
    (all or nothing)."""
    from .report_fields import lab_rows

    with atomic_dir(output, overwrite) as tmp:
        (tmp / "report.json").write_text(json.dumps(data, indent=1))
        (tmp / "report.md").write_text(render_markdown(data))
        write_rows(lab_rows(data), tmp)
        plot_report(data, tmp)
    return Path(output)

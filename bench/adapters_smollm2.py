"""SmolLM2-135M W4/W2-GateUp with a Recover-LoRA adapter: no adapter vs side-car vs merged, side by side.

    python bench/adapters_smollm2.py --quantized out/recovery-smollm2/quantized --adapter out/recovery-smollm2/adapter

Steps, all in one run on this CPU:
1. export three cpu packages from the quantized checkpoint the adapter was trained against: `base` (no
   adapter), `sidecar` (LoRA nodes + .onnx_adapter) and `merged` (folded + re-quantized, `--merge-method`),
   each verified against its torch reference (parity recorded);
2. perplexity of each package under ONNX Runtime (shipped graph, `verify.ort_perplexity`) on the same
   windows of held-out Shakespeare (`fetch.eval_text`), next to torch figures: the fp32 teacher, the
   quantized model and the quantized model + PEFT adapter; the recovery share of each row is the part of
   the cross-entropy gap between `base` and the teacher it closes;
3. decode tokens/s of the three packages with the runtime profiler (one worker per package, interleaved
   rounds in rotated order, medians).
Output: docs/results/adapters-smollm2.json, .md and .png.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ROWS = ("base", "sidecar", "merged")


def _export(args, work: Path) -> dict[str, Path]:
    from edge_recover.exporters.api import export_package

    text = _text(args)
    out = {}
    for row in ROWS:
        t = time.time()
        extra = {} if row == "base" else {"adapter": args.adapter, "adapter_mode": "sidecar" if row == "sidecar" else "merge",
                                          "adapter_name": "recovery"}
        if row == "merged":
            extra.update(merge_method=args.merge_method, merge_calibration=args.merge_calibration, eval_text=text)
        out[row] = export_package(_quantized(args), work / row, target="cpu", overwrite=True, **extra)
        print(f"exported {row} in {time.time() - t:.0f} s", flush=True)
    return out


def _shown(path: Path) -> str:
    """`path` relative to the repo when it is inside it (reports are committed)."""
    p = Path(path).resolve()
    return str(p.relative_to(ROOT)) if p.is_relative_to(ROOT) else str(path)


def _quantized(args):
    """The checkpoint, loaded afresh (a slim one takes its kept tensors from the teacher)."""
    from edge_recover.models import load_model

    return load_model(args.quantized, base=args.teacher)


def _text(args) -> str:
    from edge_recover.fetch import eval_text

    return eval_text()


def _torch_figures(args, windows) -> dict:
    """Teacher (fp32), quantized and quantized + PEFT adapter perplexity in torch on `windows`."""
    import torch

    from edge_recover.evaluate import evaluate
    from edge_recover.models import load_model
    from edge_recover.pipeline import resolve_model
    from peft import PeftModel

    teacher = resolve_model(args.teacher)
    q = load_model(args.quantized, base=teacher)
    out = {"teacher_source_hash_matches": teacher.source_hash == q.source_hash}
    with torch.no_grad():
        out["teacher"] = evaluate(teacher.model, windows, progress=False).perplexity
        del teacher
        out["quantized"] = evaluate(q.model, windows, progress=False).perplexity
        peft = PeftModel.from_pretrained(q.model, str(args.adapter)).eval()
        out["quantized_peft"] = evaluate(peft, windows, progress=False).perplexity
    return out


def _share(ppl_teacher: float, ppl_base: float, ppl: float) -> float:
    gap = math.log(ppl_base) - math.log(ppl_teacher)
    return 100.0 * (math.log(ppl_base) - math.log(ppl)) / gap if gap > 0 else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quantized", type=Path, default=ROOT / "out/recovery-smollm2/quantized",
                    help="quantized checkpoint the adapter was trained against")
    ap.add_argument("--adapter", type=Path, default=ROOT / "out/recovery-smollm2/adapter")
    ap.add_argument("--teacher", default="smollm2", help="full-precision model for the recovery share")
    ap.add_argument("--merge-method", default=None, help="rtn, mse or gptq (default: the adapter's method)")
    ap.add_argument("--merge-calibration", type=int, default=None)
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--prompt-length", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--work", type=Path, default=ROOT / "out/bench-adapters")
    ap.add_argument("--out", type=Path, default=ROOT / "docs/results/adapters-smollm2")
    ap.add_argument("--label", default="", help="a note on which adapter this is (recorded)")
    args = ap.parse_args()

    import torch

    from edge_recover.evaluate import token_windows
    from edge_recover.exporters.api import read_package_manifest
    from edge_recover.exporters.verify import ort_perplexity
    from edge_recover.runtimes.package import folder_size
    from edge_recover.runtimes.profiler import PackageEntry, ProfileSettings, profile_packages

    torch.set_num_threads(args.threads)
    t0 = time.time()
    pkgs = _export(args, args.work)
    manifests = {r: read_package_manifest(p) for r, p in pkgs.items()}
    tok = _quantized(args).tokenizer
    windows = token_windows(tok, _text(args), args.seq_len, args.windows)
    ppl = {}
    for row, p in pkgs.items():
        ppl[row], tokens = ort_perplexity(p / "model.onnx", windows.numpy(), threads=args.threads)
        print(f"{row}: ORT perplexity {ppl[row]:.2f} on {tokens} tokens", flush=True)
    torch_ppl = _torch_figures(args, windows)
    print(f"torch: {torch_ppl}", flush=True)
    settings = ProfileSettings(prompt_lengths=[args.prompt_length], new_tokens=args.new_tokens, repeats=args.repeats,
                               threads=args.threads)
    report = profile_packages([PackageEntry(str(p), label=r) for r, p in pkgs.items()], settings,
                              args.work / "profile", overwrite=True, log=lambda s: print(s, flush=True))
    speed = {r["package"]: r for r in report.data["results"]}
    rows = []
    for row in ROWS:
        m = manifests[row]
        rows.append({
            "package": row, "perplexity_ort": ppl[row],
            "recovery_share_pct": _share(torch_ppl["teacher"], ppl["base"], ppl[row]) if row != "base" else 0.0,
            "decode_tok_s": speed[row]["decode_tok_s"], "prefill_tok_s": speed[row]["prefill_tok_s"],
            "decode_runs": [x["decode_tok_s"] for x in speed[row]["runs"]],
            "decode_vs_base": speed[row]["decode_tok_s"] / speed["base"]["decode_tok_s"],
            "package_mb": round(folder_size(pkgs[row]) / 1e6, 1),
            "nodes_lora": sum(len(v["nodes"]) for v in (m.get("lora") or {}).get("layers", {}).values()),
            "parity_exact": m["parity"]["exact"], "parity_shipped": {k: m["parity"][k] for k in ("top1_agreement", "max_abs_diff")},
        })
    adapter_meta = manifests["sidecar"]["adapters"][0]
    result = {
        "model": "SmolLM2-135M-Instruct (Q4_1 GGUF -> fp32 teacher)", "label": args.label,
        "quantized": _shown(args.quantized), "adapter": _shown(args.adapter),
        "scheme": manifests["base"]["scheme"], "method": manifests["base"]["method"],
        "adapter_source": adapter_meta["source"], "rank_layout": sorted(set(adapter_meta["rank_layout"].values())),
        "adapted_layers": len(adapter_meta["rank_layout"]),
        "eval": {"text": "Hamlet + Macbeth (fetch.eval_text)", "windows": args.windows, "seq_len": args.seq_len,
                 "tokens": tokens},
        "torch_perplexity": torch_ppl, "rows": rows,
        "merge": manifests["merged"]["adapters"][0]["merge"],
        "profile": {"prompt_length": args.prompt_length, "new_tokens": args.new_tokens, "repeats": args.repeats,
                    "threads": args.threads, "device": report.data["device"],
                    "bandwidth_bytes_s": report.data["bandwidth_bytes_s"]},
        "versions": manifests["base"]["versions"], "seconds": round(time.time() - t0),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    # package manifests record absolute paths; the committed report names them from the repo root
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=2).replace(f"{ROOT}/", ""))
    args.out.with_suffix(".md").write_text(_markdown(result))
    _plot(result, args.out.with_suffix(".png"))
    print(_markdown(result))


def _markdown(r: dict) -> str:
    t = r["torch_perplexity"]
    lines = [f"# Adapters on SmolLM2-135M ({r['scheme'].get('name')}, {r['method']})", "",
             f"Adapter: {r['adapter']} (rank {'/'.join(map(str, r['rank_layout']))} on {r['adapted_layers']} layers). "
             f"{r['label']}", "",
             f"Perplexity on {r['eval']['tokens']} tokens ({r['eval']['windows']} x {r['eval']['seq_len']}, "
             f"{r['eval']['text']}); decode: prompt {r['profile']['prompt_length']}, {r['profile']['new_tokens']} new "
             f"tokens, {r['profile']['threads']} threads, medians of {r['profile']['repeats']} interleaved rounds.", "",
             "| package | ORT perplexity | recovery share | decode tok/s | vs base | prefill tok/s | size MB | LoRA nodes |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for row in r["rows"]:
        lines.append(f"| {row['package']} | {row['perplexity_ort']:.2f} | {row['recovery_share_pct']:.1f} % | "
                     f"{row['decode_tok_s']:.1f} | {row['decode_vs_base']:.2f}x | {row['prefill_tok_s']:.0f} | "
                     f"{row['package_mb']} | {row['nodes_lora']} |")
    m = r["merge"]
    lines += ["", f"Torch on the same windows: fp32 teacher {t['teacher']:.2f}, quantized {t['quantized']:.2f}, "
                  f"quantized + PEFT adapter {t['quantized_peft']:.2f} (teacher hash matches: "
                  f"{t['teacher_source_hash_matches']}).", "",
              f"Merge ({m['merge']['method']}, {m['merge']['calibration_samples']} calibration samples): "
              f"{100 * m['merge']['codes_changed']:.1f} % of the codes changed; on {m['tokens']} tokens the merged "
              f"model keeps {m['recovery_kept_ce_pct']:.1f} % of the adapter's cross-entropy gain and "
              f"{m['recovery_kept_kl_pct']:.1f} % by KL to the recovered model."]
    return "\n".join(lines) + "\n"


def _plot(r: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [row["package"] for row in r["rows"]]
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.4))
    a.bar(names, [row["perplexity_ort"] for row in r["rows"]], color=["#999", "#3a7", "#37a"])
    a.axhline(r["torch_perplexity"]["teacher"], ls="--", c="k", lw=1, label="fp32 teacher")
    a.set_ylabel("perplexity (ORT)")
    a.legend()
    b.bar(names, [row["decode_tok_s"] for row in r["rows"]], color=["#999", "#3a7", "#37a"])
    b.set_ylabel("decode tok/s (median)")
    fig.suptitle(f"SmolLM2-135M {r['scheme'].get('name')}: no adapter / side-car / merged")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    sys.exit(main())

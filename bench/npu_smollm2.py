"""SmolLM2-135M W4/W2-GateUp on the QNN HTP emulator: compile, greedy tokens vs the CPU EP, where fp16 error enters.

    python bench/npu_smollm2.py --package out/npu-smollm2          # reuse a package of `export --target qnn`
    python bench/npu_smollm2.py --export out/npu-smollm2           # export it first (rtn, context 64, window 16)

Writes docs/results/npu-smollm2.json and .md. Emulator times are Qualcomm's x86 emulator of the HTP, not NPU
speed. The layer study runs one decode step (the cache filled by the CPU run of the prompt) on the HTP and the
CPU EP with the residual stream after every decoder layer exposed as graph outputs, once per numerics variant
of the static graph (exporters/static_options.py NUMERICS), so it shows in which layer the error enters and
what each fp16 fix removes.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "What is the capital of France?"


def _export(out: Path, context: int, window: int, soc: str) -> float:
    from edge_recover.exporters.api import export_package
    from edge_recover.exporters.static_options import StaticOptions

    t = time.time()
    export_package("smollm2", out, scheme="w4w2gateup", target="qnn", method="rtn", calibration=0,
                   static=StaticOptions(context, window, soc=soc))
    return time.time() - t


def _greedy(pkg: Path, provider: str, ids: list[int], n: int) -> dict:
    from edge_recover.runtimes.static_session import StaticCausalLM

    t = time.time()
    lm = StaticCausalLM(pkg, provider, threads=2)
    load = time.time() - t
    cache = lm.empty_cache()
    t = time.time()
    logits, cache = lm.prefill(np.asarray([ids]), cache)
    prefill = time.time() - t
    tokens, steps, rows = [int(np.argmax(logits))], [], [logits]
    while len(tokens) < n:
        t = time.time()
        logits, cache = lm.step(np.asarray([[tokens[-1]]]), cache)
        steps.append(time.time() - t)
        tokens.append(int(np.argmax(logits)))
        rows.append(logits)
    return {"tokens": tokens, "load_s": load, "prefill_s": prefill, "step_s": steps, "logits": np.stack(rows)}


def _probes(graph, layers: int) -> list[str]:
    names = {o for n in graph.graph.node for o in n.output}
    out = []
    for i in range(layers):
        for t in (f"/model/layers.{i}/input_layernorm/ReduceMean_output_0", f"/model/layers.{i}/Add_1_output_0"):
            if t in names:
                out.append(t)
    return out + [t for t in ("/model/norm/Mul_1_output_0",) if t in names]


def _layer_study(pkg: Path, ids: list[int], variants: dict, soc: str, role: str = "decode") -> dict:
    """One step per numerics variant: `role` decode = the last token of `ids` after the others (cache from
    the CPU static prefill); prefill = the first window of `ids` on an empty cache."""
    import onnx
    import onnxruntime as ort
    from onnx import helper

    from edge_recover.exporters.static_graph import static_graph
    from edge_recover.exporters.static_options import StaticOptions
    from edge_recover.qnn import open_htp_session, resolve_soc
    from edge_recover.runtimes.static_session import StaticCausalLM

    st = json.loads((pkg / "manifest.json").read_text())["static"]
    cfg = json.loads((pkg / "config.json").read_text())
    cpu = StaticCausalLM(pkg, "cpu", threads=2)
    cache = cpu.empty_cache()
    _, cache = cpu.prefill(np.asarray([ids[:-1]]), cache)
    c, w = st["context_length"], st["window"]
    from edge_recover.contract import static_window

    step_ids, step_pos = static_window([ids[-1]], len(ids) - 1, 1)  # sdk/contract.py: slot = position
    feeds = {"input_ids": step_ids, "position_ids": step_pos, **cache.values}
    if role == "prefill":
        n = min(w, len(ids))
        win_ids, win_pos = static_window(ids[:n], 0, w)  # padded at the front
        feeds = {"input_ids": win_ids, "position_ids": win_pos, **{k: np.zeros_like(v) for k, v in cache.values.items()}}
    out = {}
    for name, numerics in variants.items():
        opts = StaticOptions(c, w, soc=soc, numerics=tuple(numerics))
        g = static_graph(pkg / "model.onnx", opts, w if role == "prefill" else 1)
        probes = _probes(g, int(cfg["num_hidden_layers"]))
        g.graph.output.extend(helper.make_tensor_value_info(p, onnx.TensorProto.FLOAT, None) for p in probes)
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "probe.onnx"
            onnx.save_model(g, str(path), save_as_external_data=True, location="probe.data", size_threshold=1024)
            so = ort.SessionOptions()
            so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC  # as the runtime's CPU path
            ref = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"]).run(["logits", *probes], feeds)
            t = time.time()
            sess = open_htp_session(path, resolve_soc(soc))
            compile_s = time.time() - t
            t = time.time()
            got = sess.run(["logits", *probes], feeds)
            run_s = time.time() - t
        rows = []
        if role == "prefill":  # the real rows only
            ref, got = [a[:, w - n:] for a in ref], [b[:, w - n:] for b in got]
        for p, a, b in zip(["logits", *probes], ref, got):
            rows.append({"tensor": p, "cpu_absmax": float(np.abs(a).max()),
                         "max_abs_diff": float(np.nan_to_num(np.abs(a - b), nan=np.inf).max()),
                         "rel_l2": float(np.linalg.norm((a - b).ravel()) / max(np.linalg.norm(a.ravel()), 1e-12)),
                         "nonfinite_on_htp": int((~np.isfinite(b)).sum())})
        out[name] = {"role": role, "numerics": list(numerics), "compile_s": compile_s, "emulator_step_s": run_s, "rows": rows,
                     "top1_agreement": float((ref[0].argmax(-1) == got[0].argmax(-1)).mean())}
        print(f"[{name}] logits max diff {rows[0]['max_abs_diff']:.3g} (scale {rows[0]['cpu_absmax']:.3g}), "
              f"compile {compile_s:.1f} s, step {run_s:.1f} s", file=sys.stderr)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--package", type=Path, help="an existing qnn package of SmolLM2")
    ap.add_argument("--export", type=Path, help="export the package here first")
    ap.add_argument("--context-length", type=int, default=64)
    ap.add_argument("--window", type=int, default=16)
    ap.add_argument("--soc", default="SM8650")
    ap.add_argument("--new-tokens", type=int, default=8)
    ap.add_argument("--no-layers", action="store_true", help="skip the layer study")
    ap.add_argument("--layers-only", action="store_true", help="only the layer study (no greedy runs)")
    ap.add_argument("--layer-role", default="decode", choices=("decode", "prefill"))
    ap.add_argument("--variants", default="none;rotary tables,finite mask;all",
                    help="numerics variants for the layer study, ';'-separated lists of pass names (none, all)")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "results" / "npu-smollm2.json")
    args = ap.parse_args()
    from tokenizers import Tokenizer

    from edge_recover.runtimes.chat import render_chat

    pkg = args.package or args.export
    result = {"command": " ".join(["python", "bench/npu_smollm2.py", *sys.argv[1:]]), "prompt": PROMPT}
    if args.export:
        result["export_s"] = _export(args.export, args.context_length, args.window, args.soc)
    manifest = json.loads((pkg / "manifest.json").read_text())
    v = manifest["static"]["verified"]
    result["verified"] = v
    text = render_chat(pkg, [{"role": "user", "content": PROMPT}])
    ids = Tokenizer.from_file(str(pkg / "tokenizer.json")).encode(text, add_special_tokens=False).ids
    result["prompt_tokens"] = len(ids)
    if args.layers_only:
        result["layers"] = _layer_study(pkg, ids, _variants(args.variants), args.soc, args.layer_role)
        _write(args.out, result)
        return
    runs = {p: _greedy(pkg, p, ids, args.new_tokens) for p in ("cpu", "qnn")}
    diff = np.abs(runs["cpu"]["logits"] - runs["qnn"]["logits"])
    result["greedy"] = {p: {k: r[k] for k in ("tokens", "load_s", "prefill_s", "step_s")} for p, r in runs.items()}
    result["greedy"]["tokens_equal"] = runs["cpu"]["tokens"] == runs["qnn"]["tokens"]
    result["greedy"]["first_divergence"] = next((i for i, (a, b) in enumerate(zip(runs["cpu"]["tokens"],
                                                 runs["qnn"]["tokens"])) if a != b), None)
    result["greedy"]["logits_max_abs_diff"] = float(diff.max())
    result["greedy"]["logit_scale"] = float(np.abs(runs["cpu"]["logits"]).max())
    print(json.dumps(result["greedy"], indent=1), file=sys.stderr)
    if not args.no_layers:
        result["layers"] = _layer_study(pkg, ids, _variants(args.variants), args.soc, args.layer_role)
    _write(args.out, result)


def _variants(text: str) -> dict:
    from edge_recover.exporters.static_options import NUMERICS

    out = {}
    for item in text.split(";"):
        item = item.strip()
        out[item] = NUMERICS if item == "all" else () if item == "none" else tuple(x.strip() for x in item.split(","))
    return out


def _write(path: Path, result: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1))
    path.with_suffix(".md").write_text(_markdown(result))
    print(f"wrote {path} and {path.with_suffix('.md')}", file=sys.stderr)


def _markdown(r: dict) -> str:
    v, g = r["verified"], r.get("greedy")
    lines = [f"# SmolLM2-135M W4/W2-GateUp on the QNN HTP emulator", "", f"Command: `{r['command']}`", "",
             f"SoC {v['soc']['name']} ({v['soc']['marketing']}), {v['backend']}, CPU fallback disabled, "
             f"{v['nodes_on_npu_pct']:.0f} % of nodes on the NPU. All times are emulator times on a 2-core x86 "
             f"CPU, not NPU speed.", "", "| graph | nodes | compile s | context binary MB | reload s |",
             "|---|---:|---:|---:|---:|"]
    for role, x in v["graphs"].items():
        ctx = (v.get("contexts") or {}).get(role, {})
        lines.append(f"| {role} | {x['graph_nodes']} | {x['compile_seconds']:.1f} | "
                     f"{ctx.get('binary_bytes', 0) / 1e6:.1f} | {ctx.get('load_seconds', float('nan')):.2f} |")
    q = g["qnn"] if g else None
    lines += [] if not g else ["", f"Chat prompt {r['prompt']!r} ({r['prompt_tokens']} tokens), {len(g['cpu']['tokens'])} greedy tokens:",
              f"- CPU EP (same static package): {g['cpu']['tokens']}",
              f"- QNN HTP emulator: {q['tokens']} (equal: {g['tokens_equal']}; logits max abs diff "
              f"{g['logits_max_abs_diff']:.3g} at logit scale {g['logit_scale']:.3g})",
              f"- emulator time: prefill {q['prefill_s']:.1f} s, decode step median "
              f"{float(np.median(q['step_s'])) if q['step_s'] else float('nan'):.1f} s"]
    for name, s in (r.get("layers") or {}).items():
        lines += ["", f"## One {s['role']} step, {name} ({', '.join(s['numerics']) or 'none'}): compile "
                      f"{s['compile_s']:.1f} s, step {s['emulator_step_s']:.1f} s, top-1 agreement {s['top1_agreement']:.0%}", "",
                  "| tensor | CPU abs max | HTP max abs diff | rel L2 | non-finite on HTP |", "|---|---:|---:|---:|---:|"]
        lines += [f"| {x['tensor']} | {x['cpu_absmax']:.4g} | {x['max_abs_diff']:.3g} | {x['rel_l2']:.3g} | "
                  f"{x['nonfinite_on_htp']} |" for x in s["rows"]]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()

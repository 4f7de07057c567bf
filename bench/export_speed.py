"""Package size and decode speed: our W4 and W4/W2-GateUp packages against onnxruntime-genai's builder int4.

    nice python bench/export_speed.py --model smollm2 --model qwen3-1.7b-shape [--rounds 3]

For each model, builds (once, cached under out/bench-export/) the packages
- `ours-w4`, `ours-w4w2gateup`: `export_package(..., target="cpu")` (block 64, accuracy_level 4; rtn, since
  speed does not depend on the method), lm_head kept in fp32 as the named schemes do;
- `ours-*+head8`: the same with the lm_head as 8-bit MatMulNBits (`--rule lm_head=8`);
- `builder-int4`: `python -m onnxruntime_genai.models.builder -p int4 -e cpu` (its defaults, fused graph);
then loads every package in onnxruntime-genai 0.18 (one process, the separate venv .venv-genai, created here
when missing) and measures them interleaved: per round and package a 128-token prompt (prefill) then 64
greedy tokens (decode); medians over rounds. Writes docs/results/export-speed.json.

`qwen3-1.7b-shape` is Qwen3-1.7B's config (hidden 2048, 28 layers, MLP 6144, vocab 151936, tied) with
random weights; SmolLM2's tokenizer is put beside it (the builder wants one; token ids are fed directly).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / "out" / "bench-export"
GENAI_VENV = ROOT / ".venv-genai"
GENAI_PKGS = ["torch==2.13.0", "transformers>=5,<6", "onnxruntime-genai==0.18.0", "onnx", "onnx-ir", "onnxscript", "safetensors", "protobuf"]
VARIANTS = {"ours-w4": ("w4", []), "ours-w4w2gateup": ("w4w2gateup", []),
            "ours-w4+head8": ("w4", ["lm_head=8"]), "ours-w4w2gateup+head8": ("w4w2gateup", ["lm_head=8"])}

SPEED_SCRIPT = r"""
import json, statistics, sys, time
import numpy as np, onnxruntime_genai as og
pkgs, rounds, prompt_len, gen_len = json.loads(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
models = {name: og.Model(path) for name, path in pkgs.items()}
rng = np.random.default_rng(0)
prompt = rng.integers(100, 20000, prompt_len).astype(np.int32)
res = {n: {"prefill": [], "decode": []} for n in models}
for r in range(rounds + 1):  # round 0 warms up
    for name, model in models.items():
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=prompt_len + gen_len, do_sample=False)
        gen = og.Generator(model, params)
        t0 = time.perf_counter(); gen.append_tokens(prompt); t1 = time.perf_counter()
        n = 0
        while not gen.is_done() and n < gen_len:
            gen.generate_next_token(); n += 1
        t2 = time.perf_counter()
        if r:
            res[name]["prefill"].append(prompt_len / (t1 - t0)); res[name]["decode"].append((n - 1) / (t2 - t1) if n > 1 else 0)
        del gen
print(json.dumps({n: {k: statistics.median(v) for k, v in d.items()} | {"decode_runs": d["decode"]} for n, d in res.items()}))
"""


def genai_python() -> Path:
    """The onnxruntime-genai venv's python, created on first use (transformers 5.x lives only there)."""
    py = GENAI_VENV / "bin" / "python"
    if not py.exists():
        subprocess.run([sys.executable, "-m", "venv", str(GENAI_VENV)], check=True)
        subprocess.run([str(py), "-m", "pip", "install", "-q", *GENAI_PKGS], check=True)
    return py


def model_dir(name: str) -> Path:
    """A HF folder for `name`: SmolLM2 (fetched) or the random Qwen3-1.7B-shaped model (made once)."""
    from edge_recover.fetch import fetch_smollm2

    smol = fetch_smollm2()
    if name == "smollm2":
        return smol
    out = WORK / "qwen3-1.7b-shape"
    if not (out / "config.json").exists():
        import torch
        from transformers import AutoTokenizer, Qwen3Config, Qwen3ForCausalLM

        cfg = Qwen3Config(vocab_size=151936, hidden_size=2048, intermediate_size=6144, num_hidden_layers=28,
                          num_attention_heads=16, num_key_value_heads=8, head_dim=128, max_position_embeddings=40960,
                          tie_word_embeddings=True, rope_theta=1000000.0, rms_norm_eps=1e-6)
        torch.manual_seed(0)
        with torch.device("cpu"):
            model = Qwen3ForCausalLM(cfg).to(torch.bfloat16)
        model.save_pretrained(out)
        AutoTokenizer.from_pretrained(smol).save_pretrained(out)
        del model
    return out


def export_ours(src: Path, dst: Path, scheme: str, rules: list[str]) -> None:
    """Export in a child process, so each large model's memory is returned before the next."""
    code = ("import sys; from edge_recover.exporters.api import export_package; from edge_recover.scheme import load_scheme;"
            "export_package(sys.argv[1], sys.argv[2], scheme=load_scheme(sys.argv[3], sys.argv[4:]), target='cpu',"
            " method='rtn', calibration=0, verify=(sys.argv[1].endswith('smollm2-135m')))")
    subprocess.run(["nice", sys.executable, "-c", code, str(src), str(dst), scheme, *rules], check=True)


def export_builder(src: Path, dst: Path) -> None:
    py = genai_python()
    subprocess.run(["nice", str(py), "-m", "onnxruntime_genai.models.builder", "-m", str(src), "-o", str(dst),
                    "-p", "int4", "-e", "cpu", "-c", str(WORK / "hf-cache")], check=True)


def size_mb(folder: Path) -> float:
    return round(sum(f.stat().st_size for f in folder.iterdir() if f.suffix in {".onnx", ".data"}) / 1e6, 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", action="append", choices=["smollm2", "qwen3-1.7b-shape"])
    ap.add_argument("--variant", action="append", choices=[*VARIANTS, "builder-int4"])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--gen-len", type=int, default=64)
    ap.add_argument("--out", default=str(ROOT / "docs/results/export-speed.json"))
    args = ap.parse_args()
    variants = args.variant or [*VARIANTS, "builder-int4"]
    results = json.loads(Path(args.out).read_text()) if Path(args.out).exists() else {}
    for name in args.model or ["smollm2"]:
        src = model_dir(name)
        pkgs = {}
        for v in variants:
            dst = WORK / name / v
            if not (dst / "genai_config.json").exists():
                print(f"building {name}/{v}", flush=True)
                if v == "builder-int4":
                    export_builder(src, dst)
                else:
                    export_ours(src, dst, *VARIANTS[v])
            pkgs[v] = str(dst)
        proc = subprocess.run(["nice", str(genai_python()), "-c", SPEED_SCRIPT, json.dumps(pkgs), str(args.rounds),
                               str(args.prompt_len), str(args.gen_len)], capture_output=True, text=True)
        if proc.returncode:
            raise SystemExit(proc.stderr[-3000:])
        speed = json.loads(proc.stdout.strip().splitlines()[-1])
        for v in variants:
            speed[v]["size_mb"] = size_mb(Path(pkgs[v]))
        base = speed.get("ours-w4", {}).get("decode")
        for v in variants:
            if base:
                speed[v]["decode_vs_ours_w4"] = round(speed[v]["decode"] / base, 3)
        results[name] = {"packages": speed, "rounds": args.rounds, "prompt_len": args.prompt_len,
                         "gen_len": args.gen_len, "cpu": os.cpu_count(), "runtime": "onnxruntime-genai 0.18.0"}
        print(json.dumps(results[name], indent=2), flush=True)
        Path(args.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()

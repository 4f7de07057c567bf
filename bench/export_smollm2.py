"""SmolLM2-135M: package perplexity under ONNX Runtime vs the torch quantized model, and text from
onnxruntime-genai loading the package unchanged.

    python bench/export_smollm2.py [--scheme w4w2gateup] [--windows 8] [--kv-dtype float16] [--rule lm_head=8]
                                   [--float-embedding] [--out FILE.json]

Steps: fetch SmolLM2 (once), quantize under the scheme for the cpu target (mse, 16 calibration samples),
export a package, score the same token windows of held-out Shakespeare with torch and with ORT (the
shipped graph, accuracy_level 4, and a copy at accuracy_level 0 = exact fp32 dequantization), then run
onnxruntime-genai (separate venv, see bench/export_speed.py) on the package to generate a few sentences.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from edge_recover.options import DEFAULT_SCHEME

ROOT = Path(__file__).resolve().parents[1]
GENAI_PY = ROOT / ".venv-genai" / "bin" / "python"
PROMPTS = ["The capital of France is", "Once upon a time, there was a little girl who",
           "<|im_start|>user\nWhat is the tallest mountain in the world?<|im_end|>\n<|im_start|>assistant\n"]

GENAI_SCRIPT = r"""
import json, sys, onnxruntime_genai as og
model = og.Model(sys.argv[1]); tok = og.Tokenizer(model); out = []
for prompt in json.loads(sys.argv[2]):
    params = og.GeneratorParams(model); params.set_search_options(max_length=int(sys.argv[3]), do_sample=False)
    gen = og.Generator(model, params); gen.append_tokens(tok.encode(prompt))
    while not gen.is_done(): gen.generate_next_token()
    out.append(tok.decode(gen.get_sequence(0)))
print(json.dumps(out))
"""


def genai_generate(package: Path, prompts: list[str], max_length: int = 48) -> list[str]:
    """Generate greedily with onnxruntime-genai from `package` (needs .venv-genai; see export_speed.py)."""
    proc = subprocess.run([str(GENAI_PY), "-c", GENAI_SCRIPT, str(package), json.dumps(prompts), str(max_length)],
                          capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise RuntimeError(f"onnxruntime-genai failed: {proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scheme", default=DEFAULT_SCHEME)
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--kv-dtype", default="float32", help="float32, float16 or int8 (the package's KV cache)")
    ap.add_argument("--rule", action="append", default=[], help="scheme rule, e.g. lm_head=8 (repeatable)")
    ap.add_argument("--float-embedding", action="store_true", help="keep the tied embedding as a float32 table")
    ap.add_argument("--out", default=str(ROOT / "docs/results/export-smollm2-parity.json"))
    args = ap.parse_args()

    import torch

    from edge_recover.evaluate import evaluate, token_windows
    from edge_recover.exporters.api import export_package, read_package_manifest
    from edge_recover.exporters.verify import ort_perplexity, with_accuracy_level
    from edge_recover.fetch import eval_text
    from edge_recover.pipeline import resolve_model

    torch.set_num_threads(2)
    lm = resolve_model("smollm2")
    windows = token_windows(lm.tokenizer, eval_text(), args.seq_len, args.windows)
    with tempfile.TemporaryDirectory(prefix="export-smollm2-") as tmp:
        from edge_recover.scheme import load_scheme

        pkg = export_package(lm, Path(tmp) / "pkg", scheme=load_scheme(args.scheme, args.rule), target="cpu",
                             kv_dtype=args.kv_dtype, share_embedding=not args.float_embedding)  # quantizes lm in place
        manifest = read_package_manifest(pkg)
        ppl_torch = evaluate(lm.model, windows, progress=False).perplexity
        ppl_ort4, tokens = ort_perplexity(pkg / "model.onnx", windows.numpy())
        (Path(tmp) / "acc0").mkdir()
        ppl_ort0, _ = ort_perplexity(with_accuracy_level(pkg / "model.onnx", 0, Path(tmp) / "acc0"), windows.numpy())
        texts = genai_generate(pkg, PROMPTS)
        size = sum(f.stat().st_size for f in pkg.iterdir())
    result = {
        "model": "SmolLM2-135M-Instruct (Q4_1 GGUF -> fp32)", "scheme": args.scheme, "target": "cpu",
        "kv_dtype": args.kv_dtype, "rules": args.rule, "embedding": manifest["embedding"],
        "block_size": manifest["target"]["preferred_block_size"], "method": manifest["method"],
        "tokens": tokens, "seq_len": args.seq_len,
        "perplexity": {"torch_quantized": ppl_torch, "ort_accuracy_level_4": ppl_ort4, "ort_accuracy_level_0": ppl_ort0},
        "relative_diff_pct": {"accuracy_level_4": 100 * (ppl_ort4 / ppl_torch - 1),
                              "accuracy_level_0": 100 * (ppl_ort0 / ppl_torch - 1)},
        "parity": manifest["parity"], "package_mb": round(size / 1e6, 1),
        "genai_texts": dict(zip(PROMPTS, texts)),
        "versions": manifest["versions"],
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    sys.exit(main())

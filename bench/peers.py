"""Benchmark: our packages against what CPU and ONNX users pick, in one interleaved run, same machine.

    nice .venv/bin/python bench/peers.py                                   # SmolLM2, the real figures (5 rounds)
    nice .venv/bin/python bench/peers.py --rounds 1 --prompt-lengths 32 --new-tokens 16 --eval-windows 1 --tag smoke
    nice .venv/bin/python bench/peers.py --model qwen2.5-coder-1.5b --package w4w2=out/q15-w4w2 --package w4=out/q15-w4

`--model` is `smollm2` (the default, below) or a model that ships as a GGUF file (an edge-recover model name
such as `qwen2.5-coder-1.5b`, or a path to a .gguf): then llama.cpp runs the shipped file as it is
(`llama.cpp-Q4_K_M-shipped`) beside files that llama.cpp's own quantizer makes from it (`--gguf`, default
shipped,Q4_0,Q2_K,IQ2_M; bench/peers_gguf.py: an F32 copy first, an importance matrix for the IQ2 types),
our packages come from `--package LABEL=PATH` (made by `edge-recover export MODEL ...`), and the GGUF entries'
perplexity uses a tokenizer.json made from the GGUF's own vocabulary.

In the run, each with its accuracy (held-out Shakespeare perplexity through its own runtime):
- ours: edge-recover packages (`--ours`, variant names of bench/profile_models.py: `w4w2gateup` is today's
  default package, `-head4` a 4-bit lm_head with the shared embedding, `-2b128` the 2-bit layers at block
  128), each run twice: by edge-recover's runtime (`ort`) and by onnxruntime-genai (`genai`), same folder;
  `--package LABEL=PATH` adds packages made elsewhere (e.g. the integer-exact recovery's);
- onnxruntime-genai's model builder int4 (`-p int4 -e cpu`, its defaults), built in its own venv
  (transformers 5: EDGE_RECOVER_BENCH_GENAI_PYTHON, default .venv-genai), run by onnxruntime-genai;
- llama.cpp: Q4_0, Q4_K_M and Q2_K GGUFs made by llama.cpp's own quantizer from an F32 GGUF of the same HF
  weights (llama.cpp's convert_hf_to_gguf.py from EDGE_RECOVER_PEERS_LLAMA_SRC, a llama.cpp tree, run by
  EDGE_RECOVER_PEERS_CONVERT_PYTHON: torch, transformers, sentencepiece; default the builder's venv), run by
  llama-cpp-python in the interpreter EDGE_RECOVER_PEERS_LLAMA_PYTHON.
A peer that is not installed is listed as "not installed" with the command that installs it, never dropped
silently. Every runtime gets the same threads, the same random prompts of exactly each prompt length, the
same greedy loop (runtimes/worker.py), rotated order per round; ratios are paired per round (the profiler's).
Output: docs/results/peers-MODEL[-TAG].{json,md,png,csv} (the JSON holds the whole profile report).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np

from edge_recover.options import defaults

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
import peers_gguf as pg  # noqa: E402  (llama.cpp's quantizer and importance matrix, for GGUF-shipped models)
import profile_models as pm  # noqa: E402  (its package builder and builder-venv settings)

WORK = Path(os.environ.get("EDGE_RECOVER_PEERS_WORK", REPO / "out" / "bench" / "peers"))
LLAMA_PY = os.environ.get("EDGE_RECOVER_PEERS_LLAMA_PYTHON", str(REPO / ".venv-llama" / "bin" / "python"))
LLAMA_SRC = os.environ.get("EDGE_RECOVER_PEERS_LLAMA_SRC", str(REPO / "out" / "llama.cpp"))
# the converter wants torch, transformers and sentencepiece (it tries a SentencePiece vocabulary first)
CONVERT_PY = os.environ.get("EDGE_RECOVER_PEERS_CONVERT_PYTHON", str(pm.GENAI_PY))
GGUF_TYPES = {"Q4_0": 2, "Q4_K_M": 15, "Q2_K": 10}  # llama.cpp's LLAMA_FTYPE_MOSTLY_* values
GGUF_DEFAULT = {"smollm2": "Q4_0,Q4_K_M,Q2_K"}  # `--gguf` for SmolLM2; a GGUF-shipped model: GGUF_SHIPPED_DEFAULT
GGUF_SHIPPED_DEFAULT = "shipped,Q4_0,Q2_K,IQ2_M"
INSTALL = {
    "genai-builder": "not installed: the builder needs transformers 5 in its own venv: `python -m venv .venv-genai && "
                     ".venv-genai/bin/pip install torch==2.13.0 'transformers>=5,<6' onnxruntime-genai==0.18.0 onnx "
                     "onnx-ir onnxscript safetensors protobuf` (or set EDGE_RECOVER_BENCH_GENAI_PYTHON)",
    "llama": "not installed: `python -m venv .venv-llama && CMAKE_ARGS=-DGGML_NATIVE=ON nice .venv-llama/bin/pip install "
             "llama-cpp-python==0.3.36` (about 10 min on 2 cores; where the native build dies of an illegal "
             "instruction, e.g. a VM that reports AMX without enabling it, add `\"-DCMAKE_C_FLAGS=-mno-amx-tile "
             "-mno-amx-int8 -mno-amx-bf16\"` and the same CMAKE_CXX_FLAGS, or use -DGGML_NATIVE=OFF) "
             "or set EDGE_RECOVER_PEERS_LLAMA_PYTHON to a python that imports llama_cpp",
    "convert": "no python for llama.cpp's converter: `.venv-genai/bin/pip install sentencepiece` (it has torch and "
               "transformers) or set EDGE_RECOVER_PEERS_CONVERT_PYTHON",
    "llama-src": "no llama.cpp tree for convert_hf_to_gguf.py: `pip download --no-deps --no-binary :all: "
                 "llama-cpp-python==0.3.36 && tar xzf llama_cpp_python-0.3.36.tar.gz` and set "
                 "EDGE_RECOVER_PEERS_LLAMA_SRC=llama_cpp_python-0.3.36/vendor/llama.cpp",
}
# where llama.cpp's converter cannot run (an offline machine whose transformers it does not know): the F32 GGUF
# by llama.cpp's own dequantization of the model's GGUF (SmolLM2: the Q4_1 that edge-recover's fp weights are
# dequantized from, so the same weights)
SOURCE_GGUF = os.environ.get("EDGE_RECOVER_PEERS_SOURCE_GGUF")
# a HF folder (bf16 safetensors + tokenizer) of a GGUF, dequantized by edge-recover's loader: the builder's input
HF_FOLDER = r"""
import sys, torch
from edge_recover.atomic import atomic_dir
from edge_recover.models import load_model
lm = load_model(sys.argv[1], dtype=torch.bfloat16)
with atomic_dir(sys.argv[2]) as tmp:
    lm.model.save_pretrained(tmp, safe_serialization=True)
    lm.tokenizer.save_pretrained(tmp)
"""
QUANTIZE = r"""
import ctypes, sys, llama_cpp
p = llama_cpp.llama_model_quantize_default_params()
p.ftype, p.nthread, p.allow_requantize = int(sys.argv[3]), 2, len(sys.argv) > 4
rc = llama_cpp.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), ctypes.byref(p))
sys.exit(rc)
"""


def _imports(python: str, module: str) -> bool:
    if not Path(python).exists():
        return False
    return subprocess.run([python, "-c", f"import {module}"], capture_output=True).returncode == 0


def f32_gguf(hf: Path) -> Path:
    """An F32 GGUF of the HF folder by llama.cpp's own converter (the fp weights every GGUF is made from)."""
    out = WORK / "gguf" / "smollm2-F32.gguf"
    if not out.exists():
        src = Path(LLAMA_SRC)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(".tmp")
        if SOURCE_GGUF:  # LLAMA_FTYPE_ALL_F32 = 0, requantizing allowed
            subprocess.run(["nice", LLAMA_PY, "-c", QUANTIZE, SOURCE_GGUF, str(tmp), "0", "requantize"], check=True)
        else:
            subprocess.run(["nice", CONVERT_PY, str(src / "convert_hf_to_gguf.py"), str(hf), "--outfile", str(tmp),
                            "--outtype", "f32"], check=True, env={**os.environ, "PYTHONPATH": str(src / "gguf-py")})
        tmp.rename(out)
    return out


def quantized_gguf(f32: Path, kind: str) -> Path:
    """`kind` (Q4_0, Q4_K_M, Q2_K) made from `f32` by llama.cpp's quantizer (llama_model_quantize)."""
    out = f32.with_name(f"smollm2-{kind}.gguf")
    if not out.exists():
        tmp = out.with_suffix(".tmp")
        subprocess.run(["nice", LLAMA_PY, "-c", QUANTIZE, str(f32), str(tmp), str(GGUF_TYPES[kind])], check=True)
        tmp.rename(out)
    return out


def entries(args, hf: Path) -> tuple[list, list[dict]]:
    """The profiler entries (builder first when it is there: the ratios' baseline), and the missing peers."""
    from edge_recover.runtimes.profiler import PackageEntry

    found, missing = [], []
    if _imports(str(pm.GENAI_PY), "onnxruntime_genai.models.builder"):
        found.append(PackageEntry(str(pm.build("smollm2", "genai-int4", WORK / "packages")), label="builder-int4",
                                  engine="genai"))
    else:
        missing.append({"label": "builder-int4", "why": INSTALL["genai-builder"]})
    ours = [(v, pm.build("smollm2", v, WORK / "packages", args.method)) for v in args.ours.split(",") if v]
    ours += [tuple(p.split("=", 1)) for p in args.package]
    for label, path in ours:
        for engine in ("ort", "genai"):
            found.append(PackageEntry(str(path), label=f"{label}@{engine}", engine=engine))
    if not _imports(LLAMA_PY, "llama_cpp"):
        missing += [{"label": f"llama.cpp-{k}", "why": INSTALL["llama"]} for k in args.gguf.split(",") if k]
    elif not (Path(LLAMA_SRC) / "convert_hf_to_gguf.py").is_file():
        missing += [{"label": f"llama.cpp-{k}", "why": INSTALL["llama-src"]} for k in args.gguf.split(",") if k]
    elif not _imports(CONVERT_PY, "torch, transformers, sentencepiece"):
        missing += [{"label": f"llama.cpp-{k}", "why": INSTALL["convert"]} for k in args.gguf.split(",") if k]
    else:
        f32 = f32_gguf(hf)
        for kind in (k for k in args.gguf.split(",") if k):
            found.append(PackageEntry(str(quantized_gguf(f32, kind)), label=f"llama.cpp-{kind}", engine="llama",
                                      python=LLAMA_PY, tokenizer=str(hf / "tokenizer.json")))
    return found, missing


def resolve_model(model: str) -> tuple[str, Path | None]:
    """`--model` -> (the name in output files, the shipped GGUF file or None for SmolLM2's HF folder)."""
    from edge_recover.fetch import GGUF_MODELS, fetch_model

    if model == "smollm2":
        return model, None
    if model in GGUF_MODELS:
        return model, fetch_model(model)
    path = Path(model).expanduser()
    if path.suffix == ".gguf" and path.is_file():
        return path.stem.lower(), path
    raise SystemExit(f"`--model` {model!r} is neither smollm2, one of {', '.join(GGUF_MODELS)}, nor a .gguf file")


def gguf_tokenizer(source: Path, name: str) -> Path:
    """tokenizer.json of the GGUF's own vocabulary (transformers reads it from the file, as `edge-recover export`
    does, so our packages and llama.cpp score the same ids)."""
    out = WORK / name / "tokenizer" / "tokenizer.json"
    if not out.exists():
        from transformers import AutoTokenizer

        from edge_recover.models import _gguf_token_id, fix_tokenizer

        tok = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
        fix_tokenizer(tok, _gguf_token_id(source, "eos"))
        tmp = out.parent.with_suffix(".tmp")
        tok.save_pretrained(tmp)
        tmp.rename(out.parent)
    return out


def _llama(*argv: str) -> None:
    subprocess.run(["nice", LLAMA_PY, str(REPO / "bench" / "peers_gguf.py"), *argv], check=True)


def made_gguf(entry: "pg.GgufEntry", source: Path, name: str, tokenizer: Path, chunks: int) -> Path:
    """`entry`'s file, made once by llama.cpp's quantizer from the F32 copy of `source` (an importance matrix
    first where its type needs one)."""
    if entry.shipped or entry.path.exists():
        return entry.path
    folder = entry.path.parent
    folder.mkdir(parents=True, exist_ok=True)
    f32 = folder / f"{name}-F32.gguf"
    if not f32.exists():  # the shipped values, dequantized by llama.cpp itself
        _llama("quantize", str(source), str(f32.with_suffix(".tmp")), "F32", "--requantize")
        f32.with_suffix(".tmp").rename(f32)
    extra = []
    if entry.imatrix:
        im = folder / f"{name}-imatrix-{chunks}x512.npz"
        if not im.exists():
            ids = folder / f"{name}-calibration-{chunks}x512.npy"
            np.save(ids, pg.calibration_chunks(calibration_ids(tokenizer), chunks, 512))
            _llama("imatrix", str(source), str(ids), str(im.with_suffix(".tmp.npz")))
            im.with_suffix(".tmp.npz").rename(im)
        extra = ["--imatrix", str(im)]
    tmp = entry.path.with_suffix(".tmp")
    _llama("quantize", str(f32), str(tmp), entry.kind, *extra)
    tmp.rename(entry.path)
    return entry.path


def calibration_ids(tokenizer: Path) -> list[int]:
    """The importance matrix's text: every Shakespeare play but the held-out ones (Hamlet, Macbeth)."""
    from tokenizers import Tokenizer

    from edge_recover.fetch import EVAL_PLAYS, fetch_shakespeare

    plays = sorted(p for p in fetch_shakespeare().glob("*.txt") if p.name not in EVAL_PLAYS)
    text = "\n\n".join(p.read_text(errors="replace") for p in plays)
    return Tokenizer.from_file(str(tokenizer)).encode(text, add_special_tokens=False).ids


def gguf_entries(args, source: Path, name: str) -> tuple[list, list[dict]]:
    """The entries for a model that ships as a GGUF: the builder first when installed (made from a HF folder of
    the dequantized GGUF), our packages (`--package`), then llama.cpp's; and the missing peers."""
    from edge_recover.runtimes.profiler import PackageEntry

    found, missing = [], []
    plan = pg.plan(source, name, [k for k in args.gguf.split(",") if k], WORK / "gguf", pg.file_kind(source))
    if _imports(str(pm.GENAI_PY), "onnxruntime_genai.models.builder"):
        found.append(PackageEntry(str(builder_package(source, name)), label="builder-int4", engine="genai"))
    else:
        missing.append({"label": "builder-int4", "why": INSTALL["genai-builder"]})
    for label, path in (p.split("=", 1) for p in args.package):
        for engine in ("ort", "genai"):
            found.append(PackageEntry(str(path), label=f"{label}@{engine}", engine=engine))
    if not _imports(LLAMA_PY, "llama_cpp"):
        return found, missing + [{"label": e.label, "why": INSTALL["llama"]} for e in plan]
    tokenizer = gguf_tokenizer(source, name)
    for e in plan:
        found.append(PackageEntry(str(made_gguf(e, source, name, tokenizer, args.imatrix_chunks)), label=e.label,
                                  engine="llama", python=LLAMA_PY, tokenizer=str(tokenizer)))
    return found, missing


def builder_package(source: Path, name: str) -> Path:
    """onnxruntime-genai's builder int4 (its defaults) from a HF folder of the GGUF dequantized by edge-recover's
    loader, saved in bf16 (half the disk of float32; the builder quantizes from it)."""
    out = WORK / name / "builder-int4"
    if out.exists():
        return out
    hf = WORK / name / "hf"
    if not (hf / "config.json").exists():  # in a child process: the race's parent keeps none of its memory
        subprocess.run(["nice", sys.executable, "-c", HF_FOLDER, str(source), str(hf)], check=True)
    tmp = out.with_suffix(".tmp")
    subprocess.run(["nice", str(pm.GENAI_PY), "-m", "onnxruntime_genai.models.builder", "-m", str(hf), "-o", str(tmp),
                    "-p", "int4", "-e", "cpu", "-c", str(WORK / name / "genai-cache")], check=True)
    tmp.rename(out)
    return out


def paired(data: dict, a: str, b: str, length: int) -> float:
    """Decode of `a` over `b` at `length`: the median over rounds of the within-round ratio."""
    runs = {r["package"]: r["runs"] for r in data["results"] if r["prompt_length"] == length}
    return statistics.median(x["decode_tok_s"] / y["decode_tok_s"] for x, y in zip(runs[a], runs[b]))


def race(data: dict, default: str) -> list[str]:
    """Issue 28's race for a GGUF-shipped model: `default`@ort against every other runtime's entry (the
    builder, each llama.cpp file), decode paired per round at each prompt length, and perplexity."""
    labels = {p["label"]: p for p in data["packages"]}
    mine = f"{default}@ort"
    if mine not in labels:
        return [f"race not summarized: `{mine}` is not in the run"]
    ppl = {k: (p.get("perplexity") or {}).get("perplexity") for k, p in labels.items()}
    out = []
    for other in (k for k in labels if k == "builder-int4" or k.startswith("llama.cpp-")):
        cells = ", ".join(f"{paired(data, mine, other, n):.2f}x at {n}" for n in data["settings"]["prompt_lengths"])
        line = f"{mine} / {other}: decode {cells}"
        if ppl.get(mine) is not None and ppl.get(other) is not None:
            line += f"; perplexity {ppl[mine]:.2f} vs {ppl[other]:.2f}"
        out.append(line)
    return out


def goals(data: dict, default: str, model: str = "smollm2") -> list[str]:
    """The issue's SmolLM2 goal, checked cell by cell: `default`@ort decodes >= 1.3x the builder's int4 and
    >= llama.cpp's fastest 4-bit GGUF, at perplexity no worse than the builder's. Other models: `race`."""
    if model != "smollm2":
        return race(data, default)
    labels = {p["label"]: p for p in data["packages"]}
    mine = f"{default}@ort"
    if mine not in labels:
        return [f"goal not checked: `{mine}` is not in the run"]
    out = []
    ppl = {k: (p.get("perplexity") or {}).get("perplexity") for k, p in labels.items()}
    for length in data["settings"]["prompt_lengths"]:
        if "builder-int4" in labels:
            r = paired(data, mine, "builder-int4", length)
            out.append(f"prompt {length}: {mine} / builder-int4 decode {r:.2f}x (goal >= 1.3x: {'met' if r >= 1.3 else 'NOT met'})")
        four = [k for k in labels if k.startswith("llama.cpp-Q4")]
        if four:
            fastest = max(four, key=lambda k: next(r["decode_tok_s"] for r in data["results"]
                                                   if r["package"] == k and r["prompt_length"] == length))
            r = paired(data, mine, fastest, length)
            out.append(f"prompt {length}: {mine} / {fastest} (fastest 4-bit GGUF) decode {r:.2f}x "
                       f"(goal >= 1.0x: {'met' if r >= 1.0 else 'NOT met'})")
    if ppl.get(mine) is not None and ppl.get("builder-int4") is not None:
        ok = ppl[mine] <= ppl["builder-int4"]
        out.append(f"perplexity {mine} {ppl[mine]:.2f} vs builder-int4 {ppl['builder-int4']:.2f} "
                   f"(goal no worse: {'met' if ok else 'NOT met'})")
    return out


def _title(model: str) -> str:
    return "SmolLM2-135M" if model == "smollm2" else model


def render(data: dict, missing: list[dict], command: str, default: str, model: str = "smollm2") -> str:
    dev, st = data["device"], data["settings"]
    base = data["packages"][0]["label"]
    ppl = next((p["perplexity"] for p in data["packages"] if p.get("perplexity")), None)
    lines = [f"# {_title(model)} against its peers, one interleaved run", "",
             f"{dev['cpu_model']}, {dev['threads_used']} threads for every runtime, {dev['memory_gb']} GiB; "
             f"onnxruntime {dev['onnxruntime']}; {st['repeats']} rounds, {st['new_tokens']} new tokens, greedy, "
             f"random prompts of exactly each length; read bandwidth {data['bandwidth_bytes_s'] / 1e9:.1f} GB/s "
             f"(median of {len(data['bandwidth_probes_bytes_s'])} probes). `@ort`: edge-recover's runtime, `@genai`: "
             f"onnxruntime-genai on the same folder. Ratios: against `{base}`, paired per round.", ""]
    if ppl:
        lines += [f"Perplexity: {ppl['windows']} x {ppl['seq_len']} tokens of held-out text (`{Path(ppl['text']).name}`: "
                  f"Hamlet + Macbeth by default), each through its own runtime, one token per step through its KV "
                  f"cache.", ""]
    packages = {p["label"]: p for p in data["packages"]}
    for length in st["prompt_lengths"]:
        lines += [f"## Prompt {length} tokens", "",
                  "| package | runtime | scheme | size MB | params M | decode tok/s (sd) | vs first | MB read/token "
                  "| roofline | prefill tok/s | TTFT ms | peak RSS MB | load s | perplexity |",
                  "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for r in (x for x in data["results"] if x["prompt_length"] == length):
            p = packages[r["package"]]
            pp = (p.get("perplexity") or {}).get("perplexity")
            lines.append(f"| {r['package']} | {p['provider']} | {p['scheme']} | {p['size_bytes'] / 1e6:.1f} | "
                         f"{p['parameters'] / 1e6:.1f} | {r['decode_tok_s']:.1f} ({r['decode_tok_s_stddev']:.1f}) | "
                         f"{r['decode_vs_first']:.2f}x | {r['bytes_per_token'] / 1e6:.1f} | "
                         f"{100 * r['roofline_share']:.0f} % | {r['prefill_tok_s']:.1f} | {1e3 * r['ttft_s']:.0f} | "
                         f"{p['peak_rss_bytes'] / 1e6:.0f} | {p['load_s']:.2f} | {'-' if pp is None else f'{pp:.2f}'} |")
        lines.append("")
    if missing:
        lines += ["## Not in this run", ""] + [f"- `{m['label']}`: {m['why']}" for m in missing] + [""]
    heading = "## Goals (issue 18)" if model == "smollm2" else "## The race (issue 28), paired per round"
    lines += [heading, ""] + [f"- {g}" for g in goals(data, default, model)] + [""]
    lines += ["Command:", "", "```bash", command, "```", ""]
    return "\n".join(lines)


def plot(data: dict, path: Path, model: str = "smollm2") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    labels = [p["label"] for p in data["packages"]]
    ppl = {p["label"]: (p.get("perplexity") or {}).get("perplexity") for p in data["packages"]}
    lengths = data["settings"]["prompt_lengths"]
    fig, ax = plt.subplots(figsize=(max(6.4, 0.7 * len(labels) * len(lengths)), 4.4), dpi=100)
    width = 0.8 / len(lengths)
    x = np.arange(len(labels))
    for i, length in enumerate(lengths):
        speed = {r["package"]: r["decode_tok_s"] for r in data["results"] if r["prompt_length"] == length}
        bars = ax.bar(x + i * width, [speed[k] for k in labels], width, label=f"prompt {length}")
        if i == 0:
            for b, k in zip(bars, labels):
                if ppl[k] is not None:
                    ax.annotate(f"ppl {ppl[k]:.1f}", (b.get_x(), b.get_height()), fontsize=6, rotation=90,
                                xytext=(0, 3), textcoords="offset points")
    ax.set_ylim(0, 1.25 * max(r["decode_tok_s"] for r in data["results"]))  # room for the perplexity labels
    ax.set_xticks(x + width * (len(lengths) - 1) / 2, labels, rotation=30, ha="right", fontsize=7)
    ax.set_ylabel("decode tokens/s")
    ax.set_title(f"{_title(model)} decode, {data['device']['threads_used']} threads, {data['device']['cpu_model'][:40]}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2",
                    help="smollm2, an edge-recover GGUF model name (qwen2.5-coder-1.5b, ...) or a .gguf path")
    ap.add_argument("--ours", default=None, help="our package variants (bench/profile_models.py names; SmolLM2 "
                                                 "only; default w4w2gateup,w4-head4,w4w2gateup-head4-2b128)")
    ap.add_argument("--default", default=None, help="the variant the goals are checked for (SmolLM2: "
                                                    "w4w2gateup-head4-2b128; a GGUF model: the first --package)")
    ap.add_argument("--package", action="append", default=[], help="LABEL=PATH: another package of ours")
    ap.add_argument("--gguf", default=None, help=f"llama.cpp entries (SmolLM2: {GGUF_DEFAULT['smollm2']}; a GGUF "
                                                 f"model: {GGUF_SHIPPED_DEFAULT}, `shipped` = its own file)")
    ap.add_argument("--imatrix-chunks", type=int, default=32, help="512-token chunks of calibration text for the "
                                                                   "importance matrix of IQ2-type GGUFs")
    ap.add_argument("--prepare-only", action="store_true", help="make every entry's files (GGUFs, the builder's "
                                                                  "package), list them and stop: no timed run")
    ap.add_argument("--method", default=defaults("export").method,
                    help="quantizer for our packages (rtn, mse, gptq; default: export's, sdk/options.py)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--prompt-lengths", default="128,512")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=None, help="threads for every runtime (default: all cores)")
    ap.add_argument("--eval-windows", type=int, default=8)
    ap.add_argument("--eval-seq-len", type=int, default=256)
    ap.add_argument("--tag", default="")
    ap.add_argument("--output", type=Path, default=REPO / "docs" / "results")
    args = ap.parse_args()
    from edge_recover.fetch import eval_text, fetch_smollm2
    from edge_recover.runtimes.profiler import ProfileSettings, profile_packages
    from edge_recover.runtimes.report import write_rows
    from edge_recover.runtimes.report_fields import lab_rows

    name, source = resolve_model(args.model)
    bad = next((p for p in args.package if "=" not in p), None)
    if bad is not None:
        raise SystemExit(f"`--package` {bad!r} is not LABEL=PATH; e.g. --package w4w2=out/q15-w4w2")
    if source is not None and args.ours:
        raise SystemExit(f"`--ours` builds SmolLM2 variants; for {name} pass packages made by `edge-recover export "
                         f"{args.model} ...` as --package LABEL=PATH")
    args.gguf = args.gguf if args.gguf is not None else GGUF_DEFAULT.get(name, GGUF_SHIPPED_DEFAULT)
    if source is None:
        args.ours = args.ours if args.ours is not None else "w4w2gateup,w4-head4,w4w2gateup-head4-2b128"
        args.default = args.default or "w4w2gateup-head4-2b128"
    else:
        args.default = args.default or (args.package[0].split("=", 1)[0] if args.package else "")
    text = WORK / "held-out.txt"
    if not text.exists():
        WORK.mkdir(parents=True, exist_ok=True)
        text.write_text(eval_text())
    found, missing = entries(args, fetch_smollm2()) if source is None else gguf_entries(args, source, name)
    for m in missing:
        print(f"{m['label']}: {m['why']}", file=sys.stderr)
    if args.prepare_only:
        for e in found:
            print(f"{e.label}: {e.path}")
        return
    settings = ProfileSettings(prompt_lengths=[int(x) for x in args.prompt_lengths.split(",")],
                               new_tokens=args.new_tokens, repeats=args.rounds, threads=args.threads,
                               eval_text=str(text), eval_windows=args.eval_windows, eval_seq_len=args.eval_seq_len)
    stem = f"peers-{name}" + (f"-{args.tag}" if args.tag else "")
    report = profile_packages(found, settings, WORK / f"report-{stem}", overwrite=True,
                              log=lambda s: print(s, file=sys.stderr, flush=True))
    data = report.data
    command = "nice .venv/bin/python bench/peers.py " + " ".join(sys.argv[1:])
    args.output.mkdir(parents=True, exist_ok=True)
    (args.output / f"{stem}.json").write_text(json.dumps({"kind": "edge-recover-peers", "command": command,
                                                          "model": name, "source_gguf": str(source) if source else None,
                                                          "missing": missing, "goals": goals(data, args.default, name),
                                                          "report": data}, indent=1))
    (args.output / f"{stem}.md").write_text(render(data, missing, command, args.default, name))
    rows = lab_rows(data)
    write_rows(rows, args.output, stem)
    (args.output / f"{stem}.jsonl").unlink()  # the JSON holds the report; the CSV is the lab's table
    plot(data, args.output / f"{stem}.png", name)
    print(report.summary())
    print("\n".join(goals(data, args.default, name)))
    print(f"wrote {args.output / stem}.{{json,md,csv,png}}")


if __name__ == "__main__":
    main()

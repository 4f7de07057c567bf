"""Decode speed of one package with the growing KV cache vs the shared-buffer KV cache, in one session.

    nice .venv/bin/python bench/shared_kv_decode.py out/bench/packages/qwen3-1.7b-shape-w4w2gateup-head8 \
        --prompt-lengths 128,1024 --new-tokens 16 --repeats 3

One OrtCausalLM, one ONNX Runtime session: the cache kind is chosen per run (a shared-buffer cache takes the
shared path, a plain one the growing path), so both read the same prepacked weights. Per prompt length, one
random prompt is prefilled once into a shared buffer; every run decodes `new_tokens` greedy steps from that
prefix (the growing path starts from a numpy copy of its valid positions; the shared path rewinds). Runs
alternate the two kinds, the order flipped each repeat; reported: the median step time's tok/s per kind.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np

from edge_recover.runtimes.session import KVCache, OrtCausalLM


def _decode(lm: OrtCausalLM, cache: KVCache, first: int, n: int) -> list[float]:
    token, times = first, []
    for _ in range(n):
        t0 = time.perf_counter()
        logits, cache = lm.step(np.array([[token]]), cache)
        times.append(time.perf_counter() - t0)
        token = int(np.argmax(logits))
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("package")
    ap.add_argument("--prompt-lengths", default="128,1024")
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    lm = OrtCausalLM(args.package, threads=args.threads)
    if not lm.share_buffer:
        raise SystemExit(f"{args.package}: the graph has no shared-buffer KV mode (not a fused cpu-target package)")
    rng = np.random.default_rng(0)
    rows = []
    for length in (int(x) for x in args.prompt_lengths.split(",")):
        prompt = rng.integers(100, lm.package.vocab_size - 100, size=length)
        t0 = time.perf_counter()
        logits, prefix = lm.step(prompt[None, :], lm.empty_cache(length + args.new_tokens))
        prefill_s = time.perf_counter() - t0
        first = int(np.argmax(logits))
        plain = [v[:, :, :length].copy() for v in prefix.values]
        times: dict[str, list[float]] = {"growing": [], "shared": []}
        for rep in range(args.repeats + 1):  # the first round warms up and is not counted
            kinds = ["growing", "shared"] if rep % 2 == 0 else ["shared", "growing"]
            for kind in kinds:
                cache = KVCache(prefix.values, length, prefix.ort) if kind == "shared" else KVCache(plain, length)
                steps = _decode(lm, cache, first, args.new_tokens)
                if rep:
                    times[kind] += steps
        tok_s = {k: 1.0 / statistics.median(v) for k, v in times.items()}
        row = dict(prompt=length, prefill_s=round(prefill_s, 2), growing_tok_s=round(tok_s["growing"], 2),
                   shared_tok_s=round(tok_s["shared"], 2), shared_vs_growing=round(tok_s["shared"] / tok_s["growing"], 3))
        rows.append(row)
        print(json.dumps(row), flush=True)
    print(f"{lm.describe()}; {args.new_tokens} new tokens x {args.repeats} repeats per kind, median step")


if __name__ == "__main__":
    main()

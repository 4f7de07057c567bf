"""Decode of one package with the shared-buffer path's binding made once per cache (this runtime) against a new
binding and a wrapper per output every step (before), in one process, paired rounds.

    nice .venv/bin/python bench/binding_decode.py out/demo/w4w2gateup-recovered > docs/results/binding-decode-smollm2.txt

Two OrtCausalLM on the same package; the second is set back to the per-step form (no logits buffer, binding
dropped before each step). Each round: a seeded 128-token prompt, then 64 greedy steps on each, the order flipped
per round; reported: tok/s per round and the median of the paired ratios.
"""
import statistics
import sys
import time

import numpy as np

from edge_recover.runtimes.session import OrtCausalLM
pkg = sys.argv[1]
new = OrtCausalLM(pkg, threads=2)
old = OrtCausalLM(pkg, threads=2)
old._logits_buf = None  # this session's start: a new binding and a wrapper per output, every step
rng = np.random.default_rng(0)
def run(lm, fresh, n=64, plen=128):
    cache = lm.empty_cache(plen + n)
    logits, cache = lm.prefill(rng.integers(0, 1000, (1, plen)), cache)
    t0 = time.perf_counter()
    for _ in range(n):
        if fresh: lm._shared_binding = None
        logits, cache = lm.step(np.array([[int(np.argmax(logits))]]), cache)
    return n / (time.perf_counter() - t0)
run(new, False); run(old, True)
ratios = []
for r in range(8):
    if r % 2 == 0: a = run(old, True); b = run(new, False)
    else: b = run(new, False); a = run(old, True)
    ratios.append(b / a); print(f"round {r}: per-step binding {a:.1f} tok/s, bound once {b:.1f} tok/s")
print("bound-once / per-step decode (median of paired rounds):", round(statistics.median(ratios), 3))

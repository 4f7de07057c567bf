"""Benchmark: decode-shaped MatMulNBits (M = 1) per bit width, block size, thread count and kernel path.

    .venv/bin/python bench/matmulnbits_kernels.py --threads 2 -o docs/results/kernels-2core.json

Why: a W4/W2-GateUp package decodes faster than W4 only as far as ONNX Runtime's 2-bit kernel turns half the
bytes into less time. This times that kernel alone on the layer shapes of a Qwen3-1.7B-shaped MLP
(K 2048 -> N 6144 as gate/up, then 6144 -> 2048 as down; W4/W2-GateUp keeps down at 4 bits), accuracy_level 4 (int8 activations, the CPU
target's), with and without the session entry `mlas.use_lut_gemm` (ORT's table-lookup path for 2-bit).
One layer fits in the last-level cache and would time the cache, so each model is a chain of `--pairs`
such (up, down) pairs with their own weights, about 1 GB at 4 bits: every call streams them from memory,
as a decode step does. Weights are random codes (speed does not depend on their values). Each configuration
runs in its own session, configurations interleaved per round; reported: median time per layer pair and
the effective read bandwidth (weight bytes / time). Writes JSON and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

MS = "com.microsoft"
SHAPE = (2048, 6144)  # K, N of gate/up; down is the reverse
# (up bits, up block, down bits, down block): the W4 pair, then W4/W2-GateUp's (down stays 4-bit), then all 2-bit
CONFIGS = [(4, 64, 4, 64), (4, 128, 4, 128), (2, 64, 4, 64), (2, 128, 4, 64), (2, 128, 4, 128), (2, 128, 2, 128)]


def _model(pairs: int, config: tuple[int, int, int, int], rng: np.random.Generator) -> tuple[bytes, int]:
    """A chain X -> (2048 -> 6144 -> 2048) x `pairs`, every layer with its own random codes."""
    nodes, inits, nbytes, x = [], [], 0, "A"
    for i in range(2 * pairs):
        k, n = SHAPE if i % 2 == 0 else SHAPE[::-1]
        bits, block = config[:2] if i % 2 == 0 else config[2:]
        nb = -(-k // block)
        b = rng.integers(0, 256, (n, nb, block * bits // 8), dtype=np.uint8)
        scales = rng.uniform(0.001, 0.01, n * nb).astype(np.float32)
        zp = rng.integers(0, 256, (n, -(-nb * bits // 8)), dtype=np.uint8)
        inits += [numpy_helper.from_array(t, f"{name}{i}") for t, name in ((b, "B"), (scales, "S"), (zp, "Z"))]
        nodes.append(helper.make_node("MatMulNBits", [x, f"B{i}", f"S{i}", f"Z{i}"], [f"Y{i}"], domain=MS, K=k, N=n,
                                      bits=bits, block_size=block, accuracy_level=4))
        nbytes += b.nbytes + scales.nbytes + zp.nbytes
        x = f"Y{i}"
    graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("A", TensorProto.FLOAT, [1, SHAPE[0]])],
                              [helper.make_tensor_value_info(x, TensorProto.FLOAT, [1, SHAPE[0]])], inits)
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(MS, 1)])
    m.ir_version = 10
    return m.SerializeToString(), nbytes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", default="2", help="comma-separated intra-op thread counts")
    ap.add_argument("--pairs", type=int, default=80, help="(up, down) layer pairs per model (80: ~1.1 GB at 4 bits)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--calls", type=int, default=5, help="timed calls per configuration and round")
    ap.add_argument("-o", "--output", type=Path, default=None)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    models = {cfg: _model(args.pairs, cfg, rng) for cfg in CONFIGS}
    cases = []
    for threads in (int(t) for t in args.threads.split(",")):
        for cfg, (blob, nbytes) in models.items():
            for lut in ((0, 1) if 2 in cfg else (0,)):
                so = ort.SessionOptions()
                so.intra_op_num_threads = threads
                so.add_session_config_entry("mlas.use_lut_gemm", str(lut))
                sess = ort.InferenceSession(blob, so, providers=["CPUExecutionProvider"])
                cases.append({"threads": threads, "up": f"{cfg[0]}-bit b{cfg[1]}", "down": f"{cfg[2]}-bit b{cfg[3]}", "lut": lut,
                              "weight_bytes": nbytes, "sess": sess, "times": []})
    del models
    a = rng.standard_normal((1, SHAPE[0])).astype(np.float32)
    for c in cases:  # warm-up
        c["sess"].run(None, {"A": a})
    for _ in range(args.rounds):
        for c in cases:
            t = time.perf_counter()
            for _ in range(args.calls):
                c["sess"].run(None, {"A": a})
            c["times"].append((time.perf_counter() - t) / args.calls)
    rows = []
    for c in cases:
        med = statistics.median(c["times"])
        rows.append({key: c[key] for key in ("threads", "up", "down", "lut", "weight_bytes")}
                    | {"us_per_pair": 1e6 * med / args.pairs, "gb_s": c["weight_bytes"] / med / 1e9})
    print("| threads | up (as gate/up) | down | LUT path | us per (up, down) pair | GB/s | vs 4-bit b64 |")
    print("| ---: | --- | --- | --- | ---: | ---: | ---: |")
    for r in rows:
        base = next(x for x in rows if (x["threads"], x["up"], x["down"]) == (r["threads"], "4-bit b64", "4-bit b64"))
        print(f"| {r['threads']} | {r['up']} | {r['down']} | {'on' if r['lut'] else 'off'} | "
              f"{r['us_per_pair']:.0f} | {r['gb_s']:.1f} | {base['us_per_pair'] / r['us_per_pair']:.2f}x |")
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps({"onnxruntime": ort.__version__, "pairs": args.pairs, "shape": SHAPE,
                                           "rounds": args.rounds, "calls": args.calls, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()

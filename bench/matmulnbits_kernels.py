"""Benchmark: decode-shaped MatMulNBits (M = 1) per bit width, block size, thread count and kernel path.

    .venv/bin/python bench/matmulnbits_kernels.py --threads 2 -o docs/results/kernels-2core.json
    .venv/bin/python bench/matmulnbits_kernels.py --mlp --threads 4,8,16 -o docs/results/kernels-mlp-16core.json

Why: a W4/W2-GateUp package decodes faster than W4 only as far as ONNX Runtime's 2-bit kernel turns half the
bytes into less time. This times that kernel alone on the layer shapes of a Qwen3-1.7B-shaped MLP
(K 2048 -> N 6144 as gate/up, then 6144 -> 2048 as down; W4/W2-GateUp keeps down at 4 bits), accuracy_level 4 (int8 activations, the CPU
target's), with and without the session entry `mlas.use_lut_gemm` (ORT's table-lookup path for 2-bit).
One layer fits in the last-level cache and would time the cache, so each model is a chain of `--pairs`
such (up, down) pairs with their own weights, about 1 GB at 4 bits: every call streams them from memory,
as a decode step does. Weights are random codes (speed does not depend on their values). Each configuration
runs in its own session, configurations interleaved per round; reported: median time per layer pair and
the effective read bandwidth (weight bytes / time). Writes JSON and prints a Markdown table.

`--mlp` times whole MLP blocks instead (gate and up 2048 -> 6144, their product, down 6144 -> 2048 at 4 bits,
`--layers` of them chained): the gate/up layouts a many-core CPU may want, each against the W4 block: 2-bit
gate/up at block 64 or 128, as two nodes or stacked into one node of N = 12288 followed by a Split (the
same integers, one activation quantization and one dispatch instead of two), all at accuracy level 4 (int8
activations; level 0 made 2-bit gate/up 35x slower on 2 cores: MLAS has no fast float path for it).
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


def _weights(k: int, n: int, bits: int, block: int, rng: np.random.Generator) -> tuple[np.ndarray, ...]:
    """Random MatMulNBits B, scales and zero points of a K x N layer."""
    nb = -(-k // block)
    return (rng.integers(0, 256, (n, nb, block * bits // 8), dtype=np.uint8),
            rng.uniform(0.001, 0.01, n * nb).astype(np.float32),
            rng.integers(0, 256, (n, -(-nb * bits // 8)), dtype=np.uint8))


def _serialized(nodes: list, inits: list, name: str, width: int, last: str, opset: int) -> bytes:
    """The model bytes of a chain of `nodes` from input "A" [1, width] to `last` [1, width]."""
    graph = helper.make_graph(nodes, name, [helper.make_tensor_value_info("A", TensorProto.FLOAT, [1, width])],
                              [helper.make_tensor_value_info(last, TensorProto.FLOAT, [1, width])], inits)
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset), helper.make_opsetid(MS, 1)])
    m.ir_version = 10
    return m.SerializeToString()


def _model(pairs: int, config: tuple[int, int, int, int], rng: np.random.Generator) -> tuple[bytes, int]:
    """A chain X -> (2048 -> 6144 -> 2048) x `pairs`, every layer with its own random codes."""
    nodes, inits, nbytes, x = [], [], 0, "A"
    for i in range(2 * pairs):
        k, n = SHAPE if i % 2 == 0 else SHAPE[::-1]
        bits, block = config[:2] if i % 2 == 0 else config[2:]
        ts = _weights(k, n, bits, block, rng)
        inits += [numpy_helper.from_array(t, f"{name}{i}") for t, name in zip(ts, ("B", "S", "Z"))]
        nodes.append(helper.make_node("MatMulNBits", [x, f"B{i}", f"S{i}", f"Z{i}"], [f"Y{i}"], domain=MS, K=k, N=n,
                                      bits=bits, block_size=block, accuracy_level=4))
        nbytes += sum(t.nbytes for t in ts)
        x = f"Y{i}"
    return _serialized(nodes, inits, "chain", SHAPE[0], x, 17), nbytes


# (gate/up bits, gate/up block, stacked into one node, gate/up accuracy level); down is 4-bit block 64, level 4
MLP_CONFIGS = [(4, 64, False, 4), (4, 64, True, 4), (2, 128, False, 4), (2, 128, True, 4), (2, 64, False, 4),
               (2, 64, True, 4)]


def _mlp_model(layers: int, config: tuple[int, int, bool, int], rng: np.random.Generator) -> tuple[bytes, int]:
    """A chain X -> (gate, up -> Mul -> down) x `layers`; gate/up as two nodes or one stacked node + Split."""
    bits, block, stacked, level = config
    k, n = SHAPE
    nodes, inits, nbytes, x = [], [], 0, "A"

    def matmul(name: str, inp: str, out: str, kk: int, nn: int, b: int, blk: int, acc: int) -> None:
        nonlocal nbytes
        ts = _weights(kk, nn, b, blk, rng)
        inits.extend(numpy_helper.from_array(t, f"{tn}_{name}") for t, tn in zip(ts, ("B", "S", "Z")))
        nodes.append(helper.make_node("MatMulNBits", [inp, f"B_{name}", f"S_{name}", f"Z_{name}"], [out], domain=MS,
                                      K=kk, N=nn, bits=b, block_size=blk, accuracy_level=acc))
        nbytes += sum(t.nbytes for t in ts)

    for i in range(layers):
        if stacked:
            matmul(f"gu{i}", x, f"GU{i}", k, 2 * n, bits, block, level)
            nodes.append(helper.make_node("Split", [f"GU{i}"], [f"G{i}", f"U{i}"], axis=-1, num_outputs=2))
        else:
            matmul(f"g{i}", x, f"G{i}", k, n, bits, block, level)
            matmul(f"u{i}", x, f"U{i}", k, n, bits, block, level)
        nodes.append(helper.make_node("Mul", [f"G{i}", f"U{i}"], [f"H{i}"]))
        matmul(f"d{i}", f"H{i}", f"Y{i}", n, k, 4, 64, 4)
        x = f"Y{i}"
    return _serialized(nodes, inits, "mlp", k, x, 18), nbytes  # opset 18: Split's num_outputs


def _time(cases: list[dict], rounds: int, calls: int, width: int, seed: int = 1) -> None:
    """Warm every session up, then time `calls` runs per case per round, cases interleaved; fills c["times"]."""
    a = np.random.default_rng(seed).standard_normal((1, width)).astype(np.float32)
    for c in cases:
        c["sess"].run(None, {"A": a})
    for _ in range(rounds):
        for c in cases:
            t = time.perf_counter()
            for _ in range(calls):
                c["sess"].run(None, {"A": a})
            c["times"].append((time.perf_counter() - t) / calls)


def _session(blob: bytes, threads: int, lut: int = 0) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.add_session_config_entry("mlas.use_lut_gemm", str(lut))
    return ort.InferenceSession(blob, so, providers=["CPUExecutionProvider"])


def mlp_main(args: argparse.Namespace) -> None:
    """`--mlp`: whole MLP blocks per gate/up layout, thread count interleaved; JSON + a Markdown table."""
    rng = np.random.default_rng(0)
    models = {cfg: _mlp_model(args.layers, cfg, rng) for cfg in MLP_CONFIGS}
    cases = [{"threads": t, "gate_up": f"{cfg[0]}-bit b{cfg[1]}", "stacked": cfg[2], "accuracy_level": cfg[3],
              "weight_bytes": nbytes, "sess": _session(blob, t), "times": []}
             for t in (int(t) for t in args.threads.split(",")) for cfg, (blob, nbytes) in models.items()]
    del models
    _time(cases, args.rounds, args.calls, SHAPE[0])
    keys = ("threads", "gate_up", "stacked", "accuracy_level", "weight_bytes")
    rows = [{k: c[k] for k in keys} | {"us_per_layer": 1e6 * statistics.median(c["times"]) / args.layers,
                                       "gb_s": c["weight_bytes"] / statistics.median(c["times"]) / 1e9,
                                       "us_rounds": [1e6 * t / args.layers for t in c["times"]]} for c in cases]
    print("| threads | gate/up | nodes | accuracy level | us per MLP block | GB/s | vs W4 (two nodes) |")
    print("| ---: | --- | --- | ---: | ---: | ---: | ---: |")
    for r in rows:
        base = next(x for x in rows if x["threads"] == r["threads"] and x["gate_up"] == "4-bit b64" and not x["stacked"])
        print(f"| {r['threads']} | {r['gate_up']} | {'one (stacked)' if r['stacked'] else 'two'} | {r['accuracy_level']} | "
              f"{r['us_per_layer']:.0f} | {r['gb_s']:.1f} | {base['us_per_layer'] / r['us_per_layer']:.2f}x |")
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps({"onnxruntime": ort.__version__, "mode": "mlp", "layers": args.layers,
                                           "shape": SHAPE, "rounds": args.rounds, "calls": args.calls,
                                           "rows": rows}, indent=1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", default="2", help="comma-separated intra-op thread counts")
    ap.add_argument("--pairs", type=int, default=80, help="(up, down) layer pairs per model (80: ~1.1 GB at 4 bits)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--calls", type=int, default=5, help="timed calls per configuration and round")
    ap.add_argument("--mlp", action="store_true", help="time whole MLP blocks per gate/up layout (see above)")
    ap.add_argument("--layers", type=int, default=40, help="--mlp: MLP blocks per model (40: ~0.9 GB at 4 bits)")
    ap.add_argument("-o", "--output", type=Path, default=None)
    args = ap.parse_args()
    if args.mlp:
        mlp_main(args)
        return
    rng = np.random.default_rng(0)
    models = {cfg: _model(args.pairs, cfg, rng) for cfg in CONFIGS}
    cases = []
    for threads in (int(t) for t in args.threads.split(",")):
        for cfg, (blob, nbytes) in models.items():
            for lut in ((0, 1) if 2 in cfg else (0,)):
                sess = _session(blob, threads, lut)
                cases.append({"threads": threads, "up": f"{cfg[0]}-bit b{cfg[1]}", "down": f"{cfg[2]}-bit b{cfg[3]}", "lut": lut,
                              "weight_bytes": nbytes, "sess": sess, "times": []})
    del models
    _time(cases, args.rounds, args.calls, SHAPE[0])
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

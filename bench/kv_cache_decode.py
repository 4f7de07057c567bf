"""Benchmark: one decode step of attention over a float32, float16 or int8 KV cache (CPU provider).

    .venv/bin/python bench/kv_cache_decode.py [--threads 2] [--lengths 128,512,1024,2048]

Why: at long prompts a decode step reads the cache as well as the weights; the cache's element type sets
how many bytes that is, and the attention kernel's speed on that type sets what they cost. This times the
part of a package that the KV dtype changes: a chain of 28 GroupQueryAttention nodes of the Qwen3-1.7B
shape (16 query heads, 8 KV heads, head_dim 128), one new token each, past and present bound to one
preallocated buffer per layer (the runtime's shared-buffer cache), as the exporter writes them:
float32; float16 (q, k, v cast to float16 before the node, as fusions.fuse_attention does); int8
(`kv_cache_bit_width` 8, per-channel scales, as kv_cache.to_int8 does). Configurations interleave per
round, each after one untimed step (an idle session's threads keep spinning for a moment and would slow
the next one); reported: median ms per step for all 28 layers and the cache bytes read. Writes JSON, a Markdown
table and a PNG plot (docs/results/kv-cache-decode.*).
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

ROOT = Path(__file__).resolve().parents[1]
HEADS, KV_HEADS, DIM, LAYERS = 16, 8, 128, 28
TYPES = {"float32": (TensorProto.FLOAT, np.float32), "float16": (TensorProto.FLOAT16, np.float16),
         "int8": (TensorProto.INT8, np.int8)}


def _model(kv: str) -> bytes:
    elem, _ = TYPES[kv]
    act = TensorProto.FLOAT16 if kv == "float16" else TensorProto.FLOAT
    nodes, inits, outs = [], [], []
    inputs = [helper.make_tensor_value_info("q", act, [1, 1, HEADS * DIM]),
              helper.make_tensor_value_info("k", act, [1, 1, KV_HEADS * DIM]),
              helper.make_tensor_value_info("seqlens_k", TensorProto.INT32, [1]),
              helper.make_tensor_value_info("total", TensorProto.INT32, [])]
    x = "q"
    for i in range(LAYERS):
        attrs = dict(num_heads=HEADS, kv_num_heads=KV_HEADS)
        ins = [x, "k", "k", f"past_key.{i}", f"past_value.{i}", "seqlens_k", "total"]
        if kv == "int8":
            attrs.update(kv_cache_bit_width=8, k_quant_type="PER_CHANNEL", v_quant_type="PER_CHANNEL")
            ins += [""] * 5 + [f"k_scale.{i}", f"v_scale.{i}"]
            inits += [numpy_helper.from_array(np.full((1, KV_HEADS, 1, DIM), 0.05, np.float32), f"{w}_scale.{i}")
                      for w in "kv"]
        nodes.append(helper.make_node("GroupQueryAttention", ins, [f"o.{i}", f"present_key.{i}", f"present_value.{i}"],
                                      domain="com.microsoft", **attrs))
        for w in ("key", "value"):
            inputs.append(helper.make_tensor_value_info(f"past_{w}.{i}", elem, [1, KV_HEADS, None, DIM]))
            outs.append(helper.make_tensor_value_info(f"present_{w}.{i}", elem, None))
        x = f"o.{i}"
    graph = helper.make_graph(nodes, "attention", inputs, [helper.make_tensor_value_info(x, act, None)] + outs, inits)
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    m.ir_version = 10
    return m.SerializeToString()


def _bound(kv: str, length: int, threads: int, rng: np.random.Generator):
    """A session and an IO binding with a `length`-position cache in shared buffers (one new token per run)."""
    _, dtype = TYPES[kv]
    act = np.float16 if kv == "float16" else np.float32
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    sess = ort.InferenceSession(_model(kv), so, providers=["CPUExecutionProvider"])
    b = sess.io_binding()
    b.bind_cpu_input("q", rng.standard_normal((1, 1, HEADS * DIM)).astype(act))
    b.bind_cpu_input("k", rng.standard_normal((1, 1, KV_HEADS * DIM)).astype(act))
    b.bind_cpu_input("seqlens_k", np.array([length], np.int32))
    b.bind_cpu_input("total", np.array(length + 1, np.int32))
    keep = []
    for i in range(LAYERS):
        for w in ("key", "value"):
            shape = (1, KV_HEADS, length + 64, DIM)
            buf = (rng.integers(-100, 100, shape) if kv == "int8" else rng.standard_normal(shape)).astype(dtype)
            v = ort.OrtValue.ortvalue_from_numpy(buf)
            keep += [buf, v]
            b.bind_ortvalue_input(f"past_{w}.{i}", v)
            b.bind_ortvalue_output(f"present_{w}.{i}", v)
    b.bind_output(f"o.{LAYERS - 1}")
    return sess, b, keep


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--lengths", default="128,512,1024,2048")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--calls", type=int, default=3, help="timed steps per configuration and round")
    ap.add_argument("-o", "--output", type=Path, default=ROOT / "docs/results/kv-cache-decode")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    rows = []
    for length in (int(x) for x in args.lengths.split(",")):
        cases = {kv: _bound(kv, length, args.threads, rng) for kv in TYPES}
        times: dict[str, list[float]] = {kv: [] for kv in TYPES}
        for sess, b, _ in cases.values():
            sess.run_with_iobinding(b)  # warm-up
        for _ in range(args.rounds):
            for kv, (sess, b, _) in cases.items():
                sess.run_with_iobinding(b)  # untimed: the previous session's threads spin on these cores a while
                t = time.perf_counter()
                for _ in range(args.calls):
                    sess.run_with_iobinding(b)
                times[kv].append((time.perf_counter() - t) / args.calls)
        for kv in TYPES:
            med = statistics.median(times[kv])
            cache_bytes = 2 * LAYERS * KV_HEADS * DIM * (length + 1) * np.dtype(TYPES[kv][1]).itemsize
            rows.append({"length": length, "kv": kv, "ms": 1e3 * med, "cache_mb": cache_bytes / 1e6,
                         "vs_float32": statistics.median(a / b for a, b in zip(times["float32"], times[kv]))})
        del cases
    _write(rows, args)


def _write(rows: list[dict], args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out: Path = args.output
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"onnxruntime": ort.__version__, "threads": args.threads,
                                                    "rounds": args.rounds, "layers": LAYERS, "heads": HEADS,
                                                    "kv_heads": KV_HEADS, "head_dim": DIM, "rows": rows}, indent=1))
    lines = [f"Decode-step attention, {LAYERS} GroupQueryAttention layers of the Qwen3-1.7B shape, {args.threads} "
             f"threads, onnxruntime {ort.__version__}, median of {args.rounds}", "",
             "| prompt tokens | KV cache | cache MB | ms per step | speed vs float32 (paired) |",
             "| ---: | --- | ---: | ---: | ---: |"]
    lines += [f"| {r['length']} | {r['kv']} | {r['cache_mb']:.0f} | {r['ms']:.2f} | {r['vs_float32']:.2f}x |" for r in rows]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    fig, ax = plt.subplots(figsize=(6, 4))
    for kv in TYPES:
        sub = [r for r in rows if r["kv"] == kv]
        ax.plot([r["length"] for r in sub], [r["ms"] for r in sub], marker="o", label=kv)
    ax.set_xlabel("tokens in the cache")
    ax.set_ylabel("ms per decode step (28 layers of attention)")
    ax.set_yscale("log")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=120)
    print("\n".join(lines))


if __name__ == "__main__":
    main()

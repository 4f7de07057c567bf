"""Fuzz: the torch QuantLinear and ONNX Runtime's MatMulNBits compute the same function, on 1,200 random cases.

Each case draws bits (2/4/8), block size (16..256), K (1..520, any remainder), N (1..48), M (1..6 rows),
codes / scales / zero points at random (not from a quantizer, so every integer pattern may appear), with
or without a zero-point input (without one the kernel's default 2**(bits-1) applies, which QuantLinear is
given explicitly), with or without a bias, and accuracy level 0, 1 or 4. Cases are batched: every node of
one accuracy level sits in one graph with its own input and output, so there are three sessions in all.

- accuracy levels 0 and 1 (float32 compute): equal within 1e-5 of the output scale;
- accuracy level 4 (int8 activations): within the error bound of rounding A to int8 with a per-row scale,
  sum_k |W[n, k]| * max|A[m, :]| / 254, plus float slack: a bound that the kernel's per-block scales meet.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import TensorProto, helper, numpy_helper

from edge_recover.exporters.matmulnbits import IR_VERSION, MS_DOMAIN, OPSET
from edge_recover.packing import pack_codes, pack_zero_points
from edge_recover.qlinear import QuantLinear
from edge_recover.quantizer import QuantizedWeight
from edge_recover.scheme import QuantConfig

CASES_PER_LEVEL = 400
LEVELS = (0, 1, 4)


def _case(rng: np.random.Generator) -> dict:
    bits = int(rng.choice([2, 4, 8]))
    block = int(rng.choice([16, 32, 64, 128, 256]))
    k = int(rng.integers(1, 521))
    n = int(rng.integers(1, 49))
    m = int(rng.integers(1, 7))
    nb = -(-k // block)
    with_zp = bool(rng.integers(0, 2))
    codes = rng.integers(0, 2 ** bits, size=(n, k), dtype=np.uint8)
    zps = (rng.integers(0, 2 ** bits, size=(n, nb), dtype=np.uint8) if with_zp
           else np.full((n, nb), 2 ** (bits - 1), dtype=np.uint8))
    scales = (rng.uniform(0.2, 1.0, size=(n, nb)) * 10.0 ** rng.uniform(-3, -1)).astype(np.float32)
    bias = rng.normal(0, 0.1, size=n).astype(np.float32) if rng.integers(0, 4) == 0 else None
    a = rng.normal(0, 1, size=(m, k)).astype(np.float32)
    qw = QuantizedWeight(torch.from_numpy(codes), torch.from_numpy(scales), torch.from_numpy(zps),
                         QuantConfig(bits, block, symmetric=not with_zp))
    return {"qw": qw, "with_zp": with_zp, "bias": bias, "a": a}


def _graph(cases: list[dict], level: int) -> onnx.ModelProto:
    nodes, inits, inputs, outputs = [], [], [], []
    for i, c in enumerate(cases):
        qw, cfg = c["qw"], c["qw"].config
        n, k = qw.shape
        p = f"c{i}"
        inits += [numpy_helper.from_array(pack_codes(qw.codes.numpy(), cfg.bits, cfg.block_size), f"{p}.B"),
                  numpy_helper.from_array(qw.scales.numpy().reshape(-1), f"{p}.scales")]
        node_inputs = [f"{p}.A", f"{p}.B", f"{p}.scales"]
        if c["with_zp"]:
            inits.append(numpy_helper.from_array(pack_zero_points(qw.zero_points.numpy(), cfg.bits), f"{p}.zp"))
            node_inputs.append(f"{p}.zp")
        if c["bias"] is not None:
            inits.append(numpy_helper.from_array(c["bias"], f"{p}.bias"))
            node_inputs += [""] * (5 - len(node_inputs)) + [f"{p}.bias"]
        nodes.append(helper.make_node("MatMulNBits", node_inputs, [f"{p}.Y"], name=f"/{p}/MatMulNBits",
                                      domain=MS_DOMAIN, K=k, N=n, bits=cfg.bits, block_size=cfg.block_size,
                                      accuracy_level=level))
        inputs.append(helper.make_tensor_value_info(f"{p}.A", TensorProto.FLOAT, ["M", k]))
        outputs.append(helper.make_tensor_value_info(f"{p}.Y", TensorProto.FLOAT, ["M", n]))
    graph = helper.make_graph(nodes, f"fuzz-level{level}", inputs, outputs, initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid(MS_DOMAIN, 1)])
    model.ir_version = IR_VERSION
    return model


def _torch(c: dict) -> tuple[np.ndarray, np.ndarray]:
    """QuantLinear's output and its dequantized weight [N, K]."""
    bias = None if c["bias"] is None else torch.from_numpy(c["bias"])
    layer = QuantLinear.from_quantized(c["qw"], bias)
    with torch.no_grad():
        return layer(torch.from_numpy(c["a"])).numpy(), layer.weight.numpy()


def test_fuzz_matmulnbits_against_quantlinear():
    rng = np.random.default_rng(20261201)
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    checked, worst = 0, {}
    for level in LEVELS:
        cases = [_case(rng) for _ in range(CASES_PER_LEVEL)]
        sess = ort.InferenceSession(_graph(cases, level).SerializeToString(), so, providers=["CPUExecutionProvider"])
        got = sess.run(None, {f"c{i}.A": c["a"] for i, c in enumerate(cases)})
        for i, (c, y) in enumerate(zip(cases, got)):
            expected, w = _torch(c)
            scale = max(float(np.abs(expected).max()), 1e-3)
            err = np.abs(y - expected)
            if level == 4:
                bound = (np.abs(c["a"]).max(axis=1, keepdims=True) / 254.0) @ np.abs(w).sum(axis=1, keepdims=True).T
                ok = err <= 1.05 * bound + 1e-4 * scale
            else:
                ok = err <= 1e-5 * scale + 1e-6
            cfg = c["qw"].config
            assert ok.all(), (f"case {i} level {level}: bits {cfg.bits} block {cfg.block_size} K {c['a'].shape[1]} "
                              f"N {w.shape[0]} M {c['a'].shape[0]} zp {c['with_zp']} bias {c['bias'] is not None}: "
                              f"max err {err.max():.3g} (output scale {scale:.3g})")
            worst[level] = max(worst.get(level, 0.0), float(err.max() / scale))
            checked += 1
    assert checked == len(LEVELS) * CASES_PER_LEVEL >= 1000
    assert worst[0] < 1e-5 and worst[4] > 0  # level 4 really is the int8 path: not bit-equal

"""The static graphs' scale-safe RMS norm (exporters/static_passes.py, pass 6) on the QNN HTP emulator.

Real residual streams carry a few huge channels (SmolLM2: 1.74e4 from layer 11 on the first token). The norm
divides by m = max|x| so that x² cannot overflow fp16; the HTP divides by multiplying with the reciprocal, and
1 / m is an fp16 subnormal (flushed to zero) once m > 16,384, so the pass divides by sqrt(m) twice. This runs the
rewritten norm alone on the emulator against numpy, with rows up to fp16's range.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto as T
from onnx import helper, numpy_helper

from edge_recover.exporters.static_options import StaticOptions
from edge_recover.exporters.static_passes import safe_rms_norm
from edge_recover.qnn import open_htp_session, resolve_soc

import onnxruntime_qnn  # noqa: F401  (a test dependency: CI must fail, not skip, without it)

W, K, EPS = 8, 64, 1e-5


def _norm_graph() -> onnx.ModelProto:
    """x [1, W, K] -> the RMS norm as Optimum exports it: Pow, ReduceMean, Add(eps), Sqrt, Div(x, .), Mul(weight)."""
    rng = np.random.default_rng(0)
    p = "/model/layers.0/input_layernorm"
    nodes = [helper.make_node("Pow", ["x", "two"], [f"{p}/pow"], name=f"{p}/Pow"),
             helper.make_node("ReduceMean", [f"{p}/pow", "axes"], [f"{p}/mean"], name=f"{p}/ReduceMean", keepdims=1),
             helper.make_node("Add", [f"{p}/mean", "eps"], [f"{p}/add"], name=f"{p}/Add"),
             helper.make_node("Sqrt", [f"{p}/add"], [f"{p}/sqrt"], name=f"{p}/Sqrt"),
             helper.make_node("Div", ["x", f"{p}/sqrt"], [f"{p}/div"], name=f"{p}/Div"),
             helper.make_node("Mul", [f"{p}/div", "weight"], ["y"], name=f"{p}/Mul")]
    inits = [numpy_helper.from_array(np.asarray(2.0, np.float32), "two"),
             numpy_helper.from_array(np.asarray([-1], np.int64), "axes"),
             numpy_helper.from_array(np.asarray(EPS, np.float32), "eps"),
             numpy_helper.from_array((1 + 0.1 * rng.standard_normal(K)).astype(np.float32), "weight")]
    g = helper.make_graph(nodes, "norm", [helper.make_tensor_value_info("x", T.FLOAT, [1, W, K])],
                          [helper.make_tensor_value_info("y", T.FLOAT, [1, W, K])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)])
    m.ir_version = 9
    return m


@pytest.mark.parametrize("peak", [30.0, 800.0, 1.74e4, 6.0e4])
def test_the_safe_norm_holds_on_the_htp_past_fp16_subnormal_reciprocals(peak):
    graph = _norm_graph()
    weight = numpy_helper.to_array(next(i for i in graph.graph.initializer if i.name == "weight"))
    safe = safe_rms_norm(graph, StaticOptions(context_length=16, window=W))
    assert {n.name.rsplit("/", 1)[-1] for n in safe.graph.node} >= {"SqrtMax", "Div", "Div2"}
    x = np.random.default_rng(1).standard_normal((1, W, K)).astype(np.float32) * 4
    x[0, :, 3] = peak  # one huge channel in every row, as a real model's massive activation
    want = x / np.sqrt((x.astype(np.float64) ** 2).mean(-1, keepdims=True) + EPS) * weight
    got = open_htp_session(safe.SerializeToString(), resolve_soc("SM8650")).run(None, {"x": x})[0]
    err = np.abs(got - want).max() / np.abs(want).max()
    assert err < 2e-2, (peak, err)  # fp16: ~1e-3; the old single division by m was off by ~100 % at 1.74e4

"""An empty tensor on the HTP: the refusal names the graph by its file and the node (sdk/qnn.py), and the static
graphs' "no empty tensors" pass (exporters/static_passes.py) removes the cause, with the same result on the CPU EP.

    x [1, 4, 16] ─► Slice[..., 16:] (empty) ─┐
                 └──────────────────────────┴─► Concat(axis -1) ─► Mul(2) ─► y      (Optimum's partial-rotary tail)
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto as T
from onnx import helper, numpy_helper

from edge_recover.errors import EdgeRecoverError
from edge_recover.exporters.static_options import StaticOptions
from edge_recover.exporters.static_passes import drop_empty
from edge_recover.qnn import open_htp_session, resolve_soc

import onnxruntime_qnn  # noqa: F401  (a test dependency: CI must fail, not skip, without it)


def _graph() -> onnx.ModelProto:
    inits = [numpy_helper.from_array(np.array([16], np.int64), "start"),
             numpy_helper.from_array(np.array([2 ** 62], np.int64), "end"),
             numpy_helper.from_array(np.array([-1], np.int64), "axis"),
             numpy_helper.from_array(np.array(2.0, np.float32), "two")]
    nodes = [helper.make_node("Slice", ["x", "start", "end", "axis"], ["tail"], name="/attn/Slice_6"),
             helper.make_node("Concat", ["x", "tail"], ["cat"], name="/attn/Concat", axis=-1),
             helper.make_node("Mul", ["cat", "two"], ["y"], name="/attn/Mul")]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", T.FLOAT, [1, 4, 16])],
                          [helper.make_tensor_value_info("y", T.FLOAT, [1, 4, 16])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)], ir_version=9)


def test_the_htp_refuses_an_empty_slice_in_one_line_naming_the_file(tmp_path):
    path = tmp_path / "prefill.onnx"
    onnx.save(_graph(), str(path))
    with pytest.raises(EdgeRecoverError) as err:
        open_htp_session(path, resolve_soc("SM8650"))
    msg = str(err.value)
    assert "the QNN HTP does not take the whole graph 'prefill.onnx'" in msg and str(tmp_path) not in msg, msg
    assert "Slice" in msg and "\n" not in msg


def test_dropping_the_empty_input_puts_the_graph_on_the_htp_with_the_same_result():
    model = _graph()
    x = np.random.default_rng(0).standard_normal((1, 4, 16)).astype(np.float32)
    want = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    fixed = drop_empty(model, StaticOptions(8, 4))
    assert [n.op_type for n in fixed.graph.node] == ["Identity", "Mul"]  # the Slice is gone, the Concat a pass-through
    got = open_htp_session(fixed.SerializeToString(), resolve_soc("SM8650")).run(None, {"x": x})[0]
    np.testing.assert_allclose(got, want, rtol=2e-3)  # fp16 on the HTP

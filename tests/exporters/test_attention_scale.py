"""GroupQueryAttention at scale 1 (exporters/attention_scale.py): the 1/sqrt(head_dim) moves into the query's
norm weight (Qwen3), the layers' integers and scales stay as trained, and the package still equals torch."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from edge_recover.exporters.api import export_package, read_package_manifest
from edge_recover.exporters.attention_scale import unit_attention_scale

from .conftest import make_loaded


def _gqa(graph: onnx.GraphProto) -> list[onnx.NodeProto]:
    return [n for n in graph.node if n.op_type == "GroupQueryAttention"]


def _scale(node: onnx.NodeProto) -> float:
    return next(a.f for a in node.attribute if a.name == "scale")


def test_scale_moves_into_the_query_norm_and_the_package_still_equals_torch(tmp_path):
    lm = make_loaded("qwen3")
    s = float(lm.model.model.layers[0].self_attn.scaling)
    norm_weights = [layer.self_attn.q_norm.weight.detach().numpy().copy() for layer in lm.model.model.layers]
    pkg = export_package(lm, tmp_path / "pkg", scheme="w4w2gateup", target="cpu", method="rtn", calibration=0)
    m = read_package_manifest(pkg)
    graph = onnx.load(str(pkg / "model.onnx")).graph
    inits = {t.name: t for t in graph.initializer}
    gqa = _gqa(graph)
    assert gqa and all(_scale(n) == 1.0 for n in gqa) and f"attention scale in the query x{len(gqa)}" in m["fusions"]
    for i, want in enumerate(norm_weights):
        got = numpy_helper.to_array(inits[f"model.layers.{i}.self_attn.q_norm.weight.fused"])
        np.testing.assert_allclose(got, want * np.float32(s), rtol=1e-6)
    exact = m["parity"]["exact"]
    assert m["parity"]["ok"] and exact["top1_agreement"] == 1.0
    assert exact["max_abs_diff"] / exact["logit_scale"] < 1e-4


def test_without_a_query_norm_the_scale_stays_in_the_node(tmp_path):
    """Llama has no q_norm: a Mul on the query would cost what the M = 1 kernel saves, so nothing changes."""
    lm = make_loaded("llama")
    s = float(lm.model.model.layers[0].self_attn.scaling)
    pkg = export_package(lm, tmp_path / "pkg", scheme="w4", target="cpu", method="rtn", calibration=0)
    graph = onnx.load(str(pkg / "model.onnx"))
    assert all(abs(_scale(n) - s) < 1e-7 for n in _gqa(graph.graph))
    assert not any("attention scale" in f for f in read_package_manifest(pkg)["fusions"])
    before = graph.SerializeToString()
    assert unit_attention_scale(graph) == 0 and graph.SerializeToString() == before

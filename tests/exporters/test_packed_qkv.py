"""Packed QKV (exporters/packed_qkv.py): one MatMulNBits for q/k/v computes what the three nodes did, bit for
bit, holds each layer's integers in the manifest's rows, and the package contract checks those rows."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

from edge_recover.contract import check_graph
from edge_recover.errors import EdgeRecoverError
from edge_recover.exporters.api import export_package, read_package_manifest
from edge_recover.exporters.verify import empty_past, run_step, session

from .conftest import make_loaded


@pytest.fixture(scope="module", params=["llama", "qwen3", "qwen2"])
def pair(request, tmp_path_factory):
    """(packed, plain) packages of one tiny model: Llama's attention reads the packed node, Qwen3's head norms
    read it through a Split, Qwen2's through one Add of the three biases."""
    root = tmp_path_factory.mktemp(f"pqkv-{request.param}")
    kw = dict(scheme="w4w2gateup", target="cpu", method="rtn", calibration=0)
    packed = export_package(make_loaded(request.param), root / "packed", **kw)
    plain = export_package(make_loaded(request.param), root / "plain", pack_qkv=False, **kw)  # `--no-pack-qkv`
    return packed, plain


def test_packed_graph_equals_the_three_node_graph_bit_for_bit(pair):
    packed, plain = pair
    ops = lambda p: [n.op_type for n in onnx.load(str(p / "model.onnx"), load_external_data=False).graph.node]  # noqa: E731
    assert ops(packed).count("MatMulNBits") == ops(plain).count("MatMulNBits") - 2 * 2  # 2 layers: 3 nodes -> 1
    names = [n.name for n in onnx.load(str(plain / "model.onnx"), load_external_data=False).graph.node]
    normed = any("/q_norm/" in n for n in names)  # Qwen3's per-head norms
    assert ops(packed).count("Split") == ops(plain).count("Split") + (2 if normed else 0)
    biased = any(n.endswith("/self_attn/k_proj/Add") for n in names)  # Qwen2's biases: 3 Adds -> 1 per layer
    assert ops(packed).count("Add") == ops(plain).count("Add") - (2 * 2 if biased else 0)
    assert "packed QKV MatMulNBits x2" in read_package_manifest(packed)["fusions"]
    ids = np.random.default_rng(0).integers(1, 200, (1, 9))
    outs = []
    for pkg in (packed, plain):
        sess = session(pkg / "model.onnx")
        logits, past = run_step(sess, ids[:, :8], empty_past(sess), 0)
        step, _ = run_step(sess, ids[:, 8:], past, 8)  # a decode step on the cache the prompt wrote
        outs.append((logits, step))
    for a, b in zip(*outs):
        assert np.array_equal(a, b)


def test_manifest_rows_are_checked_against_the_graph(pair, tmp_path):
    packed, _ = pair
    manifest = read_package_manifest(packed)
    rows = {n: layer["rows"] for n, layer in manifest["layers"].items() if "rows" in layer}
    assert sorted(rows) == sorted(f"model.layers.{i}.self_attn.{p}_proj" for i in range(2) for p in "qkv")
    assert rows["model.layers.0.self_attn.q_proj"][0] == 0
    assert rows["model.layers.0.self_attn.k_proj"][0] == rows["model.layers.0.self_attn.q_proj"][1]
    assert check_graph(packed, manifest) == len(manifest["layers"])
    bad = json.loads(json.dumps(manifest))
    bad["layers"]["model.layers.1.self_attn.v_proj"]["rows"] = [0, 10_000]
    with pytest.raises(EdgeRecoverError, match="rows 0:10000 do not fit node"):
        check_graph(packed, bad)

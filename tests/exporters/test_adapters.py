"""Adapters in ONNX packages on a tiny random Llama/Qwen3 (W4/W2-GateUp, RTN, block 32):

- sidecar: the package's logits equal torch's quantized model with the PEFT adapter (exact graph, fp32);
  the graph holds the LoRA nodes under readable names and the adapter weights as overridable inputs;
- merge: the package's logits equal torch's merged-and-requantized model (PEFT merge_and_unload, then the
  quantizer core on each merged weight), and the manifest says how much of the recovery survived;
- bad input: an adapter for another base model, scheme or rank layout; a target without side-car support.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import pytest

from edge_recover.errors import EdgeRecoverError
from edge_recover.exporters.api import export_package, read_package_manifest
from edge_recover.exporters.lora import add_adapter, read_lora_adapter
from edge_recover.exporters.verify import compare, with_accuracy_level
from tests.fixtures.adapters import peft_model, quantized_checkpoint, random_adapter
from tests.fixtures.tiny_models import save_tiny_model


@pytest.fixture(scope="module", params=["llama", "qwen3"])
def base(request, tmp_path_factory):
    """(checkpoint, adapter a (rank 4, all layers), folder) for one architecture."""
    d = tmp_path_factory.mktemp(f"adapters-{request.param}")
    ckpt = quantized_checkpoint(save_tiny_model(d / "hf", request.param), d / "ckpt")
    return ckpt, random_adapter(ckpt, d / "a", rank=4, seed=1), d


def _exact_parity(pkg, torch_model, tmp_path):
    """ORT (every MatMulNBits at accuracy_level 0: fp32 dequantization) vs torch, prefill + decode step."""
    return compare(with_accuracy_level(pkg / "model.onnx", 0, tmp_path), torch_model, None)


def test_sidecar_equals_torch_with_peft_adapter(base, tmp_path):
    ckpt, adapter, _ = base
    pkg = export_package(str(ckpt), tmp_path / "pkg", adapter=adapter, adapter_mode="sidecar", adapter_name="a")
    ref = peft_model(ckpt, adapter)
    (tmp_path / "exact").mkdir()
    p = _exact_parity(pkg, ref, tmp_path / "exact")
    print(f"sidecar vs torch+PEFT: max abs diff {p.max_abs_diff:.3g}, mean {p.mean_abs_diff:.3g}, scale {p.logit_scale:.3g}")
    assert p.top1_agreement == 1.0 and p.max_abs_diff < 1e-4 * max(p.logit_scale, 1.0)
    # and the adapter matters: the base package without it differs
    base_pkg = export_package(str(ckpt), tmp_path / "base")
    (tmp_path / "exact-base").mkdir()
    assert _exact_parity(base_pkg, ref, tmp_path / "exact-base").max_abs_diff > 100 * max(p.max_abs_diff, 1e-6)

    m = read_package_manifest(pkg)
    assert m["adapter_mode"] == "sidecar" and m["parity"]["ok"]
    [entry] = m["adapters"]
    assert entry["name"] == "a" and entry["default"] and (pkg / entry["file"]).is_file()
    data = read_lora_adapter(adapter)
    assert entry["rank_layout"] == data.rank_layout() and set(entry["rank_layout"].values()) == {4}
    assert entry["source"]["quant_hash"] == m["lora"]["base"]["quant_hash"]
    graph = onnx.load(str(pkg / "model.onnx"), load_external_data=False)
    names = {n.name for n in graph.graph.node}
    for node in ("lora_A/MatMul", "lora_B/MatMul", "lora/Add"):
        assert f"/model/layers.1/mlp/gate_proj/{node}" in names
    inputs = {i.name for i in graph.graph.input}
    inits = {i.name for i in graph.graph.initializer}
    lora_inputs = {n for n in inputs if ".lora_" in n}
    assert len(lora_inputs) == 2 * len(data.layers) and lora_inputs <= inits  # overridable, defaults = adapter


def test_merge_equals_torch_merged_and_requantized(base, tmp_path):
    import torch

    from edge_recover.apply import quantized_layers
    from edge_recover.quantizer import quantize_weight

    ckpt, adapter, _ = base
    pkg = export_package(str(ckpt), tmp_path / "pkg", adapter=adapter, adapter_mode="merge", merge_method="rtn")
    ref = peft_model(ckpt, adapter).merge_and_unload()  # W_hat + scale * B @ A in the QuantLinear weights
    with torch.no_grad():
        for q in quantized_layers(ref).values():
            q.load_integers(quantize_weight(q.weight, q.config, "rtn"))
    (tmp_path / "exact").mkdir()
    p = _exact_parity(pkg, ref, tmp_path / "exact")
    print(f"merged vs torch merged+requantized: max abs diff {p.max_abs_diff:.3g}, scale {p.logit_scale:.3g}")
    assert p.top1_agreement == 1.0 and p.max_abs_diff < 1e-3 * max(p.logit_scale, 1.0)
    m = read_package_manifest(pkg)
    graph = onnx.load(str(pkg / "model.onnx"), load_external_data=False)
    assert not [n.name for n in graph.graph.node if "lora" in n.name]  # no extra nodes
    assert not (pkg / "adapters").exists() and m["adapter_mode"] == "merge"
    s = m["adapters"][0]["merge"]
    assert s["merge"]["method"] == "rtn" and 0 < s["merge"]["codes_changed"] < 1
    assert np.isfinite(s["recovery_kept_kl_pct"]) and s["kl_to_recovered"]["merged"] < s["kl_to_recovered"]["base"]


def _meta_copy(adapter, dest, **changes):
    shutil.copytree(adapter, dest)
    f = dest / "edge_recover_adapter.json"
    meta = json.loads(f.read_text())
    meta.update(changes)
    f.write_text(json.dumps(meta))
    return dest


def test_bad_adapters_are_refused(base, tmp_path):
    from edge_recover.scheme import named_scheme

    ckpt, adapter, d = base
    other_model = _meta_copy(adapter, tmp_path / "other-model", base_source_hash="sha256:" + "0" * 64)
    with pytest.raises(EdgeRecoverError, match="another base model"):
        export_package(str(ckpt), tmp_path / "p1", adapter=other_model)
    other_scheme = _meta_copy(adapter, tmp_path / "other-scheme", scheme=named_scheme("w4").with_block_size(32).to_json())
    with pytest.raises(EdgeRecoverError, match="scheme 'w4'"):
        export_package(str(ckpt), tmp_path / "p2", adapter=other_scheme, adapter_mode="merge")
    other_ints = _meta_copy(adapter, tmp_path / "other-ints", quant_hash="sha256:" + "1" * 64)
    with pytest.raises(EdgeRecoverError, match="other quantized integers"):
        export_package(str(ckpt), tmp_path / "p3", adapter=other_ints)
    with pytest.raises(EdgeRecoverError, match="cannot run side-car LoRA"):
        export_package(str(ckpt), tmp_path / "p4", adapter=adapter, target="npu", vendor="qualcomm")
    with pytest.raises(EdgeRecoverError, match="adapter_mode"):
        export_package(str(ckpt), tmp_path / "p5", adapter=adapter, adapter_mode="fold")
    assert not any((tmp_path / f"p{i}").exists() for i in range(1, 6))  # nothing half-written

    pkg = export_package(str(ckpt), tmp_path / "pkg", adapter=adapter, adapter_name="a", verify=False)
    rank2 = random_adapter(ckpt, tmp_path / "rank2", rank=2, seed=3)
    with pytest.raises(EdgeRecoverError, match="another rank layout"):
        add_adapter(pkg, rank2, "r2")
    gate_up = random_adapter(ckpt, tmp_path / "gate-up", rank=4, seed=3, targets="2bit")
    with pytest.raises(EdgeRecoverError, match="another rank layout"):
        add_adapter(pkg, gate_up, "gu")
    with pytest.raises(EdgeRecoverError, match="another base model"):
        add_adapter(pkg, other_model, "om")
    with pytest.raises(EdgeRecoverError, match="already has an adapter named 'a'"):
        add_adapter(pkg, adapter, "a")
    with pytest.raises(EdgeRecoverError, match="--name"):
        add_adapter(pkg, adapter, "../evil")
    m = read_package_manifest(pkg)
    assert [a["name"] for a in m["adapters"]] == ["a"] and sorted(p.name for p in (pkg / "adapters").iterdir()) == ["a.onnx_adapter"]

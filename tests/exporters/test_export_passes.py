"""Export as passes (exporters/passes.py): each target's pass list, one frozen options object, options refused
before the model loads, and a pass that fails inside the package folder leaves no folder behind."""

from __future__ import annotations

import dataclasses

import pytest

from edge_recover.errors import EdgeRecoverError
from edge_recover.exporters import passes
from edge_recover.exporters.api import ExportOptions, export
from edge_recover.exporters.targets import TARGETS, resolve_target

from .conftest import make_loaded

DYNAMIC = ["quantize", "adapter_base", "optimum_graph", "matmulnbits", "lora_sidecar", "fusions", "embedding",
           "packed_qkv", "attention_scale", "check_graph", "write_graph", "hf_files", "kv_dtype", "adapters", "verify", "package"]


def test_each_target_runs_the_documented_pass_list():
    for name, prof in TARGETS.items():
        names = passes.pass_list(prof).names()
        if prof.static_graphs:  # qnn: the static NPU graph is the same list plus its own two passes
            assert name == "qnn"
            assert names == DYNAMIC[:9] + ["static_preflight", "check_graph"] + DYNAMIC[10:15] + ["static_graphs", "package"]
        else:
            assert names == DYNAMIC, name
    every = {p for pl in (passes.DYNAMIC, passes.STATIC) for p in pl.build + pl.write}
    for p in every:  # `(state, options) -> state`, said in one line
        doc = (p.__doc__ or "").strip()
        assert doc and "\n" not in doc, p.__name__


def test_options_are_one_frozen_object_checked_before_the_model_loads(tmp_path):
    opts = ExportOptions(target="cpu", kv_dtype="float16")
    with pytest.raises(dataclasses.FrozenInstanceError):
        opts.kv_dtype = "int8"  # type: ignore[misc]
    assert opts.fused(resolve_target("cpu")) and not opts.fused(resolve_target("dml"))
    cases = [(ExportOptions(method="bogus"), "`method`"), (ExportOptions(kv_dtype="int4"), "`kv_dtype`"),
             (ExportOptions(target="dml", kv_dtype="float16"), "`--fuse`"), (ExportOptions(target="tpu"), "tpu")]
    for bad, needle in cases:  # the model path does not exist: loading it would fail differently
        with pytest.raises(EdgeRecoverError, match=needle):
            export(tmp_path / "no-such-model", tmp_path / "pkg", bad)
    assert not (tmp_path / "pkg").exists()


def test_a_failing_write_pass_leaves_no_package(tmp_path, monkeypatch):
    seen = []

    def record(state, options):
        """Record the graph files the write passes wrote so far, then fail."""
        seen.extend(sorted(p.name for p in state.folder.iterdir()))
        raise EdgeRecoverError("stop here")

    broken = passes.PassList(passes.DYNAMIC.build, passes.DYNAMIC.write[:1] + (record,))
    monkeypatch.setattr(passes, "DYNAMIC", broken)
    with pytest.raises(EdgeRecoverError, match="stop here"):
        export(make_loaded("llama"), tmp_path / "pkg", ExportOptions(scheme="w4", method="rtn", calibration=0))
    assert "model.onnx" in seen and "model.onnx.data" in seen  # write_graph ran inside the folder
    assert not (tmp_path / "pkg").exists() and list(tmp_path.iterdir()) == []


def _graph_blocks(pkg) -> dict[str, int]:
    """layer -> the `block_size` attribute of its node (`/model/layers.0/mlp/up_proj/MatMulNBits`)."""
    import onnx

    graph = onnx.load(str(pkg / "model.onnx"), load_external_data=False)
    return {n.name.strip("/").removesuffix("/MatMulNBits").replace("/", "."):
            next(onnx.helper.get_attribute_value(a) for a in n.attribute if a.name == "block_size")
            for n in graph.graph.node if n.op_type == "MatMulNBits"}


def _scheme_file(tmp_path) -> str:
    from edge_recover.scheme import named_scheme, parse_rule

    path = tmp_path / "mine.json"  # every layer at 32 (not the cpu target's 64), down_proj at 128
    path.write_text(named_scheme("w4").with_block_size(32).with_rules([parse_rule(r"down_proj$=4:128")]).dumps())
    return str(path)


@pytest.mark.parametrize("scheme, block_size, head, down, other", [
    ("object", None, 32, 64, 64),  # `lm_head=4:32` keeps its block, the named scheme's own take the target's
    ("object", 16, 16, 16, 16),  # `block_size` overrides every block
    ("file", None, None, 128, 32),  # a JSON file keeps its blocks (and its float head)
    ("file", "4:64", None, 64, 64),
    ("w4", None, 64, 64, 64),  # a name: the target's preferred block, and the target's (8-bit) head
    ("w4", 32, 32, 32, 32),
])
def test_export_blocks_by_scheme_kind(tmp_path, scheme, block_size, head, down, other):
    from edge_recover.scheme import load_scheme

    spec = {"object": lambda: load_scheme("w4", ["lm_head=4:32"]), "file": lambda: _scheme_file(tmp_path)}
    opts = ExportOptions(target="cpu", scheme=spec.get(scheme, lambda: scheme)(), block_size=block_size,
                         method="rtn", calibration=0, verify=False)
    assert TARGETS["cpu"].preferred_block_size == 64
    blocks = _graph_blocks(export(make_loaded("llama"), tmp_path / "pkg", opts))
    assert blocks.pop("lm_head", None) == head
    assert {blocks.pop(f"model.layers.{i}.mlp.down_proj") for i in range(2)} == {down}
    assert len(blocks) == 2 * 4 and set(blocks.values()) == {other}  # qkv_proj (packed), o, gate, up per layer

"""Bad input: one clear error, non-zero exit, and no half-written package."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from types import SimpleNamespace

from edge_recover.checkpoint import save_quantized
from edge_recover.errors import EdgeRecoverError
from edge_recover.exporters import verify as verify_mod
from edge_recover.exporters.api import export_package, read_package_manifest
from edge_recover.pipeline import quantize_loaded
from edge_recover.scheme import named_scheme

from .conftest import make_loaded


def _cli(*args):
    code = "import sys; from edge_recover.cli import main; sys.argv = ['edge-recover', *sys.argv[1:]]; main()"
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=300)


def _leftovers(folder):
    return [p.name for p in folder.iterdir()]


@pytest.mark.parametrize("args, needle", [
    (["--target", "gpu"], "unknown `target` 'gpu'"),
    (["--target", "npu", "--vendor", "nvidia"], "unknown `vendor` 'nvidia'"),
    (["--target", "cpu", "--vendor", "amd"], "does not go with target 'cpu'"),
])
def test_cli_unknown_target_or_vendor(tmp_path, tiny_dirs, args, needle):
    r = _cli("export", str(tiny_dirs["llama"]), "-o", str(tmp_path / "pkg"), *args)
    assert r.returncode == 2
    assert needle in r.stderr and len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
    assert _leftovers(tmp_path) == []


def test_not_a_causal_lm(tmp_path):
    bert = tmp_path / "bert"
    bert.mkdir()
    (bert / "config.json").write_text(json.dumps({"model_type": "bert", "architectures": ["BertModel"]}))
    with pytest.raises(EdgeRecoverError, match="unsupported architecture 'bert'"):
        export_package(bert, tmp_path / "pkg")
    junk = tmp_path / "model.bin"
    junk.write_bytes(b"not a model")
    r = _cli("export", str(junk), "-o", str(tmp_path / "pkg2"))
    assert r.returncode == 2 and "not a .gguf file" in r.stderr and "Traceback" not in r.stderr
    assert sorted(_leftovers(tmp_path)) == ["bert", "model.bin"]


def test_existing_output_refused_before_work(tmp_path, tiny_dirs):
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "keep.txt").write_text("mine")
    r = _cli("export", str(tiny_dirs["llama"]), "-o", str(tmp_path / "pkg"))
    assert r.returncode == 2 and "already exists" in r.stderr
    assert _leftovers(tmp_path / "pkg") == ["keep.txt"]


def test_interrupted_export_leaves_nothing(tmp_path, monkeypatch):
    def boom(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(verify_mod, "compare", boom)
    with pytest.raises(KeyboardInterrupt):
        export_package(make_loaded("llama"), tmp_path / "pkg", method="rtn", calibration=0)
    assert _leftovers(tmp_path) == []


def test_failed_verification_refuses_package(tmp_path, monkeypatch):
    real = verify_mod.compare

    class Wrong(torch.nn.Module):  # stands for a torch model whose logits disagree with the graph
        def __init__(self, config):
            super().__init__()
            self.config = config

        def forward(self, ids):
            return SimpleNamespace(logits=torch.randn(*ids.shape, self.config.vocab_size))

    monkeypatch.setattr(verify_mod, "compare", lambda path, model, tok, **k: real(path, Wrong(model.config), tok, **k))
    with pytest.raises(EdgeRecoverError, match="verification failed.*--no-verify"):
        export_package(make_loaded("llama"), tmp_path / "pkg", method="rtn", calibration=0)
    assert _leftovers(tmp_path) == []
    monkeypatch.setattr(verify_mod, "compare", real)
    pkg = export_package(make_loaded("llama"), tmp_path / "pkg", method="rtn", calibration=0, verify=False)
    assert read_package_manifest(pkg)["parity"] is None


def test_prequantized_checkpoint_keeps_blocks_or_is_refused(tmp_path):
    lm = make_loaded("qwen3")
    report = quantize_loaded(lm, named_scheme("w4w2gateup").with_block_size(16), method="rtn", calibration=0,
                             progress=False)
    save_quantized(lm, tmp_path / "ckpt", report)
    with pytest.raises(EdgeRecoverError, match="block_size 16.*vitisai.*--block-size 128"):
        export_package(tmp_path / "ckpt", tmp_path / "pkg", target="vitisai")
    assert not (tmp_path / "pkg").exists()
    pkg = export_package(tmp_path / "ckpt", tmp_path / "pkg", target="cpu")
    layers = read_package_manifest(pkg)["layers"]
    assert {v["block_size"] for v in layers.values()} == {16}
    assert layers["model.layers.0.mlp.gate_proj"]["bits"] == 2


def test_read_package_manifest_refuses_non_packages(tmp_path):
    with pytest.raises(EdgeRecoverError, match="not a folder"):
        read_package_manifest(tmp_path / "missing")
    with pytest.raises(EdgeRecoverError, match="no manifest.json"):
        read_package_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"kind": "edge-recover-package", "format_version": 99}))
    with pytest.raises(EdgeRecoverError, match="newer than this runtime reads"):
        read_package_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"kind": "other"}))
    with pytest.raises(EdgeRecoverError, match="not an edge-recover package"):
        read_package_manifest(tmp_path)


def test_targets_command_lists_all():
    r = _cli("targets")
    assert r.returncode == 0
    for name in ("cpu", "dml", "qnn", "openvino", "vitisai", "npu"):
        assert name in r.stdout


def test_cli_kv_dtype_and_embedding_options(tmp_path, tiny_dirs):
    """`--kv-dtype int8` and `--float-embedding` reach the package; an unknown KV type is one line, exit 2."""
    from edge_recover.scheme import load_scheme

    scheme = tmp_path / "w4-head8.json"
    scheme.write_text(load_scheme("w4", ["lm_head=8"]).dumps())
    r = _cli("export", str(tiny_dirs["qwen3"]), "-o", str(tmp_path / "pkg"), "--scheme", str(scheme),
             "--method", "rtn", "--calibration", "0", "--kv-dtype", "int8", "--float-embedding")
    assert r.returncode == 0, r.stderr
    assert "int8 KV cache" in r.stdout
    m = read_package_manifest(tmp_path / "pkg")
    assert m["kv_dtype"] == "int8" and m["embedding"] == "float32 (share_embedding=False)"
    r = _cli("export", str(tiny_dirs["qwen3"]), "-o", str(tmp_path / "pkg2"), "--kv-dtype", "int4")
    assert r.returncode == 2 and "unknown `kv_dtype` 'int4'" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "pkg2").exists()


def test_cli_pack_qkv_default_and_no_pack_qkv(tmp_path, tiny_dirs):
    """q/k/v are one node by default (also under an int8 KV cache); `--no-pack-qkv` keeps three; both verified."""
    r = _cli("export", str(tiny_dirs["llama"]), "-o", str(tmp_path / "p"), "--method", "rtn", "--calibration", "0",
             "--kv-dtype", "int8")
    assert r.returncode == 0, r.stderr
    assert "packed QKV MatMulNBits x2" in r.stdout
    m = read_package_manifest(tmp_path / "p")
    assert m["parity"]["ok"] and m["layers"]["model.layers.0.self_attn.v_proj"]["rows"][1] == \
        m["layers"]["model.layers.0.self_attn.v_proj"]["shape"][0] + m["layers"]["model.layers.0.self_attn.v_proj"]["rows"][0]
    r = _cli("export", str(tiny_dirs["llama"]), "-o", str(tmp_path / "u"), "--method", "rtn", "--calibration", "0",
             "--no-pack-qkv")
    assert r.returncode == 0, r.stderr
    m = read_package_manifest(tmp_path / "u")
    assert not any("packed QKV" in f for f in m["fusions"]) and "rows" not in m["layers"]["model.layers.0.self_attn.q_proj"]

"""The peers benchmark's parts that run without the peers: a GGUF file's facts for the profiler, and a
missing peer listed with its install command (bench/peers.py), never dropped."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from edge_recover.errors import EdgeRecoverError
from edge_recover.runtimes.profiler import PackageEntry, _describe_package

REPO = Path(__file__).resolve().parents[2]


def _gguf(path: Path, tied: bool) -> Path:
    """A llama-architecture GGUF of 2 layers (hidden 8, 4 heads, 2 KV heads, vocab 16), F32 tensors."""
    import gguf

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(2)
    w.add_context_length(64)
    w.add_embedding_length(8)
    w.add_head_count(4)
    w.add_head_count_kv(2)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    rng = np.random.default_rng(0)
    w.add_tensor("token_embd.weight", rng.standard_normal((16, 8)).astype(np.float32))
    if not tied:
        w.add_tensor("output.weight", rng.standard_normal((16, 8)).astype(np.float32))
    for i in range(2):
        w.add_tensor(f"blk.{i}.attn_q.weight", rng.standard_normal((8, 8)).astype(np.float32))
        w.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(8, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.mark.parametrize("tied", [False, True])
def test_gguf_facts(tmp_path, tied):
    path = _gguf(tmp_path / "m.gguf", tied)
    d = _describe_package(PackageEntry(str(path), label="g", engine="llama"))
    n = 16 * 8 * (1 if tied else 2) + 2 * (64 + 8)
    assert d["parameters"] == n and d["weight_bytes"] == 4 * n
    # untied: the embedding table is read one row per token; tied, it is the output matrix, read in full
    assert d["weight_bytes_per_token"] == 4 * n - (0 if tied else 4 * 8 * 15)
    assert d["kv_bytes_per_position"] == 2 * 2 * 2 * 2 * 2  # K and V, 2 layers, 2 KV heads, head dim 2, float16
    assert d["context_length"] == 64 and d["scheme"] == "llama.cpp ALL_F32"
    assert d["size_bytes"] == path.stat().st_size > d["weight_bytes"]


def test_gguf_missing_file(tmp_path):
    with pytest.raises(EdgeRecoverError, match="does not exist"):
        _describe_package(PackageEntry(str(tmp_path / "none.gguf"), label="g", engine="llama"))


def _peers_module():
    spec = importlib.util.spec_from_file_location("bench_peers", REPO / "bench" / "peers.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_missing_peers_are_listed_with_their_install_command(tiny_package, tmp_path, monkeypatch):
    peers = _peers_module()
    monkeypatch.setattr(peers, "LLAMA_PY", str(tmp_path / "no-venv" / "bin" / "python"))
    monkeypatch.setattr(peers.pm, "GENAI_PY", tmp_path / "no-genai" / "bin" / "python")
    args = peers.argparse.Namespace(ours="", package=[f"mine={tiny_package}"], gguf="Q4_0,Q2_K", method="rtn")
    found, missing = peers.entries(args, tmp_path)
    assert [(e.label, e.engine) for e in found] == [("mine@ort", "ort"), ("mine@genai", "genai")]
    assert [m["label"] for m in missing] == ["builder-int4", "llama.cpp-Q4_0", "llama.cpp-Q2_K"]
    assert all(m["why"].startswith("not installed: ") for m in missing)
    assert "transformers>=5" in missing[0]["why"] and "llama-cpp-python==0.3.36" in missing[1]["why"]
    # an interpreter that exists but cannot import llama_cpp is missing too
    fake = tmp_path / "python"
    fake.write_text("#!/bin/sh\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setattr(peers, "LLAMA_PY", str(fake))
    assert [m["label"] for m in peers.entries(args, tmp_path)[1]][1:] == ["llama.cpp-Q4_0", "llama.cpp-Q2_K"]

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


def _shipped_gguf(path: Path) -> Path:
    """A tiny GGUF whose header says Q4_K_M, as a model's shipped file does (its tensors stay F32)."""
    import gguf

    _gguf(path, tied=True)
    reader = gguf.GGUFReader(str(path), "r+")
    field = reader.get_field("general.file_type")
    field.parts[field.data[0]][0] = gguf.LlamaFileType.MOSTLY_Q4_K_M
    return path


def test_gguf_model_plan(tmp_path):
    """`--model` a GGUF-shipped model: the shipped file as it is, then files made from it; only the types that
    llama.cpp refuses without one get an importance matrix; a wrong `--gguf` says what it takes."""
    import sys

    sys.path.insert(0, str(REPO / "bench"))
    import peers_gguf as pg

    src = _shipped_gguf(tmp_path / "model.gguf")
    kind = pg.file_kind(src)
    assert kind == "Q4_K_M"
    plan = pg.plan(src, "m", ["shipped", "Q4_0", "Q2_K", "IQ2_M"], tmp_path / "w", kind)
    assert [e.label for e in plan] == ["llama.cpp-Q4_K_M-shipped", "llama.cpp-Q4_0", "llama.cpp-Q2_K",
                                       "llama.cpp-IQ2_M"]
    assert plan[0].path == src and plan[0].shipped and not any(e.shipped for e in plan[1:])
    assert [e.path.name for e in plan[1:]] == ["m-Q4_0.gguf", "m-Q2_K.gguf", "m-IQ2_M.gguf"]
    assert [e.imatrix for e in plan] == [False, False, False, True]
    assert pg.FTYPES["IQ2_M"] == 29 and pg.FTYPES["Q4_0"] == 2  # llama.h's LLAMA_FTYPE_MOSTLY_* values
    with pytest.raises(ValueError, match="`--gguf` names 'IQ9'"):
        pg.plan(src, "m", ["IQ9"], tmp_path, kind)
    with pytest.raises(ValueError, match="twice"):
        pg.plan(src, "m", ["Q4_0", "Q4_0"], tmp_path, kind)


def test_gguf_model_entries_without_llama(tiny_package, tmp_path, monkeypatch):
    """Without llama.cpp every planned GGUF entry, the shipped one included, is listed with its install command."""
    peers = _peers_module()
    monkeypatch.setattr(peers, "LLAMA_PY", str(tmp_path / "no-venv" / "bin" / "python"))
    monkeypatch.setattr(peers.pm, "GENAI_PY", tmp_path / "no-genai" / "bin" / "python")
    src = _shipped_gguf(tmp_path / "model.gguf")
    assert peers.resolve_model(str(src)) == ("model", src)
    with pytest.raises(SystemExit, match="--model"):
        peers.resolve_model(str(tmp_path / "none.gguf"))
    args = peers.argparse.Namespace(package=[f"w4w2={tiny_package}"], gguf="shipped,Q2_K,IQ2_XS", imatrix_chunks=2)
    found, missing = peers.gguf_entries(args, src, "model")
    assert [(e.label, e.engine) for e in found] == [("w4w2@ort", "ort"), ("w4w2@genai", "genai")]
    assert [m["label"] for m in missing] == ["builder-int4", "llama.cpp-Q4_K_M-shipped", "llama.cpp-Q2_K",
                                             "llama.cpp-IQ2_XS"]
    assert "llama-cpp-python==0.3.36" in missing[1]["why"]


def test_race_is_paired_per_round():
    """The race's ratio is the median of the per-round ratios (2, 3, 0.5 -> 2), not the ratio of medians (1.0)."""
    peers = _peers_module()
    runs = {"w4w2@ort": [20.0, 30.0, 10.0], "llama.cpp-Q4_0": [10.0, 10.0, 20.0]}
    data = {"settings": {"prompt_lengths": [128]},
            "packages": [{"label": "w4w2@ort", "perplexity": {"perplexity": 12.5}},
                         {"label": "w4w2@genai"}, {"label": "llama.cpp-Q4_0", "perplexity": {"perplexity": 9.0}}],
            "results": [{"package": k, "prompt_length": 128, "runs": [{"decode_tok_s": v} for v in vs]}
                        for k, vs in runs.items()]}
    assert peers.goals(data, "w4w2", "qwen2.5-coder-1.5b") == [
        "w4w2@ort / llama.cpp-Q4_0: decode 2.00x at 128; perplexity 12.50 vs 9.00"]
    assert peers.goals(data, "other", "qwen2.5-coder-1.5b") == ["race not summarized: `other@ort` is not in the run"]


def test_imatrix_stats_are_llama_imatrix_means():
    """What the quantizer is given: per input column, the mean of x^2 over every row seen, batches pooled."""
    import sys

    sys.path.insert(0, str(REPO / "bench"))
    import peers_gguf as pg

    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((16, 8)).astype(np.float32), rng.standard_normal((32, 8)).astype(np.float32)
    stats = pg.ImatrixStats()
    stats.add(pg._weight_name("CPU#blk.0.ffn_up.weight#0"), a)
    stats.add("blk.0.ffn_up.weight", b)
    means = stats.means()
    assert list(means) == ["blk.0.ffn_up.weight"] and means["blk.0.ffn_up.weight"].dtype == np.float32
    np.testing.assert_allclose(means["blk.0.ffn_up.weight"], np.square(np.concatenate([a, b])).mean(0), rtol=1e-6)
    with pytest.raises(ValueError, match="inconsistent"):
        stats.add("blk.0.ffn_up.weight", a[:, :4])
    chunks = pg.calibration_chunks(list(range(1000)), 4, 100)
    assert chunks.shape == (4, 100) and chunks[:, 0].tolist() == [0, 300, 600, 900]
    with pytest.raises(ValueError, match="imatrix-chunks"):
        pg.calibration_chunks(list(range(100)), 2, 100)

"""Quantized checkpoints round-trip bit-exactly; the CLI turns bad input into one line and exit 2."""

import json
import os
import subprocess
import sys

import pytest
import torch

from edge_recover.apply import quantize_model, quantized_layers
from edge_recover.checkpoint import load_quantized, save_quantized, unpacked_equal
from edge_recover.errors import EdgeRecoverError
from edge_recover.models import load_model
from edge_recover.pipeline import quantize_loaded
from edge_recover.scheme import named_scheme


@pytest.mark.parametrize("arch_fixture", ["tiny_llama_dir", "tiny_qwen3_dir"])
def test_checkpoint_round_trip(arch_fixture, request, tmp_path):
    lm = load_model(request.getfixturevalue(arch_fixture))
    report = quantize_loaded(lm, named_scheme("w4w2gateup"), method="gptq", calibration=4, progress=False)
    bits = {layer.name.rsplit(".", 1)[-1]: layer.config for layer in report.layers}
    assert bits["gate_proj"].startswith("2-bit") and bits["up_proj"].startswith("2-bit")
    assert bits["down_proj"].startswith("4-bit") and bits["q_proj"].startswith("4-bit")
    assert report.bytes_after < report.bytes_before / 2  # the kept (tied) lm_head dominates a tiny model
    ids = torch.randint(0, 200, (2, 12))
    expected = lm.model(input_ids=ids).logits
    save_quantized(lm, tmp_path / "q", report)
    back = load_model(tmp_path / "q")
    assert back.quantized_manifest["scheme"]["name"] == "w4w2gateup"
    assert back.source_hash == lm.source_hash
    a, b = quantized_layers(lm.model), quantized_layers(back.model)
    assert a.keys() == b.keys() and len(a) == 14
    assert all(unpacked_equal(a[n].quantized(), b[n].quantized()) for n in a)
    torch.testing.assert_close(back.model(input_ids=ids).logits, expected)


def test_slim_checkpoint_takes_kept_weights_from_its_source(tiny_llama_dir, tiny_qwen3_dir, tmp_path):
    lm = load_model(tiny_llama_dir)
    report = quantize_model(lm.model, named_scheme("w4w2gateup"), "rtn", progress=False)
    save_quantized(lm, tmp_path / "full", report)
    save_quantized(lm, tmp_path / "slim", report, slim=True)
    assert (tmp_path / "slim/model.safetensors").stat().st_size < (tmp_path / "full/model.safetensors").stat().st_size / 2
    ids = torch.randint(0, 200, (1, 9))
    back = load_model(tmp_path / "slim", base=tiny_llama_dir)  # also the default: the recorded source path
    torch.testing.assert_close(back.model(input_ids=ids).logits, lm.model(input_ids=ids).logits, rtol=0, atol=0)
    with pytest.raises(EdgeRecoverError, match="quantized from another model"):
        load_model(tmp_path / "slim", base=tiny_qwen3_dir)


def test_source_hash_is_of_the_weights_not_the_files(tiny_llama_dir, tmp_path):
    lm = load_model(tiny_llama_dir)
    lm.model.save_pretrained(tmp_path / "copy")  # other file bytes (metadata), same tensors
    lm.tokenizer.save_pretrained(tmp_path / "copy")
    assert load_model(tmp_path / "copy").source_hash == lm.source_hash
    with torch.no_grad():
        lm.model.model.norm.weight[0] += 1e-3
    lm.model.save_pretrained(tmp_path / "changed")
    lm.tokenizer.save_pretrained(tmp_path / "changed")
    assert load_model(tmp_path / "changed").source_hash != lm.source_hash


def test_save_refuses_existing_folder_and_leaves_nothing(tiny_llama_dir, tmp_path):
    lm = load_model(tiny_llama_dir)
    report = quantize_model(lm.model, named_scheme("w4"), "rtn", progress=False)
    (tmp_path / "exists").mkdir()
    with pytest.raises(EdgeRecoverError, match="already exists"):
        save_quantized(lm, tmp_path / "exists", report)
    assert list((tmp_path / "exists").iterdir()) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exists"]


def test_corrupt_checkpoint_is_refused(tiny_llama_dir, tmp_path):
    lm = load_model(tiny_llama_dir)
    report = quantize_model(lm.model, named_scheme("w4"), "rtn", progress=False)
    save_quantized(lm, tmp_path / "q", report)
    (tmp_path / "q" / "model.safetensors").write_bytes(b"\x00garbage")
    with pytest.raises(EdgeRecoverError, match="corrupt or missing"):
        load_quantized(tmp_path / "q")


def test_checkpoint_without_config_names_the_fix(tiny_llama_dir, tmp_path):
    """A checkpoint folder carried without its config (only the weights and the manifest): one line, exit 2."""
    lm = load_model(tiny_llama_dir)
    report = quantize_model(lm.model, named_scheme("w4"), "rtn", progress=False)
    save_quantized(lm, tmp_path / "q", report)
    (tmp_path / "q" / "config.json").unlink()
    r = _cli("export", tmp_path / "q", "--target", "cpu", "-o", tmp_path / "pkg", cwd=tmp_path)
    assert r.returncode == 2 and "has no config.json" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not (tmp_path / "pkg").exists()


def _cli(*args, cwd):
    env = {**os.environ, "EDGE_RECOVER_CACHE": str(cwd / "cache")}
    return subprocess.run([sys.executable, "-m", "edge_recover", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, env=env)


def test_cli_quantize_writes_checkpoint(tiny_llama_dir, tmp_path):
    r = _cli("quantize", tiny_llama_dir, "--scheme", "w4w2gateup", "--method", "mse", "--calibration", "2",
             "--rule", r"layers\.1\.self_attn\.q_proj=8:64", "-o", tmp_path / "out", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    manifest = json.loads((tmp_path / "out" / "edge_recover_quantized.json").read_text())
    assert manifest["layers"]["model.layers.1.self_attn.q_proj"]["bits"] == 8
    assert manifest["layers"]["model.layers.0.mlp.up_proj"]["bits"] == 2
    assert "SQNR" in r.stdout


@pytest.mark.parametrize("args,match", [
    (["--scheme", "w3"], "unknown scheme 'w3'"),
    (["--rule", "gate_prj=2"], "matches no linear layer"),
    (["--rule", "gate_proj=3"], "`bits` must be one of"),
    (["--block-size", "48"], "power of two >= 16"),
    (["--method", "awq"], "unknown `method`"),
])
def test_cli_bad_options(tiny_llama_dir, tmp_path, args, match):
    r = _cli("quantize", tiny_llama_dir, "--method", "rtn", *args, "-o", tmp_path / "out", cwd=tmp_path) \
        if "--method" not in args else _cli("quantize", tiny_llama_dir, *args, "-o", tmp_path / "out", cwd=tmp_path)
    assert r.returncode == 2
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and match in err[0], r.stderr
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_cli_bad_model_paths(tmp_path):
    (tmp_path / "notamodel.txt").write_text("hello")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text("{ nope")
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "config.json").write_text(json.dumps({"model_type": "bert", "architectures": ["BertModel"]}))
    (tmp_path / "exists").mkdir()
    cases = [
        (tmp_path / "missing", "out1", "does not exist"),
        (tmp_path / "notamodel.txt", "out2", "not a .gguf file"),
        (tmp_path / "broken", "out3", "cannot read a model config"),
        (tmp_path / "bert", "out4", "unsupported architecture 'bert'"),
        (tmp_path / "bert", "exists", "already exists"),
    ]
    for model, out, match in cases:
        r = _cli("quantize", model, "--method", "rtn", "-o", tmp_path / out, cwd=tmp_path)
        assert r.returncode == 2, (model, r.stderr)
        assert match in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("out")) == []


def test_cli_usage_error_is_one_line(tmp_path):
    out = _cli("quantize", "smollm2", "-o", tmp_path / "q", "--no-such-option", cwd=tmp_path)
    assert out.returncode == 2 and "No such option" in out.stderr and "Traceback" not in out.stderr
    assert not (tmp_path / "q").exists()

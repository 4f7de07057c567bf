"""The fused graph (GroupQueryAttention) and the low-memory export path against the plain Optimum path.

Both are fast paths with a reference beside them: the same tiny quantized model is exported each way and
the packages are run through the runtime's KV-cache session (prefill, then decode steps), side by side.
"""

from __future__ import annotations

import collections
import json

import numpy as np
import onnx
import pytest
import torch

from edge_recover.exporters.api import export_package
from edge_recover.runtimes.session import OrtCausalLM

from .conftest import make_loaded

PROMPT = np.array([[5, 17, 42, 99, 7, 3, 250, 11]])


def _run(pkg, steps: int = 6) -> tuple[np.ndarray, list[int]]:
    """Logits of the prefill and of `steps` greedy decode steps (KV cache), and the greedy tokens."""
    lm = OrtCausalLM(pkg, threads=1)
    logits, cache = lm.step(PROMPT, lm.empty_cache())
    rows, toks = [logits], []
    for _ in range(steps):
        toks.append(int(np.argmax(logits)))
        logits, cache = lm.step(np.array([[toks[-1]]]), cache)
        rows.append(logits)
    return np.stack(rows), toks


def _ops(pkg) -> collections.Counter:
    return collections.Counter(n.op_type for n in onnx.load(str(pkg / "model.onnx"), load_external_data=False).graph.node)


@pytest.mark.parametrize("arch", ["llama", "qwen3", "qwen2", "llama-bias"])
def test_fused_graph_matches_unfused(tmp_path, arch):
    """Biased projections (Qwen2's q/k/v, a Llama's with `attention_bias`, o_proj included) fuse too: the bias
    Adds stay between the projections and the attention."""
    plain = export_package(make_loaded(arch), tmp_path / "plain", scheme="w4w2gateup", target="cpu", method="rtn",
                           calibration=0, fuse=False, verify=False)
    fused = export_package(make_loaded(arch), tmp_path / "fused", scheme="w4w2gateup", target="cpu", method="rtn",
                           calibration=0, fuse=True)  # verify on: the exporter's gate passes on the fused graph
    ops_plain, ops_fused = _ops(plain), _ops(fused)
    assert ops_fused["GroupQueryAttention"] == 2 and "Softmax" not in ops_fused
    assert sum(ops_fused.values()) < sum(ops_plain.values()) / 4
    share = [json.loads((p / "genai_config.json").read_text())["search"]["past_present_share_buffer"] for p in (plain, fused)]
    assert share == [False, True]  # only GroupQueryAttention can run on one past/present buffer
    a, toks_a = _run(plain)
    b, toks_b = _run(fused)
    print(f"{arch}: fused vs plain logits max {np.abs(a - b).max():.2e} mean {np.abs(a - b).mean():.2e}")
    np.testing.assert_allclose(b, a, atol=2e-4, rtol=0)
    assert toks_a == toks_b


def test_low_memory_path_same_outputs(tmp_path):
    lm = make_loaded("qwen3")
    x = torch.tensor(PROMPT)
    normal = export_package(lm, tmp_path / "normal", scheme="w4w2gateup", target="cpu", method="rtn", calibration=0,
                            verify=False, low_memory=False)
    with torch.no_grad():
        before = lm.model(x).logits
    light = export_package(lm, tmp_path / "light", scheme="w4w2gateup", target="cpu", method="rtn", calibration=0,
                           verify=True, low_memory=True)  # lm is already quantized: the same integers
    with torch.no_grad():  # the caller's model gets its float weights back
        torch.testing.assert_close(lm.model(x).logits, before, rtol=0, atol=0)
    assert _ops(normal) == _ops(light)
    a, toks_a = _run(normal)
    b, toks_b = _run(light)
    print(f"low-memory vs normal logits max {np.abs(a - b).max():.2e}")
    np.testing.assert_array_equal(a, b)
    assert toks_a == toks_b


def test_placeholder_check_refuses_a_wrong_role():
    from edge_recover.errors import EdgeRecoverError
    from edge_recover.exporters.rewrite import Placeholders, _check_placeholder, _placeholder

    ph = Placeholders({"model.layers.0.mlp.gate_proj": ((24, 16), 4), "model.layers.0.mlp.up_proj": ((24, 16), 5)})
    _check_placeholder("model.layers.0.mlp.gate_proj", "w", _placeholder((24, 16), 4).T, ph, {})
    with pytest.raises(EdgeRecoverError, match="placeholder"):
        _check_placeholder("model.layers.0.mlp.up_proj", "w", _placeholder((24, 16), 4).T, ph, {})


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_skip_norms_match_attention_only_fusion(tmp_path, arch, monkeypatch):
    """Residual Add + RMS norm as SkipSimplifiedLayerNormalization against the graph with only attention fused."""
    from edge_recover.exporters import fusions

    after = export_package(make_loaded(arch), tmp_path / "skip", scheme="w4w2gateup", target="cpu", method="rtn",
                           calibration=0)  # verify on: the exporter's gate passes
    monkeypatch.setattr(fusions, "fuse_skip_norms", lambda graph, model: (0, 0))
    before = export_package(make_loaded(arch), tmp_path / "attn", scheme="w4w2gateup", target="cpu", method="rtn",
                            calibration=0, verify=False)
    ops_after, ops_before = _ops(after), _ops(before)
    # 2 layers: 4 residual Adds before a norm (post-attention x2, next layer's input norm, final norm)
    assert ops_after["SkipSimplifiedLayerNormalization"] == 4 and "Pow" in ops_before and "Pow" not in ops_after
    assert ops_after["Add"] == 0  # every Add was a residual or part of a norm
    a, toks_a = _run(before, steps=12)
    b, toks_b = _run(after, steps=12)
    print(f"{arch}: skip norms vs attention-only {sum(ops_before.values())} -> {sum(ops_after.values())} nodes, "
          f"logits max {np.abs(a - b).max():.2e} mean {np.abs(a - b).mean():.2e}")
    np.testing.assert_allclose(b, a, atol=1e-4, rtol=0)
    assert toks_a == toks_b

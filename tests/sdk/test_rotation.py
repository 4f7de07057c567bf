"""Residual rotation (sdk/rotation.py): the rotated model computes the same logits; `rotate` through the CLI."""

from __future__ import annotations

import pytest
import torch

from edge_recover.errors import EdgeRecoverError
from edge_recover.models import load_model
from edge_recover.rotation import ROTATION_FILE, random_orthogonal, rotate_residual


def test_random_orthogonal_is_orthogonal_and_seeded():
    r = random_orthogonal(48, seed=3)
    torch.testing.assert_close(r @ r.T, torch.eye(48), atol=1e-5, rtol=0)
    assert torch.equal(r, random_orthogonal(48, seed=3)) and not torch.equal(r, random_orthogonal(48, seed=4))


@pytest.mark.parametrize("arch_fixture", ["tiny_llama_dir", "tiny_qwen3_dir", "tiny_qwen2_dir", "tiny_phi3_dir"])
def test_rotated_model_computes_the_same_logits(arch_fixture, request):
    """Every layout rotates: split q/k/v and gate/up, Qwen2's biases, Qwen3's per-head norms, Phi-3's fused
    qkv_proj and gate_up_proj (the layout names the readers and writers)."""
    lm = load_model(request.getfixturevalue(arch_fixture))
    model = lm.model.float().eval()
    ids = torch.randint(0, 200, (2, 16))
    with torch.no_grad():
        before = model(input_ids=ids).logits
        emb_before = model.model.embed_tokens.weight.clone()
    tied = model.lm_head.weight is model.model.embed_tokens.weight  # the tiny Qwen2 and Phi-3 are untied
    info = rotate_residual(model, seed=1)
    with torch.no_grad():
        after = model(input_ids=ids).logits
    torch.testing.assert_close(after, before, atol=2e-5 * before.abs().max().item(), rtol=0)
    assert info.untied_head == tied and model.lm_head.weight is not model.model.embed_tokens.weight
    assert not torch.allclose(model.model.embed_tokens.weight, emb_before)  # the weights did change
    norms = [m.weight for n, m in model.named_modules() if "norm" in type(m).__name__.lower() and n.count("layernorm")]
    assert norms and all(torch.all(w == 1) for w in norms)


def test_rotate_refuses_a_quantized_or_foreign_model(tiny_llama_dir):
    from edge_recover.pipeline import quantize_loaded
    from edge_recover.scheme import named_scheme
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=64, n_positions=32))
    with pytest.raises(EdgeRecoverError, match="registered family.*unsupported architecture 'gpt2'"):
        rotate_residual(gpt2)
    lm = load_model(tiny_llama_dir)
    quantize_loaded(lm, named_scheme("w4"), method="rtn", calibration=0, progress=False)
    with pytest.raises(EdgeRecoverError, match="full-precision"):
        rotate_residual(lm.model)

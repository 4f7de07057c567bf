"""The sliced KL (recovery/kl.py) against the plain expression: value and gradient, in slices and whole, at
a temperature, in bf16 as autocast hands the logits over, and the memory it keeps for the backward."""

import pytest
import torch
import torch.nn.functional as F

from edge_recover.recovery import kl
from edge_recover.recovery.kl import kd_loss


def plain(s: torch.Tensor, t: torch.Tensor, tau: float = 1.0) -> torch.Tensor:
    t_logp = F.log_softmax(t.float() / tau, dim=-1)
    s_logp = F.log_softmax(s.float() / tau, dim=-1)
    return (t_logp.exp() * (t_logp - s_logp)).sum(-1).mean() * tau * tau


@pytest.mark.parametrize("slice_elems", [kl._SLICE, 3 * 50])  # whole, and 3 tokens a slice (uneven: 2 x 5 x 7 rows)
@pytest.mark.parametrize("tau", [1.0, 2.0])
def test_value_and_gradient_equal_the_plain_expression(monkeypatch, slice_elems, tau):
    monkeypatch.setattr(kl, "_SLICE", slice_elems)
    g = torch.Generator().manual_seed(0)
    s0, t = torch.randn(2, 35, 50, generator=g) * 3, torch.randn(2, 35, 50, generator=g) * 3
    s_a, s_b = s0.clone().requires_grad_(), s0.clone().requires_grad_()
    ours, ref = kd_loss(s_a, t, tau), plain(s_b, t, tau)
    (ours * 1.7).backward()
    (ref * 1.7).backward()
    assert ours.item() == pytest.approx(ref.item(), rel=1e-5)
    assert torch.allclose(s_a.grad, s_b.grad, rtol=1e-4, atol=1e-8)
    assert kd_loss(t, t, tau).abs().item() < 1e-6  # the teacher against itself


def test_bf16_logits_get_a_bf16_gradient_close_to_the_plain_one():
    g = torch.Generator().manual_seed(1)
    s0 = (torch.randn(4, 16, 300, generator=g) * 4).bfloat16()
    t = (torch.randn(4, 16, 300, generator=g) * 4).bfloat16()
    s_a, s_b = s0.clone().requires_grad_(), s0.clone().requires_grad_()
    ours, ref = kd_loss(s_a, t), plain(s_b, t)
    ours.backward()
    ref.backward()
    assert s_a.grad.dtype == torch.bfloat16 and ours.dtype == torch.float32
    assert ours.item() == pytest.approx(ref.item(), rel=1e-5)
    assert torch.allclose(s_a.grad.float(), s_b.grad.float(), rtol=1e-2, atol=1e-6)


def test_keeps_only_the_two_logit_tensors_for_the_backward():
    """What autograd keeps: the plain expression holds several fp32 [tokens, vocabulary] copies, ours only the
    logits as they came (here bf16: half of one fp32 copy each)."""
    s = torch.randn(64, 1000, dtype=torch.bfloat16, requires_grad=True)
    t = torch.randn(64, 1000, dtype=torch.bfloat16)

    def saved_bytes(fn) -> int:
        seen: dict[int, int] = {}

        def pack(x):
            seen[id(x)] = x.numel() * x.element_size()
            return x

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
            fn()
        return sum(seen.values())

    fp32_copy = 64 * 1000 * 4
    assert saved_bytes(lambda: kd_loss(s, t)) <= fp32_copy  # two bf16 tensors
    assert saved_bytes(lambda: plain(s, t)) >= 2 * fp32_copy

"""The sliced KL (recovery/kl.py) against the plain expression: value and gradient, in slices and whole, at
a temperature, in bf16 as autocast hands the logits over, and the memory it keeps for the backward."""

import pytest
import torch
import torch.nn.functional as F

from edge_recover.recovery import kl
from edge_recover.recovery.kl import kd_loss


def plain(s: torch.Tensor, t: torch.Tensor, tau: float = 1.0, reverse: float = 0.0) -> torch.Tensor:
    t_logp = F.log_softmax(t.float() / tau, dim=-1)
    s_logp = F.log_softmax(s.float() / tau, dim=-1)
    forward = (t_logp.exp() * (t_logp - s_logp)).sum(-1).mean()
    backward = (s_logp.exp() * (s_logp - t_logp)).sum(-1).mean()
    return ((1 - reverse) * forward + reverse * backward) * tau * tau


@pytest.mark.parametrize("slice_elems", [kl._SLICE, 3 * 50])  # whole, and 3 tokens a slice (uneven: 2 x 5 x 7 rows)
@pytest.mark.parametrize("tau", [1.0, 2.0])
@pytest.mark.parametrize("reverse", [0.0, 0.3, 1.0])  # forward KL, a CAKLD mix, reverse KL
def test_value_and_gradient_equal_the_plain_expression(monkeypatch, slice_elems, tau, reverse):
    monkeypatch.setattr(kl, "_SLICE", slice_elems)
    g = torch.Generator().manual_seed(0)
    s0, t = torch.randn(2, 35, 50, generator=g) * 3, torch.randn(2, 35, 50, generator=g) * 3
    s_a, s_b = s0.clone().requires_grad_(), s0.clone().requires_grad_()
    ours, ref = kd_loss(s_a, t, tau, reverse), plain(s_b, t, tau, reverse)
    (ours * 1.7).backward()
    (ref * 1.7).backward()
    assert ours.item() == pytest.approx(ref.item(), rel=1e-5)
    assert torch.allclose(s_a.grad, s_b.grad, rtol=1e-4, atol=1e-8)
    assert kd_loss(t, t, tau, reverse).abs().item() < 1e-6  # the teacher against itself
    if reverse not in (0.0, 1.0):  # the two directions differ: the mix is not either one
        assert abs(kd_loss(s0, t, tau).item() - ours.item()) > 1e-3
        assert abs(kd_loss(s0, t, tau, 1.0).item() - ours.item()) > 1e-3


def test_teacher_confidence_is_the_mean_probability_of_the_next_token(monkeypatch):
    monkeypatch.setattr(kl, "_SLICE", 2 * 30)  # 2 tokens a slice
    g = torch.Generator().manual_seed(2)
    logits, ids = torch.randn(3, 9, 30, generator=g) * 2, torch.randint(0, 30, (3, 9), generator=g)
    want = torch.softmax(logits[:, :-1], -1).gather(2, ids[:, 1:, None]).mean().item()
    assert kl.teacher_confidence(logits, ids) == pytest.approx(want, rel=1e-6)
    assert kl.reverse_weight("kl", logits, ids) == 0.0 and kl.reverse_weight("rkl", logits, ids) == 1.0
    assert kl.reverse_weight("cakld", logits, ids) == pytest.approx(want, rel=1e-6)


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

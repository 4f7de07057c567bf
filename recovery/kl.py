"""The distillation loss: KL(teacher ‖ student) over the full vocabulary, in fp32, in slices of tokens.

The plain expression (log_softmax of both logits, their difference, the teacher's probabilities, a product) peaks
at about four fp32 copies of the [tokens, vocabulary] logits and keeps several for the backward: at batch 16 x 256
with Qwen2.5's 151,936-entry vocabulary that is 2.5 GB a copy (bench/kl_memory.py measured 2.49 GB above the inputs
at batch 4, 0.12 GB here). Here the forward computes the loss slice by slice (at most `_SLICE` fp32 elements a temporary) and keeps
only the two logit tensors as they came (bf16 under autocast); the backward recomputes the gradient slice by
slice from them:

    loss = τ² / N · Σ_tokens Σ_v p_t (log p_t − log p_s),   p = softmax(z / τ)
    ∂loss / ∂z_s = τ / N · (p_s − p_t)

The same figures as the plain expression up to float rounding (tests/recovery/test_kl.py: value and gradient).

`reverse` mixes in the reverse divergence KL(student ‖ teacher), which is mode-seeking (the student puts its
mass where the teacher is surest rather than covering all of the teacher's tail), as BitDistiller's
confidence-aware KL (CAKLD) does for 2-bit code models: loss = (1 - w) KL(t ‖ s) + w KL(s ‖ t). Its gradient:

    ∂KL(s ‖ t) / ∂z_s = τ / N · p_s ⊙ (d − Σ_v p_s d),   d = log p_s − log p_t

`--loss` (RecoverConfig.loss): `kl` (w = 0, the default), `rkl` (w = 1), `cakld` (w = the teacher's confidence
on the micro-batch: the mean probability it gives the tokens it wrote, `teacher_confidence`; under data parallel
each rank weighs its own share, so `cakld` runs on N processes are not the one-process run bit for bit).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["LOSSES", "kd_loss", "reverse_weight", "teacher_confidence"]

LOSSES = ("kl", "rkl", "cakld")

# fp32 elements in one slice's temporaries (128 MB): 220 tokens of a 151,936-entry vocabulary.
_SLICE = 1 << 25


def _rows(vocab: int) -> int:
    return max(1, _SLICE // max(vocab, 1))


class _SlicedKL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float,
                reverse: float) -> torch.Tensor:
        vocab = student_logits.shape[-1]
        s_all, t_all = student_logits.reshape(-1, vocab), teacher_logits.reshape(-1, vocab)
        n, step = s_all.shape[0], _rows(vocab)
        total = torch.zeros((), dtype=torch.float32, device=student_logits.device)
        for i in range(0, n, step):
            t_logp = F.log_softmax(t_all[i:i + step].float() / temperature, dim=-1)
            s_logp = F.log_softmax(s_all[i:i + step].float() / temperature, dim=-1)
            d = t_logp - s_logp
            if reverse < 1:
                total += (1 - reverse) * (t_logp.exp() * d).sum()
            if reverse > 0:
                total -= reverse * (s_logp.exp() * d).sum()
        ctx.save_for_backward(student_logits, teacher_logits)
        ctx.temperature, ctx.reverse = temperature, reverse
        return total / max(n, 1) * temperature * temperature

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        student_logits, teacher_logits = ctx.saved_tensors
        tau, w = ctx.temperature, ctx.reverse
        vocab = student_logits.shape[-1]
        s_all, t_all = student_logits.reshape(-1, vocab), teacher_logits.reshape(-1, vocab)
        n, step = s_all.shape[0], _rows(vocab)
        grad = torch.empty_like(s_all)
        scale = grad_out.float() * tau / max(n, 1)
        for i in range(0, n, step):
            s_logp = F.log_softmax(s_all[i:i + step].float() / tau, dim=-1)
            t_logp = F.log_softmax(t_all[i:i + step].float() / tau, dim=-1)
            p_s = s_logp.exp()
            g = (1 - w) * (p_s - t_logp.exp()) if w < 1 else torch.zeros_like(p_s)
            if w > 0:
                d = s_logp - t_logp
                g += w * p_s * (d - (p_s * d).sum(-1, keepdim=True))
            grad[i:i + step] = (g * scale).to(grad.dtype)
        return grad.view_as(student_logits), None, None, None


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0,
            reverse: float = 0.0) -> torch.Tensor:
    """Mean per-token KL(teacher ‖ student) of softmax(logits / τ), times τ² (Hinton); logits [B, T, V]; with
    `reverse` = w in [0, 1], (1 - w) of it plus w of KL(student ‖ teacher). Only the student's logits get a
    gradient (the teacher's are targets).

    Example:
        >>> x = torch.randn(2, 3, 5)
        >>> float(kd_loss(x, x))
        0.0
    """
    return _SlicedKL.apply(student_logits, teacher_logits.detach(), float(temperature), float(reverse))


@torch.no_grad()
def teacher_confidence(teacher_logits: torch.Tensor, ids: torch.Tensor, temperature: float = 1.0) -> float:
    """The mean probability the teacher gives the next token of `ids` [B, T] (logits [B, T, V]: position j
    predicts token j + 1), in slices; BitDistiller's confidence, the weight CAKLD gives the reverse KL."""
    vocab = teacher_logits.shape[-1]
    logits = teacher_logits[:, :-1].reshape(-1, vocab)
    targets = ids[:, 1:].reshape(-1).to(logits.device)
    step, total = _rows(vocab), 0.0
    for i in range(0, logits.shape[0], step):
        logp = F.log_softmax(logits[i:i + step].float() / temperature, dim=-1)
        total += logp.gather(1, targets[i:i + step, None]).exp().sum().item()
    return total / max(logits.shape[0], 1)


def reverse_weight(loss: str, teacher_logits: torch.Tensor, ids: torch.Tensor, temperature: float = 1.0) -> float:
    """The reverse-KL weight of a batch under `loss` (one of LOSSES)."""
    if loss == "kl":
        return 0.0
    if loss == "rkl":
        return 1.0
    return teacher_confidence(teacher_logits, ids, temperature)

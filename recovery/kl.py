"""The distillation loss: KL(teacher ‖ student) over the full vocabulary, in fp32, in slices of tokens.

The plain expression (log_softmax of both logits, their difference, the teacher's probabilities, a product) holds
about seven fp32 copies of the [tokens, vocabulary] logits at once and keeps three for the backward: at batch
16 x 256 with Qwen2.5's 151,936-entry vocabulary that is 2.5 GB a copy, most of a run's GPU memory beyond the
model. Here the forward computes the loss slice by slice (at most `_SLICE` fp32 elements a temporary) and keeps
only the two logit tensors as they came (bf16 under autocast); the backward recomputes the gradient slice by
slice from them:

    loss = τ² / N · Σ_tokens Σ_v p_t (log p_t − log p_s),   p = softmax(z / τ)
    ∂loss / ∂z_s = τ / N · (p_s − p_t)

The same figures as the plain expression up to float rounding (tests/recovery/test_kl.py: value and gradient).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["kd_loss"]

# fp32 elements in one slice's temporaries (128 MB): 220 tokens of a 151,936-entry vocabulary.
_SLICE = 1 << 25


def _rows(vocab: int) -> int:
    return max(1, _SLICE // max(vocab, 1))


class _SlicedKL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
        vocab = student_logits.shape[-1]
        s_all, t_all = student_logits.reshape(-1, vocab), teacher_logits.reshape(-1, vocab)
        n, step = s_all.shape[0], _rows(vocab)
        total = torch.zeros((), dtype=torch.float32, device=student_logits.device)
        for i in range(0, n, step):
            t_logp = F.log_softmax(t_all[i:i + step].float() / temperature, dim=-1)
            s_logp = F.log_softmax(s_all[i:i + step].float() / temperature, dim=-1)
            total += (t_logp.exp() * (t_logp - s_logp)).sum()
        ctx.save_for_backward(student_logits, teacher_logits)
        ctx.temperature = temperature
        return total / max(n, 1) * temperature * temperature

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        student_logits, teacher_logits = ctx.saved_tensors
        tau = ctx.temperature
        vocab = student_logits.shape[-1]
        s_all, t_all = student_logits.reshape(-1, vocab), teacher_logits.reshape(-1, vocab)
        n, step = s_all.shape[0], _rows(vocab)
        grad = torch.empty_like(s_all)
        scale = grad_out.float() * tau / max(n, 1)
        for i in range(0, n, step):
            p_s = F.softmax(s_all[i:i + step].float() / tau, dim=-1)
            p_t = F.softmax(t_all[i:i + step].float() / tau, dim=-1)
            grad[i:i + step] = ((p_s - p_t) * scale).to(grad.dtype)
        return grad.view_as(student_logits), None, None


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Mean per-token KL(teacher ‖ student) of softmax(logits / τ), times τ² (Hinton); logits [B, T, V].
    Only the student's logits get a gradient (the teacher's are targets).

    Example:
        >>> x = torch.randn(2, 3, 5)
        >>> float(kd_loss(x, x))
        0.0
    """
    return _SlicedKL.apply(student_logits, teacher_logits.detach(), float(temperature))

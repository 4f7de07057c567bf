"""Perplexity and teacher agreement on real text.

The text is tokenized once and cut into non-overlapping windows of `seq_len` tokens; every window is scored
in full (no striding), so figures compare across models with the same tokenizer and settings. With a
teacher, the same pass also gives the KL divergence KL(teacher || model) per token and top-1 agreement.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F


@dataclass
class EvalResult:
    perplexity: float
    cross_entropy: float  # mean next-token NLL, nats
    tokens: int
    kl_to_teacher: float | None = None
    top1_agreement: float | None = None

    def to_json(self) -> dict:
        return asdict(self)


def token_windows(tokenizer, text: str, seq_len: int = 512, max_windows: int | None = None) -> torch.Tensor:
    """Tokenize `text` and return [n_windows, seq_len] int64 (the tail that does not fill a window is dropped)."""
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"][0]
    n = ids.numel() // seq_len
    if max_windows:
        n = min(n, max_windows)
    if n == 0:
        raise ValueError(f"text has {ids.numel()} tokens, fewer than one window of {seq_len}")
    return ids[: n * seq_len].view(n, seq_len)


@torch.no_grad()
def evaluate(model, windows: torch.Tensor, teacher=None, batch_size: int = 4, device: str | None = None,
             progress: bool = True) -> EvalResult:
    """Mean next-token cross-entropy of `model` on `windows` ([B, T] ids), and KL/top-1 against `teacher`.

    Example:
        >>> evaluate(model, token_windows(tok, text)).perplexity  # doctest: +SKIP
    """
    device = device or next(model.parameters()).device
    nll_sum, kl_sum, agree, count = 0.0, 0.0, 0, 0
    batches = list(windows.split(batch_size))
    if progress:
        from tqdm import tqdm

        batches = tqdm(batches, desc="evaluate", unit="batch", leave=False)
    for batch in batches:
        batch = batch.to(device)
        logits = model(input_ids=batch).logits[:, :-1].float()
        targets = batch[:, 1:]
        nll_sum += F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1), reduction="sum").item()
        count += targets.numel()
        if teacher is not None:
            t_logits = teacher(input_ids=batch).logits[:, :-1].float()
            t_logp = F.log_softmax(t_logits, -1)
            kl_sum += (t_logp.exp() * (t_logp - F.log_softmax(logits, -1))).sum().item()
            agree += (t_logits.argmax(-1) == logits.argmax(-1)).sum().item()
    ce = nll_sum / count
    return EvalResult(
        perplexity=math.exp(ce), cross_entropy=ce, tokens=count,
        kl_to_teacher=kl_sum / count if teacher is not None else None,
        top1_agreement=agree / count if teacher is not None else None,
    )


def recovery_share(ce_fp: float, ce_quant: float, ce_recovered: float) -> float:
    """Share (percent) of the cross-entropy gap between quantized and full precision that recovery closes."""
    gap = ce_quant - ce_fp
    return float("nan") if gap <= 0 else 100.0 * (ce_quant - ce_recovered) / gap

"""Calibration without a corpus: the model's own samples, and per-channel activation importance.

`teacher_samples` lets the full-precision model write text from random first tokens (no labels, no data
set: the same idea recovery uses at scale). `input_hessians` runs those samples through the model and
records H = E[x x^T] over the inputs of every linear layer. GPTQ uses H itself; the `mse` quantizer uses
its diagonal E[x_k^2] to weight each input channel's error, which turns weight error into an estimate of
output error.

Memory: one K x K fp32 matrix per linear layer (about 60 MB for SmolLM2-135M). For multi-billion models a
layer-by-layer pass would be needed; that is future work.
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn


@torch.no_grad()
def teacher_samples(model, tokenizer, n: int = 16, seq_len: int = 128, seed: int = 0,
                    batch_size: int = 16, top_p: float = 0.95, temperature: float = 1.0) -> torch.Tensor:
    """[n, seq_len] token ids sampled from `model`, each started from a random ordinary token.

    Example:
        >>> ids = teacher_samples(model, tok, n=4, seq_len=32)  # doctest: +SKIP
    """
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(seed)
    special = set(tokenizer.all_special_ids)
    pool = torch.tensor([i for i in range(min(len(tokenizer), model.config.vocab_size)) if i not in special])
    out = []
    torch.manual_seed(seed)
    for start in range(0, n, batch_size):
        b = min(batch_size, n - start)
        first = pool[torch.randint(len(pool), (b,), generator=gen)].view(b, 1).to(device)
        seqs = model.generate(first, attention_mask=torch.ones_like(first), do_sample=True, top_p=top_p,
                              temperature=temperature, top_k=0, max_length=seq_len, min_length=seq_len,
                              pad_token_id=tokenizer.eos_token_id, eos_token_id=None)
        out.append(seqs[:, :seq_len].cpu())
    return torch.cat(out)


@torch.no_grad()
def input_hessians(model: nn.Module, windows: torch.Tensor, batch_size: int = 8,
                   layers: "Iterable[str] | None" = None) -> dict[str, torch.Tensor]:
    """H = E[x x^T] [K, K] over all tokens of `windows` for the input of every nn.Linear (the lm_head
    included), or only of those named in `layers`, keyed by layer name.

    Example:
        >>> hs = input_hessians(model, teacher_samples(model, tok, n=8))  # doctest: +SKIP
        >>> importance = {name: torch.diag(h) for name, h in hs.items()}
    """
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    hooks = []

    def hook(name):
        def fn(_module, args):
            x = args[0].detach().float().reshape(-1, args[0].shape[-1])
            sums[name] = sums.get(name, 0) + x.T @ x
            counts[name] = counts.get(name, 0) + x.shape[0]
        return fn

    wanted = None if layers is None else set(layers)
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear) and (wanted is None or name in wanted):
            hooks.append(m.register_forward_pre_hook(hook(name)))
    device = next(model.parameters()).device
    try:
        for batch in windows.split(batch_size):
            model(input_ids=batch.to(device))
    finally:
        for h in hooks:
            h.remove()
    return {name: (s / counts[name]).cpu() for name, s in sums.items()}

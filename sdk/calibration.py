"""Calibration without a corpus: the model's own samples, and per-channel activation importance.

`teacher_samples` lets the full-precision model write text from random first tokens (no labels, no data
set: the same idea recovery uses at scale), through `sample_rows`, the one teacher sampler (a KV-cache
loop; recovery's synthetic data set is the same loop with a temperature per row). `input_hessians` runs those samples through the model and
records H = E[x x^T] over the inputs of every linear layer. GPTQ uses H itself; the `mse` quantizer uses
its diagonal E[x_k^2] to weight each input channel's error, which turns weight error into an estimate of
output error.

Memory: one K x K fp32 matrix per linear layer (about 60 MB for SmolLM2-135M, 2.3 GB for Qwen2.5-0.5B,
10.6 GB for Qwen2.5-1.5B: its down_proj alone is 8,960 x 8,960). `mse` needs only the diagonal, so
`input_hessians(..., diagonal=True)` keeps [K] per layer (one K x K product at a time, the diagonal kept),
the same numbers bit for bit. GPTQ on multi-billion models would need a layer-by-layer pass; future work.
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn


def ordinary_token_pool(tokenizer, vocab_size: int) -> torch.Tensor:
    """Ids a sample may start from: every token id below `vocab_size` that is not a special token."""
    from .errors import require

    special = set(getattr(tokenizer, "all_special_ids", []) or []) if tokenizer is not None else set()
    n = min(len(tokenizer), vocab_size) if tokenizer is not None else vocab_size
    pool = torch.tensor([i for i in range(n) if i not in special], dtype=torch.long)
    require(pool.numel() > 0, "the tokenizer has no ordinary tokens to start samples from")
    return pool


def sample_top_p(logits: torch.Tensor, top_p: float, generator: torch.Generator) -> torch.Tensor:
    """One token per row from softmax(logits) [B, V] restricted to the top-p nucleus; returns [B]."""
    probs = torch.softmax(logits.float(), dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        keep = (sorted_p.cumsum(-1) - sorted_p) < top_p  # the first token always stays
        pick = torch.multinomial(sorted_p * keep, 1, generator=generator)
        return order.gather(-1, pick).squeeze(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def sample_rows(model, first: torch.Tensor, seq_len: int, temperature: "torch.Tensor | float" = 1.0,
                top_p: float = 0.95, generator: torch.Generator | None = None,
                forced: torch.Tensor | None = None) -> torch.Tensor:
    """The teacher sampler: `model` continues each first token [B] to `seq_len` tokens; returns [B, seq_len].

    A plain KV-cache loop (one forward per new token for the whole batch, no `generate()`), top-p sampling
    at a per-row `temperature` ([B] or one float), no stop at EOS: every row is exactly `seq_len` long and
    the batch never shrinks. Runs on the model's device; wrap it in autocast for bf16 on a GPU.
    `first` may also be a prefix [B, P] with `forced` [B, P] (bool): position t < P of a row takes the
    prefix token where `forced` is set and the sampled one elsewhere (column 0 is always taken), so rows of
    one batch can start from prompts of different lengths and still step together.

    Example:
        >>> rows = sample_rows(model, torch.tensor([17, 42]), seq_len=32)  # doctest: +SKIP
    """
    device = next(model.parameters()).device
    prefix = first.view(first.shape[0], -1).to(device)
    forced = forced.to(device) if forced is not None else torch.zeros_like(prefix, dtype=torch.bool)
    ids = prefix[:, :1]
    inv_t = (1.0 / torch.as_tensor(temperature, dtype=torch.float32)).reshape(-1, 1).to(device)
    generator = generator if generator is not None else torch.Generator(device=device).manual_seed(0)
    rows = [ids]
    step = model(input_ids=ids, use_cache=True)
    for t in range(1, seq_len):
        nxt = sample_top_p(step.logits[:, -1].float() * inv_t, top_p, generator).view(-1, 1)
        if t < prefix.shape[1]:
            nxt = torch.where(forced[:, t:t + 1], prefix[:, t:t + 1], nxt)
        rows.append(nxt)
        step = model(input_ids=nxt, past_key_values=step.past_key_values, use_cache=True)
    return torch.cat(rows, dim=1).cpu()


@torch.no_grad()
def teacher_samples(model, tokenizer, n: int = 16, seq_len: int = 128, seed: int = 0,
                    batch_size: int = 16, top_p: float = 0.95, temperature: float = 1.0) -> torch.Tensor:
    """[n, seq_len] token ids sampled from `model` (`sample_rows`), each started from a random ordinary token.

    Example:
        >>> ids = teacher_samples(model, tok, n=4, seq_len=32)  # doctest: +SKIP
    """
    device = next(model.parameters()).device
    cpu_gen = torch.Generator().manual_seed(seed)
    pool = ordinary_token_pool(tokenizer, model.config.vocab_size)
    first = pool[torch.randint(len(pool), (n,), generator=cpu_gen)]
    dev_gen = torch.Generator(device=device).manual_seed(seed + 1)
    return torch.cat([sample_rows(model, first[i:i + batch_size], seq_len, temperature, top_p, dev_gen)
                      for i in range(0, n, batch_size)])


@torch.no_grad()
def input_hessians(model: nn.Module, windows: torch.Tensor, batch_size: int = 8,
                   layers: "Iterable[str] | None" = None, diagonal: bool = False) -> dict[str, torch.Tensor]:
    """H = E[x x^T] [K, K] over all tokens of `windows` for the input of every nn.Linear (the lm_head
    included), or only of those named in `layers`, keyed by layer name.

    `diagonal`: only E[x_k^2] [K] per layer (what `mse` reads), equal bit for bit to `torch.diag` of the
    full H: each batch's x^T x is still computed (the same product, so the same rounding) and only its
    diagonal is summed, so a layer holds K floats instead of K x K.

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
            xtx = x.T @ x
            sums[name] = sums.get(name, 0) + (xtx.diagonal() if diagonal else xtx)  # `+` copies the diagonal out
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

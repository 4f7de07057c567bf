"""Merge mode: fold a LoRA adapter into the quantized weights and re-quantize them under the same configs.

    W_hat = dequantize(codes, scales, zero points)     the integers the adapter was trained against
    W'    = W_hat + scale * B @ A                       PEFT's merge (float64, then fp32)
    codes', scales', zero points' = quantize_weight(W', the layer's own QuantConfig, method, hessian)

`quantize_weight` is the sdk's one quantizer core, so a merged package is an ordinary package (no extra
nodes) whose integers come from the same function as every other package. The price: the delta has to
survive rounding to the layer's grid, and at 2 bits one step is large next to a LoRA delta, so part of
the recovery is lost. `survival` measures how much on a few token windows, comparing three torch models
on the same ids: the base (adapter off), the recovered model (base + LoRA, what a side-car package
computes) and the merged one:

    recovery kept (CE) = (CE_base - CE_merged) / (CE_base - CE_recovered)      share of the adapter's gain
    recovery kept (KL) = 1 - KL(recovered || merged) / KL(recovered || base)   how close merged stays

`method` picks how the merged weight is re-quantized: `rtn`, `mse` (importance = diagonal of the input
Hessian), or `gptq` (full input Hessian). Hessians come from the recovered model's own samples
(`calibration.teacher_samples` through `lora_hooks`), i.e. the inputs each layer sees once recovered.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Iterator

import torch

from edge_recover.errors import require

from .lora import LoraAdapterData


@contextmanager
def lora_hooks(model, data: LoraAdapterData) -> Iterator[None]:
    """Within the block, every adapted layer computes base(x) + scale * (x A^T) B^T (PEFT's forward)."""
    handles = []
    for name, layer in data.layers.items():
        module = model.get_submodule(name)
        a = torch.from_numpy(layer.a)
        b = torch.from_numpy(layer.b)

        def hook(_m, args, out, a=a, b=b, scale=layer.scale):
            x = args[0]
            return out + scale * ((x.to(a.dtype) @ a.T) @ b.T).to(out.dtype)

        handles.append(module.register_forward_hook(hook))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def merge_hessians(model, tokenizer, data: LoraAdapterData, samples: int, seq_len: int = 128,
                   seed: int = 0) -> dict[str, torch.Tensor] | None:
    """Input Hessians of the adapted layers, from `samples` sequences the recovered model writes itself."""
    from edge_recover.calibration import input_hessians, teacher_samples

    if samples <= 0:
        return None
    with lora_hooks(model, data):
        ids = teacher_samples(model, tokenizer, n=samples, seq_len=seq_len, seed=seed)
        hs = input_hessians(model, ids)
    return {n: h for n, h in hs.items() if n in data.layers}


@torch.no_grad()
def merge_adapter(model, data: LoraAdapterData, method: str = "mse",
                  hessians: dict[str, torch.Tensor] | None = None) -> dict:
    """Fold `data` into the `QuantLinear` layers of `model` and re-quantize them in place; returns stats.

    Example:
        >>> merge_adapter(qmodel, read_lora_adapter("out/adapter"), method="rtn")["layers"]  # doctest: +SKIP
        210
    """
    from edge_recover.apply import quantized_layers
    from edge_recover.quantizer import check_method, quantize_weight, sqnr_db

    check_method(method)
    require(method != "gptq" or hessians is not None,
            "`merge_method` gptq needs calibration samples; pass a positive `merge_calibration` or use mse")
    qlayers = quantized_layers(model)
    changed = total = 0
    sqnr = []
    for name, layer in sorted(data.layers.items()):
        q = qlayers[name]
        target = (q.quantized().dequantize().double() + layer.delta()).float()
        h = hessians.get(name) if hessians else None
        qw = quantize_weight(target, q.config, method, importance=None if h is None else torch.diag(h),
                             hessian=h if method == "gptq" else None)
        changed += int((qw.codes != q.codes).sum())
        total += q.codes.numel()
        q.load_integers(qw)
        sqnr.append(sqnr_db(target, q.weight))
    return {"layers": len(data.layers), "method": method, "codes_changed": changed / max(total, 1),
            "mean_sqnr_db": sum(sqnr) / len(sqnr)}


def _log_probs(model, ids: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(model(input_ids=ids).logits[:, :-1].float(), -1)


def _ce(logp: torch.Tensor, ids: torch.Tensor) -> float:
    return float(-logp.gather(-1, ids[:, 1:, None]).sum())


def _kl(p_log: torch.Tensor, q_log: torch.Tensor) -> float:
    return float((p_log.exp() * (p_log - q_log)).sum())


@torch.no_grad()
def survival(model, data: LoraAdapterData, windows: torch.Tensor, merge) -> dict:
    """Base, recovered and merged figures on `windows` [n, T]; calls `merge()` (in place) in between.

    Keeps the recovered log-probabilities of all windows in memory (n x T x vocab fp32): a few windows.
    """
    ce_base = ce_rec = ce_merged = kl_base = kl_merged = 0.0
    recovered = []
    for row in windows.split(1):
        base = _log_probs(model, row)
        with lora_hooks(model, data):
            rec = _log_probs(model, row)
        ce_base += _ce(base, row)
        ce_rec += _ce(rec, row)
        kl_base += _kl(rec, base)
        recovered.append(rec)
    stats = merge()
    for row, rec in zip(windows.split(1), recovered):
        merged = _log_probs(model, row)
        ce_merged += _ce(merged, row)
        kl_merged += _kl(rec, merged)
    n = windows.shape[0] * (windows.shape[1] - 1)
    ce = {"base": ce_base / n, "recovered": ce_rec / n, "merged": ce_merged / n}
    gain = ce["base"] - ce["recovered"]
    return {
        "windows": int(windows.shape[0]), "tokens": n,
        "perplexity": {k: math.exp(v) for k, v in ce.items()},
        "cross_entropy": ce,
        "kl_to_recovered": {"base": kl_base / n, "merged": kl_merged / n},
        "recovery_kept_ce_pct": 100.0 * (ce["base"] - ce["merged"]) / gain if gain > 0 else float("nan"),
        "recovery_kept_kl_pct": 100.0 * (1.0 - kl_merged / kl_base) if kl_base > 0 else float("nan"),
        "merge": stats,
    }


def survival_windows(tokenizer, vocab_size: int, text: str | None, seq_len: int = 128, max_windows: int = 4) -> torch.Tensor:
    """Token windows [n, T] of `text` (or the verifier's prompts, padded by repetition, without a text)."""
    from edge_recover.evaluate import token_windows

    if text:
        try:
            return token_windows(tokenizer, text, seq_len, max_windows)
        except ValueError:
            pass  # too short for one window: fall back to the prompts
    from .verify import DEFAULT_PROMPTS, prompt_ids

    rows = [torch.from_numpy(r[0]) for r in prompt_ids(tokenizer, vocab_size, DEFAULT_PROMPTS)]
    t = min(len(r) for r in rows)
    return torch.stack([r[:t] for r in rows])

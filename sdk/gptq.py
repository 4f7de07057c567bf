"""GPTQ: round column by column and push each column's rounding error onto the columns not yet rounded.

Plain rounding treats the columns of W (the input channels) independently. GPTQ (Frantar et al., 2022)
uses the layer's input second moment H = E[x x^T] and, after rounding column k, updates the remaining
columns by the error times a row of the inverse Hessian's Cholesky factor, so that later columns absorb the
output error of earlier ones. At 2 bits that is most of the difference between a broken and a usable layer.

Block structure: every `block_size` columns a new MatMulNBits block starts; its scale and zero point are
chosen (by `params_fn`, the core's rtn or mse search) from the weights as they are *then*, error updates
included. The result is ordinary MatMulNBits integers: the exporter packs them like any other.
Columns are processed in order (no act-order), so blocks stay contiguous as MatMulNBits requires.
"""

from __future__ import annotations

from typing import Callable

import torch

_LAZY = 128  # columns per lazy-batch update (a multiple of the block size is used)


def gptq_quantize(w: torch.Tensor, hessian: torch.Tensor, block_size: int, qmax: int,
                  params_fn: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
                  damp: float = 0.01) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """GPTQ on w [N, K] with H [K, K]; returns codes [N, K] (float), scales [N, nb], zero points [N, nb].

    `params_fn(group [N, g], importance [g]) -> (scale [N], zero_point [N])` picks a block's grid.
    """
    w = w.detach().float().clone()
    n, k = w.shape
    h = hessian.detach().to(w.device, torch.float32).clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    h += torch.eye(k, device=h.device) * damp * torch.diag(h).mean()
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    diag_h = torch.diag(hessian).to(w.device, torch.float32).clamp_min(1e-8)

    nb = -(-k // block_size)
    codes = torch.zeros(n, k, device=w.device)
    scales = torch.zeros(n, nb, device=w.device)
    zeros = torch.zeros(n, nb, device=w.device)
    lazy = max(_LAZY, block_size)
    for i1 in range(0, k, lazy):
        i2 = min(i1 + lazy, k)
        w1 = w[:, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        h1 = hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if col % block_size == 0:
                g_end = min(i + block_size, i2 - i1)
                s, z = params_fn(w1[:, i:g_end], diag_h[col:col + (g_end - i)])
                scales[:, col // block_size], zeros[:, col // block_size] = s, z
            s, z = scales[:, col // block_size], zeros[:, col // block_size]
            q = torch.clamp(torch.round(w1[:, i] / s) + z, 0, qmax)
            codes[:, col] = q
            err = (w1[:, i] - (q - z) * s) / h1[i, i]
            w1[:, i:] -= err[:, None] * h1[i, i:][None, :]
            err1[:, i] = err
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    return codes, scales, zeros

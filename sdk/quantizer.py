"""The one quantizer core: a weight in, MatMulNBits codes, scales and zero points out.

Everything that needs integers calls `quantize_weight`: the torch `QuantLinear` that recovery trains
against, the checkpoint writer and the ONNX exporter. That is how the exported graph and the trained
student stay the same function.

Conventions (those of ONNX Runtime's MatMulNBits): a weight W [N, K] (out, in) is cut into blocks of
`block_size` along K; each block has a float scale s and an integer zero point z in [0, 2**bits); a code
q in [0, 2**bits) stands for (q - z) * s. Symmetric configs fix z = 2**(bits-1), the kernel's default.

Methods:
- `rtn`: round to nearest on the block's min-max range. The reference.
- `gptq`: GPTQ (see `gptq.py`): rounds column by column and spreads each column's error over the columns
  not yet rounded, using the layer's input second moment H = E[x x^T]; each block's grid comes from the
  `mse` search. Needs `hessian`; the best at 2 bits.
- `mse`: per-block search for the clipping range that minimises the squared error, then a few rounds of
  alternating least squares on (scale, zero point) with the codes fixed. Errors may be weighted per input
  channel by an importance vector (E[x_k^2] from calibration activations), which turns weight error into
  an estimate of output error; without it every channel counts the same. Cost: about 25 passes over the
  weight, seconds for a 135M model on a CPU. At 2 bits it lowers the error a lot (see docs/quantization.md).

Memory: `rtn` and `mse` treat each row's blocks on their own, so `quantize_weight` runs them on slices of at
most `ROW_CHUNK_ELEMENTS` weights and concatenates the integers (the same integers, bit for bit: every
reduction is over one block). The `mse` search holds about ten weight-sized fp32 temporaries, which for a
whole 151,936 x 1,536 lm_head would be 9 GB; a slice keeps them near 0.6 GB.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable

import torch

from .errors import require
from .scheme import QuantConfig

METHODS = ("rtn", "mse", "gptq")  # the registered handlers below, in order of cost
_CLIP_GRID = 20  # candidate shrink factors from 1.0 down to _CLIP_MIN
_CLIP_MIN = 0.35
_LS_ROUNDS = 4
ROW_CHUNK_ELEMENTS = 1 << 24  # weights per slice of a row-wise method (64 MB in fp32)


@dataclass
class QuantizedWeight:
    """Unpacked integers of one weight: codes uint8 [N, K], scales f32 [N, nb], zero_points uint8 [N, nb]."""

    codes: torch.Tensor
    scales: torch.Tensor
    zero_points: torch.Tensor
    config: QuantConfig

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """W_hat [N, K] = (codes - zero_point) * scale, block by block, computed in fp32."""
        return dequantize(self.codes, self.scales, self.zero_points, self.config.block_size).to(dtype)


def dequantize(codes: torch.Tensor, scales: torch.Tensor, zero_points: torch.Tensor, block_size: int) -> torch.Tensor:
    """Reference dequantization: codes [N, K] -> fp32 [N, K], (code - zero point) * scale.

    Computed in place on one [N, K] fp32 buffer seen as blocks [N, nb, block_size], with the block's zero
    point and scale broadcast: the same two roundings per weight as gathering them per column, without the
    four more [N, K] temporaries (3.7 GB for a 151,936 x 1,536 lm_head)."""
    n, k = codes.shape
    nb = -(-k // block_size)
    w = torch.zeros(n, nb * block_size, dtype=torch.float32, device=codes.device)
    w[:, :k] = codes
    blocks = w.view(n, nb, block_size)
    blocks -= zero_points.float()[..., None]
    blocks *= scales.float()[..., None]
    return w if nb * block_size == k else w[:, :k].contiguous()


def _blocks(w: torch.Tensor, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[N, K] -> ([N, nb, bs], valid mask [nb, bs]); padding repeats the last column (keeps min/max)."""
    n, k = w.shape
    nb = -(-k // block_size)
    pad = nb * block_size - k
    if pad:
        w = torch.cat([w, w[:, -1:].expand(n, pad)], dim=1)
    mask = (torch.arange(nb * block_size, device=w.device) < k).view(nb, block_size)
    return w.view(n, nb, block_size), mask


def _codes(wb: torch.Tensor, s: torch.Tensor, z: torch.Tensor, qmax: int) -> torch.Tensor:
    return torch.clamp(torch.round(wb / s[..., None]) + z[..., None], 0, qmax)


def _minmax_params(lo, hi, cfg: QuantConfig):
    """Scale and zero point (both float tensors, zero point integral) for a [lo, hi] range per block."""
    qmax = cfg.levels - 1
    if cfg.symmetric:
        half = cfg.levels // 2
        amax = torch.maximum(lo.abs(), hi.abs())
        s = amax / max(half - 1, 1)
        z = torch.full_like(s, float(half))
    else:
        s = (hi - lo) / qmax
        s = torch.where(s > 0, s, torch.ones_like(s))
        z = torch.clamp(torch.round(-lo / s), 0, qmax)
    s = torch.where(s > 0, s, torch.ones_like(s))
    return s, z


def _block_error(wb, q, s, z, weight):
    err = (q - z[..., None]) * s[..., None] - wb
    return (err * err * weight).sum(-1)


def _least_squares(wb, q, weight, z, cfg: QuantConfig):
    """Best scale (and integer zero point unless symmetric) for fixed codes, by weighted least squares."""
    qmax = cfg.levels - 1
    if not cfg.symmetric:
        # w ~ a*q + c  (a = s, c = -s*z): closed-form weighted regression per block.
        sw = weight.sum(-1).clamp_min(1e-12)
        mq = (weight * q).sum(-1) / sw
        mw = (weight * wb).sum(-1) / sw
        cov = (weight * (q - mq[..., None]) * (wb - mw[..., None])).sum(-1)
        var = (weight * (q - mq[..., None]) ** 2).sum(-1)
        a = torch.where(var > 0, cov / var.clamp_min(1e-12), torch.zeros_like(var))
        ok = a > 0
        c = mw - a * mq
        z = torch.where(ok, torch.clamp(torch.round(-c / torch.where(ok, a, torch.ones_like(a))), 0, qmax), z)
    d = q - z[..., None]
    num = (weight * d * wb).sum(-1)
    den = (weight * d * d).sum(-1)
    s = torch.where(den > 0, num / den.clamp_min(1e-12), torch.zeros_like(den))
    return s, z


def check_method(method: str) -> None:
    """Refuse an unknown quantization method by name, before any long work starts."""
    require(method in _HANDLERS, f"unknown `method` {method!r}; choose one of {', '.join(_HANDLERS)}")


# A method is a handler `(w [N, K] fp32, config, importance [K] | None, hessian [K, K] | None) -> QuantizedWeight`
# registered under its name; `quantize_weight` looks it up (torchao's config -> handler table, not an if-chain).
Handler = Callable[[torch.Tensor, QuantConfig, "torch.Tensor | None", "torch.Tensor | None"], QuantizedWeight]
_HANDLERS: dict[str, Handler] = {}
_ROW_WISE: set[str] = set()  # methods whose rows never meet: quantized in slices of rows


def register_method(name: str, row_wise: bool = False) -> Callable[[Handler], Handler]:
    """Register a quantization method handler under `name` (see `Handler`); `row_wise`: each row's integers
    depend on that row alone (and `importance`), so `quantize_weight` may run it on slices of rows.

    Example:
        >>> @register_method("mine")  # doctest: +SKIP
        ... def _mine(w, config, importance, hessian): ...
    """
    def add(fn: Handler) -> Handler:
        _HANDLERS[name] = fn
        if row_wise:
            _ROW_WISE.add(name)
        return fn

    return add


def quantize_weight(
    weight: torch.Tensor,
    config: QuantConfig,
    method: str = "rtn",
    importance: torch.Tensor | None = None,
    hessian: torch.Tensor | None = None,
) -> QuantizedWeight:
    """Quantize a linear weight [N, K] (out, in) to MatMulNBits integers with the handler of `method`.

    `importance` [K] (optional, `mse` only) weights the error of each input channel, e.g. E[x_k^2].
    `hessian` [K, K] (required by `gptq`) is E[x x^T] of the layer's inputs.

    Example:
        >>> qw = quantize_weight(torch.randn(8, 40), QuantConfig(bits=2, block_size=16), method="mse")
        >>> qw.codes.shape, qw.scales.shape
        (torch.Size([8, 40]), torch.Size([8, 3]))
    """
    check_method(method)
    require(weight.ndim == 2, f"a linear weight must be 2-D [out, in], got shape {tuple(weight.shape)}")
    handler, w = _HANDLERS[method], weight.detach()
    rows = max(1, ROW_CHUNK_ELEMENTS // max(w.shape[1], 1))
    if method not in _ROW_WISE or w.shape[0] <= rows:
        return handler(w.float(), config, importance, hessian)
    parts = [handler(w[i:i + rows].float(), config, importance, hessian) for i in range(0, w.shape[0], rows)]
    return QuantizedWeight(torch.cat([p.codes for p in parts]), torch.cat([p.scales for p in parts]),
                           torch.cat([p.zero_points for p in parts]), config)


@register_method("rtn", row_wise=True)
def _rtn(w: torch.Tensor, config: QuantConfig, importance=None, hessian=None) -> QuantizedWeight:
    """Round to nearest on each block's min-max range."""
    wb, _ = _blocks(w, config.block_size)
    s, z = _minmax_params(wb.amin(-1), wb.amax(-1), config)
    return _finish(w, wb, s, z, config)


@register_method("mse", row_wise=True)
def _mse(w: torch.Tensor, config: QuantConfig, importance=None, hessian=None) -> QuantizedWeight:
    """Clipping search, then alternating least squares on (scale, zero point), errors weighted by `importance`."""
    n, k = w.shape
    qmax = config.levels - 1
    wb, mask = _blocks(w, config.block_size)
    lo, hi = wb.amin(-1), wb.amax(-1)
    s, z = _minmax_params(lo, hi, config)
    weight_bk = mask.float().expand_as(wb)
    if importance is not None:
        require(importance.shape == (k,), f"`importance` must have shape ({k},), got {tuple(importance.shape)}")
        imp, _ = _blocks(importance.detach().float().view(1, k).to(w.device), config.block_size)
        weight_bk = weight_bk * imp.clamp_min(1e-8)
    best_err = _block_error(wb, _codes(wb, s, z, qmax), s, z, weight_bk)
    for alpha in torch.linspace(1.0, _CLIP_MIN, _CLIP_GRID)[1:].tolist():
        cs, cz = _minmax_params(lo * alpha, hi * alpha, config)
        err = _block_error(wb, _codes(wb, cs, cz, qmax), cs, cz, weight_bk)
        better = err < best_err
        s, z, best_err = torch.where(better, cs, s), torch.where(better, cz, z), torch.where(better, err, best_err)
    for _ in range(_LS_ROUNDS):
        q = _codes(wb, s, z, qmax)
        cs, cz = _least_squares(wb, q, weight_bk, z, config)
        cs = torch.where(cs > 0, cs, s)
        err = _block_error(wb, _codes(wb, cs, cz, qmax), cs, cz, weight_bk)
        better = err < best_err
        s, z, best_err = torch.where(better, cs, s), torch.where(better, cz, z), torch.where(better, err, best_err)
    return _finish(w, wb, s, z, config)


@register_method("gptq")
def _gptq(w: torch.Tensor, config: QuantConfig, importance=None, hessian=None) -> QuantizedWeight:
    """GPTQ (gptq.py) with each block's grid from the `mse` search; needs the layer's input Hessian."""
    n, k = w.shape
    require(hessian is not None and hessian.shape == (k, k),
            f"`gptq` needs the layer's input Hessian [{k}, {k}]; calibrate first (pipeline.calibrate)")
    from .gptq import gptq_quantize

    def params(group, imp):
        qw = _mse(group, replace(config, block_size=_pow2_at_least(group.shape[1])), imp)
        return qw.scales[:, 0], qw.zero_points[:, 0].float()

    codes, s, z = gptq_quantize(w, hessian.to(w.device), config.block_size, config.levels - 1, params)
    return QuantizedWeight(codes.to(torch.uint8), s.contiguous(), z.to(torch.uint8), config)


def _finish(w: torch.Tensor, wb: torch.Tensor, s: torch.Tensor, z: torch.Tensor, config: QuantConfig) -> QuantizedWeight:
    n, k = w.shape
    codes = _codes(wb, s, z, config.levels - 1).reshape(n, -1)[:, :k].to(torch.uint8)
    return QuantizedWeight(codes.contiguous(), s.contiguous(), z.to(torch.uint8).contiguous(), config)


def _pow2_at_least(x: int) -> int:
    return max(16, 1 << (x - 1).bit_length())


def sqnr_db(reference: torch.Tensor, approx: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB: 10 log10(|W|^2 / |W - W_hat|^2)."""
    ref = reference.detach().float()
    noise = (ref - approx.detach().float()).pow_(2).sum().item()  # one weight-sized temporary, not two
    signal = ref.pow(2).sum().item()
    return float("inf") if noise == 0 else 10.0 * torch.log10(torch.tensor(signal / noise)).item()

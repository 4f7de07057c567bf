"""`FakeQuantLinear`: a trainable linear layer whose forward is exactly the MatMulNBits function of its codes.

Quantization-aware training keeps, per weight, a float *latent* w and, per block, a trainable log-scale
log s; the zero point z stays the integer it started as (in [0, 2**bits), uint8, what the kernel reads), unless
`train_zero_points()` makes it trainable too: a float latent z_l, z = clamp(round(z_l), 0, 2**bits - 1) with the
straight-through gradient (EfficientQAT's Block-AP), still an integer in range at every step.
The forward computes

    q     = clamp(round(w / s) + z, 0, 2**bits - 1)        the codes (integers)
    W_hat = (q - z) * s                                     in fp32, as `quantizer.dequantize` does
    y     = x @ W_hat.T (+ bias)

with a straight-through estimator for the rounding (the gradient of round is taken as 1), so w and s
learn through the quantizer; clamping passes no gradient outside the range. `to_quantized()` returns the
very (q, s, z) of the forward as a `QuantizedWeight`, so a checkpoint written from it holds the integers
the student computed with, and `QuantLinear.from_quantized(layer.to_quantized())` gives the same outputs
(tests check it bit for bit). Nothing new reaches the package: the same nodes, the same weight bytes.

Start: `from_quant_linear(q, latent=W)`. Given the float weight W that the codes were rounded from (RTN
min-max: round(W / s) + z reproduces the codes exactly), the latent keeps the sub-step position of every
weight; given no W (or integers not made by rounding, e.g. GPTQ), the latent starts at the dequantized
weight, the centre of each code's interval. Either way the first forward computes the starting integers.
The scale is trained in log space so that one Adam step moves every block's scale by the same relative
amount, whatever its size.

Latent units (`units`): `weight` keeps w in weight units (q = round(w / s) + z: a scale change also moves
the rounding points, as in LSQ / EfficientQAT); `step` keeps u = w / s in units of the quantization step
(q = round(u) + z, W_hat = (q - z) * s: the scale only rescales the block, as in AdaRound / AutoRound), so
one learning rate means the same share of a step at 2 and at 4 bits.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .errors import require
from .qlinear import QuantLinear
from .quantizer import QuantizedWeight
from .scheme import QuantConfig


UNITS = ("weight", "step")


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """round(x) in the forward, identity in the backward (straight-through estimator)."""
    return x + (torch.round(x) - x).detach()


def _blocked(x: torch.Tensor, block_size: int) -> torch.Tensor:
    """[N, K] -> [N, nb, block_size], zero-padded at the end when K is not a whole number of blocks."""
    n, k = x.shape
    pad = -k % block_size
    return (F.pad(x, (0, pad)) if pad else x).reshape(n, -1, block_size)


def _unblocked(x: torch.Tensor, k: int) -> torch.Tensor:
    """The inverse of `_blocked`: [N, nb, block_size] -> [N, k]."""
    flat = x.reshape(x.shape[0], -1)
    return flat if flat.shape[1] == k else flat[:, :k].contiguous()


class _FakeQuant(torch.autograd.Function):
    """W_hat = (clamp(round(u) + z, 0, L - 1) - z) * s with the straight-through gradient, in one function.

    u = latent (step units) or latent / s (weight units). It works on the weight viewed as [N, blocks,
    block] so that the per-block s and z broadcast instead of being copied out to [N, K], and the backward
    recomputes the codes from the inputs instead of saving [N, K] intermediates (autograd of the plain
    expression kept about 14 bytes per weight and spent most of a CPU training step in elementwise passes).
    Its gradients are those of that expression (`FakeQuantLinear.dequantized_reference`; tests compare):
        step:   dW/dlatent = s * inside,  dW/ds = q - z
        weight: dW/dlatent = inside,      dW/ds = (q - z) - inside * u
    where `inside` marks round(u) + z within [0, L - 1] (the clamp passes no gradient outside)."""

    @staticmethod
    def _codes(latent_b, s_b, z_b, step: bool, levels: int):
        u = latent_b if step else latent_b / s_b
        v = torch.round(u) + z_b
        return u, v, v.clamp(0, levels - 1)

    @staticmethod
    def forward(ctx, latent, s, z, block_size: int, step: bool, levels: int):
        # z: the integer zero points as floats; its gradient (trainable zero points) is d W_hat / dz =
        # s * (inside - 1): a zero point moves the clamping window, so only clamped weights see it
        s_b, z_b = s[:, :, None], z[:, :, None]
        _, _, q = _FakeQuant._codes(_blocked(latent, block_size), s_b, z_b, step, levels)
        ctx.save_for_backward(latent, s, z)
        ctx.block_size, ctx.step, ctx.levels = block_size, step, levels
        return _unblocked((q - z_b) * s_b, latent.shape[1])

    @staticmethod
    def backward(ctx, grad):
        latent, s, z = ctx.saved_tensors
        bs, k = ctx.block_size, latent.shape[1]
        s_b, z_b = s[:, :, None], z[:, :, None]
        u, v, q = _FakeQuant._codes(_blocked(latent, bs), s_b, z_b, ctx.step, ctx.levels)
        g = _blocked(grad, bs)
        g_in = g * ((v >= 0) & (v <= ctx.levels - 1))
        if ctx.step:
            g_latent, g_s = g_in * s_b, (g * (q - z_b)).sum(-1)
        else:
            g_latent, g_s = g_in, (g * (q - z_b) - g_in * u).sum(-1)
        g_z = (g_in - g).sum(-1) * s if ctx.needs_input_grad[2] else None
        return _unblocked(g_latent, k), g_s, g_z, None, None, None


class FakeQuantLinear(nn.Module):
    """A linear layer trained through the quantizer; its integers are `to_quantized()`.

    Example:
        >>> from edge_recover.quantizer import quantize_weight
        >>> lin = nn.Linear(64, 8)
        >>> q = QuantLinear.from_quantized(quantize_weight(lin.weight, QuantConfig(4, 32)), lin.bias)
        >>> fq = FakeQuantLinear.from_quant_linear(q, latent=lin.weight)
        >>> torch.equal(fq.to_quantized().codes, q.codes)
        True
    """

    def __init__(self, in_features: int, out_features: int, config: QuantConfig, bias: bool = False,
                 device: torch.device | str | None = None, units: str = "weight") -> None:
        super().__init__()
        require(units in UNITS, f"`units` must be one of {', '.join(UNITS)}, got {units!r}")
        self.in_features, self.out_features, self.config, self.units = in_features, out_features, config, units
        nb = -(-in_features // config.block_size)
        self.latent = nn.Parameter(torch.zeros(out_features, in_features, dtype=torch.float32, device=device))
        self.log_scale = nn.Parameter(torch.zeros(out_features, nb, dtype=torch.float32, device=device))
        self.register_buffer("zero_points", torch.zeros(out_features, nb, dtype=torch.uint8, device=device))
        self.zero_latent: nn.Parameter | None = None  # trainable zero points (`train_zero_points`)
        self.bias = nn.Parameter(torch.zeros(out_features, device=device), requires_grad=False) if bias else None

    @classmethod
    def from_quant_linear(cls, q: QuantLinear, latent: torch.Tensor | None = None, units: str = "weight") -> "FakeQuantLinear":
        """Start from a `QuantLinear`'s integers; `latent` (the float weight they were rounded from) is optional."""
        layer = cls(q.in_features, q.out_features, q.config, bias=q.bias is not None, device=q.codes.device, units=units)
        with torch.no_grad():
            require(bool((q.scales > 0).all()), "a quantized layer with a non-positive scale cannot be trained in log space")
            layer.log_scale.copy_(q.scales.float().log())
            layer.zero_points.copy_(q.zero_points)
            if latent is None:
                layer.latent.copy_((q.codes.float() - layer._expand(q.zero_points.float())) * layer._expand(layer.scales()))
            else:
                require(tuple(latent.shape) == (q.out_features, q.in_features),
                        f"`latent` must have shape {(q.out_features, q.in_features)}, got {tuple(latent.shape)}")
                layer.latent.copy_(latent.detach().float())
            if units == "step":
                layer.latent.div_(layer._expand(layer.scales()))
            if layer.bias is not None:
                layer.bias.copy_(q.bias.detach().float())
        return layer

    def train_zero_points(self) -> None:
        """Make the zero points trainable: a float latent starting at the integers, rounded and clamped to
        [0, 2**bits) in every forward (straight-through gradient), so they stay integers in range."""
        if self.zero_latent is None:
            self.zero_latent = nn.Parameter(self.zero_points.float().clone())

    def zeros(self) -> torch.Tensor:
        """The zero points of the forward as floats [N, nb]: the integers, or the rounded trainable latent."""
        if self.zero_latent is None:
            return self.zero_points.float()
        return torch.clamp(round_ste(self.zero_latent), 0, self.config.levels - 1)

    def _expand(self, per_block: torch.Tensor) -> torch.Tensor:
        """[N, nb] -> [N, K]: each column gets its block's value."""
        idx = torch.arange(self.in_features, device=per_block.device) // self.config.block_size
        return per_block[:, idx]

    def scales(self) -> torch.Tensor:
        """The fp32 block scales s = exp(log_scale) [N, nb] (what the package stores)."""
        return self.log_scale.float().exp()

    def _codes_float(self, s_full: torch.Tensor, z_full: torch.Tensor) -> torch.Tensor:
        u = self.latent if self.units == "step" else self.latent / s_full
        return torch.clamp(round_ste(u) + z_full, 0, self.config.levels - 1)

    def dequantized(self) -> torch.Tensor:
        """W_hat [N, K] = (q - z) * s in fp32, differentiable in the latent and the scales (STE)."""
        return _FakeQuant.apply(self.latent, self.scales(), self.zeros(), self.config.block_size,
                                self.units == "step", self.config.levels)

    def dequantized_rows(self, rows: torch.Tensor) -> torch.Tensor:
        """W_hat[rows] (the output rows `rows`, e.g. the tokens of a tied embedding's lookup), computed for those
        rows only: blocks run along K, so a row's codes depend on that row's latents and scales alone."""
        return _FakeQuant.apply(self.latent[rows], self.scales()[rows], self.zeros()[rows],
                                self.config.block_size, self.units == "step", self.config.levels)

    def dequantized_reference(self) -> torch.Tensor:
        """The same W_hat written as a plain autograd expression (what `dequantized`'s gradients must equal)."""
        s_full = self._expand(self.scales())
        z_full = self._expand(self.zeros())
        return (self._codes_float(s_full, z_full) - z_full) * s_full

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dequantized().to(x.dtype) if not torch.is_autocast_enabled() else self.dequantized(),
                        self.bias)

    @torch.no_grad()
    def to_quantized(self) -> QuantizedWeight:
        """The integers of the forward: codes uint8 [N, K], scales fp32 [N, nb], zero points uint8 [N, nb]."""
        s = self.scales()
        bs, z = self.config.block_size, self.zeros()
        _, _, q = _FakeQuant._codes(_blocked(self.latent, bs), s[:, :, None], z[:, :, None], self.units == "step",
                                    self.config.levels)  # the forward's own function of the latents
        codes = _unblocked(q, self.in_features)
        return QuantizedWeight(codes.to(torch.uint8).contiguous(), s.contiguous(), z.to(torch.uint8).contiguous(), self.config)

    def to_quant_linear(self, dtype: torch.dtype = torch.float32) -> QuantLinear:
        """A frozen `QuantLinear` holding `to_quantized()` (the layer to export or evaluate)."""
        return QuantLinear.from_quantized(self.to_quantized(), self.bias, dtype=dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, {self.config.describe()}, "
                f"latent in {self.units} units")

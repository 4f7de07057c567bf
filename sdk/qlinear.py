"""`QuantLinear`: a linear layer that computes with exactly the integers of the quantizer core.

It subclasses `nn.Linear` so that PEFT LoRA wraps it like any linear layer (`base_layer`), with no
custom dispatch. Its `weight` is a frozen parameter equal to `dequantize(codes, scales, zero_points)`;
the integers themselves live in buffers and are the source of truth: `refresh_weight()` rebuilds the
weight from them, and every writer (checkpoint, ONNX export) reads the integers, never the float weight.

Trade-off: holding the dequantized weight costs memory (fp32 or bf16 copies) but keeps the forward a
plain `F.linear`, which is the fastest path in torch on CPU and GPU and lets autocast work unchanged.
"""

from __future__ import annotations

import torch
from torch import nn

from .quantizer import QuantizedWeight, dequantize
from .scheme import QuantConfig


class QuantLinear(nn.Linear):
    """A frozen quantized linear layer.

    Example:
        >>> from edge_recover.quantizer import quantize_weight
        >>> lin = nn.Linear(64, 8)
        >>> q = QuantLinear.from_quantized(quantize_weight(lin.weight, QuantConfig(4, 32)), lin.bias)
        >>> q(torch.randn(2, 64)).shape
        torch.Size([2, 8])
    """

    def __init__(self, in_features: int, out_features: int, config: QuantConfig, bias: bool = False,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> None:
        super().__init__(in_features, out_features, bias=bias, dtype=dtype, device=device)
        self.config = config
        nb = -(-in_features // config.block_size)
        self.register_buffer("codes", torch.zeros(out_features, in_features, dtype=torch.uint8, device=device))
        self.register_buffer("scales", torch.ones(out_features, nb, dtype=torch.float32, device=device))
        self.register_buffer("zero_points", torch.zeros(out_features, nb, dtype=torch.uint8, device=device))
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)

    @classmethod
    def from_quantized(cls, qw: QuantizedWeight, bias: torch.Tensor | None = None,
                       dtype: torch.dtype = torch.float32) -> "QuantLinear":
        n, k = qw.shape
        layer = cls(k, n, qw.config, bias=bias is not None, dtype=dtype, device=qw.codes.device)
        layer.load_integers(qw)
        if bias is not None:
            layer.bias.data.copy_(bias.detach())
        return layer

    def load_integers(self, qw: QuantizedWeight) -> None:
        """Set the codes, scales and zero points, then rebuild the float weight from them."""
        self.codes.copy_(qw.codes)
        self.scales.copy_(qw.scales)
        self.zero_points.copy_(qw.zero_points)
        self.refresh_weight()

    @torch.no_grad()
    def refresh_weight(self) -> None:
        w = dequantize(self.codes, self.scales, self.zero_points, self.config.block_size)
        self.weight.data = w.to(device=self.weight.device, dtype=self.weight.dtype)

    def quantized(self) -> QuantizedWeight:
        return QuantizedWeight(self.codes, self.scales, self.zero_points, self.config)

    def _apply(self, fn, recurse=True):
        # `.to(dtype)` leaves the uint8 buffers alone but would cast the scales: keep them fp32, exact.
        scales = self.scales
        out = super()._apply(fn, recurse)
        self.scales = scales.to(self.scales.device)
        return out

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, {self.config.describe()}"

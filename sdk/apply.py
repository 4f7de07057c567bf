"""Apply a scheme to a model: swap every `nn.Linear` the scheme quantizes for a `QuantLinear`.

`quantize_model(model, scheme, method)` returns a `QuantReport` with, per layer, the config it got and the
error it costs (SQNR in dB), and the weight bytes before and after (what decode reads per token).
Layers the scheme keeps are listed too: nothing is skipped silently.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Iterable

import torch
from torch import nn

from .errors import EdgeRecoverError, require
from .layouts import LAYOUTS
from .qlinear import QuantLinear
from .quantizer import quantize_weight, sqnr_db
from .scheme import KEEP, QuantConfig, Scheme


@dataclass
class LayerReport:
    name: str
    shape: tuple[int, int]
    config: str  # QuantConfig.describe() or "keep"
    bits: float  # effective bits per weight, scales and zero points included (16 for kept fp weights)
    sqnr_db: float | None


@dataclass
class QuantReport:
    scheme: dict
    method: str
    layers: list[LayerReport] = field(default_factory=list)
    bytes_before: int = 0  # linear weights at fp16, what an unquantized edge model reads
    bytes_after: int = 0

    def to_json(self) -> dict:
        return {**asdict(self), "layers": [asdict(layer) for layer in self.layers]}

    def dumps(self) -> str:
        return json.dumps(self.to_json(), indent=2)

    def summary_rows(self) -> list[tuple[str, int, float | None]]:
        """(config, layer count, mean SQNR dB) per distinct config, for a short table; the SQNR is None for
        kept layers (no quantization error to measure)."""
        groups: dict[str, list[LayerReport]] = {}
        for layer in self.layers:
            groups.setdefault(layer.config, []).append(layer)
        rows = []
        for cfg, layers in groups.items():
            vals = [lr.sqnr_db for lr in layers if lr.sqnr_db is not None]
            rows.append((cfg, len(layers), sum(vals) / len(vals) if vals else None))
        return rows


def effective_bits(config: QuantConfig) -> float:
    """Bits per weight as MatMulNBits stores it: the code, plus an fp32 scale and a packed zero point per block."""
    return config.bits + (32 + config.bits) / config.block_size


def linear_layers(model: nn.Module) -> dict[str, nn.Linear]:
    """All linear layers of the decoder, by qualified name (the embedding is not a Linear)."""
    return {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


@torch.no_grad()
def quantize_model(model: nn.Module, scheme: Scheme, method: str = "rtn",
                   hessians: dict[str, torch.Tensor] | None = None, progress: bool = True,
                   names: Iterable[str] | None = None) -> QuantReport:
    """Quantize `model` in place under `scheme`; returns the per-layer report. `names`: only these linear layers
    (the others stay as they are and out of the report; pipeline.py's grouped GPTQ quantizes a model in parts).

    `hessians` maps a layer name to E[x x^T] of its inputs (see `calibration.input_hessians`): `gptq` needs
    it; `mse` uses its diagonal to weight errors by how much each input channel matters, and takes the
    diagonal alone ([K], `input_hessians(..., diagonal=True)`) too.

    Example:
        >>> report = quantize_model(model, named_scheme("w4w2gateup"), method="mse")  # doctest: +SKIP
    """
    layers = linear_layers(model)
    require(bool(layers), "the model has no nn.Linear layers to quantize")
    # a named scheme's gate/up rule as this family names the layers (Phi-3: the fused gate_up_proj)
    scheme = scheme.for_layout(LAYOUTS.get(getattr(getattr(model, "config", None), "model_type", None)))
    scheme.check_matches(layers)
    if names is not None:
        wanted = set(names)
        layers = {n: m for n, m in layers.items() if n in wanted}
    if method == "gptq":  # refused before minutes of work, naming the layer (not after, deep in the quantizer)
        missing = [n for n, m in layers.items() if scheme.resolve(n) != KEEP and not isinstance(m, QuantLinear)
                   and (hessians is None or n not in hessians)]
        if missing:
            raise EdgeRecoverError(f"`gptq` needs the input Hessian of every layer it quantizes; none for "
                                   f"{missing[0]!r} ({len(missing)} layers): calibrate them (pipeline.calibrate "
                                   f"with the scheme) or use method `mse`")
    report = QuantReport(scheme=scheme.to_json(), method=method)
    iterator = list(layers)
    if progress:
        from tqdm import tqdm

        iterator = tqdm(iterator, desc=f"quantize {scheme.name} ({method})", unit="layer", leave=False)
    for name in iterator:
        lin = layers.pop(name)  # the replaced float layer is freed as the loop moves on, not kept to the end
        cfg = scheme.resolve(name)
        n, k = lin.weight.shape
        report.bytes_before += n * k * 2
        if cfg == KEEP or isinstance(lin, QuantLinear):
            report.layers.append(LayerReport(name, (n, k), KEEP, 16.0, None))
            report.bytes_after += n * k * 2
            continue
        h = hessians.get(name) if hessians else None
        full = h is not None and h.ndim == 2  # a diagonal [K] (mse's calibration) is the importance itself
        qw = quantize_weight(lin.weight, cfg, method, importance=torch.diag(h) if full else h,
                             hessian=h if full else None)
        q = QuantLinear.from_quantized(qw, lin.bias, dtype=lin.weight.dtype)
        q.to(lin.weight.device)
        report.layers.append(LayerReport(name, (n, k), cfg.describe(), effective_bits(cfg), sqnr_db(lin.weight, q.weight)))
        report.bytes_after += int(n * k * effective_bits(cfg) / 8)
        _set_module(model, name, q)
    return report


def quantized_layers(model: nn.Module) -> dict[str, QuantLinear]:
    """The `QuantLinear` layers of a model (PEFT-wrapped ones included, by their base-model name)."""
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, QuantLinear):
            clean = name.replace("base_model.model.", "").replace(".base_layer", "")
            out[clean] = m
    return out

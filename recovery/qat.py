"""Integer-exact recovery (`--mode qat`): distil the teacher into the quantized integers themselves.

    teacher W ──► start integers (RTN min-max, GPTQ, or a --quantized checkpoint)
                      │ every QuantLinear -> FakeQuantLinear (latent w, log-scale, integer zero point)
                      ▼ distil (distill.py's loop: same data, KL, schedule, checkpoints, resume)
                  FakeQuantLinear -> QuantLinear(to_quantized())  ──► quantized checkpoint (sdk/checkpoint.py)

What ships is a checkpoint in the format `edge-recover quantize` writes, so `edge-recover export` packs its
integers unchanged: the package has the nodes and weight bytes of an unrecovered one, no side-car, and
decodes at the same speed. What trains:
- every quantized layer's latent weights and block scales (through the fake quantizer, `sdk/fakequant.py`);
  zero points stay the integers they start as (in range, uint8), which is what MatMulNBits and QNN read, or
  (`train_zero_points`) train as rounded, clamped latents: integers in range at every step all the same;
- the latent in weight units or in units of the quantization step (`units`, see sdk/fakequant.py);
- optionally (`train_norms`, default on) the RMSNorm weights, which ship as floats anyway: no new bytes;
- optionally (`train_head`) the float output head (with a tied input embedding, the one shared tensor: SmolLM2,
  Qwen3), which also ships as floats. A head the scheme quantizes trains through its fake quantizer instead.
Each group has its own learning rate (latents move in weight units, log-scales in relative units).

The latent starts at the teacher's float weight where that reproduces the start integers (RTN: it does, and
the latent then keeps each weight's position inside its rounding step). Where it does not (GPTQ integers:
error feedback moves some weights to a neighbouring code), `start="centre"` (the default) puts every latent at
its code's centre, half a step from any rounding boundary. `start="teacher"` decides weight by weight: the
teacher's value where it rounds to the start code, the code's centre elsewhere; it exists because an RTN start
is reproduced by the teacher only up to float rounding (exp(log s) is not s), so on a real model every layer
missed the whole-layer test by a few weights and `centre` put all of them half a step from a boundary (the
eighth study: 0 of 168 layers from the teacher, 0.67 % of codes moved). `start="nearest"` puts it at the point of its code's
interval nearest to the teacher weight: the teacher itself where it lies inside, else just inside the edge GPTQ
pushed it across; the codes still start exactly as given. Measured on the CPU demo's recipe (SmolLM2, 62 steps):
nearest moves 5.9 % of the codes where centre moves none, and ends far worse (held-out KL 1.29 against 0.81,
package perplexity 108.7 against 66.5): the codes it flips back are GPTQ's error compensation.
`qat_start` reports which start each layer got.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from edge_recover.apply import QuantReport, _set_module, quantized_layers
from edge_recover.errors import require
from edge_recover.fakequant import FakeQuantLinear
from edge_recover.quantizer import sqnr_db


@dataclass
class QatStart:
    """How the QAT student started: layers whose latent is the teacher weight vs the dequantized one."""

    from_teacher: int
    from_dequantized: int
    from_nearest: int = 0
    from_mixed: int = 0  # `start="teacher"` layers whose teacher weights reproduce some codes, not all
    teacher_share: float = 0.0  # share of all trained weights whose latent starts at the teacher's value

    def to_json(self) -> dict:
        return {"latent_from_teacher": self.from_teacher, "latent_from_dequantized": self.from_dequantized,
                "latent_nearest_to_teacher": self.from_nearest, "latent_mixed": self.from_mixed,
                "latent_teacher_share": self.teacher_share}


LATENT_STARTS = ("nearest", "centre", "teacher")
# how far inside a code's interval (in steps) a latent clamped to it starts: rounds to that code, not the next
_EDGE = 0.02


def nearest_latent(q, w: torch.Tensor) -> torch.Tensor:
    """The point of each code's rounding interval nearest to the teacher weight `w` [N, K], in weight units.

    Code c (with zero point z, step s) is what every w with round(w / s) + z == c gives, i.e. the interval
    (c - z -+ 1/2) * s, open-ended at the lowest and highest code (the quantizer clamps there).
    """
    from edge_recover.quantizer import dequantize

    idx = torch.arange(q.in_features, device=q.codes.device) // q.config.block_size
    s = q.scales.float()[:, idx]
    centre = dequantize(q.codes, q.scales, q.zero_points, q.config.block_size).float()
    lo = torch.where(q.codes == 0, torch.full_like(centre, -torch.inf), centre - (0.5 - _EDGE) * s)
    hi = torch.where(q.codes == q.config.levels - 1, torch.full_like(centre, torch.inf), centre + (0.5 - _EDGE) * s)
    return torch.minimum(torch.maximum(w.float(), lo), hi)


def fake_quant_layers(model: nn.Module) -> dict[str, FakeQuantLinear]:
    """The trainable fake-quantized layers of `model`, by qualified name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, FakeQuantLinear)}


def norm_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """Weights of the normalization layers (RMSNorm / LayerNorm), which ship as floats."""
    out = {}
    for name, m in model.named_modules():
        if "norm" in type(m).__name__.lower() and isinstance(getattr(m, "weight", None), nn.Parameter):
            out[f"{name}.weight"] = m.weight
    return out


def head_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The output head's weight when it is a float `nn.Linear` (not quantized), by its first qualified name.

    Tied to the input embedding (SmolLM2, Qwen3) it is one tensor, named `model.embed_tokens.weight`.

    Example:
        >>> list(head_parameters(qat_model))  # doctest: +SKIP
        ['model.embed_tokens.weight']
    """
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None or type(head) is not nn.Linear:  # QuantLinear / FakeQuantLinear: the integers train instead
        return {}
    return {name: p for name, p in model.named_parameters(remove_duplicate=True) if p is head.weight}


def shipped_floats(model: nn.Module, train_norms: bool, train_head: bool) -> tuple[str, ...]:
    """Names of the float tensors recovery trained (norms, head): what a slim checkpoint must store anyway."""
    return tuple(norm_parameters(model) if train_norms else ()) + tuple(head_parameters(model) if train_head else ())


# Layers at this many bits or more are not trained: near-lossless already (the cpu target's 8-bit head: 51.75 vs
# the float head's 51.94), and training them cost accuracy: the demo's recipe ended at 70.37 Hamlet perplexity
# with the 8-bit head trained, 66.48 with it kept, 66.04 with a float head (docs/results/recovery-cpu-head8/)
FROZEN_BITS = 8


def make_qat_student(base: nn.Module, teacher: nn.Module, train_norms: bool = True, units: str = "weight",
                     train_head: bool = False, start: str = "centre", train_zero_points: bool = False) -> QatStart:
    """Turn every `QuantLinear` of `base` (in place) into a `FakeQuantLinear` that starts at its integers.

    `start` places the latents of integers the teacher weight does not round to (module docstring).

    Only the latents, log-scales, (with `train_zero_points`) zero points, (with `train_norms`) norm weights and
    (with `train_head`) a float head are left trainable.

    Example:
        >>> start = make_qat_student(student_model, teacher_model)  # doctest: +SKIP
    """
    for p in base.parameters():
        p.requires_grad_(False)
    require(start in LATENT_STARTS, f"`--latent-start` must be one of {', '.join(LATENT_STARTS)}, got {start!r}")
    n_teacher = n_deq = n_near = n_mixed = 0
    at_teacher = total = 0
    for name, q in quantized_layers(base).items():
        if q.config.bits >= FROZEN_BITS:  # stays a frozen QuantLinear: its integers ship as they are
            continue
        w = teacher.get_submodule(name).weight.detach().to(q.codes.device, torch.float32)
        fq = FakeQuantLinear.from_quant_linear(q, latent=w, units=units)
        total += w.numel()
        same = fq.to_quantized().codes == q.codes
        if bool(same.all()):
            n_teacher += 1
            at_teacher += w.numel()
        elif start == "teacher":  # weight by weight: the teacher where it rounds to the code, else the centre
            centre = FakeQuantLinear.from_quant_linear(q, units=units)
            with torch.no_grad():
                centre.latent.copy_(torch.where(same, fq.latent, centre.latent))
            fq = centre
            require(torch.equal(fq.to_quantized().codes, q.codes), f"{name}: the teacher start moved a code")
            n_mixed += 1
            at_teacher += int(same.sum())
        else:
            fq = None
            if start == "nearest":
                fq = FakeQuantLinear.from_quant_linear(q, latent=nearest_latent(q, w), units=units)
                fq = fq if torch.equal(fq.to_quantized().codes, q.codes) else None
                n_near += fq is not None
            if fq is None:  # centre, or a nearest start that float rounding moved off its code
                fq = FakeQuantLinear.from_quant_linear(q, units=units)
                n_deq += 1
        if train_zero_points:
            fq.train_zero_points()
        _set_module(base, name, fq)
    if train_norms:
        for p in norm_parameters(base).values():
            p.requires_grad_(True)
    if train_head:
        for p in head_parameters(base).values():
            p.requires_grad_(True)
    return QatStart(n_teacher, n_deq, n_near, n_mixed, at_teacher / max(total, 1))


def param_groups(model: nn.Module, lr: float, lr_scale: float, lr_norm: float, lr_head: float = 0.0,
                 latent_update: str = "adamw", lr_zero: float = 1e-2) -> list[dict]:
    """Optimizer groups: latents at `lr`, log-scales at `lr_scale`, trainable zero points at `lr_zero` (integer
    units), trainable norm weights at `lr_norm`, a trainable float head at `lr_head`. `latent_update="layer-sgd"` marks the latents' group for recovery/optim.py's
    layer-normalised momentum step (the others stay AdamW).

    Each group records its peak as `peak_lr`; the schedule scales every group by the same factor."""
    latents, scales, zeros = [], [], []
    for fq in fake_quant_layers(model).values():
        latents.append(fq.latent)
        scales.append(fq.log_scale)
        if fq.zero_latent is not None:
            zeros.append(fq.zero_latent)
    norms = [p for p in norm_parameters(model).values() if p.requires_grad]
    latent_group = {"params": latents, "lr": lr, "peak_lr": lr}
    if latent_update != "adamw":
        latent_group.update(update=latent_update, weight_decay=0.0)
    groups = [latent_group, {"params": scales, "lr": lr_scale, "peak_lr": lr_scale}]
    if zeros:
        groups.append({"params": zeros, "lr": lr_zero, "peak_lr": lr_zero, "weight_decay": 0.0})
    if norms:
        groups.append({"params": norms, "lr": lr_norm, "peak_lr": lr_norm, "weight_decay": 0.0})
    head = [p for p in head_parameters(model).values() if p.requires_grad]
    if head:
        groups.append({"params": head, "lr": lr_head, "peak_lr": lr_head, "weight_decay": 0.0})
    return groups


@torch.no_grad()
def freeze_qat_student(model: nn.Module) -> nn.Module:
    """Replace every `FakeQuantLinear` (in place) by the frozen `QuantLinear` of its integers; returns `model`."""
    for name, fq in fake_quant_layers(model).items():
        _set_module(model, name, fq.to_quant_linear(dtype=torch.float32))
    for p in model.parameters():
        p.requires_grad_(False)
    return model


@torch.no_grad()
def codes_moved(model: nn.Module, start: dict[str, torch.Tensor]) -> float:
    """Share of codes that differ from the start integers (`start`: name -> codes)."""
    moved = total = 0
    for name, q in quantized_layers(model).items():
        moved += int((q.codes.cpu() != start[name]).sum())
        total += q.codes.numel()
    return moved / max(total, 1)


@torch.no_grad()
def recovered_report(model: nn.Module, teacher: nn.Module, scheme_json: dict, method: str) -> QuantReport:
    """A `QuantReport` for the recovered integers: per layer its config and SQNR against the teacher weight."""
    from edge_recover.apply import LayerReport, effective_bits

    rep = QuantReport(scheme=scheme_json, method=method)
    for name, q in quantized_layers(model).items():
        w = teacher.get_submodule(name).weight.detach().float().cpu()
        deq = q.quantized().dequantize().cpu()
        rep.layers.append(LayerReport(name, (q.out_features, q.in_features), q.config.describe(),
                                      effective_bits(q.config), sqnr_db(w, deq)))
        rep.bytes_before += w.numel() * 2
        rep.bytes_after += int(round(w.numel() * effective_bits(q.config) / 8))
    return rep

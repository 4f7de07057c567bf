"""The recovery optimizer: AdamW, and for the latents optionally a layer-normalised SGD step.

AdamW moves every parameter by about `lr` a step whatever the size of its gradient (it divides by the running
RMS of that parameter's own gradient). For a latent integer code that is the wrong prior: a latent a tenth of a
step from a rounding boundary flips on the noise of its straight-through gradient as readily as one that the
loss pushes consistently (docs/recovery.md, the ninth study: the more codes AdamW moved, the worse the model).
`latent_update="layer-sgd"` moves the latents of one layer along their momentum, scaled so that the layer's RMS
move is `lr` (in quantization steps, `--latent-units step`):

    m  <- 0.9 m + g                                          per weight (the momentum buffer)
    u  <- u - lr * clamp(m / rms(m over the layer), -3, 3)   a weight moves in proportion to its own evidence

so a weight with a tenth of the layer's typical gradient moves a tenth as far, and the learning rate keeps its
meaning across layers whose gradient scales differ by orders of magnitude. The clamp bounds a step at 3 x lr:
straight-through gradients are heavy-tailed, and unclamped, a weight at 300 x the layer's RMS moved three codes in
one step and the README demo's recipe diverged at step 13 (measured). Every other group (log-scales, norms,
a float head) keeps AdamW. With no group flagged this is `torch.optim.AdamW`, step for step and bit for bit.

Example:
    >>> opt = RecoveryAdamW([{"params": [w], "update": "layer-sgd"}, {"params": [s]}], lr=1e-2)  # doctest: +SKIP
"""

from __future__ import annotations

import torch

__all__ = ["LATENT_UPDATES", "RecoveryAdamW"]

LATENT_UPDATES = ("adamw", "layer-sgd")
_MOMENTUM = 0.9
_CLIP = 3.0  # the most a weight moves in one step, in learning rates


class RecoveryAdamW(torch.optim.AdamW):
    """`torch.optim.AdamW` whose groups marked `"update": "layer-sgd"` take the layer-normalised momentum step."""

    @torch.no_grad()
    def step(self, closure=None):
        sgd = [g for g in self.param_groups if g.get("update") == "layer-sgd"]
        if not sgd:
            return super().step(closure)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        held = []
        for group in sgd:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                m = state.get("momentum_buffer")
                if m is None:
                    m = state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["step"] = torch.zeros((), dtype=torch.float32)  # AdamW's load_state_dict reads every "step"
                state["step"] += 1
                m.mul_(_MOMENTUM).add_(p.grad)
                rms = m.float().pow(2).mean().sqrt().clamp_min(1e-30)  # a zero m moves nothing either way
                p.add_((m / rms.to(m.dtype)).clamp_(-_CLIP, _CLIP), alpha=-group["lr"])  # no host sync
                held.append((p, p.grad))
                p.grad = None  # AdamW's step below skips what has no gradient
        super().step()
        for p, grad in held:
            p.grad = grad
        return loss

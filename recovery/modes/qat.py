"""Mode `qat` (the default): train the integers themselves (recovery/qat.py), output a quantized checkpoint.

Every quantized layer becomes a FakeQuantLinear (latents, log-scales; norms and a float head optionally too);
after training the latents are rounded back to integers, and the checkpoint is what `edge-recover export` packs
as it is: the unrecovered package's nodes and bytes, no side-car. Its defaults are the best measured run
(docs/recovery.md: held-out KL 4.35 -> 0.40 on SmolLM2 with lr 1e-2 in step units and beta2 0.95 for the noisy
straight-through gradients, against 0.64 with lr 2e-3 / 2e-3 / 1e-4 and beta2 0.999).
"""

from __future__ import annotations

from edge_recover.apply import quantized_layers
from edge_recover.errors import require

from ..output import RunOutput, write_quantized
from . import TRAIN_HEAD_QUANTIZED, Plan, Student


class QatMode:
    name = "qat"
    output = "quantized"
    tensor_file = "qat.safetensors"
    lr = 1e-2  # the latents', in quantization-step units
    beta2 = 0.95

    def check(self, cfg) -> None:
        """Every setting works with qat."""

    def plan(self, base, cfg) -> Plan:
        """Every quantized layer trains; its start codes are kept to count the codes that moved."""
        codes = {n: q.codes.clone() for n, q in quantized_layers(base).items()}
        return Plan(list(codes), codes)

    def student(self, plan: Plan, base, teacher, cfg, train_ids, device, resume: bool) -> Student:
        from ..qat import head_parameters, make_qat_student, param_groups

        require(not cfg.train_head or bool(head_parameters(base)), TRAIN_HEAD_QUANTIZED)  # a --quantized one's
        base = base.to(device)
        start = make_qat_student(base, teacher, train_norms=cfg.train_norms, units=cfg.latent_units,
                                 train_head=cfg.train_head, start=cfg.latent_start,
                                 train_zero_points=cfg.train_zero_points)
        return Student(base, param_groups(base, cfg.lr, cfg.lr_scale, cfg.lr_norm, cfg.lr_head, cfg.latent_update,
                                          cfg.lr_zero),
                       start.to_json())

    def finish(self, plan: Plan, model, report: dict):
        """The latents rounded to integers: from here on the student is exactly what ships."""
        from ..qat import codes_moved, freeze_qat_student

        model = freeze_qat_student(model)
        report["codes_moved"] = codes_moved(model, plan.data)
        return model

    def write(self, plan: Plan, out: RunOutput) -> None:
        write_quantized(out)


MODE = QatMode()

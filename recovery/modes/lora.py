"""Mode `lora` (the paper's Recover-LoRA): PEFT LoRA on the frozen integers, output an adapter folder.

The targets (`--targets`: the scheme's lowest bit width by default) get LoRA A and B, started from PEFT's zero,
the quantization error's top-r SVD (`residual`) or the same weighted by the teacher's inputs (`activation`, the
default); only A and B train. The adapter records the integers it belongs to (recovery/student.py), and
`export --adapter` puts it beside the package (side-car) or folds it in (merge).
"""

from __future__ import annotations

import torch

from edge_recover.errors import require

from ..output import RunOutput, write_adapter
from ..student import add_lora, init_lora_from_activations, init_lora_from_residual, resolve_targets
from . import Plan, Student


class LoraMode:
    name = "lora"
    output = "adapter"
    tensor_file = "lora.safetensors"
    lr = 3e-4
    beta2 = 0.999

    def check(self, cfg) -> None:
        require(cfg.block_ap_steps == 0, "`--block-ap-steps` trains the integers layer by layer: it needs `--mode qat`")

    def plan(self, base, cfg) -> Plan:
        """The LoRA targets, refused now (a bad `--targets`) rather than after the teacher's sampling."""
        return Plan(resolve_targets(base, cfg.targets))

    def student(self, plan: Plan, base, teacher, cfg, train_ids, device, resume: bool) -> Student:
        torch.manual_seed(cfg.seed)  # LoRA A init
        student = add_lora(base, plan.layers, cfg.rank, cfg.lora_alpha).to(device)
        if cfg.init == "residual" and not resume:
            init_lora_from_residual(student, teacher, plan.layers)
        elif cfg.init == "activation" and not resume:
            from edge_recover.calibration import input_hessians

            hessians = input_hessians(teacher, train_ids[: max(cfg.calibration, 64)], batch_size=cfg.batch_size)
            init_lora_from_activations(student, teacher, plan.layers, hessians)
            del hessians
        params = [p for p in student.parameters() if p.requires_grad]
        return Student(student, [{"params": params, "lr": cfg.lr, "peak_lr": cfg.lr}])

    def finish(self, plan: Plan, model, report: dict):
        return model

    def write(self, plan: Plan, out: RunOutput) -> None:
        write_adapter(out, plan.layers)


MODE = LoraMode()

"""The last stage of `recover` (distill.py): the mode's output folder, written all-or-nothing.

lora: PEFT adapter_config.json + adapter_model.safetensors and edge_recover_adapter.json (base hash, scheme,
method, integer hash); qat: a quantized checkpoint (sdk/checkpoint.py) with the trained norm weights; both:
recovery_report.json (REPORT_NAME) and metrics.jsonl.
"""

from __future__ import annotations

import json
import shutil

from .student import ADAPTER_MARKER, adapter_metadata

REPORT_NAME = "recovery_report.json"


def write_adapter(student, lm, scheme, method, qhash, targets, cfg, quantized, output, report, metrics_path,
                  overwrite) -> None:
    """The trained LoRA adapter (PEFT files + edge_recover_adapter.json binding it to its integers), all-or-nothing."""
    from edge_recover.atomic import atomic_dir

    with atomic_dir(output, overwrite) as tmp:
        student.save_pretrained(str(tmp))
        meta = adapter_metadata(lm.source_hash, scheme, method, qhash, targets, cfg.rank, cfg.lora_alpha,
                                calibration=None if quantized else {"samples": cfg.calibration, "seed": cfg.seed})
        (tmp / ADAPTER_MARKER).write_text(json.dumps(meta, indent=2))
        (tmp / REPORT_NAME).write_text(json.dumps(report, indent=2))
        shutil.copyfile(metrics_path, tmp / "metrics.jsonl")


def write_quantized(student, lm, scheme, method, output, report, metrics_path, overwrite, teacher_model) -> None:
    """The recovered integers as a quantized checkpoint (the trained norm and head weights with them), all-or-nothing."""
    from edge_recover.checkpoint import save_quantized
    from edge_recover.models import LoadedModel

    from .qat import recovered_report, shipped_floats

    qreport = recovered_report(student, teacher_model, scheme.to_json(), method)
    floats = shipped_floats(student, report["config"]["train_norms"], report["config"]["train_head"])
    save_quantized(LoadedModel(student, lm.tokenizer, lm.source, lm.source_hash), output, qreport, overwrite=overwrite,
                   slim_include=floats,
                   extra_files={REPORT_NAME: json.dumps(report, indent=2), "metrics.jsonl": metrics_path.read_text()},
                   manifest_extra={"recovery": {"mode": "qat", "start_quant_hash": report["quant_hash"],
                                                "kl_before": report["kl_before"], "kl_after": report["kl_after"]}})

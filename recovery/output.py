"""The last stage of `recover` (distill.py): the mode's output folder, written all-or-nothing.

lora: PEFT adapter_config.json + adapter_model.safetensors and edge_recover_adapter.json (base hash, scheme,
method, integer hash); qat: a quantized checkpoint (sdk/checkpoint.py) with the trained norm weights; both:
recovery_report.json (REPORT_NAME) and metrics.jsonl. A mode (recovery/modes/) calls one of these with the
run's `RunOutput`.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .student import ADAPTER_MARKER, adapter_metadata

REPORT_NAME = "recovery_report.json"


@dataclass
class RunOutput:
    """What a finished run hands its mode's writer: the trained student, where it came from, where it goes."""

    student: Any  # the model that ships (a PeftModel for lora, the frozen QuantLinear model for qat)
    lm: Any  # the teacher's LoadedModel (tokenizer, source, source hash)
    teacher: Any  # the teacher's torch model
    scheme: Any  # the Scheme the start integers were made with
    method: str
    qhash: str  # the start integers' hash (student.quant_hash)
    cfg: Any  # distill.RecoverConfig
    quantized: "str | Path | None"  # the `--quantized` checkpoint, or None when the run quantized
    output: Path
    report: dict
    metrics_path: Path
    overwrite: bool


def write_adapter(out: RunOutput, targets: list[str]) -> None:
    """The trained LoRA adapter (PEFT files + edge_recover_adapter.json binding it to its integers), all-or-nothing."""
    from edge_recover.atomic import atomic_dir

    cfg = out.cfg
    with atomic_dir(out.output, out.overwrite) as tmp:
        out.student.save_pretrained(str(tmp))
        meta = adapter_metadata(out.lm.source_hash, out.scheme, out.method, out.qhash, targets, cfg.rank,
                                cfg.lora_alpha,
                                calibration=None if out.quantized else {"samples": cfg.calibration, "seed": cfg.seed})
        (tmp / ADAPTER_MARKER).write_text(json.dumps(meta, indent=2))
        (tmp / REPORT_NAME).write_text(json.dumps(out.report, indent=2))
        shutil.copyfile(out.metrics_path, tmp / "metrics.jsonl")


def write_quantized(out: RunOutput) -> None:
    """The recovered integers as a quantized checkpoint (the trained norm and head weights with them), all-or-nothing."""
    from edge_recover.checkpoint import save_quantized
    from edge_recover.models import LoadedModel

    from .qat import recovered_report, shipped_floats

    lm, report = out.lm, out.report
    qreport = recovered_report(out.student, out.teacher, out.scheme.to_json(), out.method)
    floats = shipped_floats(out.student, report["config"]["train_norms"], report["config"]["train_head"])
    save_quantized(LoadedModel(out.student, lm.tokenizer, lm.source, lm.source_hash), out.output, qreport,
                   overwrite=out.overwrite, slim_include=floats,
                   extra_files={REPORT_NAME: json.dumps(report, indent=2), "metrics.jsonl": out.metrics_path.read_text()},
                   manifest_extra={"recovery": {"mode": "qat", "start_quant_hash": report["quant_hash"],
                                                "kl_before": report["kl_before"], "kl_after": report["kl_after"]}})

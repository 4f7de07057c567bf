"""`ExportOptions(adapter=DIR, adapter_mode=...)`: the adapter steps of an export, in order.

    plan_adapter       before any model is loaded: read the adapter, refuse a bad mode / name / target
    quantize_for       a full-precision MODEL is quantized exactly as the adapter's run did (its scheme,
                       method, calibration), so the integers can match; a checkpoint keeps its own
    bind_base          refuse an adapter for another base model, scheme or set of integers
    merge (merge)      survival figures + fold and re-quantize in place (merge.py)
    reference          the torch model the package must equal: PEFT on the base (sidecar), else the model
    write              sidecar: `adapters/NAME.onnx_adapter` + manifest `lora` / `adapters` records

The graph side of side-car mode is `lora.add_sidecar`, run by the `lora_sidecar` pass (passes.py, `plan.sidecar`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from edge_recover.errors import require

from .lora import (ADAPTER_SUFFIX, ADAPTERS_DIR, LoraAdapterData, Sidecar, adapter_entry, base_record,
                   check_against_base, check_name, read_lora_adapter, write_adapter_file)
from .targets import TargetProfile

MODES = ("sidecar", "merge")


@dataclass
class AdapterPlan:
    """What one export does with its adapter."""

    mode: str
    name: str
    data: LoraAdapterData
    sidecar: Sidecar | None = None
    base: dict | None = None
    merge_report: dict | None = None
    extra: dict = field(default_factory=dict)


def plan_adapter(adapter: str | Path, mode: str, name: str | None, target: TargetProfile) -> AdapterPlan:
    """Validate the request before any long work: mode, target support, name, the adapter files."""
    require(mode in MODES, f"unknown `adapter_mode` {mode!r}; choose sidecar or merge")
    dtype = target.check_sidecar() if mode == "sidecar" else None
    default_name = re.sub(r"[^A-Za-z0-9_.-]", "-", Path(adapter).expanduser().resolve().name).lstrip("-._") or "adapter"
    name = check_name(name or default_name[:64])
    data = read_lora_adapter(adapter)
    return AdapterPlan(mode, name, data, Sidecar(data, dtype) if dtype else None)


def quantize_for(lm, plan: AdapterPlan) -> tuple[dict, str] | None:
    """Quantize a full-precision `lm` in place the way the adapter's run did (scheme, method, calibration);
    returns (scheme JSON, method) of that quantization, or None when `lm` was quantized already."""
    from edge_recover.apply import quantized_layers
    from edge_recover.pipeline import quantize_loaded
    from edge_recover.scheme import Scheme

    if quantized_layers(lm.model):
        return None
    meta = plan.data.meta
    cal = meta.get("calibration") or {}
    scheme = Scheme.from_json(meta["scheme"])
    quantize_loaded(lm, scheme, method=meta["method"],
                    calibration=int(cal.get("samples", 32)), seed=int(cal.get("seed", 0)), progress=False)
    return scheme.to_json(), meta["method"]


def bind_base(lm, plan: AdapterPlan, scheme_json: dict) -> None:
    """Record the base (source hash, scheme, integer hash) and refuse an adapter that does not belong to it."""
    from edge_recover.apply import quantized_layers
    from edge_recover.recovery.student import quant_hash

    plan.base = base_record(lm.source_hash, scheme_json, quant_hash(lm.model))
    shapes = {n: (q.out_features, q.in_features) for n, q in quantized_layers(lm.model).items()}
    check_against_base(plan.data, plan.base, shapes)


def merge(lm, plan: AdapterPlan, method: str | None, calibration: int | None, eval_text: str | None) -> None:
    """Fold the adapter into `lm`'s integers (re-quantized) and record how much of the recovery survives."""
    from edge_recover.quantizer import check_method

    from .merge import merge_adapter, merge_hessians, survival, survival_windows

    method = method or plan.data.meta.get("method", "mse")
    check_method(method)
    cal = calibration if calibration is not None else int((plan.data.meta.get("calibration") or {}).get("samples", 16))
    hessians = merge_hessians(lm.model, lm.tokenizer, plan.data, cal) if method in ("mse", "gptq") else None
    windows = survival_windows(lm.tokenizer, lm.model.config.vocab_size, eval_text)
    report = survival(lm.model, plan.data, windows, lambda: merge_adapter(lm.model, plan.data, method, hessians))
    report["merge"]["calibration_samples"] = cal if hessians is not None else 0
    report["text"] = "eval_text" if eval_text else "verifier prompts"
    plan.merge_report = report


def reference(lm, plan: AdapterPlan):
    """The torch model the package's logits must equal: PEFT LoRA on the base for side-car, else `lm.model`."""
    if plan.mode != "sidecar":
        return lm.model
    from edge_recover.errors import EdgeRecoverError

    from peft import PeftModel

    try:
        return PeftModel.from_pretrained(lm.model, str(plan.data.path)).eval()
    except (OSError, ValueError, RuntimeError, KeyError) as exc:
        raise EdgeRecoverError(f"adapter {str(plan.data.path)!r} cannot be loaded by PEFT "
                               f"({str(exc).splitlines()[0][:160]}); is the folder complete?") from None


def write(plan: AdapterPlan, folder: Path) -> dict:
    """Write the adapter files into the package folder; returns the manifest fields."""
    if plan.mode == "merge":
        return {"adapter_mode": "merge", "quant_hash_before_merge": plan.base["quant_hash"], "adapters": [{
            "name": plan.name, "mode": "merge", "rank_layout": plan.data.rank_layout(),
            "source": plan.data.provenance(), "merge": plan.merge_report}]}
    sc = plan.sidecar
    digest = write_adapter_file(plan.data, sc.dtype, folder / ADAPTERS_DIR / f"{plan.name}{ADAPTER_SUFFIX}")
    return {"adapter_mode": "sidecar",
            "lora": {"mode": "sidecar", "dtype": sc.dtype, "base": plan.base, "layers": sc.layers},
            "adapters": [adapter_entry(plan.name, plan.data, sc.dtype, digest, default=True)]}

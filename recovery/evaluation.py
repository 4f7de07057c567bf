"""Evaluation of a recovery: full precision vs quantized vs quantized + adapter, on text never trained on.

One pass per model over the same token windows (`edge_recover.evaluate`): perplexity, mean cross-entropy,
KL(teacher ‖ model) per token and top-1 agreement with the teacher. The recovery share is the part of
the cross-entropy gap between the quantized model and the teacher that the adapter closes:
    recovery % = 100 · (CE_quant − CE_recovered) / (CE_quant − CE_fp)
The quantized figures come from the very PEFT model with its adapter switched off (`disable_adapter`),
so both numbers use the same integers. `load_teacher` and `load_student` load the models the same way for
every evaluation (this one and task accuracy, recovery/task_eval.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from edge_recover.errors import require
from edge_recover.evaluate import evaluate, recovery_share, token_windows
from edge_recover.models import LoadedModel
from edge_recover.options import build_scheme, defaults
from edge_recover.scheme import Scheme
from edge_recover.shared_head import share_quantized_head


@torch.no_grad()
def compare(teacher, student, windows: torch.Tensor, batch_size: int = 4, progress: bool = True) -> dict:
    """Figures for teacher, quantized and (if `student` is a PeftModel) recovered, on `windows` [B, T].

    Example:
        >>> figs = compare(teacher, peft_student, token_windows(tok, text, 512))  # doctest: +SKIP
        >>> figs["recovery_pct"]  # doctest: +SKIP
    """
    from peft import PeftModel

    device = next(student.parameters()).device
    teacher = teacher.to(device).eval()
    student.eval()
    fp = evaluate(teacher, windows, batch_size=batch_size, device=device, progress=progress)
    out = {"tokens": fp.tokens, "ppl_fp": fp.perplexity, "ce_fp": fp.cross_entropy}
    if isinstance(student, PeftModel):
        with student.disable_adapter():
            q = evaluate(student, windows, teacher=teacher, batch_size=batch_size, device=device, progress=progress)
        r = evaluate(student, windows, teacher=teacher, batch_size=batch_size, device=device, progress=progress)
    else:
        q, r = evaluate(student, windows, teacher=teacher, batch_size=batch_size, device=device, progress=progress), None
    out.update({"ppl_quant": q.perplexity, "ce_quant": q.cross_entropy, "kl_quant": q.kl_to_teacher,
                "top1_quant": q.top1_agreement})
    if r is not None:
        out.update({"ppl_recovered": r.perplexity, "ce_recovered": r.cross_entropy, "kl_recovered": r.kl_to_teacher,
                    "top1_recovered": r.top1_agreement,
                    "recovery_pct": recovery_share(fp.cross_entropy, q.cross_entropy, r.cross_entropy)})
    return out


def evaluate_recovery(model: str | Path, scheme, text_file: str | Path | None = None, *, adapter: str | Path | None = None,
                      quantized: str | Path | None = None, method: str | None = None,
                      calibration: int = defaults("eval").calibration, seed: int = 0, seq_len: int = 512, max_windows: int | None = None, device: str = "auto",
                      batch_size: int = 4, progress: bool = True) -> dict:
    """Load the teacher `model`, quantize it under `scheme` (or load `quantized`), add `adapter`, compare.

    Without `quantized`, the integers are made again with `method` (default: the adapter's) and must hash to
    those the adapter was trained on; otherwise the adapter is refused.

    Example:
        >>> evaluate_recovery("smollm2", build_scheme("w4w2gateup"), "hamlet.txt", adapter="out/adapter")  # doctest: +SKIP
    """
    if text_file is None:  # the held-out default: Hamlet + Macbeth, never used in training
        from edge_recover.fetch import eval_text

        text = eval_text()
    else:
        p = Path(text_file)
        require(p.is_file(), f"`--text` {str(p)!r} does not exist; pass a UTF-8 text file")
        text = p.read_text(encoding="utf-8", errors="replace")
    lm, recipe = load_teacher(model, adapter, method, calibration, seed)
    try:
        windows = token_windows(lm.tokenizer, text, seq_len, max_windows)
    except ValueError as exc:
        from edge_recover.errors import EdgeRecoverError

        raise EdgeRecoverError(f"`--text` {str(text_file or 'default')!r}: {exc}; pass a longer text or a smaller "
                               f"`--seq-len`") from None
    student, scheme, _ = load_student(lm, scheme, recipe, quantized=quantized, adapter=adapter, progress=progress)
    use_cuda = torch.cuda.is_available() if device == "auto" else device.startswith("cuda")
    dev = torch.device(device if device not in ("auto",) else ("cuda" if use_cuda else "cpu"))
    student.to(dev)
    figs = compare(lm.model, student, windows, batch_size=batch_size, progress=progress)
    return {"model": lm.source, "scheme": scheme.name, "method": recipe.method,
            "adapter": str(adapter) if adapter else None,
            "text": str(text_file) if text_file else "Hamlet + Macbeth (held out)", "seq_len": seq_len, **figs}


@dataclass(frozen=True)
class QuantRecipe:
    """How a student's integers are made again: quantizer method, calibration samples, seed."""

    method: str
    calibration: int
    seed: int


def load_teacher(model: str | Path, adapter: str | Path | None = None, method: str | None = None,
                 calibration: int = defaults("eval").calibration, seed: int = 0) -> tuple[LoadedModel, QuantRecipe]:
    """The full-precision teacher `model` and the recipe its student is quantized with: `method` (default the
    adapter's, else `eval`'s default: sdk/options.py), and the adapter's own calibration when it records one, so
    the integers can match those it was trained on. A quantized checkpoint as `model` is refused (it goes in
    `--quantized`).

    Example:
        >>> lm, recipe = load_teacher("smollm2", adapter="out/adapter")  # doctest: +SKIP
    """
    from edge_recover.pipeline import resolve_model

    from .student import read_adapter_metadata

    meta = read_adapter_metadata(adapter) if adapter else None
    method = method or (meta["method"] if meta else defaults("eval").method)
    if meta and meta.get("calibration"):  # re-make the integers the way the adapter's run made them
        calibration, seed = meta["calibration"]["samples"], meta["calibration"]["seed"]
    lm = resolve_model(model)
    require(lm.quantized_manifest is None,
            f"{str(model)!r} is a quantized checkpoint; pass the full-precision teacher as MODEL and it as `--quantized`")
    return lm, QuantRecipe(method, int(calibration), int(seed))


def load_student(lm: LoadedModel, scheme, recipe: QuantRecipe, *, quantized: str | Path | None = None,
                 adapter: str | Path | None = None, progress: bool = True):
    """The student of teacher `lm`: the `quantized` checkpoint, or `lm` quantized again under `scheme` (default:
    the adapter's, else w4w2gateup at the cpu layout, as `quantize` makes it) by `recipe`; with `adapter` on it
    (refused unless trained on those very integers).
    Returns (student model, its scheme, a short description of the quantized model).

    Example:
        >>> student, scheme, what = load_student(lm, None, recipe, quantized="out/q", adapter="out/a")  # doctest: +SKIP
    """
    from .student import load_adapter, load_student_checkpoint, quantize_student, read_adapter_metadata

    if quantized is not None:
        base, _, scheme = load_student_checkpoint(quantized, lm, scheme)
        what = f"quantized checkpoint {quantized} ({scheme.name})"
    else:
        if scheme is None:  # the integers the adapter was trained on, or those `quantize` makes by default
            scheme = Scheme.from_json(read_adapter_metadata(adapter)["scheme"]) if adapter else build_scheme(None)
        base, _ = quantize_student(lm, scheme, recipe.method, calibration=recipe.calibration, seed=recipe.seed,
                                   progress=progress)
        share_quantized_head(base)  # a tied quantized head embeds too, as the package and a loaded checkpoint do
        calib = f" on {recipe.calibration} calibration samples" if recipe.method != "rtn" else ""
        what = f"{scheme.name}, {recipe.method}{calib}, quantized now"
    student = load_adapter(base, adapter, lm.source_hash, scheme) if adapter else base
    return student, scheme, what

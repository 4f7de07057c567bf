"""The student: the quantized model (the exact integers of the quantizer core) with PEFT LoRA on target layers.

The base weights never change: each target `QuantLinear` becomes the `base_layer` of a PEFT LoRA layer and
only the low-rank A and B matrices train. An adapter is only meaningful on the integers it was trained
against, so the adapter folder records, next to PEFT's own files, the teacher's source hash, the scheme,
the quantizer method and a hash of the integers (`quant_hash`); `load_adapter` refuses any mismatch.

Targets: `low-bit` (default; the layers at the scheme's lowest bit width: gate/up for w4w2gateup, every
layer for w4), `2bit` (the same, refused when no layer is at 2 bits), `all` (every quantized layer), or a
comma-separated list of regular expressions over layer names.
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
from pathlib import Path

import torch

from edge_recover.apply import quantized_layers
from edge_recover.errors import EdgeRecoverError, require
from edge_recover.models import LoadedModel
from edge_recover.scheme import Scheme

ADAPTER_MARKER = "edge_recover_adapter.json"
ADAPTER_KIND = "edge-recover-adapter"
ADAPTER_FORMAT_VERSION = 1


def quant_hash(model) -> str:
    """sha256 over every quantized layer's name, config, codes, scales and zero points (sorted by name)."""
    h = hashlib.sha256()
    for name, q in sorted(quantized_layers(model).items()):
        h.update(name.encode())
        h.update(q.config.describe().encode())
        for t in (q.codes, q.scales.float(), q.zero_points):
            h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return "sha256:" + h.hexdigest()


def resolve_targets(model, targets: str) -> list[str]:
    """Names of the quantized layers that get LoRA under `targets` (`2bit`, `all` or regexes, comma-separated).

    Example:
        >>> resolve_targets(qmodel, "all")[:1]  # doctest: +SKIP
        ['model.layers.0.self_attn.q_proj']
    """
    layers = quantized_layers(model)
    require(bool(layers), "the model has no quantized layers; quantize it first")
    spec = (targets or "").strip()
    if spec == "all":
        names = list(layers)
    elif spec in ("2bit", "low-bit", "default"):
        low = min(q.config.bits for q in layers.values())
        require(low <= 2 or spec != "2bit",
                "the scheme puts no layer at 2 bits, so `--targets 2bit` selects nothing; pass `--targets all`")
        names = [n for n, q in layers.items() if q.config.bits == low]
    else:
        try:
            pats = [re.compile(p.strip()) for p in spec.split(",") if p.strip()]
        except re.error as exc:
            raise EdgeRecoverError(f"`--targets` {targets!r} is not a valid regular expression ({exc}); "
                                   "use `2bit`, `all` or patterns like 'mlp\\.(gate|up)_proj$'") from None
        names = [n for n in layers if any(p.search(n) for p in pats)]
    require(bool(names), f"`--targets` {targets!r} matches no quantized layer; use `2bit`, `all` or a regex "
                         f"matching names like {next(iter(layers))!r}")
    return names


def quantize_student(lm: LoadedModel, scheme: Scheme, method: str, calibration: int = 16, seed: int = 0,
                     progress: bool = True, device: torch.device | str | None = None):
    """A quantized deep copy of the teacher `lm` (the teacher stays full precision); returns (copy, report).

    `device`: where calibration and the quantizer run (GPTQ on a GPU takes seconds, on a CPU minutes); the copy
    comes back on the CPU. None: the teacher's device, and the copy stays there."""
    from edge_recover.pipeline import quantize_loaded

    require(lm.quantized_manifest is None,
            f"{lm.source!r} is already quantized; pass the full-precision teacher as MODEL and the checkpoint as `--quantized`")
    model = copy.deepcopy(lm.model) if device is None else copy.deepcopy(lm.model).to(device)
    student = LoadedModel(model, lm.tokenizer, lm.source, lm.source_hash)
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False  # full fp32 Hessians and GPTQ updates, whatever training uses
    try:
        report = quantize_loaded(student, scheme, method, calibration=calibration, seed=seed, progress=progress)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    return (student.model if device is None else student.model.cpu()), report


def load_student_checkpoint(path: str | Path, teacher: LoadedModel, scheme: Scheme | None):
    """A quantized checkpoint folder as the student base; it must come from `teacher` (and `scheme`).

    Returns (model, manifest, scheme): `scheme` as given, or the checkpoint's when None.
    """
    from edge_recover.models import load_model

    q = load_model(path, base=teacher)
    require(q.quantized_manifest is not None, f"`--quantized` {str(path)!r} is not an edge-recover quantized checkpoint")
    require(q.source_hash == teacher.source_hash,
            f"`--quantized` {str(path)!r} was made from another model ({q.source_hash}; the teacher is "
            f"{teacher.source_hash}); quantize this MODEL with `edge-recover quantize`")
    if scheme is not None:
        theirs = q.quantized_manifest["scheme"]
        same_name = theirs.get("name") == scheme.name
        require(theirs == scheme.to_json(),
                f"`--quantized` {str(path)!r} uses scheme {theirs.get('name')!r}"
                f"{' with other rules (block sizes)' if same_name else ''}, not {scheme.name!r}; "
                f"leave out `--scheme` to use the checkpoint's")
    from edge_recover.shared_head import share_quantized_head

    share_quantized_head(q.model)  # the student computes what the package does (a tied quantized head embeds)
    return q.model, q.quantized_manifest, scheme or Scheme.from_json(q.quantized_manifest["scheme"])


def add_lora(model, targets: list[str], rank: int, alpha: float, dropout: float = 0.0):
    """Wrap `targets` of `model` in PEFT LoRA (base frozen); returns the PeftModel."""
    from peft import LoraConfig, get_peft_model

    require(isinstance(rank, int) and rank > 0, f"`--rank` must be a positive integer, got {rank!r}; try 32")
    require(alpha > 0, f"`--alpha` must be positive, got {alpha!r}; try twice the rank")
    for p in model.parameters():
        p.requires_grad_(False)
    cfg = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, bias="none", target_modules=targets,
                     task_type="CAUSAL_LM")
    return get_peft_model(model, cfg)


def _lora_pair_and_error(student, teacher, name: str):
    """The LoRA A [r, K] and B [N, r] weights of layer `name`, PEFT's scaling, and W_teacher - W_quantized."""
    layer = student.base_model.model.get_submodule(name)
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    w_t = teacher.get_submodule(name).weight.detach().to(a.device, torch.float32)
    return a, b, layer.scaling["default"], w_t - layer.base_layer.weight.detach().to(a.device, torch.float32)


def _start_at(a: torch.Tensor, b: torch.Tensor, scale: float, u: torch.Tensor, sv: torch.Tensor,
              right: torch.Tensor) -> float:
    """Set s * B @ A to the rank-r truncation of U diag(S) RIGHT, split evenly (sqrt(S) on each side).

    A rank above the available one (min(N, K)) leaves the extra pairs at PEFT's start (B = 0). Returns the
    captured share of sum(S^2)."""
    r = a.shape[0]
    k = min(r, sv.numel())
    root = (sv[:k] / scale).sqrt()
    b[:, :k] = (u[:, :k] * root[None, :]).to(b.dtype)
    a[:k] = (root[:, None] * right[:k]).to(a.dtype)
    return float((sv[:r] ** 2).sum() / (sv ** 2).sum().clamp_min(1e-30))


def init_lora_from_residual(student, teacher, targets: list[str]) -> dict[str, float]:
    """Start each LoRA pair at the best rank-r approximation of what quantization removed.

    With R = W_teacher - W_quantized (N x K) and its SVD U S V^T, set B = U_r sqrt(S_r) / sqrt(s) and
    A = sqrt(S_r) V_r^T / sqrt(s) (s = PEFT's scaling alpha / r), so that s * B @ A = R_r: the student starts
    from the quantized weights plus the top-r part of their error instead of from zero (PEFT's default,
    B = 0). The rest of the error is left to distillation. Returns, per layer, the share of ||R||_F^2 that
    the initial adapter already captures.

    Example:
        >>> shares = init_lora_from_residual(peft_student, teacher_model, targets)  # doctest: +SKIP
    """
    shares = {}
    with torch.no_grad():
        for name in targets:
            a, b, scale, resid = _lora_pair_and_error(student, teacher, name)
            u, sv, vh = torch.linalg.svd(resid, full_matrices=False)
            shares[name] = _start_at(a, b, scale, u, sv, vh)
    return shares


def init_lora_from_activations(student, teacher, targets: list[str], hessians: dict[str, torch.Tensor],
                               damp: float = 0.01) -> dict[str, float]:
    """Start each LoRA pair at the best rank-r approximation of the quantization error *as the layer sees it*.

    The error that matters is R x for the inputs x the layer gets, not R itself: with H = E[x x^T] = Q L Q^T
    (the teacher's input second moment, damped by `damp` x its mean eigenvalue), the rank-r matrix D minimising
    E||(R - D) x||^2 is D = [R Q L^1/2]_r L^-1/2 Q^T, where [.]_r is the truncated SVD U_r S_r V_r^T. So
    B = U_r sqrt(S_r) / sqrt(s) and A = sqrt(S_r) V_r^T L^-1/2 Q^T / sqrt(s) (s = PEFT's scaling). Inputs live
    in few directions, so a small rank covers much more of this error than of ||R||_F. Returns, per layer,
    the captured share of E||R x||^2.

    Example:
        >>> hs = input_hessians(teacher_model, train_ids[:64])  # doctest: +SKIP
        >>> shares = init_lora_from_activations(peft_student, teacher_model, targets, hs)  # doctest: +SKIP
    """
    shares = {}
    last = None  # (H, root L, Q) of the previous layer: q/k/v and gate/up share one input, and come in a row
    with torch.no_grad():
        for name in targets:
            require(name in hessians, f"no input statistics for {name!r}; pass the teacher's `input_hessians`")
            a, b, scale, resid = _lora_pair_and_error(student, teacher, name)
            h = hessians[name]
            if last is None or last[0].shape != h.shape or not torch.equal(last[0], h):
                lam, q = torch.linalg.eigh(h.to(a.device, torch.float64))
                lam = lam.clamp_min(0) + damp * lam.clamp_min(0).mean().clamp_min(1e-12)
                last = (h, lam.sqrt(), q)
            _, root_l, q = last
            u, sv, vh = torch.linalg.svd(resid.double() @ (q * root_l[None, :]), full_matrices=False)
            shares[name] = _start_at(a, b, scale, u, sv, (vh[: a.shape[0]] / root_l[None, :]) @ q.T)
    return shares


def adapter_metadata(teacher_hash: str, scheme: Scheme, method: str, qhash: str, targets: list[str], rank: int,
                     alpha: float, calibration: dict | None = None) -> dict:
    """What `edge_recover_adapter.json` records; `calibration` ({samples, seed}) says how to re-make the integers."""
    return {"kind": ADAPTER_KIND, "format_version": ADAPTER_FORMAT_VERSION, "base_source_hash": teacher_hash,
            "scheme": scheme.to_json(), "method": method, "quant_hash": qhash, "calibration": calibration,
            "targets": targets, "rank": rank, "alpha": alpha}


def read_adapter_metadata(path: str | Path) -> dict:
    p = Path(path)
    require(p.is_dir(), f"adapter {str(p)!r} does not exist; pass the `-o` folder of `edge-recover recover`")
    try:
        meta = json.loads((p / ADAPTER_MARKER).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise EdgeRecoverError(f"adapter {str(p)!r} has no readable {ADAPTER_MARKER} ({type(exc).__name__}); "
                               "it was not written by `edge-recover recover`") from None
    require(meta.get("kind") == ADAPTER_KIND, f"{str(p / ADAPTER_MARKER)!r} is not an edge-recover adapter record")
    require(meta.get("format_version", 0) <= ADAPTER_FORMAT_VERSION,
            f"adapter {str(p)!r} was written by a newer edge-recover; upgrade edge-recover")
    return meta


def check_adapter(meta: dict, teacher_hash: str, scheme: Scheme | dict, qhash: str, where: str = "adapter") -> None:
    """Refuse an adapter trained on another base model, scheme or set of integers."""
    scheme_json = scheme.to_json() if isinstance(scheme, Scheme) else scheme
    require(meta["base_source_hash"] == teacher_hash,
            f"{where} was trained on another base model ({meta['base_source_hash']}; this one is {teacher_hash}); "
            "use the adapter made for this model or run `edge-recover recover` on it")
    require(meta["scheme"] == scheme_json,
            f"{where} was trained for scheme {meta['scheme'].get('name')!r}, not {scheme_json.get('name')!r}; "
            f"pass `--scheme {meta['scheme'].get('name')}` or recover for this scheme")
    require(meta["quant_hash"] == qhash,
            f"{where} was trained on other quantized integers (method {meta.get('method')!r}); pass the quantized "
            "checkpoint it was trained on with `--quantized` or the same `--method`")


def load_adapter(model, path: str | Path, teacher_hash: str, scheme: Scheme | dict, is_trainable: bool = False):
    """`peft.PeftModel.from_pretrained(model, path)` after checking that the adapter belongs to `model`.

    Example:
        >>> recovered = load_adapter(qmodel, "out/adapter", lm.source_hash, named_scheme("w4w2gateup"))  # doctest: +SKIP
    """
    from peft import PeftModel

    meta = read_adapter_metadata(path)
    check_adapter(meta, teacher_hash, scheme, quant_hash(model), where=f"adapter {str(path)!r}")
    try:
        return PeftModel.from_pretrained(model, str(path), is_trainable=is_trainable)
    except (OSError, ValueError, RuntimeError, KeyError) as exc:
        raise EdgeRecoverError(f"adapter {str(path)!r} cannot be loaded ({str(exc).splitlines()[0][:160]}); "
                               "is the folder complete?") from None


def lora_state(model) -> dict[str, torch.Tensor]:
    """The trainable LoRA tensors, by parameter name (what a checkpoint saves)."""
    return {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}

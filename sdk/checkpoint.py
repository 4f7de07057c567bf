"""Quantized checkpoints: a folder that `load_model` reads back to the very same integers.

    config.json, generation_config.json, tokenizer files   as Hugging Face writes them
    model.safetensors                                       kept tensors as they are; for each quantized
                                                            layer NAME: NAME.qweight (MatMulNBits B, packed),
                                                            NAME.scales (f32), NAME.qzeros (packed)
    edge_recover_quantized.json                             scheme, method, per-layer configs, source hash,
                                                            versions, quantization report

A *slim* checkpoint (`slim=True`, `edge-recover quantize --slim`) leaves the kept tensors (embeddings,
norms, anything not quantized) out: it holds only the integers and is loaded together with its source
model (`base=`), whose weights must hash to the recorded source hash. For SmolLM2 that is 54 MB instead
of about 170 MB: small enough to ship integers between machines (GPTQ is not bit-reproducible across torch
builds, so the integers a recovery trained against travel with it instead of being made again).

The integers are stored packed in the exporter's layout, so the checkpoint is also what `export` packs.
Loading uses safetensors only (no pickle).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .apply import QuantReport, _set_module, quantized_layers
from .atomic import atomic_dir
from .errors import EdgeRecoverError, require
from .fetch import model_path
from .packing import pack_codes, pack_zero_points, unpack_codes, unpack_zero_points
from .qlinear import QuantLinear
from .quantizer import QuantizedWeight
from .scheme import QuantConfig
from .source import QUANTIZED_MARKER, LoadedModel, check_architecture, load_source
from .versions import library_versions, tool_version

CHECKPOINT_FORMAT_VERSION = 1


def _packed_tensors(name: str, qw: QuantizedWeight) -> dict[str, torch.Tensor]:
    cfg = qw.config
    return {
        f"{name}.qweight": torch.from_numpy(pack_codes(qw.codes.cpu().numpy(), cfg.bits, cfg.block_size)),
        f"{name}.scales": qw.scales.detach().float().cpu().contiguous(),
        f"{name}.qzeros": torch.from_numpy(pack_zero_points(qw.zero_points.cpu().numpy(), cfg.bits)),
    }


def save_quantized(lm: LoadedModel, path: str | Path, report: QuantReport, overwrite: bool = False,
                   slim: bool = False, slim_include: tuple[str, ...] = (), extra_files: dict[str, str] | None = None,
                   manifest_extra: dict | None = None) -> Path:
    """Write `lm` (already quantized in place) as a checkpoint folder, all-or-nothing (`slim`: integers only).

    `slim_include`: kept tensors a slim checkpoint stores anyway (e.g. norm weights that recovery trained;
    the loader takes only the others from the source). `extra_files` {name: text} are written beside, in
    the same all-or-nothing step; `manifest_extra` adds keys to the manifest (e.g. how it was recovered)."""
    from safetensors.torch import save_file

    model = lm.model
    qlayers = quantized_layers(model)
    require(bool(qlayers), "the model has no quantized layers; call quantize_model first")
    skip = set()
    tensors: dict[str, torch.Tensor] = {}
    layers_meta = {}
    for name, q in qlayers.items():
        tensors.update(_packed_tensors(name, q.quantized()))
        layers_meta[name] = {**q.config.to_json(), "shape": [q.out_features, q.in_features]}
        skip.update({f"{name}.weight", f"{name}.codes", f"{name}.scales", f"{name}.zero_points"})
    seen_ptrs = set()
    for key, t in model.state_dict().items():  # slim: the kept tensors stay with the source
        if key in skip or (slim and key not in slim_include):
            continue
        ptr = t.data_ptr()
        if ptr in seen_ptrs:  # tied weights (lm_head = embed_tokens) are stored once
            continue
        seen_ptrs.add(ptr)
        tensors[key] = t.detach().cpu().contiguous()
    manifest = {
        "format_version": CHECKPOINT_FORMAT_VERSION,
        "tool": "edge-recover", "tool_version": tool_version(),
        "scheme": report.scheme, "method": report.method,
        "layers": layers_meta,
        "source": lm.source, "source_hash": lm.source_hash,
        "kept_weights": "from_source" if slim else "included",
        "versions": library_versions(),
        "report": report.to_json(),
        **(manifest_extra or {}),
    }
    with atomic_dir(path, overwrite) as tmp:
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "edge-recover-quantized"})
        model.config.save_pretrained(tmp)
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(tmp)
        lm.tokenizer.save_pretrained(tmp)
        (tmp / QUANTIZED_MARKER).write_text(json.dumps(manifest, indent=2))
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
    return Path(path)


def read_manifest(path: Path) -> dict:
    try:
        manifest = json.loads((path / QUANTIZED_MARKER).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise EdgeRecoverError(f"{str(path)!r}: unreadable {QUANTIZED_MARKER} ({exc}); re-run `edge-recover quantize`") from None
    require(manifest.get("format_version", 0) <= CHECKPOINT_FORMAT_VERSION,
            f"{str(path)!r} was written by a newer edge-recover (format {manifest.get('format_version')}); upgrade edge-recover")
    return manifest


def load_quantized(path: str | Path, dtype=None, base: "LoadedModel | str | Path | None" = None) -> LoadedModel:
    """Load a checkpoint written by `save_quantized`; the QuantLinear integers are bit-identical.

    A slim checkpoint takes its kept tensors from `base` (a loaded model or a path; default: the recorded
    source path), which must be the very model it was quantized from.

    Example:
        >>> lm = load_quantized("out/smollm2-w4w2", base="smollm2")  # doctest: +SKIP
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    p = Path(path)
    manifest = read_manifest(p)
    require((p / "config.json").is_file(),
            f"quantized checkpoint {str(p)!r} has no config.json (a checkpoint folder holds its source's config and "
            "tokenizer files); copy them from the source model's folder, or re-run `edge-recover quantize`")
    config = AutoConfig.from_pretrained(p)
    check_architecture(config)
    try:
        tensors = load_file(str(p / "model.safetensors"))
    except (SafetensorError, OSError) as exc:
        raise EdgeRecoverError(f"{str(p / 'model.safetensors')!r} is corrupt or missing ({exc}); re-run `edge-recover quantize`") from None
    if manifest.get("kept_weights") == "from_source":
        for key, t in _kept_from_base(p, manifest, base).items():  # tensors the slim file holds win
            tensors.setdefault(key, t)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype or torch.float32)
    head = next((n for n, m in model.named_modules() if m is model.get_output_embeddings()), None)
    for name, meta in manifest["layers"].items():
        cfg = QuantConfig.from_json({k: meta[k] for k in ("bits", "block_size", "symmetric")})
        n, k = meta["shape"]
        try:
            packed, scales, zps = (tensors.pop(f"{name}.{s}") for s in ("qweight", "scales", "qzeros"))
        except KeyError:
            raise EdgeRecoverError(f"{str(p)!r}: layer {name!r} is missing from model.safetensors; the checkpoint is incomplete") from None
        nb = scales.shape[1]
        codes = torch.from_numpy(unpack_codes(packed.numpy(), cfg.bits, k).copy())
        zp = torch.from_numpy(unpack_zero_points(zps.numpy(), cfg.bits, nb).copy())
        old = model.get_submodule(name)
        bias = tensors.pop(f"{name}.bias", None)
        q = QuantLinear.from_quantized(QuantizedWeight(codes, scales.float(), zp, cfg), bias, dtype=old.weight.dtype)
        _set_module(model, name, q)
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    qnames = set(manifest["layers"])
    missing = [m for m in missing if m.rsplit(".", 1)[0] not in qnames and not (config.tie_word_embeddings and m == "lm_head.weight")]
    require(not unexpected and not missing,
            f"{str(p)!r}: checkpoint does not match its config (missing {missing[:3]}, unexpected {unexpected[:3]})")
    if config.tie_word_embeddings and head not in qnames:
        # a quantized head keeps its own integers; tying would put the float embedding back in its weight
        model.tie_weights()
    model.eval()
    tok = AutoTokenizer.from_pretrained(p)
    return LoadedModel(model, tok, manifest["source"], manifest["source_hash"], quantized_manifest=manifest)


def _kept_from_base(path: Path, manifest: dict, base) -> dict[str, torch.Tensor]:
    """The kept (unquantized) tensors of a slim checkpoint, taken from its source model."""
    if base is None:
        require(Path(manifest["source"]).exists(),
                f"{str(path)!r} is a slim checkpoint and its source {manifest['source']!r} is not here; "
                f"pass the source model (`--base MODEL`)")
        base = manifest["source"]
    if not isinstance(base, LoadedModel):
        base = load_source(model_path(base))  # a spec: `smollm2`, a HF folder or a .gguf file
    require(base.source_hash == manifest["source_hash"],
            f"{str(path)!r} was quantized from another model ({manifest['source_hash'][:19]}; `base` is "
            f"{base.source_hash[:19]}); pass the model it was made from")
    qnames = set(manifest["layers"])
    out, seen = {}, set()
    for k, t in base.model.state_dict().items():
        if k.rsplit(".", 1)[0] in qnames or t.data_ptr() in seen:  # a tied head is its embedding, stored once:
            continue  # a trained embedding in the slim file must not be overwritten by the source's head
        seen.add(t.data_ptr())
        out[k] = t.detach().to("cpu", torch.float32).contiguous()
    return out


def unpacked_equal(a: QuantizedWeight, b: QuantizedWeight) -> bool:
    """True when two quantized weights hold the same integers and scales."""
    return bool(torch.equal(a.codes.cpu(), b.codes.cpu()) and torch.equal(a.zero_points.cpu(), b.zero_points.cpu())
                and torch.equal(a.scales.cpu().float(), b.scales.cpu().float()) and a.config == b.config)



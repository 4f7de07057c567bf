"""Rotate a decoder's residual stream (QuaRot's R1, no online transforms): the same function, easier to quantize.

A pre-norm decoder (Llama, Qwen2, Qwen3, ...) only ever reads its residual stream through an RMSNorm and the
linear layers after it, and only writes it through `o_proj` and `down_proj`. With the norms' weights folded
into the layers that read them, an orthogonal R [K, K] can turn the whole stream into h R:

    embed_tokens      E            ->  E R                  (each token's row rotated)
    q/k/v, gate/up    W  [N, K]    ->  W diag(g) R          (g: the norm before them, then set to 1)
    o_proj, down_proj W  [K, N]    ->  R^T W                (bias b -> b R)
    lm_head           W  [V, K]    ->  W diag(g_final) R    (untied from the embedding: the two now differ)

RMSNorm(h R) = RMSNorm(h) R because R keeps every vector's length, so the rotated model computes the same
logits (to float rounding: SmolLM2's Hamlet perplexity 42.5583 -> 42.5583). What changes is what the
quantizer sees: a random rotation spreads each input channel's outliers over all K channels, so a block of
weights along K has a flatter range. Measured on SmolLM2-135M (GPTQ, the cpu layout 4:64 / 2:128, 8-bit head,
16 calibration samples, 8 x 512 Hamlet windows, torch): W4/W2-GateUp 256.0 -> 143.9, W4 52.4 -> 49.1.

The cost: a tied model comes out untied (its head carries g_final, its embedding does not), so a package
whose head is quantized can no longer embed from the head's integers (exporters/embedding.py) and stores its
embedding table in float. R is a seeded random orthogonal matrix (QR of a Gaussian, signs fixed), recorded
in the rotated folder's `edge_recover_rotation.json` with the source hash.

Which modules are the embedding, the norms, the readers and the writers comes from the family's layout
(sdk/layouts.py), so a fused family rotates the same way: Phi-3's qkv_proj and gate_up_proj are readers.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .apply import quantized_layers
from .errors import EdgeRecoverError, require

ROTATION_FILE = "edge_recover_rotation.json"


@dataclass(frozen=True)
class RotationInfo:
    """What `rotate_residual` did: the seed of R, its size, and whether it untied the head."""

    seed: int
    hidden_size: int
    untied_head: bool

    def to_json(self) -> dict:
        return {"seed": self.seed, "hidden_size": self.hidden_size, "untied_head": self.untied_head,
                "kind": "residual-orthogonal", "norms_folded": True}


def random_orthogonal(k: int, seed: int = 0) -> torch.Tensor:
    """A seeded random orthogonal [k, k] matrix (float32; Haar-distributed: QR of a Gaussian, signs fixed).

    Example:
        >>> r = random_orthogonal(8, seed=1)
        >>> bool(torch.allclose(r @ r.T, torch.eye(8), atol=1e-5))
        True
    """
    g = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(k, k, generator=g, dtype=torch.float64))
    return (q * torch.sign(torch.diagonal(r))).float()


@dataclass
class _Decoder:
    """The modules rotation touches, found through the model family's layout (sdk/layouts.py): the embedding,
    the final norm, and per layer its two norms, the linears that read each norm's output (q/k/v or a fused qkv;
    gate/up or a fused gate_up) and the two that write the residual stream (o, down)."""

    embedding: nn.Module
    final_norm: nn.Module
    layers: list  # (input norm, attention readers, o, post-attention norm, MLP readers, down)


def _decoder(model: nn.Module) -> _Decoder:
    """The model's decoder by its family's layout, or one error line saying why it cannot be rotated."""
    from .layouts import layout_for

    arch = type(model).__name__
    try:
        layout = layout_for(model.config)
    except EdgeRecoverError as exc:
        raise EdgeRecoverError(f"`rotate` needs a pre-norm decoder of a registered family: {exc}") from None
    require(layout.norm == "rms", f"`rotate` needs an RMSNorm that scales by its weight; {arch}'s layout says "
                                  f"{layout.norm!r}; quantize this model without rotating it")
    at, mlp = layout.attention, layout.mlp
    try:
        layers = []
        for layer in model.get_submodule(layout.layers):
            attn, ffn = layer.get_submodule(at.module), layer.get_submodule(mlp.module)
            layers.append((layer.get_submodule(layout.input_norm),
                           [attn.get_submodule(n) for n in at.projections() if n != at.o], attn.get_submodule(at.o),
                           layer.get_submodule(layout.post_attention_norm),
                           [ffn.get_submodule(n) for n in mlp.projections() if n != mlp.down], ffn.get_submodule(mlp.down)))
        dec = _Decoder(model.get_submodule(layout.embedding), model.get_submodule(layout.final_norm), layers)
    except AttributeError as exc:
        raise EdgeRecoverError(f"`rotate`: {arch} does not have the modules its {layout.model_type!r} layout names "
                               f"({exc}); quantize this model without rotating it") from None
    for norm in (dec.final_norm, layers[0][0]):
        name = type(norm).__name__
        # Gemma's RMSNorm scales by (1 + weight): folding `weight` alone would change the model
        if "RMSNorm" not in name or "Gemma" in name or getattr(norm, "bias", None) is not None:
            raise EdgeRecoverError(f"`rotate` needs an RMSNorm that scales by its weight, without bias; {arch} uses "
                                   f"{name}; quantize this model without rotating it")
    return dec


def _fold(norm: nn.Module, linears: list[nn.Linear]) -> None:
    g = norm.weight.detach().double()
    for lin in linears:
        lin.weight.data = (lin.weight.detach().double() * g[None, :]).to(lin.weight.dtype)
    norm.weight.data.fill_(1.0)


def _rotate_in(lin: nn.Linear, r: torch.Tensor) -> None:
    lin.weight.data = (lin.weight.detach().double() @ r).to(lin.weight.dtype)


def _rotate_out(lin: nn.Linear, r: torch.Tensor) -> None:
    lin.weight.data = (r.T @ lin.weight.detach().double()).to(lin.weight.dtype)
    if lin.bias is not None:
        lin.bias.data = (lin.bias.detach().double() @ r).to(lin.bias.dtype)


@torch.no_grad()
def rotate_residual(model: nn.Module, seed: int = 0) -> RotationInfo:
    """Rotate `model`'s residual stream in place (norm weights folded, head untied); the logits stay the same.

    Example:
        >>> info = rotate_residual(lm.model, seed=0)  # doctest: +SKIP
    """
    dec = _decoder(model)
    head = model.get_output_embeddings()
    require(type(head) is nn.Linear and not quantized_layers(model),
            "rotation works on a full-precision model; rotate first, then quantize")
    r = random_orthogonal(dec.embedding.weight.shape[1], seed).double()
    was_tied = head.weight is dec.embedding.weight
    if was_tied:
        head.weight = nn.Parameter(head.weight.detach().clone())
    model.config.tie_word_embeddings = False
    for input_norm, readers, o, post_norm, mlp_readers, down in dec.layers:
        _fold(input_norm, readers)
        _fold(post_norm, mlp_readers)
        for lin in readers + mlp_readers:
            _rotate_in(lin, r)
        _rotate_out(o, r)
        _rotate_out(down, r)
    _fold(dec.final_norm, [head])
    _rotate_in(head, r)
    emb = dec.embedding.weight
    emb.data = (emb.detach().double() @ r).to(emb.dtype)
    return RotationInfo(seed, r.shape[0], was_tied)


def rotate_to_folder(model: str | Path, output: str | Path, seed: int = 0, overwrite: bool = False) -> RotationInfo:
    """Load `model` (a spec as `quantize` takes), rotate it and write a Hugging Face folder (safetensors).

    The folder is an ordinary full-precision model: `quantize`, `recover` and `export` take it as they take
    the original, and it records the rotation in `edge_recover_rotation.json`.

    Example:
        >>> rotate_to_folder("smollm2", "out/smollm2-rot")  # doctest: +SKIP
    """
    from .atomic import atomic_dir, check_new_dir
    from .pipeline import resolve_model

    check_new_dir(output, overwrite)
    lm = resolve_model(model)
    require(lm.quantized_manifest is None,
            f"{lm.source!r} is a quantized checkpoint; rotate the full-precision model, then quantize")
    info = rotate_residual(lm.model, seed)
    with atomic_dir(output, overwrite=overwrite) as tmp:
        lm.model.save_pretrained(tmp, safe_serialization=True)
        lm.tokenizer.save_pretrained(tmp)
        record = {**info.to_json(), "source": str(lm.source), "source_hash": lm.source_hash}
        (tmp / ROTATION_FILE).write_text(json.dumps(record, indent=2) + "\n")
    return info

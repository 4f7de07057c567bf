"""Model families as data: one `Layout` per Hugging Face `model_type`, in one table.

A layout names the roles of a decoder-only model's modules, not their paths in any one file: where the layers
are, which projections make attention and the MLP, what kind of norm scales the residual stream, which
per-head norms and biases the attention has, how the embedding and the head are named and tied, the
`type` that onnxruntime-genai reads from genai_config.json, and whether the cpu target's fused attention
(exporters/fusions.py) applies. Every stage that asks "is this model supported?" asks `layout_for(config)`:

    HF config.json ──► layout_for(config) ──► Layout ──┬─► sdk/models.check_architecture (load, checkpoint, export)
                                                       ├─► exporters/fusions (fused_attention; q/k/v/o or qkv, o)
                                                       ├─► exporters/genai.genai_config  (genai_type)
                                                       └─► sdk/scheme's named schemes   (role_pattern: gate/up)

A new family needs one `register(Layout(...))` entry below and a tiny-model fixture
(tests/fixtures/tiny_models.py) whose modules tests/sdk/test_layouts.py checks against the layout: Phi-3's entry
(fused qkv and gate_up) is the worked example (docs/design.md, "Model families"). The module paths are read by
the named schemes (`Scheme.for_layout`), rotation, block-wise reconstruction and the exporters (the fused
attention and norms, the embedding's integers, the low-memory placeholders): this table is the one place that
names them.

Trade-off: a layout is a flat record of names, not a builder. A family whose math differs (Gemma's RMSNorm
scales by 1 + weight) cannot be described by renaming alone, so it is refused with the reason until the
exporters map that math (`norm="rms_one_plus"` is the field such a family will set).

Example:
    >>> layout_for(AutoConfig.from_pretrained("Qwen/Qwen2.5-0.5B")).attention.biases  # doctest: +SKIP
    ('q', 'k', 'v')
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Iterable, Literal

from .errors import EdgeRecoverError, require

NormKind = Literal["rms", "rms_one_plus"]


@dataclass(frozen=True)
class Attention:
    """Attention's module names inside one decoder layer (`{layers}.{i}.{module}.{q}` etc.).

    `qkv` names one fused projection instead of q/k/v (rows q | k | v, split by `Layout.qkv_split`; Phi-3's
    qkv_proj, which GroupQueryAttention reads packed). `biases` lists the projections (roles q/k/v/o) that always carry a bias; a config flag
    such as Llama's `attention_bias` may add more. `q_norm` / `k_norm` name per-head RMS norms (Qwen3).
    """

    module: str = "self_attn"
    q: str = "q_proj"
    k: str = "k_proj"
    v: str = "v_proj"
    o: str = "o_proj"
    qkv: str | None = None
    biases: tuple[str, ...] = ()
    q_norm: str | None = None
    k_norm: str | None = None

    def projections(self) -> tuple[str, ...]:
        """The attention's linear layers (local names), in q, k, v, o order or qkv, o when fused."""
        return (self.qkv, self.o) if self.qkv else (self.q, self.k, self.v, self.o)


@dataclass(frozen=True)
class Mlp:
    """The MLP's module names inside one decoder layer; `gate_up` names a fused gate | up projection."""

    module: str = "mlp"
    gate: str = "gate_proj"
    up: str = "up_proj"
    down: str = "down_proj"
    gate_up: str | None = None

    def projections(self) -> tuple[str, ...]:
        """The MLP's linear layers (local names): gate, up, down, or gate_up, down when fused."""
        return (self.gate_up, self.down) if self.gate_up else (self.gate, self.up, self.down)


@dataclass(frozen=True)
class Layout:
    """One architecture's decoder, by role.

    Example:
        >>> LAYOUTS["llama"].linear_names(0)[0]
        'model.layers.0.self_attn.q_proj'
    """

    model_type: str
    genai_type: str  # genai_config.json "model.type" (onnxruntime-genai)
    layers: str = "model.layers"
    attention: Attention = field(default_factory=Attention)
    mlp: Mlp = field(default_factory=Mlp)
    norm: NormKind = "rms"
    input_norm: str = "input_layernorm"
    post_attention_norm: str = "post_attention_layernorm"
    final_norm: str = "model.norm"
    rotary: str = "model.rotary_emb"  # the module whose cos/sin tables the fused attention reads
    embedding: str = "model.embed_tokens"
    head: str = "lm_head"
    tie_key: str = "tie_word_embeddings"  # the config flag that ties the head to the embedding
    fused_attention: bool = True  # exporters/fusions.py maps its attention to GroupQueryAttention

    def layer(self, index: int) -> str:
        """The path of decoder layer `index`, e.g. 'model.layers.3'."""
        return f"{self.layers}.{index}"

    def linear_names(self, index: int) -> tuple[str, ...]:
        """The full names of layer `index`'s linear layers: attention's, then the MLP's."""
        at, mlp, base = self.attention, self.mlp, self.layer(index)
        return (tuple(f"{base}.{at.module}.{p}" for p in at.projections())
                + tuple(f"{base}.{mlp.module}.{p}" for p in mlp.projections()))

    def qkv_split(self, config) -> tuple[int, int, int]:
        """Row counts of a fused qkv projection's q | k | v parts: heads, kv heads and kv heads times head_dim."""
        heads = int(config.num_attention_heads)
        dim = int(getattr(config, "head_dim", None) or config.hidden_size // heads)
        kv = int(getattr(config, "num_key_value_heads", None) or heads)
        return heads * dim, kv * dim, kv * dim

    def tied(self, config) -> bool:
        """Whether `config` ties the head to the embedding (the HF default is tied)."""
        return bool(getattr(config, self.tie_key, True))


LAYOUTS: dict[str, Layout] = {}

# Families refused with a reason of their own: their math differs from what the exporters map.
_GEMMA = ("gemma", "gemma2", "gemma3", "gemma3_text")
_REFUSED = {t: "Gemma's RMSNorm scales by 1 + weight, which the exporters do not map yet" for t in _GEMMA}


def register(layout: Layout) -> Layout:
    """Add `layout` to the table under its `model_type` (replacing one there); returns it.

    Example:
        >>> register(Layout("mylm", genai_type="llama"))  # doctest: +SKIP
    """
    LAYOUTS[layout.model_type] = layout
    return layout


def unregister(model_type: str) -> None:
    """Remove `model_type` from the table (tests, plugins); a type not there is ignored."""
    LAYOUTS.pop(model_type, None)


def supported() -> tuple[str, ...]:
    """The registered model types, sorted: what edge-recover loads, quantizes and exports."""
    return tuple(sorted(LAYOUTS))


def layout_for(config) -> Layout:
    """The layout of a Hugging Face `config`'s `model_type`, or one `EdgeRecoverError` line saying why not.

    Example:
        >>> layout_for(model.config).genai_type  # doctest: +SKIP
        'mistral'
    """
    model_type = getattr(config, "model_type", None)
    if model_type in LAYOUTS:
        return LAYOUTS[model_type]
    archs = ", ".join(getattr(config, "architectures", None) or ["?"])
    families = ", ".join(supported())
    if model_type in _REFUSED:
        raise EdgeRecoverError(f"unsupported architecture {model_type!r} ({archs}): {_REFUSED[model_type]}; "
                               f"edge-recover supports {families}; pass a model of one of those")
    raise EdgeRecoverError(f"unsupported architecture {model_type!r} ({archs}); edge-recover supports {families}; "
                           "pass a model of one of those families, or register a layout for it "
                           "(sdk/layouts.py, docs/design.md 'Model families')")


def role_pattern(*roles: str, layouts: "Iterable[Layout] | None" = None) -> str:
    """A regex (for a scheme rule) matching the MLP projections `roles` ('gate', 'up', 'down') of `layouts`
    (default: every registered family), e.g. `mlp\\.(gate_proj|up_proj)$`: the names come from the table, not from
    the scheme. A fused gate | up projection (Phi-3's `gate_up_proj`) is one layer with one bit width: it
    matches when both 'gate' and 'up' are asked for, never for one of them alone.

    Example:
        >>> role_pattern("gate", "up", layouts=[LAYOUTS["llama"]])
        'mlp\\\\.(gate_proj|up_proj)$'
        >>> role_pattern("gate", "up", layouts=[LAYOUTS["phi3"]])
        'mlp\\\\.(gate_up_proj)$'
    """
    require(roles and set(roles) <= {"gate", "up", "down", "gate_up"},
            f"`roles` must name MLP projections (gate, up, down, gate_up), got {roles!r}")
    layouts = list(LAYOUTS.values() if layouts is None else layouts)
    modules: list[str] = []
    names: list[str] = []
    for layout in layouts:
        new = role_names(layout, roles)
        if new and layout.mlp.module not in modules:
            modules.append(layout.mlp.module)
        names += [n for n in new if n not in names]
    require(names, f"no layer of {', '.join(lay.model_type for lay in layouts)} has the MLP roles {roles!r}")
    module = re.escape(modules[0]) if len(modules) == 1 else "(" + "|".join(map(re.escape, modules)) + ")"
    return f"{module}\\.({'|'.join(map(re.escape, names))})$"


def role_names(layout: Layout, roles: tuple[str, ...]) -> tuple[str, ...]:
    """The local names of `layout`'s MLP layers that hold exactly the roles `roles` (gate / up / down / gate_up):
    a fused gate_up for ('gate', 'up') or 'gate_up', nothing of it for 'gate' or 'up' alone.

    Example:
        >>> role_names(LAYOUTS["phi3"], ("gate", "up", "down"))
        ('gate_up_proj', 'down_proj')
    """
    mlp = layout.mlp
    fused = (mlp.gate_up,) if mlp.gate_up and ({"gate", "up"} <= set(roles) or "gate_up" in roles) else ()
    split = tuple(getattr(mlp, r) for r in roles if r != "gate_up" and not (mlp.gate_up and r in ("gate", "up")))
    return fused + split


# The families and what the code does with them today. Qwen2's q/k/v carry biases (o does not); Qwen3 adds
# per-head RMS norms on q and k; Llama and Mistral are the plain layout. All four tie by `tie_word_embeddings`.
register(Layout("llama", genai_type="llama"))
register(Layout("mistral", genai_type="mistral"))
register(Layout("qwen2", genai_type="qwen2", attention=Attention(biases=("q", "k", "v"))))
register(Layout("qwen3", genai_type="qwen3", attention=Attention(q_norm="q_norm", k_norm="k_norm")))
# Phi-3 (Phi3ForCausalLM; Phi-3.5-mini and Phi-4-mini too): q | k | v rows in one qkv_proj, gate | up rows in one
# gate_up_proj; no biases; the head untied in Phi-3, tied in Phi-4-mini, by the same `tie_word_embeddings`.
register(Layout("phi3", genai_type="phi3", attention=Attention(qkv="qkv_proj"), mlp=Mlp(gate_up="gate_up_proj")))

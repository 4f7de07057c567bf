"""Quantization schemes as data.

A `Scheme` maps a layer name to a `QuantConfig` (bits, block size, symmetric) or to `KEEP` (left in full
precision). Rules are looked up in the order torchao uses for its module-fqn maps: an exact name first,
then the first regex that matches (`re.search`), then the default. Schemes are frozen, versioned and
round-trip through JSON, so a package can say exactly how it was made.

Block sizes a target may choose: a named scheme's blocks (32) and those of a `--rule` given without BLOCK
are stand-ins (`QuantConfig.block_stand_in`), which `Scheme.with_target_block_size` sets to a target's
fast layout (the exporter: the target's preferred block). Every other block someone chose (a JSON file's, a
`--rule X=4:32`, `with_block_size`, a hand-built `QuantConfig`) stays. The mark is in neither the JSON nor
`==`, so a scheme reads, writes and compares as before.

    >>> s = named_scheme("w4w2gateup")
    >>> s.resolve("model.layers.0.mlp.gate_proj").bits
    2
    >>> s.resolve("model.layers.0.self_attn.q_proj").bits
    4
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterable, Mapping, Union

from .errors import EdgeRecoverError, require
from .layouts import LAYOUTS, Layout, role_names, role_pattern

SCHEME_FORMAT_VERSION = 1
VALID_BITS = (2, 4, 8)
KEEP = "keep"
# Layers that are never quantized unless a rule names them: the embedding is a Gather, not a MatMul, and
# the lm_head carries most of the output quality of a small model.
DEFAULT_KEPT = ("lm_head",)


def _check_block_size(block_size: int) -> None:
    require(
        isinstance(block_size, int) and block_size >= 16 and block_size & (block_size - 1) == 0,
        f"`block_size` must be a power of two >= 16 (MatMulNBits), got {block_size!r}; try 32, 64 or 128",
    )


@dataclass(frozen=True)
class QuantConfig:
    """How one linear layer is quantized: `bits` in {2,4,8}, `block_size` along K, zero point or not.

    Example:
        >>> QuantConfig(bits=2, block_size=64).levels
        4
    """

    bits: int = 4
    block_size: int = 32
    symmetric: bool = False
    # True: `block_size` is a stand-in (a named scheme's, a `--rule` without BLOCK) that a target's preferred
    # block replaces (`Scheme.with_target_block_size`); not in the JSON, the repr or `==`
    block_stand_in: bool = field(default=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        require(self.bits in VALID_BITS, f"`bits` must be one of {VALID_BITS}, got {self.bits!r}")
        _check_block_size(self.block_size)

    @property
    def levels(self) -> int:
        return 1 << self.bits

    def to_json(self) -> dict:
        return {"bits": self.bits, "block_size": self.block_size, "symmetric": self.symmetric}

    @classmethod
    def from_json(cls, d: dict) -> "QuantConfig":
        unknown = set(d) - {"bits", "block_size", "symmetric"}
        require(not unknown, f"unknown quantization keys {sorted(unknown)}; allowed: bits, block_size, symmetric")
        return cls(**d)

    def describe(self) -> str:
        return f"{self.bits}-bit b{self.block_size}" + (" sym" if self.symmetric else "")


Target = "QuantConfig | str"  # a config or KEEP
# One block size for every quantized layer, or one per bit width ({2: 128} re-blocks only the 2-bit layers):
# kernels differ per width (FACTS: CPU 2-bit is fastest at block 128, 4-bit already fast at 64).
BlockSizes = Union[int, Mapping[int, int]]


def parse_block_sizes(text: "str | int | None") -> "BlockSizes | None":
    """Parse a `--block-size` option: `64` (every layer) or `BITS:BLOCK[,BITS:BLOCK]` (per bit width).

    Example:
        >>> parse_block_sizes("4:64,2:128")
        {4: 64, 2: 128}
        >>> parse_block_sizes("128")
        128
    """
    if text is None or isinstance(text, int):
        return text
    if isinstance(text, Mapping):
        return dict(text)
    hint = "e.g. `--block-size 64` or `--block-size 4:64,2:128`"
    if ":" not in text:
        try:
            return int(text)
        except ValueError:
            raise EdgeRecoverError(f"--block-size {text!r} is not a number; {hint}") from None
    sizes: dict[int, int] = {}
    for part in text.split(","):
        bits, sep, block = part.strip().partition(":")
        try:
            b, n = int(bits), int(block)
        except ValueError:
            raise EdgeRecoverError(f"--block-size part {part!r} must be BITS:BLOCK; {hint}") from None
        require(b in VALID_BITS, f"--block-size part {part!r}: bits must be one of {VALID_BITS}; {hint}")
        require(b not in sizes, f"--block-size names {b}-bit twice; {hint}")
        _check_block_size(n)
        sizes[b] = n
    return sizes


@dataclass(frozen=True)
class Rule:
    """`pattern` is an exact layer name or a regex (searched); `config` a QuantConfig or KEEP."""

    pattern: str
    config: QuantConfig | str
    # a named scheme's head rule, which a target's head replaces (`Scheme.with_target_head`); not in the JSON
    # or `==`, like `QuantConfig.block_stand_in`
    head_stand_in: bool = field(default=False, compare=False, repr=False)
    # a named scheme's rule built from the family table's MLP roles (("gate", "up") for w4w2gateup), which
    # `Scheme.for_layout` spells as a family names them; not in the JSON or `==`
    roles: tuple[str, ...] = field(default=(), compare=False, repr=False)

    def __post_init__(self) -> None:
        if isinstance(self.config, str):
            require(self.config == KEEP, f"a rule's target must be a quantization or 'keep', got {self.config!r}")
        try:
            re.compile(self.pattern)
        except re.error as exc:
            raise EdgeRecoverError(f"rule pattern {self.pattern!r} is not a valid regex ({exc}); escape it") from None

    def to_json(self) -> dict:
        return {"pattern": self.pattern, "config": self.config if self.config == KEEP else self.config.to_json()}

    @classmethod
    def from_json(cls, d: dict) -> "Rule":
        require(isinstance(d, dict) and "pattern" in d and "config" in d, f"a rule needs `pattern` and `config`, got {d!r}")
        cfg = d["config"]
        return cls(d["pattern"], KEEP if cfg == KEEP else QuantConfig.from_json(cfg))


@dataclass(frozen=True)
class Scheme:
    """A named, versioned map from layer names to quantization configs.

    `rules` are tried in order (exact names before regexes, see `resolve`); `default` applies to every
    other linear layer.
    """

    name: str
    default: QuantConfig | str = field(default_factory=QuantConfig)
    rules: tuple[Rule, ...] = ()
    version: int = SCHEME_FORMAT_VERSION

    def resolve(self, layer_name: str) -> QuantConfig | str:
        """Return the config for `layer_name`: exact rule, then first regex rule, then the default."""
        for rule in self.rules:
            if rule.pattern == layer_name:
                return rule.config
        for rule in self.rules:
            if re.search(rule.pattern, layer_name):
                return rule.config
        return self.default

    def with_block_size(self, block_size: BlockSizes) -> "Scheme":
        """The same scheme with every quantized config at `block_size`, or, given a map {bits: block},
        each config of those bits at its block (the others unchanged)."""
        return self._re_block(block_size, stand_ins_only=False)

    def with_target_block_size(self, block_size: BlockSizes) -> "Scheme":
        """The same scheme with its stand-in blocks (a named scheme's own, a `--rule` without BLOCK) at a
        target's `block_size`; blocks someone chose (a JSON file's, `--rule lm_head=4:32`, `with_block_size`)
        stay as they are.

        Example:
            >>> s = load_scheme("w4", ["lm_head=4:32"]).with_target_block_size(64)
            >>> s.resolve("lm_head").block_size, s.resolve("model.layers.0.mlp.up_proj").block_size
            (32, 64)
        """
        return self._re_block(block_size, stand_ins_only=True)

    def _re_block(self, block_size: BlockSizes, stand_ins_only: bool) -> "Scheme":
        sizes = dict(block_size) if isinstance(block_size, Mapping) else {b: block_size for b in VALID_BITS}
        for n in sizes.values():
            _check_block_size(n)

        def re_block(c):
            if c == KEEP or c.bits not in sizes or (stand_ins_only and not c.block_stand_in):
                return c
            return replace(c, block_size=sizes[c.bits], block_stand_in=False)

        return replace(
            self,
            default=re_block(self.default),
            rules=tuple(replace(r, config=re_block(r.config)) for r in self.rules),
        )

    def with_target_head(self, head: "QuantConfig | None") -> "Scheme":
        """The same scheme with a named scheme's own head rule (float) replaced by a target's `head` (None:
        unchanged). A head someone chose (`--rule lm_head=keep`, `--rule lm_head=4:32`, a JSON file's) stays.

        Example:
            >>> load_scheme("w4").with_target_head(CPU_HEAD).with_target_block_size(64).resolve("lm_head")
            QuantConfig(bits=8, block_size=64, symmetric=False)
            >>> load_scheme("w4", ["lm_head=keep"]).with_target_head(CPU_HEAD).resolve("lm_head")
            'keep'
        """
        if head is None:
            return self
        return replace(self, rules=tuple(Rule(r.pattern, head) if r.head_stand_in else r for r in self.rules))

    def with_rules(self, extra: Iterable[Rule]) -> "Scheme":
        """The scheme with `extra` rules taking precedence over its own."""
        extra = tuple(extra)
        return replace(self, name=self.name + ("+custom" if extra else ""), rules=extra + self.rules)

    def for_layout(self, layout: Layout | None) -> "Scheme":
        """The scheme with each rule built from MLP roles (a named scheme's gate/up) spelled as `layout`'s family
        names them: Phi-3's one fused `mlp\\.(gate_up_proj)$` for `mlp\\.(gate_proj|up_proj)$`. A family that
        names them so (Llama, Mistral, Qwen2, Qwen3) gets the scheme back unchanged, so its JSON and a package's
        manifest stay byte for byte what they were; `None` (no registered family) too.

        Example:
            >>> named_scheme("w4w2gateup").for_layout(LAYOUTS["phi3"]).resolve("model.layers.0.mlp.gate_up_proj").bits
            2
        """
        if layout is None:
            return self
        rules = tuple(replace(r, pattern=role_pattern(*r.roles, layouts=[layout]))
                      if r.roles and role_names(layout, r.roles) else r for r in self.rules)
        return self if [r.pattern for r in rules] == [r.pattern for r in self.rules] else replace(self, rules=rules)

    def check_matches(self, layer_names: Iterable[str]) -> None:
        """Refuse a rule that matches no layer: it is almost always a typo."""
        names = list(layer_names)
        for rule in self.rules:
            if rule.pattern in DEFAULT_KEPT:
                continue
            if not any(rule.pattern == n or re.search(rule.pattern, n) for n in names):
                raise EdgeRecoverError(
                    f"rule {rule.pattern!r} matches no linear layer of this model "
                    f"(e.g. {names[0] if names else 'none'!r}); fix the pattern or drop the rule"
                )

    def to_json(self) -> dict:
        return {
            "format_version": self.version,
            "name": self.name,
            "default": self.default if self.default == KEEP else self.default.to_json(),
            "rules": [r.to_json() for r in self.rules],
        }

    @classmethod
    def from_json(cls, d: dict) -> "Scheme":
        require(isinstance(d, dict) and "name" in d, "a scheme file must be a JSON object with a `name`")
        version = d.get("format_version", SCHEME_FORMAT_VERSION)
        require(
            version <= SCHEME_FORMAT_VERSION,
            f"scheme format_version {version} is newer than this edge-recover ({SCHEME_FORMAT_VERSION}); upgrade edge-recover",
        )
        default = d.get("default", QuantConfig().to_json())
        return cls(
            name=d["name"],
            default=KEEP if default == KEEP else QuantConfig.from_json(default),
            rules=tuple(Rule.from_json(r) for r in d.get("rules", [])),
            version=version,
        )

    def dumps(self) -> str:
        return json.dumps(self.to_json(), indent=2)

    def describe(self) -> str:
        lines = [f"{self.name}: default {self.default if self.default == KEEP else self.default.describe()}"]
        lines += [f"  {r.pattern!r} -> {r.config if r.config == KEEP else r.config.describe()}"
                  + (" (or the export target's head: cpu 8-bit, see `edge-recover targets`)" if r.head_stand_in else "")
                  for r in self.rules]
        return "\n".join(lines)


_KEEP_HEAD = Rule(r"(^|\.)lm_head$", KEEP, head_stand_in=True)  # float unless a target says otherwise
# The MLP's gate and up projections of the built-in families that keep them apart (sdk/layouts.py), as a regex:
# `mlp\.(gate_proj|up_proj)$`. Built once at import, so a named scheme's JSON (and a package's manifest) says the
# same pattern on every machine. A family that fuses them (Phi-3's gate_up_proj) gets its own spelling when a
# model of it is quantized (`Scheme.for_layout`, called by apply.quantize_model); one registered later with other
# names does too.
_GATE_UP = role_pattern("gate", "up", layouts=[lay for lay in LAYOUTS.values() if not lay.mlp.gate_up])


def _stand_in(bits: int) -> QuantConfig:
    """`bits` at block 32, a block that a target's preferred one replaces (`with_target_block_size`)."""
    return QuantConfig(bits, 32, block_stand_in=True)


# The head the CPU's packages get from a named scheme (export --target cpu, and recover, which trains for the
# CPU's layout): 8-bit, at the target's block. Measured (docs/results/head-smollm2/, W4 SmolLM2, 2 cores):
# float 51.94 ppl at 97 / 86 tok/s (128 / 512-token prompt), 8-bit 51.75 at 131 / 126, 4-bit block 32 54.67 at
# 150 / 121: the 8-bit head costs no accuracy and reads a quarter of the float head's bytes, and the tied
# embedding then reads its integers too (166 -> 99 MB for W4).
CPU_HEAD = QuantConfig(8, 32, block_stand_in=True)
# The qnn target's: the HTP runs 2/4-bit MatMulNBits only, so 4-bit at the target's block; the embedding then reads
# the head's integers (tied) or its own 8-bit table (untied) with plain ops (exporters/embedding.py). A float head
# and a float embedding were 545 MB each on Qwen2.5-Coder-0.5B's qnn package.
NPU_HEAD = QuantConfig(4, 32, block_stand_in=True)

NAMED_SCHEMES: dict[str, Scheme] = {
    "w8": Scheme("w8", _stand_in(8), (_KEEP_HEAD,)),
    "w4": Scheme("w4", _stand_in(4), (_KEEP_HEAD,)),
    "w2": Scheme("w2", _stand_in(2), (_KEEP_HEAD,)),
    "w4w2gateup": Scheme("w4w2gateup", _stand_in(4), (_KEEP_HEAD, Rule(_GATE_UP, _stand_in(2), roles=("gate", "up")))),
}


def named_scheme(name: str) -> Scheme:
    """Look up a named scheme (`w8`, `w4`, `w2`, `w4w2gateup`).

    Example:
        >>> named_scheme("w4").default.bits
        4
    """
    if name not in NAMED_SCHEMES:
        raise EdgeRecoverError(f"unknown scheme {name!r}; choose one of {', '.join(NAMED_SCHEMES)} (see `edge-recover schemes`)")
    return NAMED_SCHEMES[name]


def parse_rule(text: str, block_size: "BlockSizes | None" = None) -> Rule:
    """Parse a `--rule` option: `PATTERN=keep` or `PATTERN=BITS[:BLOCK][:sym]`.

    A rule without BLOCK takes `block_size` (one size, or {bits: size}; the command's `--block-size`), else
    32 as a stand-in that an export's target block replaces (`Scheme.with_target_block_size`); a rule's own
    BLOCK is kept.

    Example:
        >>> parse_rule(r"down_proj$=2:64").config
        QuantConfig(bits=2, block_size=64, symmetric=False)
    """
    pattern, sep, target = text.rpartition("=")
    require(bool(sep) and bool(pattern), f"--rule {text!r} must look like PATTERN=BITS[:BLOCK][:sym] or PATTERN=keep")
    if target == KEEP:
        return Rule(pattern, KEEP)
    parts = target.split(":")
    try:
        bits = int(parts[0])
        block = int(parts[1]) if len(parts) > 1 and parts[1] != "sym" else None
    except ValueError:
        raise EdgeRecoverError(f"--rule {text!r}: bits and block size must be integers, e.g. 'down_proj$=4:64'") from None
    if block is None:
        block = block_size.get(bits) if isinstance(block_size, Mapping) else block_size
    sym = "sym" in parts[1:]
    return Rule(pattern, QuantConfig(bits, block or 32, symmetric=sym, block_stand_in=block is None))


def load_scheme(spec: str, rules: Iterable[str] = (), block_size: "BlockSizes | str | None" = None) -> Scheme:
    """Build a scheme from a name or a JSON file, optional `--rule` strings and a block-size override
    (`parse_block_sizes`). A name's blocks and those of a rule without BLOCK are stand-ins that an export
    sets to its target's block; a file's blocks and a rule's own BLOCK are kept (module docstring).

    Example:
        >>> s = load_scheme("w4w2gateup", ["lm_head=4:32"])
        >>> s.name, s.resolve("lm_head").block_size
        ('w4w2gateup+custom', 32)
    """
    block_size = parse_block_sizes(block_size)
    if spec.endswith(".json") or Path(spec).is_file():
        path = Path(spec)
        require(path.is_file(), f"scheme file {spec!r} does not exist; pass a scheme name or a JSON file")
        try:
            scheme = Scheme.from_json(json.loads(path.read_text()))
        except json.JSONDecodeError as exc:
            raise EdgeRecoverError(f"scheme file {spec!r} is not valid JSON ({exc.msg}, line {exc.lineno})") from None
    else:
        scheme = named_scheme(spec)
    if block_size is not None:
        scheme = scheme.with_block_size(block_size)
    return scheme.with_rules(parse_rule(r, block_size) for r in rules)

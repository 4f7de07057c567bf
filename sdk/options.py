"""The quantization options, defined once: what `quantize`, `recover`, `export` and `eval` (and bench/) are told
about how a full-precision model becomes integers, with the same defaults everywhere.

    --scheme        w4w2gateup                  a quantized checkpoint (`export Q`, `recover --quantized Q`) keeps its own
    --method        gptq                        export: mse (the one measured override, `OVERRIDES`)
    --calibration   32 teacher samples          export: 16 (with mse)
    --block-size    the target's layout         quantize, recover: the cpu target's, 64 for every width and the
                                                8-bit head (`LAYOUT`); export --target T: T's; a JSON file keeps its own
    --rule          extra PATTERN=BITS[:BLOCK][:sym] or PATTERN=keep, on top (a rule's own BLOCK stays)

`eval` quantizes its student as `quantize` does (same defaults), but an `--adapter` brings its own recipe: its
method (unless `--method` is given), calibration and scheme, so that its integers are made again exactly.

Why these defaults (the measurements are in docs/):
- gptq: at 2 bits the method decides whether the model is usable (docs/quantization.md, SmolLM2 W4/W2-GateUp
  block 64: rtn 825.7, mse 215.5, gptq 188.0 perplexity), and it is the better start for recovery (docs/recovery.md:
  65.0 vs 72.9 from rtn after the same run). 32 calibration samples: the quantization table's.
- export's override, mse with 16 samples: an export quantizes a full-precision model in one go, on the machine it
  runs on, and gptq's full K x K input Hessians do not fit there for the large models we ship (10.6 GB on
  Qwen2.5-Coder-1.5B, docs/models/qwen2.5-coder-1.5b.md; mse reads only their diagonals), at 20-30x the time; at
  4 bits mse is as good as gptq (47.7 vs 48.2). The 0.5B and 1.5B packages were measured with mse/16. For gptq
  integers in a package: `quantize` (or `recover`) first, then `export` the checkpoint, which keeps its integers.
- blocks 64 and the 8-bit head: the cpu target's layout (exporters/targets.py), the target of the packages we
  measure. Block 64 is where the CPU's 2-bit MatMulNBits gets fast (2-bit at 32 is slower than 4-bit), and it is
  more accurate than 2-bit blocks of 128 before recovery (gptq 201.1 vs 237.9, docs/quantization.md) and after it
  (63.04 vs 65.17, docs/recovery.md, the sixth study), whose decode gain the paired run could not resolve (0.94x /
  1.28x, sd 10-20 %); 64 is also the qnn target's block. `--block-size 4:64,2:128` is the fastest 2-bit kernel.
  The 8-bit head costs no accuracy and reads a quarter of the float head's bytes (sdk/scheme.py, CPU_HEAD).

`QuantOptions` carries the five options as one frozen value (and which of them the user typed); `build_scheme`
turns them into the `Scheme` each command quantizes with (the one order: target head, `--block-size`, `--rule`,
the target's blocks for what is left); `QuantOptions.student_scheme` is what `recover` and `eval` pass on beside a
`--quantized` checkpoint; `quant_options(command)` declares them on a Typer command, with this module's defaults
and help.
No torch import here: the CLI imports it at start-up.

Example:
    >>> defaults("export").method, defaults("quantize").method
    ('mse', 'gptq')
    >>> build_scheme(None).resolve("model.layers.0.mlp.up_proj")
    QuantConfig(bits=2, block_size=64, symmetric=False)
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, List, Optional

from .errors import require
from .scheme import CPU_HEAD, BlockSizes, QuantConfig, Scheme, load_scheme, parse_block_sizes, parse_rule

__all__ = ["COMMANDS", "DEFAULT_SCHEME", "LAYOUT", "OVERRIDES", "QuantDefaults", "QuantLayout", "QuantOptions",
           "build_scheme", "defaults", "quant_options"]

DEFAULT_SCHEME = "w4w2gateup"
COMMANDS = ("quantize", "recover", "export", "eval")


@dataclass(frozen=True)
class QuantDefaults:
    """The quantizer a command uses when not told: `method` and its `calibration` samples, and why."""

    method: str = "gptq"
    calibration: int = 32
    why: str = ("gptq: the best 2-bit integers and the better start for recovery (docs/quantization.md, "
                "docs/recovery.md)")


@dataclass(frozen=True)
class QuantLayout:
    """The blocks and head a named scheme's stand-ins become where no target says otherwise (quantize, recover)."""

    block_size: BlockSizes = 64
    head: QuantConfig | None = CPU_HEAD
    why: str = ("the cpu target's layout: block 64 (the CPU's fast 2-bit path; more accurate than 2-bit blocks of "
                "128 before and after recovery) and the 8-bit head")


DEFAULTS = QuantDefaults()
# The one measured exception: export quantizes a full-precision model in one go on the machine it runs on.
OVERRIDES: dict[str, QuantDefaults] = {
    "export": QuantDefaults("mse", 16, "mse with 16 samples: what a one-shot export of a large model affords (gptq's "
                                       "full input Hessians: 10.6 GB on a 1.5B model; mse is as good at 4 bits, "
                                       "docs/models/qwen2.5-coder-1.5b.md); for gptq integers, export a "
                                       "`quantize` checkpoint"),
}
LAYOUT = QuantLayout()


def defaults(command: str) -> QuantDefaults:
    """The quantizer defaults of `command` (`quantize`, `recover`, `export`, `eval`): `DEFAULTS` unless `OVERRIDES`
    says.

    Example:
        >>> defaults("recover").calibration
        32
    """
    if command not in COMMANDS:
        raise ValueError(f"unknown command {command!r}; one of {', '.join(COMMANDS)}")
    return OVERRIDES.get(command, DEFAULTS)


@dataclass(frozen=True)
class QuantOptions:
    """The quantization options of one command, as the user gave them (None: the default).

    `scheme` a name or JSON file (None: `DEFAULT_SCHEME`, or a quantized checkpoint's own); `rules` extra
    `PATTERN=BITS[:BLOCK][:sym]` / `PATTERN=keep` strings; `block_size` `64` or `4:64,2:128` (None: the target's);
    `explicit` the options the user typed (`method`, ...), beside their values (`eval`: an adapter's own method
    stands unless `--method` is typed).

    Example:
        >>> QuantOptions(rules=("lm_head=4",)).scheme_for().resolve("lm_head").bits
        4
    """

    scheme: str | None = None
    method: str = DEFAULTS.method
    calibration: int = DEFAULTS.calibration
    block_size: str | None = None
    rules: tuple[str, ...] = ()
    explicit: frozenset[str] = field(default=frozenset(), compare=False)

    def given(self) -> bool:
        """Whether the user chose the scheme (`--scheme`, `--block-size` or `--rule`)."""
        return bool(self.scheme or self.block_size or self.rules)

    def student_scheme(self, quantized: bool) -> Scheme | None:
        """The scheme `recover` and `eval` quantize a teacher with, or check a `--quantized` checkpoint against:
        None when the user chose none (the checkpoint's own, or `DEFAULT_SCHEME` at the cpu layout); the scheme
        as named beside a checkpoint (which keeps its blocks: `--block-size` and `--rule` are refused with one)."""
        require(not (self.block_size and quantized), "`--block-size` cannot re-block a `--quantized` checkpoint; "
                                                     "quantize it with that block size, or leave `--quantized` out")
        require(not (self.rules and quantized), "`--rule` cannot change a `--quantized` checkpoint's scheme; quantize "
                                                "it with that rule, or leave `--quantized` out")
        if not self.given():
            return None
        return load_scheme(self.scheme or DEFAULT_SCHEME) if quantized else self.scheme_for()

    def scheme_for(self, head: QuantConfig | None = LAYOUT.head, block_size: BlockSizes = LAYOUT.block_size) -> Scheme:
        """The scheme to quantize with for a target whose head is `head` and preferred blocks `block_size`."""
        return build_scheme(self.scheme, self.rules, self.block_size, head=head, target_block_size=block_size)


def build_scheme(spec: "str | Scheme | None", rules: Iterable[str] = (), block_size: "BlockSizes | str | None" = None, *,
                 head: QuantConfig | None = LAYOUT.head, target_block_size: BlockSizes = LAYOUT.block_size) -> Scheme:
    """The scheme a command quantizes a full-precision model with, built in the one order every command uses.

    `spec` a scheme name or JSON file (None: `DEFAULT_SCHEME`) or a `Scheme`; a named scheme's float head becomes
    `head` (a target's: cpu 8-bit), then `block_size` (`--block-size`) sets every block of the widths it names,
    then `rules` (`--rule`) come first (a rule without BLOCK takes `--block-size`, else a stand-in), and the
    stand-ins left (a named scheme's blocks, a rule's without BLOCK) become `target_block_size`. A JSON file's
    blocks and a rule's own BLOCK stay.

    Example:
        >>> s = build_scheme("w4", ["lm_head=4:32"])
        >>> s.resolve("lm_head").block_size, s.resolve("model.layers.0.mlp.up_proj").block_size
        (32, 64)
    """
    sch = spec if isinstance(spec, Scheme) else load_scheme(str(spec or DEFAULT_SCHEME))
    sch = sch.with_target_head(head)
    blocks = parse_block_sizes(block_size)
    if blocks is not None:
        sch = sch.with_block_size(blocks)
    return sch.with_rules(parse_rule(r, blocks) for r in rules).with_target_block_size(target_block_size)


# ─── the Typer declaration ────────────────────────────────────────────────────────────────────────────

def _help(command: str) -> dict[str, str]:
    d = defaults(command)
    override = f" ({command}'s own default: {d.why})" if command in OVERRIDES else f" ({d.why})"
    # eval makes an adapter's integers again: its recipe stands where the user typed nothing
    adapter = {k: f"; with `--adapter`, the adapter's own{w}" for k, w in
               (("scheme", " (without `--quantized`)"), ("method", " unless this is given"), ("calibration", ""))
               } if command == "eval" else {}
    blocks = ("the target's: a scheme name gets `--target`'s preferred block (cpu: 64, and its 8-bit head), a "
              "JSON file keeps its own" if command == "export" else
              f"{LAYOUT.why}; a JSON file keeps its own")
    return {
        "scheme": f"scheme name or JSON file (see `edge-recover schemes`; default {DEFAULT_SCHEME}); a quantized "
                  f"checkpoint keeps its own{adapter.get('scheme', '')}",
        "method": "quantizer: gptq (error feedback through the input Hessian), mse (clipping search + least "
                  f"squares, activation-weighted) or rtn (min-max reference){override}{adapter.get('method', '')}",
        "calibration": "teacher-sampled sequences for the quantizer's statistics (0: none; rtn needs none)"
                       f"{adapter.get('calibration', '')}",
        "block_size": f"block size: 64 (every width) or per bit width as 4:64,2:128 (the fastest 2-bit kernel); "
                      f"default: {blocks}",
        "rule": "extra scheme rule PATTERN=BITS[:BLOCK][:sym] or PATTERN=keep, e.g. lm_head=4:32 (repeatable; "
                "a rule's own BLOCK survives --block-size; not for a quantized checkpoint)",
    }


def _parameters(command: str) -> list[inspect.Parameter]:
    """The five options as Typer parameters with `command`'s defaults (one declaration for every command)."""
    import typer

    d, h = defaults(command), _help(command)
    specs: list[tuple[str, Any, Any]] = [
        ("scheme", Optional[str], typer.Option(None, help=h["scheme"])),
        ("method", str, typer.Option(d.method, help=h["method"])),
        ("calibration", int, typer.Option(d.calibration, help=h["calibration"])),
        ("block_size", Optional[str], typer.Option(None, help=h["block_size"])),
        ("rule", List[str], typer.Option([], help=h["rule"])),
    ]
    return [inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=o, annotation=t) for n, t, o in specs]


def _typed(names: list[str]) -> frozenset[str]:
    """Which of the parameters `names` the user gave (on the command line or in the environment), not defaults."""
    from typer.main import get_current_context  # Typer's own Context (it carries its own copy of click)

    ctx = get_current_context(silent=True)
    if ctx is None:  # called as a plain function: only its arguments, no command line
        return frozenset()
    sources = {n: ctx.get_parameter_source(n) for n in names}
    return frozenset(n for n, src in sources.items() if src is not None and src.name in ("COMMANDLINE", "ENVIRONMENT"))


def quant_options(command: str) -> Callable:
    """Declare `--scheme --method --calibration --block-size --rule` on a Typer command, in place of its
    `quant: QuantOptions` parameter, which then receives them as one `QuantOptions`.

    Example:
        >>> @app.command()  # doctest: +SKIP
        ... @quant_options("quantize")
        ... def quantize(model: str, quant: QuantOptions = QuantOptions()) -> None:
        ...     scheme = quant.scheme_for()
    """
    extra = _parameters(command)
    names = [p.name for p in extra]

    def decorate(fn: Callable) -> Callable:
        sig = inspect.signature(fn, eval_str=True)
        params = list(sig.parameters.values())
        at = [p.name for p in params].index("quant")
        clash = set(names) & set(sig.parameters)
        if clash:
            raise TypeError(f"{fn.__name__} declares {sorted(clash)} itself; they come from quant_options")

        @functools.wraps(fn)
        def command_fn(*args, **kwargs):
            given = {n: kwargs.pop(n) for n in names}
            quant = QuantOptions(scheme=given["scheme"], method=given["method"], calibration=given["calibration"],
                                 block_size=given["block_size"], rules=tuple(given["rule"] or ()),
                                 explicit=_typed(names))
            return fn(*args, quant=quant, **kwargs)

        new = sig.replace(parameters=params[:at] + extra + params[at + 1:])
        command_fn.__signature__ = new
        # evaluated types (the function's own are strings under `from __future__ import annotations`)
        command_fn.__annotations__ = {p.name: p.annotation for p in new.parameters.values()
                                      if p.annotation is not inspect.Parameter.empty}
        del command_fn.__wrapped__  # Typer reads the signature above, not the function's own
        return command_fn

    return decorate

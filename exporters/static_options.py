"""What a static-graph export is asked for: the graphs' shapes, the SoC, the fp16 fixes, and the HTP parity gate.

`StaticOptions` shapes the prefill / decode graphs (context C, window W), names the SoC the HTP verifies and
compiles for and the optional fp16 passes to run (`NUMERICS`); `HtpTolerance` is how far the HTP's logits may
stray from the CPU EP's before the export fails. The passes that read them are in static_passes.py, the pipeline
that runs them in static_graph.py; both import this module, which imports neither.

Example:
    >>> StaticOptions(context_length=128, window=32).numerics == NUMERICS
    True
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edge_recover.errors import EdgeRecoverError, require

__all__ = ["GRAPH_FILES", "HtpTolerance", "NUMERICS", "StaticOptions"]

GRAPH_FILES = {"prefill": "prefill.onnx", "decode": "decode.onnx"}
NUMERICS = ("rotary tables", "finite mask", "scale-safe RMS norm")  # the passes only fp16 needs (optional)


@dataclass(frozen=True)
class HtpTolerance:
    """How far the HTP's logits may stray from the CPU EP's on the same static graph before the export fails.

    Per graph (prefill, decode), over its real positions only: top-1 agreement >= `min_top1`, and the max abs
    diff <= `max_rel_diff` x the logit scale (max |logit| on the CPU EP). The defaults pass SmolLM2-135M's
    good fp16 runs (real-text prefill window 15 of 16 top-1, 1.52 at scale 27.9, i.e. 0.054; 8 greedy steps
    1.75 at 29.2, 0.060; decode 0.62 at 23.7, 0.026) and the tiny test models (< 0.02, top-1 all), and fail
    the broken ones (Qwen2.5-Coder-0.5B prefill 46.7 at 15.9, top-1 25 %; SmolLM2 without the scale-safe
    norm 358 at 27.9, decode 5.63 at 23.7 = 0.24).

    Example:
        >>> HtpTolerance.parse("0.95,0.1")
        HtpTolerance(min_top1=0.95, max_rel_diff=0.1)
    """

    min_top1: float = 0.9       # fraction of real positions whose argmax must agree
    max_rel_diff: float = 0.15  # max abs diff as a fraction of the logit scale

    @classmethod
    def parse(cls, text: str) -> "HtpTolerance":
        """`--htp-tolerance TOP1[,REL]`: fractions, e.g. "0.9,0.15" (REL omitted: the default)."""
        parts = [p.strip() for p in str(text).split(",")]
        fix = "pass TOP1[,REL] as fractions, e.g. `--htp-tolerance 0.9,0.15` (the default)"
        require(1 <= len(parts) <= 2 and all(parts), f"`--htp-tolerance` {text!r} is not TOP1[,REL]; {fix}")
        try:
            values = [float(p) for p in parts]
        except ValueError:
            raise EdgeRecoverError(f"`--htp-tolerance` {text!r} holds a value that is not a number; {fix}") from None
        top1, rel = values[0], values[1] if len(values) == 2 else cls.max_rel_diff
        require(0.0 <= top1 <= 1.0, f"`--htp-tolerance` TOP1 must be a fraction in 0..1 (not a percentage), got "
                                    f"{parts[0]}; {fix}")
        require(rel >= 0.0 and not np.isnan(rel), f"`--htp-tolerance` REL must be >= 0 (a fraction of the logit "
                                                   f"scale), got {parts[-1]}; {fix}")
        return cls(top1, rel)

    def flag(self) -> str:
        """These values as the CLI flag's argument."""
        return f"{self.min_top1:g},{self.max_rel_diff:g}"


@dataclass(frozen=True)
class StaticOptions:
    """How the static graphs are shaped and checked.

    Example:
        >>> StaticOptions(context_length=128, window=32).window
        32
    """

    context_length: int = 0     # C: KV cache slots = the longest prompt + answer (0: the model's default)
    window: int = 0             # W: prompt tokens per prefill step (0: the default, min(64, C))
    mask_value: float = -1.0e4  # the additive mask of a masked key (finite in fp16)
    soc: str = "SM8650"         # the SoC the HTP graphs are verified and compiled for
    compile_contexts: bool = True  # write EPContext models (ep.context_enable) into the package
    numerics: tuple[str, ...] = NUMERICS  # fp16 fixes to apply
    tolerance: HtpTolerance | None = HtpTolerance()  # the HTP-vs-CPU-EP parity gate (None: figures only)

    def check(self, max_positions: int) -> None:
        """Refuse shapes the model or the target cannot take."""
        require(self.context_length >= 2, f"`--context-length` must be >= 2, got {self.context_length}")
        require(self.context_length <= max_positions,
                f"`--context-length` {self.context_length} exceeds the model's {max_positions} positions; "
                f"pass at most {max_positions}")
        require(1 <= self.window <= self.context_length,
                f"the prefill window must be 1..{self.context_length} tokens, got {self.window}")

"""The generation loop: prefill the prompt, then decode one token at a time with the KV cache.

`generate_ids` works on token ids and records timings (prefill, time to first token, each decode step), so
the profiler and the chat examples use the same loop. `Generator` adds the tokenizer (the package's
`tokenizer.json`, read with the `tokenizers` library) and streams text: each new token's text is the
difference between decoding all generated ids now and before, held back while it ends in an incomplete
UTF-8 sequence.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence

import numpy as np

from edge_recover.errors import EdgeRecoverError

from .sampling import Sampling, choose_token
from .session import OrtCausalLM

__all__ = ["GenerationResult", "generate_ids", "Generator"]


@dataclass
class GenerationResult:
    """Tokens out and what they cost."""

    prompt_tokens: int
    tokens: list[int]
    stop_reason: str                 # "stop_token", "max_new_tokens" or "context"
    prefill_s: float                 # the prompt's forward pass
    ttft_s: float                    # prompt in -> first new token chosen
    step_latencies_s: list[float] = field(default_factory=list)  # each decode step after the first token
    text: str = ""

    @property
    def prefill_tok_s(self) -> float:
        return self.prompt_tokens / self.prefill_s if self.prefill_s > 0 else float("nan")

    @property
    def decode_tok_s(self) -> float:
        total = sum(self.step_latencies_s)
        return len(self.step_latencies_s) / total if total > 0 else float("nan")


def generate_ids(lm: OrtCausalLM, prompt_ids: Sequence[int], max_new_tokens: int = 64,
                 sampling: Sampling = Sampling(), stop_token_ids: Iterable[int] = (),
                 on_token: Optional[Callable[[int], None]] = None) -> GenerationResult:
    """Generate up to `max_new_tokens` after `prompt_ids`; stop early at a stop token or the context end.

    The stop token itself is kept in `tokens` (and passed to `on_token`). Greedy when `sampling` is the default.

    Example:
        >>> res = generate_ids(lm, [1, 2, 3], max_new_tokens=8)  # doctest: +SKIP
        >>> res.tokens, res.decode_tok_s  # doctest: +SKIP
    """
    n = len(prompt_ids)
    if n == 0:
        raise EdgeRecoverError("`prompt` is empty; give at least one token")
    if n >= lm.context_length:
        raise EdgeRecoverError(f"prompt of {n} tokens does not fit the model's context of {lm.context_length} "
                               f"tokens (one position is needed for the answer); shorten `--prompt`")
    if max_new_tokens < 1:
        raise EdgeRecoverError(f"`max_new_tokens` must be >= 1, got {max_new_tokens}")
    stops = set(int(t) for t in stop_token_ids)
    rng = np.random.default_rng(sampling.seed)
    t0 = time.perf_counter()
    cache = lm.empty_cache(capacity=min(n + max_new_tokens, lm.context_length))  # sizes a shared-buffer cache
    logits, cache = lm.prefill(np.asarray([prompt_ids], dtype=np.int64), cache)
    t1 = time.perf_counter()
    token = choose_token(logits, sampling, rng)
    t2 = time.perf_counter()
    result = GenerationResult(n, [token], "max_new_tokens", prefill_s=t1 - t0, ttft_s=t2 - t0)
    if on_token:
        on_token(token)
    while True:
        if token in stops:
            result.stop_reason = "stop_token"
            break
        if len(result.tokens) >= max_new_tokens:
            break
        if cache.length + 1 > lm.context_length:
            result.stop_reason = "context"
            break
        ts = time.perf_counter()
        logits, cache = lm.step(np.asarray([[token]], dtype=np.int64), cache)
        token = choose_token(logits, sampling, rng)
        result.step_latencies_s.append(time.perf_counter() - ts)
        result.tokens.append(token)
        if on_token:
            on_token(token)
    return result


class Generator:
    """A package, its tokenizer and a session: text in, text out (streamed if asked).

    Example:
        >>> gen = Generator("out/demo/w4w2gateup", provider="cpu")  # doctest: +SKIP
        >>> gen.generate("The capital of France is", max_new_tokens=16, on_text=print).text  # doctest: +SKIP
    """

    def __init__(self, package: str | Path, provider: str = "cpu", threads: Optional[int] = None,
                 provider_options: Optional[dict] = None, fallback: bool = False, io_binding: bool = True,
                 session_config: Optional[dict] = None) -> None:
        from tokenizers import Tokenizer

        from .static_session import open_causal_lm  # a static (NPU) package gets StaticCausalLM

        self.lm = open_causal_lm(package, provider, threads, provider_options, fallback, io_binding,
                                 session_config=session_config)
        tok_file = self.lm.package.path / "tokenizer.json"
        if not tok_file.is_file():
            raise EdgeRecoverError(f"package {str(self.lm.package.path)!r} lacks tokenizer.json; re-export it")
        self.tokenizer = Tokenizer.from_file(str(tok_file))

    def encode(self, text: str) -> list[int]:
        """Token ids of `text` as the model saw them in training (no special tokens added)."""
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def generate(self, prompt: str | Sequence[int], max_new_tokens: int = 64, sampling: Sampling = Sampling(),
                 stop_token_ids: Optional[Iterable[int]] = None,
                 on_text: Optional[Callable[[str], None]] = None) -> GenerationResult:
        """Generate after `prompt` (text, or token ids); `on_text` receives each new piece of text.

        Stops at the package's EOS ids unless `stop_token_ids` is given.
        """
        ids = self.encode(prompt) if isinstance(prompt, str) else list(prompt)
        stops = self.lm.package.eos_token_ids if stop_token_ids is None else list(stop_token_ids)
        out: list[int] = []
        shown = [""]

        def _on_token(token: int) -> None:
            out.append(token)
            if on_text is None:
                return
            text = self.decode(out)
            if text.endswith("\ufffd"):  # an incomplete multi-byte character: wait for the rest
                return
            if text.startswith(shown[0]):
                on_text(text[len(shown[0]):])
            shown[0] = text

        result = generate_ids(self.lm, ids, max_new_tokens, sampling, stops, _on_token)
        result.text = self.decode(result.tokens)
        if on_text is not None and result.text.startswith(shown[0]) and len(result.text) > len(shown[0]):
            on_text(result.text[len(shown[0]):])
        return result

"""The same package under onnxruntime-genai (optional): its own generate loop, tokenizer and KV handling.

The exporter writes `genai_config.json` into every package, so `og.Model(package)` loads the folder
unchanged. onnxruntime-genai is optional: `pip install onnxruntime-genai` (0.18 works with onnxruntime 1.31);
without it, `genai_generate` raises one line saying so.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable, Optional

from edge_recover.errors import EdgeRecoverError

from .generate import GenerationResult
from .sampling import Sampling

__all__ = ["genai_available", "genai_generate"]


def genai_available() -> bool:
    """True when `onnxruntime_genai` imports."""
    try:
        import onnxruntime_genai  # noqa: F401
    except ImportError:
        return False
    return True


def genai_generate(package: str | Path, prompt: str, max_new_tokens: int = 64, sampling: Sampling = Sampling(),
                   chat: bool = False, on_text: Optional[Callable[[str], None]] = None,
                   provider: str = "cpu") -> GenerationResult:
    """Generate with onnxruntime-genai from a package folder (needs its genai_config.json).

    Example:
        >>> genai_generate("out/demo/w4w2gateup", "The capital of France is", 16).text  # doctest: +SKIP
    """
    try:
        import onnxruntime_genai as og
    except ImportError:
        raise EdgeRecoverError("onnxruntime-genai is not installed; `pip install onnxruntime-genai` or use "
                               "`--engine ort`") from None
    path = Path(package)
    if not (path / "genai_config.json").is_file():
        raise EdgeRecoverError(f"package {str(path)!r} has no genai_config.json; re-export it with a current "
                               f"edge-recover")
    config = og.Config(str(path))
    if provider != "cpu":
        config.clear_providers()
        config.append_provider(provider)
    model = og.Model(config)
    tokenizer = og.Tokenizer(model)
    if chat:
        from .chat import render_chat

        prompt = render_chat(path, [{"role": "user", "content": prompt}])
    ids = list(tokenizer.encode(prompt))
    params = og.GeneratorParams(model)
    options = dict(max_length=len(ids) + max_new_tokens, do_sample=not sampling.greedy)
    if not sampling.greedy:
        options.update(temperature=sampling.temperature, top_p=sampling.top_p, top_k=sampling.top_k or 0,
                       random_seed=sampling.seed)
    params.set_search_options(**options)
    generator = og.Generator(model, params)
    stream = tokenizer.create_stream()
    t0 = time.perf_counter()
    generator.append_tokens(ids)
    t1 = time.perf_counter()
    result = GenerationResult(len(ids), [], "max_new_tokens", prefill_s=t1 - t0, ttft_s=0.0)
    while not generator.is_done():
        ts = time.perf_counter()
        generator.generate_next_token()
        token = int(generator.get_next_tokens()[0])
        now = time.perf_counter()
        if result.tokens:
            result.step_latencies_s.append(now - ts)
        else:
            result.ttft_s = now - t0
        result.tokens.append(token)
        if on_text:
            on_text(stream.decode(token))
    if len(ids) + len(result.tokens) < len(ids) + max_new_tokens:
        result.stop_reason = "stop_token"
    result.text = tokenizer.decode(result.tokens)
    return result

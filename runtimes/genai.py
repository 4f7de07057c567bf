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

__all__ = ["genai_available", "genai_generate", "genai_max_length", "names_qnn", "read_genai_config", "register_qnn"]


def genai_available() -> bool:
    """True when `onnxruntime_genai` imports."""
    try:
        import onnxruntime_genai  # noqa: F401
    except ImportError:
        return False
    return True


def read_genai_config(package: str | Path) -> dict:
    """The package's genai_config.json, or one line saying it has none."""
    import json

    path = Path(package) / "genai_config.json"
    if not path.is_file():
        raise EdgeRecoverError(f"package {str(package)!r} has no genai_config.json; re-export it with a current "
                               f"edge-recover")
    return json.loads(path.read_text())


def names_qnn(config: dict) -> bool:
    """Whether a genai_config asks for the QNN provider anywhere (a qnn package's pipeline stages do)."""
    if isinstance(config, dict):
        return "qnn" in config or any(names_qnn(v) for v in config.values())
    return isinstance(config, list) and any(names_qnn(v) for v in config)


def genai_max_length(config: dict, prompt: int, new: int) -> int:
    """og's `max_length` for `new` tokens after `prompt` tokens under genai_config `config`: a package with a sliding
    window (the static NPU pipeline) counts the prompt padded to whole windows, so that is what the budget starts
    from, capped at the context the graphs were built for."""
    model = config["model"]
    window = (model["decoder"].get("sliding_window") or {}).get("window_size")
    if not window:
        return prompt + new
    padded = -(-prompt // window) * window
    return min(padded + new, int(model.get("context_length") or padded + new))


def register_qnn(og) -> None:
    """Register onnxruntime-qnn's plugin EP library with onnxruntime-genai (its wheels have no built-in QNN EP),
    once per process; one line naming the fix when onnxruntime-qnn is not installed.

    Example:
        >>> import onnxruntime_genai as og; register_qnn(og); og.Model("out/npu")  # doctest: +SKIP
    """
    try:
        import onnxruntime_qnn
    except ImportError:
        raise EdgeRecoverError("this package runs on the QNN provider, and onnxruntime-genai needs onnxruntime-qnn's "
                               "plugin library for it: `pip install onnxruntime-qnn`, or run it with `--engine ort`"
                               ) from None
    try:
        og.register_execution_provider_library(onnxruntime_qnn.EP_NAME, onnxruntime_qnn.get_library_path())
    except RuntimeError as exc:
        if "already registered" not in str(exc):
            raise EdgeRecoverError(f"onnxruntime-genai could not register onnxruntime-qnn's library: "
                                   f"{str(exc).splitlines()[0]}") from None


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
    settings = read_genai_config(path)
    config = og.Config(str(path))
    if provider != "cpu":
        config.clear_providers()
        config.append_provider(provider)
    if provider == "qnn" or names_qnn(settings):
        register_qnn(og)
    try:
        model = og.Model(config)
    except RuntimeError as exc:  # one line: og's message names the provider or file it could not take
        raise EdgeRecoverError(f"onnxruntime-genai could not load {str(path)!r}: {str(exc).splitlines()[0]}; "
                               "run it with `--engine ort`, or see docs/npu.md 'Running the package in "
                               "onnxruntime-genai'") from None
    tokenizer = og.Tokenizer(model)
    if chat:
        from .chat import render_chat

        prompt = render_chat(path, [{"role": "user", "content": prompt}])
    ids = list(tokenizer.encode(prompt))
    params = og.GeneratorParams(model)
    options = dict(max_length=genai_max_length(settings, len(ids), max_new_tokens), do_sample=not sampling.greedy)
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
    while not generator.is_done() and len(result.tokens) < max_new_tokens:  # a pipeline model's is_done()
        # stays false at max_length (og 0.18), and one more step raises
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

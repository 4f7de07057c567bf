"""Code tasks (HumanEval) on a deployed package: greedy generation through ONNX Runtime.

`PackageCodeGenerator` is the package generator of `edge_recover.humaneval.score_code`: it opens the package
as `run` does (`open_causal_lm`, so static NPU packages work too), builds the prompt with the package's own
chat template (runtimes/chat.py; the raw HumanEval prompt when the package has none), and decodes greedily
with `generate_ids`, watching the text after each token so that it stops as soon as the answer's code
block closes (or at EOS, `max_new_tokens`, the context's end). The token loop has no stop-string hook, so
the per-token callback ends it by raising a private exception that carries nothing; the tokens so far are
kept by the callback itself.

runtimes/cli.py registers this class as the `package-code` backend (`edge_recover.tasks_score.register_backend`),
so that `edge-recover eval --package PKG --tasks humaneval` (recovery/cli.py) reaches it without an earlier
stage importing the runtime.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

from edge_recover.errors import EdgeRecoverError
from edge_recover.humaneval import CodePrompt, Completion, Problem, code_prompt

from .generate import generate_ids
from .sampling import Sampling

__all__ = ["PackageCodeGenerator"]


class _Done(Exception):
    """Raised from the token callback when the answer is complete."""


def _has_chat_template(package: Path) -> bool:
    cfg = package / "tokenizer_config.json"
    if cfg.is_file() and json.loads(cfg.read_text()).get("chat_template"):
        return True
    return (package / "chat_template.jinja").is_file()


class PackageCodeGenerator:
    """Greedy answers to code problems from a package through ONNX Runtime.

    Example:
        >>> gen = PackageCodeGenerator("out/qwen2.5-coder-0.5b-w4", provider="cpu")  # doctest: +SKIP
        >>> done = gen(problem, max_new_tokens=384)  # doctest: +SKIP
        >>> done.prompt.solution(done.text)  # doctest: +SKIP
    """

    def __init__(self, package: str | os.PathLike, provider: str = "cpu", threads: Optional[int] = None,
                 provider_options: Optional[dict] = None, fallback: bool = False) -> None:
        from tokenizers import Tokenizer

        from .static_session import open_causal_lm

        self.lm = open_causal_lm(package, provider, threads, provider_options, fallback)
        path = self.lm.package.path
        if not (path / "tokenizer.json").is_file():
            raise EdgeRecoverError(f"package {str(path)!r} lacks tokenizer.json; re-export it")
        self.tokenizer = Tokenizer.from_file(str(path / "tokenizer.json"))
        self.chat = _has_chat_template(path)
        self.stops = list(self.lm.package.eos_token_ids)

    def describe(self) -> str:
        """One line for reports: the package, the provider, the prompt style."""
        choice = getattr(self.lm, "choice", None)
        provider = choice.describe() if choice is not None else "onnxruntime"
        return (f"package {self.lm.package.path} through ONNX Runtime ({provider}); "
                + ("its chat template" if self.chat else "raw completion (no chat template)"))

    def prompt(self, problem: Problem) -> CodePrompt:
        """The problem's prompt under the package's chat template (or the raw HumanEval prompt)."""
        if not self.chat:
            return code_prompt(problem)
        from .chat import render_chat

        return code_prompt(problem, lambda messages: render_chat(self.lm.package.path, messages))

    def __call__(self, problem: Problem, max_new_tokens: int) -> Completion:
        prompt = self.prompt(problem)
        ids = self.tokenizer.encode(prompt.text, add_special_tokens=False).ids
        context = self.lm.context_length
        if len(ids) >= context:
            raise EdgeRecoverError(f"{problem.task_id}: the prompt of {len(ids)} tokens does not fit the package's "
                                   f"context of {context} tokens; HumanEval needs about 1,000 (export with a "
                                   "longer context)")
        tokens: list[int] = []
        stop = ["max_new_tokens"]

        def on_token(token: int) -> None:
            tokens.append(token)
            if token in self.stops:
                return
            if prompt.done(self.tokenizer.decode(tokens, skip_special_tokens=True)):
                stop[0] = "code_block" if prompt.chat else "stop_sequence"
                raise _Done

        try:
            result = generate_ids(self.lm, ids, max_new_tokens, Sampling(), self.stops, on_token)
            stop[0] = {"stop_token": "eos"}.get(result.stop_reason, result.stop_reason)
        except _Done:
            pass
        text = self.tokenizer.decode(tokens, skip_special_tokens=True)
        return Completion(prompt, text, len(tokens), stop[0])

"""An lm-evaluation-harness backend for packages: `--model edge-recover --model_args package=PKG`.

`EdgeRecoverLM` implements lm-eval's three request types on the deployed graph through ONNX Runtime:

- `loglikelihood`: `PackageLoglikelihood` (runtimes/task_eval.py), the same scorer as `edge-recover eval
  --package`: requests that share a context share its run and go in one batch;
- `loglikelihood_rolling`: the text's tokens in disjoint windows of the package's context (lm-eval's own
  `get_rolling_token_windows`, the end-of-text token first), summed;
- `generate_until`: the package's KV-cache loop (`OrtCausalLM.prefill` / `step`, the runtime's fast path),
  greedy unless `do_sample` with a `temperature`, stopping at an `until` string, an end-of-sequence token,
  `max_gen_toks` or the end of the context.

Registration: lm-eval 0.4.13 resolves `--model NAME` in its own registry and scans no entry-point group,
so this module registers the class when imported (`register()`), pyproject.toml declares it in the
`lm_eval.models` entry-point group, and the `edge-recover-lm-eval` script (`main`) registers every model of
that group, then runs lm-eval's own command line unchanged:

    edge-recover-lm-eval run --model edge-recover --model_args package=out/pkg,provider=cpu --tasks mytask \
        --include_path my_tasks/

From Python, `import edge_recover.runtimes.lm_eval_backend` and pass `model="edge-recover"` to
`lm_eval.simple_evaluate`.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
from lm_eval.api.model import LM

from .sampling import Sampling, choose_token
from .session import OrtCausalLM
from .task_eval import PackageLoglikelihood

__all__ = ["EdgeRecoverLM", "register", "main", "MODEL_NAME"]

MODEL_NAME = "edge-recover"
ENTRY_POINT_GROUP = "lm_eval.models"
_CHUNK = 64  # lm-eval requests per scorer call (its own order keeps the choices of one document together)


class EdgeRecoverLM(LM):
    """lm-eval's `LM` over an edge-recover package (`package=PKG[,provider=cpu][,threads=N][,max_gen_toks=N]`).

    Example:
        >>> lm = EdgeRecoverLM(package="out/smollm2-w4w2gateup")  # doctest: +SKIP
        >>> lm_eval.simple_evaluate(model=lm, tasks=["mytask"])  # doctest: +SKIP
    """

    def __init__(self, package: str, provider: str = "cpu", threads: Optional[int] = None, max_gen_toks: int = 256,
                 adapter: Optional[str] = None, **lm_eval_options) -> None:
        """`lm_eval_options` are the harness's own (batch_size, max_batch_size, device): the scorer batches the
        choices of each context itself and runs on `provider`, so they are accepted and not used."""
        super().__init__()
        self.package = str(package)
        self.provider = provider
        self.threads = int(threads) if threads not in (None, "") else None
        self.scorer = PackageLoglikelihood(package, provider, threads=self.threads, adapter=adapter)
        self.max_gen_toks = int(max_gen_toks)
        self.adapter = adapter
        self._generator: Optional[OrtCausalLM] = None

    @property
    def eot_token_id(self) -> int:
        return self.scorer.prefix_id if self.scorer.prefix_id is not None else 0

    def tok_encode(self, text: str) -> list[int]:
        return self.scorer.encode(text)

    def tok_decode(self, ids) -> str:
        return self.scorer.tokenizer.decode(list(ids), skip_special_tokens=True)

    def _bar(self, items, disable: bool, desc: str):
        if disable:
            return items
        from tqdm import tqdm

        return tqdm(items, desc=desc, unit="req")

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        """(log p(continuation | context), continuation is greedy) per request, as lm-eval expects."""
        pairs = [tuple(r.args[:2]) for r in requests]
        out: list[tuple[float, bool]] = []
        for start in self._bar(range(0, len(pairs), _CHUNK), disable_tqdm, "edge-recover loglikelihood"):
            out.extend(self.scorer(pairs[start:start + _CHUNK]))
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of each whole text, scored in disjoint windows of the package's context."""
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

        out = []
        for r in self._bar(requests, disable_tqdm, "edge-recover loglikelihood_rolling"):
            windows = [make_disjoint_window(w) for w in get_rolling_token_windows(
                token_list=self.tok_encode(r.args[0]), prefix_token=self.eot_token_id,
                max_seq_len=self.scorer.context_length - 1, context_len=1)]
            out.append(float(sum(lp for lp, _ in self.scorer.score_ids(windows))))
        return out

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Text after each context, generated with the package's KV cache until a stop string."""
        if self._generator is None:
            self._generator = OrtCausalLM(self.package, self.provider, self.threads, adapter=self.adapter)
        return [self._generate(*r.args[:2]) for r in self._bar(requests, disable_tqdm, "edge-recover generate_until")]

    def _generate(self, context: str, gen_kwargs: dict) -> str:
        lm = self._generator
        kwargs = dict(gen_kwargs or {})
        until = kwargs.get("until") or []
        until = [until] if isinstance(until, str) else list(until)
        max_new = int(kwargs.get("max_gen_toks", self.max_gen_toks))
        temperature = float(kwargs.get("temperature", 0.0) or 0.0)
        sampling = Sampling(temperature=temperature if kwargs.get("do_sample") else 0.0,
                            top_p=float(kwargs.get("top_p", 1.0) or 1.0), seed=int(kwargs.get("seed", 0) or 0))
        ids = self.tok_encode(context)[-(lm.context_length - 1):] or [self.eot_token_id]
        stops = set(lm.package.eos_token_ids)
        rng = np.random.default_rng(sampling.seed)
        cache = lm.empty_cache(capacity=min(len(ids) + max_new, lm.context_length))
        logits, cache = lm.prefill(np.asarray([ids], np.int64), cache)
        new: list[int] = []
        text = ""
        while len(new) < max_new:
            token = choose_token(logits, sampling, rng)
            if token in stops:
                break
            new.append(token)
            text = self.tok_decode(new)
            hits = [text.index(s) for s in until if s and s in text]
            if hits:
                return text[:min(hits)]
            if cache.length + 1 >= lm.context_length:
                break
            logits, cache = lm.step(np.asarray([[token]], np.int64), cache)
        return text


def register() -> None:
    """Register `EdgeRecoverLM` in lm-eval's model registry as `edge-recover` (once)."""
    from lm_eval.api.registry import model_registry

    if MODEL_NAME not in model_registry:  # an entry-point placeholder resolves to this very class
        model_registry.register(MODEL_NAME, target=EdgeRecoverLM)


def _register_entry_points() -> None:
    """Every model declared in the `lm_eval.models` entry-point group, as a lazy placeholder."""
    import importlib.metadata as md

    import lm_eval.models  # noqa: F401  (lm-eval's own models first)
    from lm_eval.api.registry import model_registry

    for ep in md.entry_points(group=ENTRY_POINT_GROUP):
        if ep.name not in model_registry:
            model_registry.register(ep.name, target=ep)


def main() -> None:
    """`edge-recover-lm-eval`: lm-eval's command line with the `lm_eval.models` entry points registered."""
    _register_entry_points()
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()


register()

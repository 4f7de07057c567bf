"""Task accuracy of a deployed package: log-likelihood multiple choice through ONNX Runtime.

`PackageLoglikelihood` is the package backend of `edge_recover.tasks_score` (the same scoring as the torch
backend, recovery/task_eval.py). It opens the package's graph with `OrtCausalLM` on any provider, with the
logits of every position (`last_logits_only=False`) and the plain `session.run` path, and scores the
requests of one call, grouped by context, in two runs of the graph per context:

    context c[0..m-1]:  run c[:-1] with an empty past                    -> past (m-1 positions)
    choices k = 1..n:   run [c[-1]] + x_k[:-1], right-padded, as one batch of n rows on that past
                        (the past repeated n times)                      -> logits [n, L, vocab]
    log p(x_k | c) = sum_j log_softmax(logits[k, j])[x_k[j]]

The cpu target's fused graphs (com.microsoft GroupQueryAttention) refuse a batch of several new tokens on a
past ("batch_size must be 1 when sequence_length > 1 and past context is given", onnxruntime 1.31), so
there the n rows are the whole sequences c + x_k[:-1], one batch on an empty past (one run per context).

Right padding needs no mask: a causal graph's logits at a real position never see the pads after it, so
the attention mask stays all ones (GroupQueryAttention's `seqlens_k` then counts the pads, which only
the pads' own rows read). The context is run once, not once per choice. The tokenizer is the package's
`tokenizer.json`, and pairs are split by the shared `encode_pair`, so a package and its torch model score
the very same tokens.

runtimes/cli.py registers this class as the `package` backend (`edge_recover.tasks_score.register_backend`),
so that `edge-recover eval --package` (recovery/cli.py) reaches it without an earlier stage importing it.
"""

from __future__ import annotations

import os
from typing import Mapping, Optional, Sequence

import numpy as np

from edge_recover.errors import EdgeRecoverError
from edge_recover.tasks_score import encode_pair

from .session import CACHE_DTYPES, OrtCausalLM

__all__ = ["PackageLoglikelihood", "open_tokenizer"]


def open_tokenizer(package_dir: str | os.PathLike):
    """The package's `tokenizer.json` as a `tokenizers.Tokenizer` (an error that names the fix if missing)."""
    from pathlib import Path

    from tokenizers import Tokenizer

    path = Path(package_dir) / "tokenizer.json"
    if not path.is_file():
        raise EdgeRecoverError(f"package {str(package_dir)!r} lacks tokenizer.json; re-export it")
    return Tokenizer.from_file(str(path))


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x -= x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


class PackageLoglikelihood:
    """`loglikelihood(requests)` on a package through ONNX Runtime.

    Example:
        >>> ll = PackageLoglikelihood("out/smollm2-w4w2gateup", provider="cpu")  # doctest: +SKIP
        >>> ll([("The capital of France is", " Paris"), ("The capital of France is", " Rome")])  # doctest: +SKIP
        [(-2.0, True), (-7.4, False)]
    """

    def __init__(self, package: str | os.PathLike, provider: str = "cpu", threads: Optional[int] = None,
                 provider_options: Optional[Mapping[str, str]] = None, fallback: bool = False,
                 adapter: Optional[str] = None) -> None:
        self.lm = OrtCausalLM(package, provider, threads, provider_options, fallback, io_binding=False,
                              adapter=adapter, share_buffer=False, last_logits_only=False)
        self.tokenizer = open_tokenizer(self.lm.package.path)
        eos = self.lm.package.eos_token_ids
        self.prefix_id = int(eos[0]) if eos else None
        sess = self.lm.session
        self._inputs = {i.name for i in sess.get_inputs()}
        self._kv = [i for i in sess.get_inputs() if i.name.startswith("past_key_values.")]
        self._outputs = [o.name for o in sess.get_outputs()]
        heads, dim = self.lm.package.stats.kv_heads, self.lm.package.stats.head_dim
        self._empty = {i.name: np.zeros((1, heads, 0, dim), CACHE_DTYPES[i.type]) for i in self._kv}
        self._fused = bool(self.lm.package.stats.kv_share_buffer)  # every present.* written by GroupQueryAttention

    @property
    def context_length(self) -> int:
        return self.lm.context_length

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, no special tokens added."""
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def __call__(self, requests: Sequence[tuple[str, str]]) -> list[tuple[float, bool]]:
        return self.score_ids([encode_pair(self.encode, c, x, self.prefix_id) for c, x in requests])

    def forward(self, input_ids: np.ndarray, past: Mapping[str, np.ndarray], past_len: int
                ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """One run of the graph: `input_ids` [batch, t] after `past_len` cached positions; returns the logits of
        every position [batch, t, vocab] and the new past (by `past_key_values.*` name)."""
        b, t = input_ids.shape
        feeds = {"input_ids": input_ids.astype(np.int64, copy=False),
                 "attention_mask": np.ones((b, past_len + t), np.int64), **past}
        if "position_ids" in self._inputs:
            feeds["position_ids"] = np.broadcast_to(np.arange(past_len, past_len + t, dtype=np.int64), (b, t)).copy()
        run_options = self.lm.adapter.run_options if self.lm.adapter else None
        outs = dict(zip(self._outputs, self.lm.session.run(None, feeds, run_options)))
        new_past = {"past_key_values." + n[len("present."):]: v for n, v in outs.items() if n.startswith("present.")}
        return outs["logits"], new_past

    def score_ids(self, pairs: Sequence[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """(log p(continuation | context), continuation is greedy) per (context ids, continuation ids) pair; pairs
        that share a context share its run and go in one batch."""
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, (ctx, _) in enumerate(pairs):
            groups.setdefault(tuple(ctx), []).append(i)
        out: list[Optional[tuple[float, bool]]] = [None] * len(pairs)
        for ctx_key, members in groups.items():
            conts = [list(pairs[i][1]) for i in members]
            longest = max(len(c) for c in conts)
            if longest >= self.context_length:
                raise EdgeRecoverError(f"a choice of {longest} tokens does not fit the package's context of "
                                       f"{self.context_length}; shorten it in the task file")
            ctx = list(ctx_key)[-(self.context_length - longest):]  # keep the context's end when too long
            past, past_len = dict(self._empty), 0
            if self._fused:  # GQA takes no batch of several tokens on a past: whole rows, no past
                rows, offset = [ctx + c[:-1] for c in conts], len(ctx) - 1
            else:
                rows, offset, past_len = [[ctx[-1]] + c[:-1] for c in conts], 0, len(ctx) - 1
                if past_len:
                    _, past = self.forward(np.asarray([ctx[:-1]], np.int64), past, 0)
            width = max(len(r) for r in rows)
            batch = np.zeros((len(rows), width), np.int64)
            for k, r in enumerate(rows):
                batch[k, :len(r)] = r
            past_b = {name: np.repeat(v, len(rows), axis=0) for name, v in past.items()}
            logits, _ = self.forward(batch, past_b, past_len)
            for k, (i, cont) in enumerate(zip(members, conts)):
                logp = _log_softmax(logits[k, offset:offset + len(cont)])
                target = np.asarray(cont)
                out[i] = (float(logp[np.arange(len(cont)), target].sum()), bool((logp.argmax(-1) == target).all()))
        return out  # type: ignore[return-value]

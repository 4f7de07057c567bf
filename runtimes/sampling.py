"""Next-token choice from one row of logits: greedy, temperature, top-k, top-p (nucleus). Pure numpy.

Greedy is `temperature == 0` and is exactly `argmax` (first index on ties, like torch), so greedy tokens can
be compared with torch's `generate(do_sample=False)` one for one.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edge_recover.errors import EdgeRecoverError

__all__ = ["Sampling", "choose_token"]


@dataclass(frozen=True)
class Sampling:
    """How to pick the next token.

    Example:
        >>> Sampling().greedy, Sampling(temperature=0.7, top_p=0.9).greedy
        (True, False)
    """

    temperature: float = 0.0   # 0: greedy
    top_k: int = 0             # 0: no top-k cut
    top_p: float = 1.0         # 1: no nucleus cut
    seed: int = 0

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise EdgeRecoverError(f"`temperature` must be >= 0 (0 = greedy), got {self.temperature}")
        if self.top_k < 0:
            raise EdgeRecoverError(f"`top_k` must be >= 0 (0 = off), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise EdgeRecoverError(f"`top_p` must be in (0, 1] (1 = off), got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def choose_token(logits: np.ndarray, sampling: Sampling, rng: np.random.Generator) -> int:
    """Pick one token id from `logits` ([vocab]).

    Example:
        >>> choose_token(np.array([0.1, 2.0, 0.3]), Sampling(), np.random.default_rng(0))
        1
    """
    if sampling.greedy:
        return int(np.argmax(logits))
    x = logits.astype(np.float64) / sampling.temperature
    if sampling.top_k and sampling.top_k < x.size:
        kth = np.partition(x, -sampling.top_k)[-sampling.top_k]
        x = np.where(x < kth, -np.inf, x)
    x = x - x.max()
    p = np.exp(x)
    p /= p.sum()
    if sampling.top_p < 1.0:
        order = np.argsort(-p, kind="stable")
        cum = np.cumsum(p[order])
        keep = order[: int(np.searchsorted(cum, sampling.top_p) + 1)]  # smallest set with mass >= top_p
        mask = np.zeros_like(p, dtype=bool)
        mask[keep] = True
        p = np.where(mask, p, 0.0)
        p /= p.sum()
    return int(rng.choice(p.size, p=p))

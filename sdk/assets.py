"""Every named download, one table: the models (`fetch.model_names()`), the evaluation text and the task files.

`edge-recover fetch NAME` is `fetch_asset(NAME)`. It sits after the modules that know how to get each asset
(fetch.py: models and Shakespeare; tasks.py: BIG-bench; humaneval.py: HumanEval), which take their download
helpers from fetch.py: so fetch.py imports none of them.
"""

from __future__ import annotations

from pathlib import Path

from .errors import EdgeRecoverError
from .fetch import fetch_model, fetch_shakespeare, model_names
from .humaneval import fetch_humaneval
from .tasks import fetch_bigbench

OTHER_ASSETS = {"shakespeare": fetch_shakespeare, "bigbench": fetch_bigbench, "humaneval": fetch_humaneval}


def fetch_asset(name: str) -> Path:
    """Fetch a named asset (once; then the cached path): a model (`smollm2`, `qwen2.5-coder-0.5b`,
    `qwen2.5-coder-1.5b`), `shakespeare` (text), `bigbench` or `humaneval` (task files).

    Example:
        >>> fetch_asset("shakespeare")  # doctest: +SKIP
        PosixPath('/home/me/.cache/edge-recover/shakespeare')
    """
    if name in model_names():
        return fetch_model(name)
    if name not in OTHER_ASSETS:
        raise EdgeRecoverError(f"unknown asset {name!r}; choose one of {', '.join((*model_names(), *OTHER_ASSETS))}")
    return OTHER_ASSETS[name]()

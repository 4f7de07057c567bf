"""Log-likelihood multiple choice, once for every backend.

For each example, every choice is scored as the continuation log-probability log p(choice | context), the
options of one question in one call of the backend's `loglikelihood(requests)` (so a backend can batch them,
or share the context's forward pass), where `requests` is a list of (context, continuation) strings and the
answer one (log-prob, is_greedy) pair per request (lm-evaluation-harness's convention). The prediction is the
arg-max choice:

- `acc`: arg-max of the summed log-prob;
- `acc_norm`: arg-max of the log-prob divided by the choice's length in characters, leading whitespace (the
  delimiter) not counted (lm-evaluation-harness's `acc_norm`; characters, not tokens, so that it does not
  depend on the tokenizer);

an example counts as correct when the prediction is one of its gold choices. Standard errors are those of a
mean of 0/1 outcomes, sqrt(p (1 - p) / (n - 1)). Tokenization is shared too (`encode_pair`): the pair is
split as lm-evaluation-harness splits it, trailing whitespace of the context moved to the continuation and
the continuation's tokens taken from the encoding of the whole string, so that every backend scores the
same tokens.

Recovery share per task: (acc_recovered - acc_quantized) / (acc_fp - acc_quantized); its standard error
comes from a paired bootstrap over the examples (the three models answer the same questions, so their
errors are correlated and the plain formula would overstate the noise).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional, Sequence

from .errors import EdgeRecoverError
from .tasks import Task

__all__ = ["LogLikelihood", "TaskResult", "score_task", "score_tasks", "encode_pair", "mean_stderr",
           "recovery_share", "recovery_table", "reach", "register_backend", "open_backend"]

# (context, continuation) pairs -> one (log p(continuation | context), continuation is the greedy pick) each
LogLikelihood = Callable[[Sequence[tuple[str, str]]], Sequence[tuple[float, bool]]]
REACH = 0.8  # the paper's bar: a task "recovers" when its recovery share reaches 80 %
# Backends of later stages, by name -> "module:callable" (imported only when opened), so that the CLI of an
# earlier stage (recovery/cli.py's `eval --package`) can reach the runtime's backend without importing it.
_BACKENDS: dict[str, str] = {}


def register_backend(name: str, target: str) -> None:
    """Register a backend factory `target` ("package.module:Callable", returning a `LogLikelihood`) as `name`.

    Example:
        >>> register_backend("package", "edge_recover.runtimes.task_eval:PackageLoglikelihood")
    """
    _BACKENDS[name] = target


def open_backend(name: str, *args, **kwargs) -> LogLikelihood:
    """Open the registered backend `name` with the factory's arguments."""
    import importlib

    if name not in _BACKENDS:
        raise EdgeRecoverError(f"no `{name}` scoring backend is registered; install edge-recover with its runtimes "
                               "(edge_recover.runtimes) to score packages")
    module, attr = _BACKENDS[name].split(":")
    return getattr(importlib.import_module(module), attr)(*args, **kwargs)


def encode_pair(encode: Callable[[str], list[int]], context: str, continuation: str,
                prefix_id: Optional[int] = None) -> tuple[list[int], list[int]]:
    """Token ids (context, continuation) as lm-evaluation-harness splits them.

    Trailing whitespace of `context` moves to the front of `continuation` ("A: " + "yes" -> "A:" + " yes"),
    and the continuation is what the whole string's encoding adds after the context's. An empty context
    becomes `[prefix_id]` (the end-of-text token, say), since the first token needs something to follow.

    Example:
        >>> encode_pair(tok.encode, "Q: 1 + 1?\\nA: ", "2")  # doctest: +SKIP
        ([48, 42, ...], [220, 17])
    """
    n = len(context) - len(context.rstrip())
    if n:
        context, continuation = context[:-n], context[-n:] + continuation
    whole = encode(context + continuation)
    ctx = encode(context) if context else []
    if whole[:len(ctx)] != ctx:  # the boundary merged into one token: keep the context's own encoding
        cont = encode(continuation)
        whole = ctx + cont
    cont = whole[len(ctx):]
    if not cont:
        raise EdgeRecoverError(f"choice {continuation!r} encodes to no tokens; fix the task file")
    if not ctx:
        if prefix_id is None:
            raise EdgeRecoverError("an example has an empty context and the model has no end-of-text token to "
                                   "start from; give every example a context")
        ctx = [prefix_id]
    return ctx, cont


def mean_stderr(values: Sequence[float]) -> tuple[float, float]:
    """Mean and its standard error (sample standard deviation / sqrt(n)); stderr is nan below 2 values."""
    n = len(values)
    if n == 0:
        return float("nan"), float("nan")
    mean = sum(values) / n
    if n < 2:
        return mean, float("nan")
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(var / n)


@dataclass
class TaskResult:
    """Accuracy of one model on one task, with the per-example outcomes (for paired comparisons)."""

    task: str
    examples: int
    chance: float
    acc: float
    acc_stderr: float
    acc_norm: float
    acc_norm_stderr: float
    seconds: float
    correct: list[int] = field(default_factory=list)       # 1 / 0 per example, acc
    correct_norm: list[int] = field(default_factory=list)  # 1 / 0 per example, acc_norm

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> "TaskResult":
        return cls(**data)


def _argmax(values: Sequence[float]) -> int:
    return max(range(len(values)), key=lambda i: values[i])


def score_task(task: Task, loglikelihood: LogLikelihood, progress: bool = True, desc: str = "",
               questions_per_call: int = 1) -> TaskResult:
    """Score `task` with `loglikelihood`: all choices of a question in one call (`questions_per_call`
    questions per call, for backends that batch, e.g. on a GPU).

    Example:
        >>> res = score_task(resolve_task("strategyqa").subset(100), TorchLoglikelihood(model, tok))  # doctest: +SKIP
        >>> res.acc, res.acc_stderr  # doctest: +SKIP
    """
    examples = task.examples
    if not examples:
        raise EdgeRecoverError(f"task {task.name!r} has no examples")
    step = max(int(questions_per_call), 1)
    chunks = [examples[i:i + step] for i in range(0, len(examples), step)]
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(examples), desc=desc or task.name, unit="q", leave=False)
    t0 = time.perf_counter()
    correct, correct_norm = [], []
    for chunk in chunks:
        requests = [(ex.context, c) for ex in chunk for c in ex.choices]
        scores = list(loglikelihood(requests))
        if len(scores) != len(requests):
            raise EdgeRecoverError(f"the backend returned {len(scores)} scores for {len(requests)} requests")
        at = 0
        for ex in chunk:
            logp = [float(s[0]) for s in scores[at:at + len(ex.choices)]]
            at += len(ex.choices)
            norm = [lp / max(len(c.lstrip()), 1) for lp, c in zip(logp, ex.choices)]
            correct.append(int(_argmax(logp) in ex.gold))
            correct_norm.append(int(_argmax(norm) in ex.gold))
        if bar is not None:
            bar.update(len(chunk))
    if bar is not None:
        bar.close()
    acc, acc_se = mean_stderr(correct)
    accn, accn_se = mean_stderr(correct_norm)
    return TaskResult(task.name, len(examples), task.chance, acc, acc_se, accn, accn_se,
                      time.perf_counter() - t0, correct, correct_norm)


def score_tasks(tasks: Sequence[Task], loglikelihood: LogLikelihood, progress: bool = True,
                label: str = "", questions_per_call: int = 1) -> list[TaskResult]:
    """`score_task` for each of `tasks` with the same backend."""
    return [score_task(t, loglikelihood, progress, desc=f"{label} {t.name}".strip(),
                       questions_per_call=questions_per_call) for t in tasks]


def recovery_share(fp: float, quantized: float, recovered: float) -> float:
    """(recovered - quantized) / (fp - quantized); nan when quantization lost nothing (no gap to recover)."""
    gap = fp - quantized
    return float("nan") if gap <= 0 else (recovered - quantized) / gap


def _bootstrap_share(fp: Sequence[int], q: Sequence[int], r: Sequence[int], rounds: int = 2000,
                     seed: int = 0) -> float:
    """Standard error of the recovery share from a paired bootstrap over examples (nan draws skipped)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    f, qq, rr = (np.asarray(v, dtype=np.float64) for v in (fp, q, r))
    idx = rng.integers(0, len(f), size=(rounds, len(f)))
    gap = f[idx].mean(1) - qq[idx].mean(1)
    ok = gap > 0
    if ok.sum() < rounds // 2:  # the gap itself is noise: the share has no useful error bar
        return float("nan")
    share = (rr[idx].mean(1)[ok] - qq[idx].mean(1)[ok]) / gap[ok]
    return float(share.std(ddof=1))


def recovery_table(fp: Sequence[TaskResult], quantized: Sequence[TaskResult],
                   recovered: Sequence[TaskResult], metrics: str | Sequence[str] = "acc") -> list[dict]:
    """Per task: the three accuracies and the recovery share with its paired-bootstrap standard error, in
    `metrics` (`acc` or `acc_norm`: one for all tasks, or one per task).

    Example:
        >>> rows = recovery_table(fp_results, q_results, r_results)  # doctest: +SKIP
        >>> rows[0]["share"], rows[0]["share_stderr"]  # doctest: +SKIP
    """
    per_task = [metrics] * len(fp) if isinstance(metrics, str) else list(metrics)
    rows = []
    for f, q, r, metric in zip(fp, quantized, recovered, per_task):
        if not (f.task == q.task == r.task and f.examples == q.examples == r.examples):
            raise EdgeRecoverError(f"recovery needs the same examples for every model; got {f.task}/{q.task}/{r.task}")
        per = "correct" if metric == "acc" else "correct_norm"
        a = [getattr(x, metric) for x in (f, q, r)]
        rows.append({"task": f.task, "metric": metric, "fp": a[0], "quantized": a[1], "recovered": a[2],
                     "share": recovery_share(*a),
                     "share_stderr": _bootstrap_share(getattr(f, per), getattr(q, per), getattr(r, per))})
    return rows


def reach(rows: Sequence[dict], bar: float = REACH) -> int:
    """How many tasks of a `recovery_table` reach a recovery share of `bar` (a nan share does not count)."""
    return sum(1 for row in rows if not math.isnan(row["share"]) and row["share"] >= bar)

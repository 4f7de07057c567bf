"""Task accuracy of torch models: the full-precision teacher, the quantized student, the student + adapter.

`TorchLoglikelihood` is the torch backend of `edge_recover.tasks_score`: the requests of one call (the
choices of one question) go through the model as one right-padded batch. Right padding needs no attention
mask: a causal model's logits at a real position never see the pads after it, so each row's scores are
those of the row alone. Sequences longer than `max_length` keep their last tokens.

`evaluate_tasks` loads the models with `evaluate_recovery`'s helpers (recovery/evaluation.py:
`load_teacher`, `load_student`) -- the teacher, then a quantized checkpoint (`quantized`) or the teacher
quantized again under `scheme`, then an adapter, refused unless it was trained on those very integers --
and scores each task on each of them.
With an adapter the quantized scores come from the same PEFT model with the adapter switched off, and the
recovery share per task is reported (`edge_recover.tasks_score.recovery_table`).
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

from edge_recover.errors import require
from edge_recover.tasks import Task
from edge_recover.tasks_report import model_row, task_report
from edge_recover.tasks_score import encode_pair, score_tasks

__all__ = ["TorchLoglikelihood", "evaluate_tasks"]


class TorchLoglikelihood:
    """`loglikelihood(requests)` on a torch causal LM (a HF model, quantized or with a PEFT adapter).

    Example:
        >>> ll = TorchLoglikelihood(lm.model, lm.tokenizer)  # doctest: +SKIP
        >>> ll([("The capital of France is", " Paris"), ("The capital of France is", " Rome")])  # doctest: +SKIP
        [(-1.9, True), (-7.3, False)]
    """

    def __init__(self, model, tokenizer, device: Optional[torch.device] = None, max_length: Optional[int] = None) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.device = device or next(model.parameters()).device
        cfg = getattr(model, "config", None)
        self.max_length = int(max_length or getattr(cfg, "max_position_embeddings", 2048) or 2048)
        eos = tokenizer.eos_token_id
        self.prefix_id = int(eos[0] if isinstance(eos, list) else eos) if eos is not None else None

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, no special tokens added."""
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def __call__(self, requests: Sequence[tuple[str, str]]) -> list[tuple[float, bool]]:
        return self.score_ids([encode_pair(self.encode, c, x, self.prefix_id) for c, x in requests])

    @torch.no_grad()
    def score_ids(self, pairs: Sequence[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """(log p(continuation | context), continuation is greedy) per (context ids, continuation ids) pair,
        all pairs in one forward pass."""
        rows, conts = [], []
        for ctx, cont in pairs:
            require(len(cont) <= self.max_length, f"a choice of {len(cont)} tokens does not fit the model's context "
                                                  f"of {self.max_length}; shorten it in the task file")
            rows.append((list(ctx) + list(cont))[-(self.max_length + 1):-1])  # position j predicts token j + 1
            conts.append(list(cont))
        width = max(len(r) for r in rows)
        batch = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            batch[i, :len(r)] = torch.tensor(r, dtype=torch.long)
        logits = self.model(input_ids=batch.to(self.device)).logits.float()  # [n, width, vocab]
        out = []
        for i, (r, cont) in enumerate(zip(rows, conts)):
            n = len(r)
            logp = torch.log_softmax(logits[i, n - len(cont):n], dim=-1)  # [len(cont), vocab]
            target = torch.tensor(cont, device=logp.device)
            lp = logp.gather(1, target[:, None]).sum().item()
            out.append((float(lp), bool((logp.argmax(-1) == target).all().item())))
        return out


def _device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def score_torch_models(model: str | Path, scheme, make: Callable, score: Callable, *, quantized=None, adapter=None,
                       method: str | None = None, calibration: int = 32, seed: int = 0, device: str = "auto",
                       fp: bool = True, progress: bool = True, labels: Optional[dict] = None, student: bool = True):
    """The teacher `model` (if `fp`), its quantized student (if `student`) and (with `adapter`) the recovered one, each scored:
    `make(model, tokenizer, device, max_length)` builds a scorer, `score(scorer, name)` runs it. Returns
    ([(name, description, result)], names, the student's scorer, or the teacher's without a student); the
    multiple-choice and the code paths share it.
    """
    from .evaluation import load_student, load_teacher

    names = {"fp": "fp", "quantized": "quantized", "recovered": "recovered", **(labels or {})}
    lm, recipe = load_teacher(model, adapter, method, calibration, seed)
    dev = _device(device)
    rows: list[tuple] = []
    if fp:
        teacher = make(lm.model.to(dev), lm.tokenizer, dev, None)
        rows.append((names["fp"], f"{lm.source} (full precision)", score(teacher, names["fp"])))
        if not student:  # the teacher alone: no quantizer runs
            return rows, names, teacher
    quant, scheme, what = load_student(lm, scheme, recipe, quantized=quantized, adapter=adapter, progress=progress)
    quant = quant.to(dev)
    scorer = make(quant, lm.tokenizer, dev, lm.model.config.max_position_embeddings)
    with quant.disable_adapter() if adapter else contextlib.nullcontext():
        rows.append((names["quantized"], what, score(scorer, names["quantized"])))
    if adapter:
        rows.append((names["recovered"], f"{what} + adapter {adapter}", score(scorer, names["recovered"])))
    return rows, names, scorer


def evaluate_tasks(model: str | Path, tasks: Sequence[Task], scheme=None, *, quantized: str | Path | None = None,
                   adapter: str | Path | None = None, method: str | None = None, calibration: int = 32,
                   seed: int = 0, device: str = "auto", fp: bool = True, progress: bool = True,
                   labels: Optional[dict] = None, student: bool = True, questions_per_call: int = 1) -> dict:
    """Score `tasks` on the teacher `model` (if `fp`), the quantized student and (with `adapter`) the recovered
    one; return a task report (`edge_recover.tasks_report.task_report`), with the recovery share per task when all three are scored.

    `labels` renames the rows ({"fp": ..., "quantized": ..., "recovered": ...}); `questions_per_call` questions
    go through the model as one right-padded batch (the same scores up to float rounding; faster on a GPU).

    Example:
        >>> rep = evaluate_tasks("smollm2", resolve_tasks("default"), quantized="out/q", adapter="out/a")  # doctest: +SKIP
        >>> rep["recovery"][0]["reach"]  # doctest: +SKIP
    """
    rows, names, _ = score_torch_models(
        model, scheme, lambda m, tok, dev, n: TorchLoglikelihood(m, tok, dev, max_length=n),
        lambda scorer, name: score_tasks(tasks, scorer, progress, name, questions_per_call), quantized=quantized, adapter=adapter,
        method=method, calibration=calibration, seed=seed, device=device, fp=fp, progress=progress, labels=labels,
        student=student)
    models = [model_row(*row) for row in rows]
    return task_report(tasks, models, recoveries=[(names["fp"], names["quantized"], names["recovered"])]
                       if (fp and student and adapter) else [])

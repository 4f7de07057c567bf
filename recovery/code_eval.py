"""Code tasks (HumanEval) on torch models: the teacher, the quantized student, the student + adapter.

`TorchCodeGenerator` is the torch generator of `edge_recover.humaneval.score_code`: the prompt under the
tokenizer's chat template (the raw HumanEval prompt when it has none), `model.generate` greedy, stopped by
a `StoppingCriteria` that decodes the new tokens and stops once the answer's code block closes (or at EOS,
`max_new_tokens`, the model's context).

`evaluate_code` loads the models as `evaluate_tasks` does (recovery/evaluation.py: `load_teacher`,
`load_student`): the teacher (if `fp`), a quantized checkpoint (`quantized`) or the teacher quantized again
under `scheme`, and with `adapter` the recovered model (the quantized scores then come from the same PEFT
model with the adapter switched off).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import torch

from edge_recover.errors import require
from edge_recover.humaneval import (CodeEvalOptions, CodePrompt, CodeTask, Completion, Problem, code_prompt,
                                    score_code_tasks)

from .task_eval import score_torch_models  # fp / quantized / recovered, as the multiple-choice path scores them

__all__ = ["TorchCodeGenerator", "evaluate_code"]


class TorchCodeGenerator:
    """Greedy answers to code problems from a torch causal LM (a HF model, quantized or with a PEFT adapter).

    Example:
        >>> gen = TorchCodeGenerator(lm.model, lm.tokenizer)  # doctest: +SKIP
        >>> done = gen(problem, max_new_tokens=384)  # doctest: +SKIP
    """

    def __init__(self, model, tokenizer, device: Optional[torch.device] = None, max_length: Optional[int] = None) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.device = device or next(model.parameters()).device
        cfg = getattr(model, "config", None)
        self.max_length = int(max_length or getattr(cfg, "max_position_embeddings", 2048) or 2048)
        eos = tokenizer.eos_token_id
        gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        ids = [i for e in (eos, gen_eos) if e is not None for i in (e if isinstance(e, list) else [e])]
        self.stops = sorted(set(int(i) for i in ids))
        self.chat = bool(getattr(tokenizer, "chat_template", None))

    def prompt(self, problem: Problem) -> CodePrompt:
        """The problem's prompt under the tokenizer's chat template (or the raw HumanEval prompt)."""
        if not self.chat:
            return code_prompt(problem)
        return code_prompt(problem, lambda m: self.tokenizer.apply_chat_template(m, tokenize=False,
                                                                                 add_generation_prompt=True))

    @torch.no_grad()
    def __call__(self, problem: Problem, max_new_tokens: int) -> Completion:
        from transformers import StoppingCriteria, StoppingCriteriaList

        prompt = self.prompt(problem)
        ids = self.tokenizer(prompt.text, add_special_tokens=False)["input_ids"]
        n = len(ids)
        require(n < self.max_length, f"{problem.task_id}: the prompt of {n} tokens does not fit the model's context "
                                     f"of {self.max_length} tokens")
        budget = min(max_new_tokens, self.max_length - n)
        tokenizer, ended = self.tokenizer, [False]

        class _CodeDone(StoppingCriteria):
            def __call__(self, input_ids, scores, **kwargs):
                ended[0] = prompt.done(tokenizer.decode(input_ids[0, n:].tolist(), skip_special_tokens=True))
                return torch.full((input_ids.shape[0],), ended[0], dtype=torch.bool, device=input_ids.device)

        inp = torch.tensor([ids], dtype=torch.long, device=self.device)
        out = self.model.generate(input_ids=inp, attention_mask=torch.ones_like(inp), max_new_tokens=budget,
                                  do_sample=False, temperature=None, top_p=None, top_k=None,
                                  eos_token_id=self.stops or None,
                                  pad_token_id=self.stops[0] if self.stops else None,
                                  stopping_criteria=StoppingCriteriaList([_CodeDone()]))
        new = out[0, n:].tolist()
        if ended[0]:
            stop = "code_block" if prompt.chat else "stop_sequence"
        elif new and new[-1] in self.stops:
            stop = "eos"
        else:
            stop = "max_new_tokens" if budget == max_new_tokens else "context"
        return Completion(prompt, self.tokenizer.decode(new, skip_special_tokens=True), len(new), stop)


def evaluate_code(model: str | Path, tasks: Sequence[CodeTask], scheme=None, *, quantized: str | Path | None = None,
                  adapter: str | Path | None = None, method: str | None = None, calibration: int = 32,
                  seed: int = 0, device: str = "auto", fp: bool = True, options: CodeEvalOptions = CodeEvalOptions(),
                  progress: bool = True, labels: Optional[dict] = None, journal=None) -> dict:
    """pass@1 of the teacher `model` (if `fp`), the quantized student and (with `adapter`) the recovered one on
    the code `tasks`; returns a code report (`edge_recover.code_report.code_report`).

    Example:
        >>> rep = evaluate_code("qwen-coder-dir", [resolve_code_task("humaneval")], quantized="out/q")  # doctest: +SKIP
        >>> rep["models"][1]["results"][0]["pass_at_1"]  # doctest: +SKIP
    """
    from edge_recover.code_report import code_model_row, code_report

    rows, _, gen = score_torch_models(
        model, scheme, lambda m, tok, dev, n: TorchCodeGenerator(m, tok, dev, max_length=n),
        lambda scorer, name: score_code_tasks(tasks, scorer, options, progress, name, journal), quantized=quantized,
        adapter=adapter, method=method, calibration=calibration, seed=seed, device=device, fp=fp, progress=progress,
        labels=labels)
    rows = [code_model_row(*row) for row in rows]
    prompt_style = "chat template" if gen.chat else "raw completion (no chat template)"
    return code_report(tasks, rows, options, settings={"backend": "torch", "prompt": prompt_style})

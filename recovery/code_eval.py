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

    def __call__(self, problem: Problem, max_new_tokens: int) -> Completion:
        return self.batch([problem], max_new_tokens)[0]

    @torch.no_grad()
    def batch(self, problems: Sequence[Problem], max_new_tokens: int) -> list[Completion]:
        """Greedy answers to `problems` in one `generate`: prompts left-padded to the longest, each row stopped on
        its own (its code block closed, EOS), the batch when every row has stopped or at the token budget (the
        longest prompt's room in the context). One problem is exactly the unpadded single answer."""
        from transformers import StoppingCriteria, StoppingCriteriaList

        prompts = [self.prompt(p) for p in problems]
        rows = [self.tokenizer(p.text, add_special_tokens=False)["input_ids"] for p in prompts]
        for problem, row in zip(problems, rows):
            require(len(row) < self.max_length, f"{problem.task_id}: the prompt of {len(row)} tokens does not fit the "
                                                f"model's context of {self.max_length} tokens")
        width = max(len(r) for r in rows)
        budget = min(max_new_tokens, self.max_length - width)
        pad = self.stops[0] if self.stops else int(self.tokenizer.pad_token_id or 0)
        tokenizer, ended = self.tokenizer, [0] * len(rows)  # new tokens when the row's code block closed (0: not)
        stops, finished = set(self.stops), [False] * len(rows)  # a row is over once its block closed or EOS came

        class _CodeDone(StoppingCriteria):
            def __call__(self, input_ids, scores, **kwargs):
                last = input_ids[:, -1].tolist()
                for i, prompt in enumerate(prompts):
                    if finished[i]:
                        continue  # nothing more to decode: only padding follows
                    if last[i] in stops:
                        finished[i] = True
                    elif prompt.done(tokenizer.decode(input_ids[i, width:].tolist(), skip_special_tokens=True)):
                        ended[i], finished[i] = input_ids.shape[1] - width, True
                return torch.tensor(finished, dtype=torch.bool, device=input_ids.device)

        inp = torch.tensor([[pad] * (width - len(r)) + r for r in rows], dtype=torch.long, device=self.device)
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], dtype=torch.long, device=self.device)
        out = self.model.generate(input_ids=inp, attention_mask=mask, max_new_tokens=budget,
                                  do_sample=False, temperature=None, top_p=None, top_k=None,
                                  eos_token_id=self.stops or None, pad_token_id=pad,
                                  stopping_criteria=StoppingCriteriaList([_CodeDone()]))
        done = []
        for i, prompt in enumerate(prompts):
            new = out[i, width:].tolist()
            eos = next((j for j, t in enumerate(new) if t in self.stops), None)
            if ended[i] and (eos is None or ended[i] <= eos):
                new, stop = new[:ended[i]], "code_block" if prompt.chat else "stop_sequence"
            elif eos is not None:
                new, stop = new[:eos + 1], "eos"
            else:
                stop = "max_new_tokens" if budget == max_new_tokens else "context"
            done.append(Completion(prompt, self.tokenizer.decode(new, skip_special_tokens=True), len(new), stop))
        return done


def evaluate_code(model: str | Path, tasks: Sequence[CodeTask], scheme=None, *, quantized: str | Path | None = None,
                  adapter: str | Path | None = None, method: str | None = None, calibration: int = 32,
                  seed: int = 0, device: str = "auto", fp: bool = True, options: CodeEvalOptions = CodeEvalOptions(),
                  progress: bool = True, labels: Optional[dict] = None, journal=None, student: bool = True) -> dict:
    """pass@1 of the teacher `model` (if `fp`), the quantized student (if `student`) and (with `adapter`) the recovered one on
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
        labels=labels, student=student)
    rows = [code_model_row(*row) for row in rows]
    prompt_style = "chat template" if gen.chat else "raw completion (no chat template)"
    return code_report(tasks, rows, options, settings={"backend": "torch", "prompt": prompt_style})

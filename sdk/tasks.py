"""Multiple-choice tasks offline: our JSON task format, BIG-bench's JSON tasks, and fetching them once.

A task is a list of examples; an example is a context, the choices (continuations scored after it) and the
indices of the correct choices. Two file formats load into that one shape (docs/eval.md has both):

- ours (`"format": "edge-recover-task"`): examples `{"context", "choices", "answer"}`, and a `delimiter`
  (default one space) put between the context and each choice;
- BIG-bench's `task.json` (`examples` with `target_scores`), formatted the way BIG-bench's own
  `bigbench/api/json_task.py` formats a zero-shot multiple-choice query: `task_prefix +
  example_input_prefix + input [+ choice_prefix + choice ...] + example_output_prefix`, the choices
  appended in BIG-bench's permutation (seed 42) unless `append_choices_to_input` is false, duplicate
  examples dropped; the correct choices are those with the highest target score.

BIG-bench ships on PyPI only as a 358 MB sdist (`bigbench` 1.0.0, Apache-2.0) whose metadata names a
direct-URL dependency, which pip 26 refuses even for `pip download --no-deps`; `fetch_bigbench` runs pip
25.3 (itself fetched from PyPI as a wheel, run from the file) to download it once, extracts the task.json
files of `BIGBENCH_TASKS` into `<cache>/tasks/bigbench/` (about 9.5 MB of the 358) and deletes the rest.
Nothing is fetched at run time: a task that is not in the cache is an error that says how to fetch it.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterable, Sequence

from .atomic import atomic_dir
from .errors import EdgeRecoverError

__all__ = ["Example", "Task", "load_task_file", "resolve_task", "resolve_tasks", "fetch_bigbench", "tasks_dir",
           "BIGBENCH_TASKS", "DEFAULT_SUITE", "DEFAULT_METRICS", "TASK_FORMAT", "METRICS"]

TASK_FORMAT, TASK_FORMAT_VERSION = "edge-recover-task", 1
METRICS = ("acc", "acc_norm")
BIGBENCH = {"package": "bigbench==1.0.0", "pip": "pip==25.3", "dir": "bigbench"}
# BIG-bench multiple-choice tasks in English with short contexts (mean input under ~1,000 characters) and
# task.json files under 2 MB: the candidates measured for the default suite (docs/eval.md).
BIGBENCH_TASKS = (
    "analytic_entailment", "anachronisms", "causal_judgment", "date_understanding", "disambiguation_qa",
    "emoji_movie", "empirical_judgments", "entailed_polarity", "epistemic_reasoning", "fantasy_reasoning",
    "general_knowledge", "hindu_knowledge", "implicatures", "intent_recognition", "irony_identification",
    "logical_fallacy_detection", "metaphor_boolean", "misconceptions", "moral_permissibility",
    "movie_recommendation", "navigate", "penguins_in_a_table", "phrase_relatedness", "physical_intuition",
    "physics", "presuppositions_as_nli", "question_selection", "ruin_names", "simple_ethical_questions",
    "snarks", "social_iqa", "social_support", "sports_understanding", "strategyqa", "temporal_sequences",
    "understanding_fables", "winowhy",
)
# The default suite: BIG-bench tasks on which SmolLM2-135M's fp model is clearly above chance
# (measured: docs/eval.md, "The default suite").
DEFAULT_SUITE = ("metaphor_boolean", "presuppositions_as_nli", "date_understanding", "physics")
# Each suite task's headline metric, chosen on the fp model in the same measurement (the other is reported too).
DEFAULT_METRICS = {name: "acc" for name in DEFAULT_SUITE}


@dataclass(frozen=True)
class Example:
    """One question: `context`, the `choices` scored as its continuations, and the `gold` choice indices."""

    context: str
    choices: tuple[str, ...]
    gold: tuple[int, ...]


@dataclass(frozen=True)
class Task:
    """A named list of multiple-choice examples, with the file it came from."""

    name: str
    examples: tuple[Example, ...]
    source: str
    description: str = ""
    metric: str = "acc"  # the task's headline metric (`acc` or `acc_norm`): what recovery shares are taken of

    @property
    def chance(self) -> float:
        """Expected accuracy of a uniform random pick: mean over examples of gold / choices."""
        return sum(len(e.gold) / len(e.choices) for e in self.examples) / max(len(self.examples), 1)

    def subset(self, limit: int | None, seed: int = 1234) -> "Task":
        """At most `limit` examples, a fixed random subset in file order (files are often sorted by label).

        Example:
            >>> task.subset(200).examples  # doctest: +SKIP
        """
        if limit is None or limit >= len(self.examples):
            return self
        if limit < 1:
            raise EdgeRecoverError(f"`--limit` must be >= 1, got {limit}")
        import numpy as np

        keep = sorted(np.random.RandomState(seed).choice(len(self.examples), limit, replace=False).tolist())
        return replace(self, examples=tuple(self.examples[i] for i in keep))


def tasks_dir() -> Path:
    """`<cache>/tasks`: where fetched task files live."""
    from .fetch import cache_dir

    return cache_dir() / "tasks"


def _bad(path: Path | str, what: str) -> EdgeRecoverError:
    return EdgeRecoverError(f"task file {str(path)!r} {what}; see docs/eval.md for the task format")


def _ours(data: dict, path: Path) -> Task:
    version = data.get("format_version", 1)
    if not isinstance(version, int) or version > TASK_FORMAT_VERSION:
        raise _bad(path, f"has format_version {version!r}, newer than this edge-recover reads ({TASK_FORMAT_VERSION})")
    delimiter = data.get("delimiter", " ")
    examples = data.get("examples")
    if not isinstance(delimiter, str):
        raise _bad(path, "has a `delimiter` that is not a string")
    if not isinstance(examples, list) or not examples:
        raise _bad(path, "has no `examples` list")
    out = []
    for i, ex in enumerate(examples):
        if not isinstance(ex, dict):
            raise _bad(path, f"example {i} is not an object")
        context, choices, answer = ex.get("context"), ex.get("choices"), ex.get("answer")
        if not isinstance(context, str):
            raise _bad(path, f"example {i} has no string `context`")
        if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) and c for c in choices):
            raise _bad(path, f"example {i} needs `choices`: a list of at least 2 non-empty strings")
        gold = answer if isinstance(answer, list) else [answer]
        if not gold or not all(isinstance(g, int) and not isinstance(g, bool) and 0 <= g < len(choices) for g in gold):
            raise _bad(path, f"example {i} has `answer` {answer!r}; give a choice index (or a list of them) "
                             f"in 0..{len(choices) - 1}")
        out.append(Example(context, tuple(delimiter + c for c in choices), tuple(sorted(set(gold)))))
    name = data.get("name") or path.stem
    metric = data.get("metric", "acc")
    if metric not in METRICS:
        raise _bad(path, f"has `metric` {metric!r}; use one of {', '.join(METRICS)}")
    return Task(str(name), tuple(out), str(path), str(data.get("description", "")), metric)


def _bigbench(data: dict, path: Path, name: str) -> Task:
    """BIG-bench's zero-shot multiple-choice formatting (bigbench/api/json_task.py, default_format_fn)."""
    import numpy as np

    inp_prefix = data.get("example_input_prefix", "\nQ: ")
    out_prefix = data.get("example_output_prefix", "\nA: ")
    choice_prefix = data.get("choice_prefix", "\n  choice: ")
    append = data.get("append_choices_to_input", True)
    append = append if isinstance(append, bool) else str(append).lower() == "true"  # some files write "false"
    task_prefix = str(data.get("task_prefix", ""))
    seen, out = set(), []
    for i, ex in enumerate(data["examples"]):
        key = json.dumps(ex, sort_keys=False)
        if key in seen:
            continue
        seen.add(key)
        scores = ex.get("target_scores") if isinstance(ex, dict) else None
        if not isinstance(scores, dict) or len(scores) < 2 or not isinstance(ex.get("input"), str):
            raise _bad(path, f"example {i} has no `input` string and `target_scores` with at least 2 choices")
        try:
            values = {str(k): float(v) for k, v in scores.items()}
        except (TypeError, ValueError):
            raise _bad(path, f"example {i} has a non-numeric target score") from None
        best = max(values.values())
        if best <= min(values.values()):
            raise _bad(path, f"example {i} has no choice scored above the others")
        text = ex["input"]
        if append:
            perm = np.random.RandomState(seed=42).permutation(sorted(values))
            text = text + choice_prefix + choice_prefix.join(perm)
        choices = tuple(values)
        out.append(Example(task_prefix + inp_prefix + text + out_prefix, choices,
                           tuple(j for j, c in enumerate(choices) if values[c] == best)))
    return Task(name, tuple(out), str(path), str(data.get("description", "")), DEFAULT_METRICS.get(name, "acc"))


def load_task_file(path: str | Path, name: str | None = None) -> Task:
    """Load a task file: our format (docs/eval.md) or a BIG-bench task.json with `target_scores`.

    Example:
        >>> task = load_task_file("my_task.json")  # doctest: +SKIP
        >>> task.examples[0].choices  # doctest: +SKIP
    """
    p = Path(path)
    if not p.is_file():
        raise EdgeRecoverError(f"task file {str(p)!r} does not exist; pass a task name or a JSON task file")
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _bad(p, f"is not readable JSON ({type(exc).__name__}: {str(exc)[:80]})") from None
    if not isinstance(data, dict):
        raise _bad(p, "is not a JSON object")
    if data.get("format") == TASK_FORMAT:
        return _ours(data, p)
    examples = data.get("examples")
    if isinstance(examples, list) and examples and all(isinstance(e, dict) and "target_scores" in e for e in examples):
        return _bigbench(data, p, name or str(data.get("name") or p.stem))
    raise _bad(p, f"is neither an edge-recover task (`\"format\": \"{TASK_FORMAT}\"`) nor a BIG-bench task.json "
                  "whose examples all have `target_scores`")


def resolve_task(spec: str) -> Task:
    """A task from a name or a file: a path to a JSON task file, or `NAME` / `bigbench:NAME` for a fetched
    BIG-bench task (`edge-recover fetch bigbench`).

    Example:
        >>> resolve_task("bigbench:strategyqa").chance  # doctest: +SKIP
        0.5
    """
    spec = spec.strip()
    if spec.endswith(".json") or Path(spec).is_file():
        return load_task_file(spec)
    name = spec.split(":", 1)[1] if spec.startswith("bigbench:") else spec
    path = tasks_dir() / BIGBENCH["dir"] / f"{name}.json"
    if path.is_file():
        return load_task_file(path, name=name)
    if name in BIGBENCH_TASKS:
        raise EdgeRecoverError(f"task {spec!r} is not in the cache ({str(path)!r}); run `edge-recover fetch bigbench` once")
    raise EdgeRecoverError(f"unknown task {spec!r}; pass a JSON task file, `default`, or one of the BIG-bench tasks "
                           f"{', '.join(BIGBENCH_TASKS[:6])}, ... (docs/eval.md lists them)")


def resolve_tasks(specs: str | Iterable[str]) -> list[Task]:
    """Tasks from a comma-separated list (or an iterable) of names / files; `default` is `DEFAULT_SUITE`."""
    items = [s.strip() for s in (specs.split(",") if isinstance(specs, str) else specs) if s.strip()]
    if not items:
        raise EdgeRecoverError("`--tasks` is empty; pass task names or files separated by commas, or `default`")
    expanded: list[str] = []
    for item in items:
        expanded.extend(DEFAULT_SUITE if item == "default" else [item])
    tasks = [resolve_task(s) for s in expanded]
    names = [t.name for t in tasks]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise EdgeRecoverError(f"`--tasks` names {', '.join(dup)} more than once; give each task once")
    return tasks


def _run_pip(pip: Sequence[str], args: Sequence[str], what: str) -> None:
    proc = subprocess.run([*pip, *args], capture_output=True, text=True)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["?"])[-1]
        raise EdgeRecoverError(f"`pip download {what}` failed ({last[:200]}); check access to PyPI or put the "
                               f"task files into {str(tasks_dir() / BIGBENCH['dir'])!r} by hand")


def fetch_bigbench(force: bool = False, names: Sequence[str] = BIGBENCH_TASKS) -> Path:
    """The folder of fetched BIG-bench task files (`<cache>/tasks/bigbench/NAME.json`), made on first use.

    Example:
        >>> sorted(p.stem for p in fetch_bigbench().glob("*.json"))[:2]  # doctest: +SKIP
        ['analytic_entailment', 'anachronisms']
    """
    target = tasks_dir() / BIGBENCH["dir"]
    if not force and all((target / f"{n}.json").is_file() for n in names):
        return target
    base = [sys.executable, "-m", "pip"]
    with tempfile.TemporaryDirectory(prefix="edge-recover-dl-") as tmp:
        tmp_path = Path(tmp)
        _run_pip(base, ["download", "--no-deps", "--quiet", "-d", str(tmp_path / "pip"), BIGBENCH["pip"]], BIGBENCH["pip"])
        wheel = next((tmp_path / "pip").glob("pip-*.whl"))
        _run_pip([sys.executable, str(wheel / "pip")],
                 ["download", "--no-deps", "--no-binary", ":all:", "--quiet", "-d", str(tmp_path / "sdist"),
                  BIGBENCH["package"]], BIGBENCH["package"])
        sdist = next((tmp_path / "sdist").glob("bigbench-*.tar.gz"))
        wanted = {f"bigbench/benchmark_tasks/{n}/task.json": n for n in names}
        with tarfile.open(sdist) as tf, atomic_dir(target, overwrite=True) as out:
            for member in tf:
                rel = member.name.split("/", 1)[-1]
                if member.isfile() and rel in wanted:
                    (out / f"{wanted.pop(rel)}.json").write_bytes(tf.extractfile(member).read())
            if wanted:
                raise EdgeRecoverError(f"{sdist.name} lacks {', '.join(sorted(wanted.values()))}; "
                                       "the BIG-bench release changed: update BIGBENCH_TASKS")
            (out / "SOURCE.txt").write_text(f"task.json files extracted by edge-recover from PyPI {BIGBENCH['package']} "
                                            "(sdist, Apache-2.0): bigbench/benchmark_tasks/NAME/task.json\n")
    return target

"""HumanEval through ONNX Runtime on a tiny random package (a byte-level Llama with a chat template, its
context raised to 1,024 positions so that a chat prompt fits):

- the package's greedy answer equals the torch model's (the exact fp32 graph: same prompt text from the same
  chat template, same tokens);
- `edge-recover eval --package PKG --tasks humaneval --limit 2 --report DIR`, the problems being the test
  fixture put in the cache: the three report files, pass@1 in [0, 1] with n = 2 and the outcomes adding up
  (a random model passes nothing, but that is not asserted);
- bad input (code and multiple-choice tasks mixed, humaneval not fetched) is one line on stderr, exit 2, and
  no report folder.
"""

from __future__ import annotations

import gzip
import json
import math
from pathlib import Path

import pytest

from tests.fixtures.cli import run_cli as _cli
from tests.runtimes.conftest import make_fp32_package, make_tiny_hf

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "humaneval_tiny.jsonl"


@pytest.fixture(scope="module")
def long_hf(tmp_path_factory) -> Path:
    hf = make_tiny_hf(tmp_path_factory.mktemp("tiny-long") / "hf", seed=2)
    cfg = json.loads((hf / "config.json").read_text())
    cfg["max_position_embeddings"] = 1024  # rotary positions: no learned table to grow
    (hf / "config.json").write_text(json.dumps(cfg))
    return hf


@pytest.fixture(scope="module")
def long_package(long_hf, tmp_path_factory) -> Path:
    return make_fp32_package(long_hf, tmp_path_factory.mktemp("pkg-long") / "fp32")


@pytest.fixture()
def humaneval_cache(tmp_path, monkeypatch) -> Path:
    """The fixture's problems where `edge-recover fetch humaneval` puts HumanEval."""
    monkeypatch.setenv("EDGE_RECOVER_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "cache" / "tasks" / "humaneval"
    folder.mkdir(parents=True)
    (folder / "HumanEval.jsonl.gz").write_bytes(gzip.compress(FIXTURE.read_bytes()))
    return folder


def test_package_answer_equals_the_torch_models(long_hf, long_package):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from edge_recover.humaneval import load_problems
    from edge_recover.recovery.code_eval import TorchCodeGenerator
    from edge_recover.runtimes.code_eval import PackageCodeGenerator

    problem = load_problems(FIXTURE).problems[0]
    torch_gen = TorchCodeGenerator(AutoModelForCausalLM.from_pretrained(long_hf).eval(),
                                   AutoTokenizer.from_pretrained(long_hf))
    ort_gen = PackageCodeGenerator(long_package)
    assert torch_gen.chat and ort_gen.chat
    a, b = torch_gen(problem, 24), ort_gen(problem, 24)
    assert a.prompt.text == b.prompt.text and a.prompt.text.endswith("```python\n")
    assert (a.text, a.tokens, a.stop) == (b.text, b.tokens, b.stop)
    assert b.tokens >= 1


def test_cli_eval_package_humaneval_writes_the_report(long_package, humaneval_cache, tmp_path):
    report = tmp_path / "report"
    code, out, err = _cli("eval", "--package", long_package, "--provider", "cpu", "--tasks", "humaneval",
                          "--limit", "2", "--max-new-tokens", "16", "--report", report)
    assert code == 0, err
    assert sorted(p.name for p in report.iterdir()) == ["accuracy.png", "report.json", "report.md"]
    data = json.loads((report / "report.json").read_text())
    assert data["kind"] == "edge-recover-code-eval" and data["settings"]["max_new_tokens"] == 16
    assert data["tasks"] == [{"name": "humaneval", "problems": 2, "source": str(humaneval_cache / "HumanEval.jsonl.gz"),
                              "metric": "pass@1"}]
    res = data["models"][0]["results"][0]
    assert res["problems"] == 2 and 0.0 <= res["pass_at_1"] <= 1.0
    assert sum(res["counts"].values()) == 2 and sum(res["passed"]) == res["counts"]["passed"]
    assert res["pass_at_1"] == res["counts"]["passed"] / 2
    p = res["pass_at_1"]
    assert res["pass_at_1_stderr"] == pytest.approx(math.sqrt(p * (1 - p) / 2))
    assert [s["task_id"] for s in res["samples"]] == ["Tiny/0", "Tiny/1"]
    assert all(1 <= s["tokens"] <= 16 for s in res["samples"])
    assert "| humaneval | 2 |" in (report / "report.md").read_text()
    assert (report / "accuracy.png").stat().st_size > 1000
    assert "pass@1" in out and "humaneval" in out


def test_cli_eval_humaneval_resumes_after_a_stop(long_package, humaneval_cache, tmp_path, monkeypatch):
    """`eval --report DIR` stopped after the first problem: the rerun says it resumes, generates and tests only
    the second answer, writes the same report a straight run writes, and removes its journal."""
    import edge_recover.humaneval as he

    real_check, asked = he.check_solution, []

    def counting(problem, solution, limits):  # called once per generated answer
        asked.append(problem.task_id)
        if stop and len(asked) == 2:
            raise KeyboardInterrupt
        return real_check(problem, solution, limits)

    monkeypatch.setattr(he, "check_solution", counting)
    args = ("eval", "--package", long_package, "--provider", "cpu", "--tasks", "humaneval", "--limit", "2",
            "--max-new-tokens", "16", "--report")
    report, journal = tmp_path / "report", tmp_path / "report.progress.jsonl"
    stop = True
    code, _, err = _cli(*args, report)  # the CLI turns the stop into exit 130
    assert code == 130 and "interrupted" in err, (code, err)
    assert not report.exists() and len(journal.read_text().splitlines()) == 1
    stop, asked[:] = False, []
    code, out, err = _cli(*args, report)
    assert code == 0, err
    assert "resuming from" in out and asked == ["Tiny/1"] and not journal.exists()
    code, _, err = _cli(*args, tmp_path / "straight")
    assert code == 0, err
    a, b = (json.loads((d / "report.json").read_text())["models"][0]["results"][0] for d in (report, tmp_path / "straight"))
    assert [s["completion"] for s in a["samples"]] == [s["completion"] for s in b["samples"]]
    assert a["passed"] == b["passed"]


def test_cli_humaneval_bad_input_is_one_line_exit_2(long_package, tmp_path, monkeypatch):
    monkeypatch.setenv("EDGE_RECOVER_CACHE", str(tmp_path / "empty-cache"))
    cases = [(("--package", long_package, "--tasks", "humaneval"), "fetch humaneval"),
             (("--package", long_package, "--tasks", f"{FIXTURE},default"), "mixes code tasks"),
             (("--package", long_package, "--tasks", FIXTURE, "--limit", "0"), "--limit"),
             (("--package", long_package, "--tasks", tmp_path / "none.jsonl"), "does not exist")]
    for args, words in cases:
        report = tmp_path / "r"
        code, _, err = _cli("eval", *args, "--report", report)
        assert code == 2, (args, err)
        assert len(err.strip().splitlines()) == 1 and words in err, (args, err)
        assert not report.exists()

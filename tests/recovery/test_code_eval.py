"""HumanEval on torch models: `edge-recover eval MODEL --tasks PROBLEMS.jsonl --quantized Q` on a tiny random
model without a chat template (so the raw-completion path): fp and quantized rows, the report files, pass@1 in
[0, 1] with the outcomes adding up; and the torch generator stops where a code answer ends.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from tests.fixtures.cli import run_cli as _cli
from edge_recover.humaneval import load_problems

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "humaneval_tiny.jsonl"


def test_torch_generator_stops_when_the_code_block_closes(tiny_model):
    """The chat path on the tiny model with a chat template added: a model forced to write a whole answer
    block stops right after the closing fence, before max_new_tokens."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LogitsProcessor, LogitsProcessorList

    from edge_recover.recovery.code_eval import TorchCodeGenerator

    tok = AutoTokenizer.from_pretrained(tiny_model)
    tok.chat_template = "{% for m in messages %}{{ m['content'] }}\n{% endfor %}"
    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    answer = tok("    return a + b\n```\nThat adds them up and more words follow here", add_special_tokens=False)["input_ids"]

    class Force(LogitsProcessor):
        def __init__(self, start: int) -> None:
            self.start = start

        def __call__(self, input_ids, scores):
            i = input_ids.shape[1] - self.start
            forced = torch.full_like(scores, -1e9)
            forced[:, answer[min(i, len(answer) - 1)]] = 0
            return forced

    gen = TorchCodeGenerator(model, tok)
    problem = load_problems(FIXTURE).problems[0]
    n = len(tok(gen.prompt(problem).text, add_special_tokens=False)["input_ids"])
    original = model.generate
    model.generate = lambda **kw: original(**kw, logits_processor=LogitsProcessorList([Force(n)]))
    done = gen(problem, 64)
    assert done.stop == "code_block" and done.tokens < len(answer), done
    assert done.text.startswith("    return a + b\n```") and "more words" not in done.text
    solution = done.prompt.solution(done.text)
    assert solution == problem.prompt + "    return a + b\n"


def test_cli_eval_torch_humaneval_fp_and_quantized(tiny_model, tmp_path):
    q = tmp_path / "q"
    code, _, err = _cli("quantize", tiny_model, "--method", "rtn", "--calibration", "0", "-o", q)
    assert code == 0, err
    report = tmp_path / "report"
    code, out, err = _cli("eval", tiny_model, "--tasks", FIXTURE, "--quantized", q, "--limit", "2",
                          "--max-new-tokens", "8", "--report", report, "--device", "cpu")
    assert code == 0, err
    data = json.loads((report / "report.json").read_text())
    assert [m["label"] for m in data["models"]] == ["fp", "quantized"]
    assert data["settings"]["backend"] == "torch" and data["settings"]["prompt"].startswith("raw completion")
    for m in data["models"]:
        res = m["results"][0]
        assert res["task"] == "humaneval_tiny" and res["problems"] == 2 and 0.0 <= res["pass_at_1"] <= 1.0
        assert sum(res["counts"].values()) == 2 and res["pass_at_1"] == sum(res["passed"]) / 2
        assert all(1 <= s["tokens"] <= 8 for s in res["samples"])
    assert sorted(p.name for p in report.iterdir()) == ["accuracy.png", "report.json", "report.md"]
    assert "humaneval_tiny" in out


def test_cli_eval_torch_humaneval_batched_answers_equal_one_by_one(tiny_model, tmp_path):
    """`--batch-size 3` (left-padded, each row stopped on its own) gives the very answers, token counts and
    stops that one problem at a time gives on the tiny model in fp32, and the same pass@1."""
    reports = {}
    for b in ("1", "3"):
        reports[b] = tmp_path / f"report-b{b}"
        code, _, err = _cli("eval", tiny_model, "--tasks", FIXTURE, "--max-new-tokens", "12", "--batch-size", b,
                            "--report", reports[b], "--device", "cpu")
        assert code == 0, err
    one, three = (json.loads((reports[b] / "report.json").read_text())["models"][0]["results"][0] for b in ("1", "3"))
    assert one["problems"] == three["problems"] == len(load_problems(FIXTURE).problems) >= 3
    key = lambda r: [(s["task_id"], s["completion"], s["tokens"], s["stop"], s["status"]) for s in r["samples"]]
    assert key(one) == key(three) and one["pass_at_1"] == three["pass_at_1"]


def test_cli_eval_batch_size_refused_for_packages_and_below_one(tiny_model, tmp_path):
    code, _, err = _cli("eval", tiny_model, "--tasks", FIXTURE, "--batch-size", "0", "--device", "cpu")
    assert code != 0 and "`--batch-size` must be >= 1, got 0" in err and len(err.strip().splitlines()) == 1
    code, _, err = _cli("eval", "--package", tmp_path, "--tasks", FIXTURE, "--batch-size", "4")
    assert code != 0 and "`--batch-size` is for torch models" in err and len(err.strip().splitlines()) == 1


def test_cli_eval_torch_humaneval_no_fp_scores_the_student_alone(tiny_model, tmp_path):
    q = tmp_path / "q"
    code, _, err = _cli("quantize", tiny_model, "--method", "rtn", "--calibration", "0", "-o", q)
    assert code == 0, err
    code, out, err = _cli("eval", tiny_model, "--tasks", FIXTURE, "--quantized", q, "--no-fp", "--limit", "1",
                          "--max-new-tokens", "4", "--json", tmp_path / "r.json", "--device", "cpu")
    assert code == 0, err
    data = json.loads((tmp_path / "r.json").read_text())
    assert [m["label"] for m in data["models"]] == ["quantized"] and data["models"][0]["results"][0]["problems"] == 1


def test_cli_eval_torch_humaneval_fp_only_scores_the_teacher_alone(tiny_model, tmp_path):
    """`--fp-only`: the fp row alone, with the same answers as the fp row of a full run; no quantizer runs.
    Combined with a student's options, or without `--tasks`, it is one line and exit 2."""
    args = ("--tasks", FIXTURE, "--limit", "2", "--max-new-tokens", "4", "--device", "cpu")
    code, _, err = _cli("eval", tiny_model, *args, "--method", "rtn", "--json", tmp_path / "both.json")
    assert code == 0, err
    code, _, err = _cli("eval", tiny_model, *args, "--fp-only", "--json", tmp_path / "fp.json")
    assert code == 0, err
    both, alone = (json.loads((tmp_path / f"{n}.json").read_text())["models"] for n in ("both", "fp"))
    assert [m["label"] for m in alone] == ["fp"] and "quantize" not in err
    answers = lambda rs: [(r["pass_at_1"], [(a["task_id"], a["status"], a["completion"]) for a in r["samples"]])  # noqa: E731
                          for r in rs]
    assert answers(alone[0]["results"]) == answers(both[0]["results"])
    for extra, named in ((("--no-fp",), "--no-fp"), (("--method", "rtn"), "--method"),
                         (("--quantized", tmp_path),  "--quantized")):
        code, _, err = _cli("eval", tiny_model, *args, "--fp-only", *extra)
        assert code == 2 and len(err.strip().splitlines()) == 1 and named in err, err
    code, _, err = _cli("eval", tiny_model, "--fp-only")
    assert code == 2 and "`--fp-only` is for `--tasks`" in err and len(err.strip().splitlines()) == 1


def test_cli_eval_torch_humaneval_quantizes_with_the_calibration_given(tiny_model, tmp_path):
    """`--calibration` reaches the quantizer of the code path: GPTQ on 1 vs 4 calibration samples gives
    students of their own; the row says how it was quantized."""
    rows = {}
    for n in ("1", "4"):
        code, _, err = _cli("eval", tiny_model, "--tasks", FIXTURE, "--method", "gptq", "--calibration", n, "--no-fp",
                            "--limit", "1", "--max-new-tokens", "2", "--json", tmp_path / f"c{n}.json", "--device", "cpu")
        assert code == 0, err
        rows[n] = json.loads((tmp_path / f"c{n}.json").read_text())["models"][0]
    assert rows["1"]["what"] == "w4w2gateup, gptq on 1 calibration samples, quantized now", rows["1"]["what"]
    assert rows["4"]["what"] == "w4w2gateup, gptq on 4 calibration samples, quantized now", rows["4"]["what"]

"""Task accuracy through ONNX Runtime: the package backend against the torch model, on tiny real packages.

- exact graph (the fp32 Optimum export): per-choice log-probs equal the torch model's to float precision,
  so every prediction is the same;
- the cpu target's fused graph (GroupQueryAttention, MatMulNBits): choices scored as one right-padded batch
  on the shared context equal the same choices scored one by one;
- a hand-made task whose correct choice is the teacher's own pick scores 100 % through the CLI, with the
  report written; bad input (unknown task, malformed task file, a folder that is not a package) is one line
  on stderr, exit 2, and no report folder.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.fixtures.cli import run_cli as _cli
from edge_recover.recovery.task_eval import TorchLoglikelihood
from edge_recover.runtimes.task_eval import PackageLoglikelihood
from edge_recover.tasks import Example, Task
from edge_recover.tasks_score import score_task

LETTERS = "abcdefghijklmnopqrstuvwxyz"
CONTEXTS = ["the cat sat on", "to be or not", "a stitch in time", "all the world", "now is the winter",
            "quick brown fox", "lazy dog runs", "merely players"]


def _requests(n_choices: int = 4, seed: int = 0) -> list[list[tuple[str, str]]]:
    rng = np.random.default_rng(seed)
    out = []
    for ctx in CONTEXTS:
        words = ["".join(rng.choice(list(LETTERS), size=int(rng.integers(1, 6)))) for _ in range(n_choices)]
        out.append([(ctx, " " + w) for w in words])
    return out


def test_exact_graph_package_scores_equal_torch(tiny_hf, tiny_package):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_hf).eval()
    torch_ll = TorchLoglikelihood(model, AutoTokenizer.from_pretrained(tiny_hf))
    ort_ll = PackageLoglikelihood(tiny_package)
    diffs = []
    for reqs in _requests():
        a, b = torch_ll(reqs), ort_ll(reqs)
        diffs += [abs(x[0] - y[0]) for x, y in zip(a, b)]
        assert [x[1] for x in a] == [y[1] for y in b]
        assert int(np.argmax([x[0] for x in a])) == int(np.argmax([y[0] for y in b]))
    print(f"exact graph: max |logp torch - logp ort| = {max(diffs):.2e}, mean {np.mean(diffs):.2e}")
    assert max(diffs) < 1e-3
    assert np.mean([abs(x[0]) for r in _requests() for x in torch_ll(r)]) > 1.0  # real, non-trivial log-probs


def test_fused_package_batch_equals_one_by_one(tiny_w4w2):
    package, _ = tiny_w4w2
    ll = PackageLoglikelihood(package)
    for reqs in _requests(n_choices=5, seed=1):
        together = ll(reqs)
        alone = [ll([r])[0] for r in reqs]
        np.testing.assert_allclose([x[0] for x in together], [x[0] for x in alone], atol=1e-4)


def test_quantized_package_agrees_with_its_torch_model(tiny_hf, tiny_w4w2):
    """The W4/W2 package against the torch model holding the same integers (not an exact graph: int8
    activations in MatMulNBits), on a task scored by both: predictions agree on nearly every example."""
    from transformers import AutoTokenizer

    package, qmodel = tiny_w4w2
    task = Task("t", tuple(Example(c, tuple(x for _, x in reqs), (0,)) for reqs in _requests(seed=2)
                           for c in [reqs[0][0]]), "test")
    torch_ll = TorchLoglikelihood(qmodel.eval(), AutoTokenizer.from_pretrained(tiny_hf))
    a, b = score_task(task, torch_ll, progress=False), score_task(task, PackageLoglikelihood(package), progress=False)
    agree = np.mean(np.asarray(a.correct) == np.asarray(b.correct))
    assert agree >= 0.85, (a.correct, b.correct)


def _teacher_task(tiny_hf, path: Path) -> Path:
    """Our task format: after each context, the choices are 4 letters and the answer is the letter the teacher
    itself ranks first among them (next-token logits)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_hf)
    model = AutoModelForCausalLM.from_pretrained(tiny_hf).eval()
    rng = np.random.default_rng(3)
    examples = []
    for ctx in CONTEXTS:
        letters = [str(x) for x in rng.choice(list(LETTERS), size=4, replace=False)]
        ids = tok(ctx, add_special_tokens=False, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0, -1]
        scores = [float(logits[tok(x, add_special_tokens=False)["input_ids"][0]]) for x in letters]
        examples.append({"context": ctx, "choices": letters, "answer": int(np.argmax(scores))})
    path.write_text(json.dumps({"format": "edge-recover-task", "format_version": 1, "name": "teacher_pick",
                                "delimiter": "", "examples": examples}))
    return path


def test_cli_known_answer_scores_first_and_writes_report(tiny_hf, tiny_package, tmp_path):
    task = _teacher_task(tiny_hf, tmp_path / "teacher_pick.json")
    report = tmp_path / "report"
    code, out, err = _cli("eval", "--package", tiny_package, "--provider", "cpu", "--tasks", task, "--report", report)
    assert code == 0, err
    data = json.loads((report / "report.json").read_text())
    res = data["models"][0]["results"][0]
    assert res["task"] == "teacher_pick" and res["examples"] == len(CONTEXTS)
    assert res["acc"] == 1.0 and res["chance"] == 0.25
    assert (report / "report.md").read_text().count("teacher_pick") >= 1
    assert (report / "accuracy.png").stat().st_size > 1000
    assert "teacher_pick" in out and "100.0" in out


def test_cli_bad_input_is_one_line_exit_2(tiny_package, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"format": "edge-recover-task", "examples": [{"context": "a", "choices": ["x"], "answer": 0}]}')
    not_json = tmp_path / "broken.json"
    not_json.write_text("{ not json")
    not_pkg = tmp_path / "not_a_package"
    not_pkg.mkdir()
    (not_pkg / "model.onnx").write_bytes(b"")
    cases = [(("--package", tiny_package, "--tasks", "no_such_task"), "unknown task"),
             (("--package", tiny_package, "--tasks", bad), "at least 2"),
             (("--package", tiny_package, "--tasks", not_json), "not readable JSON"),
             (("--package", not_pkg, "--tasks", bad.with_name("ok.json")), "does not exist"),
             (("--package", tiny_package), "--tasks")]
    for args, words in cases:
        report = tmp_path / "r"
        code, _, err = _cli("eval", *args, "--report", report)
        assert code == 2, (args, err)
        assert len(err.strip().splitlines()) == 1 and words in err, (args, err)
        assert not report.exists()
    ok = tmp_path / "ok.json"
    ok.write_text(json.dumps({"format": "edge-recover-task", "examples": [{"context": "a", "choices": ["x", "y"],
                                                                           "answer": 1}]}))
    code, _, err = _cli("eval", "--package", not_pkg, "--tasks", ok)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "manifest" in err, err
    code, _, err = _cli("eval", "--package", tiny_package, "--tasks", ok, "--batch-size", "4")  # no batching there
    assert code == 2 and len(err.strip().splitlines()) == 1 and "--batch-size" in err, err

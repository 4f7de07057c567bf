"""Multiple-choice tasks on torch models: the task formats, the shared scoring, the torch backend and the CLI.

On a tiny random model: a hand-made task whose answer is the teacher's own pick scores 100 %; choices scored
in one right-padded batch equal the same choices scored alone; `edge-recover eval MODEL --tasks FILE` scores
fp and quantized models and writes its report; BIG-bench's format is read as BIG-bench formats it; bad task
files and unknown tasks are one line, exit 2; `edge-recover fetch bigbench` extracts only the task files.
"""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.fixtures.cli import run_cli as _cli
from edge_recover.errors import EdgeRecoverError
from edge_recover.tasks import BIGBENCH_TASKS, load_task_file, resolve_task, resolve_tasks
from edge_recover.tasks_score import (TaskResult, encode_pair, mean_stderr, reach, recovery_share, recovery_table,
                                      score_task)

CONTEXTS = ["the quick brown fox", "to be or not to be", "all the world's a stage", "merely players and",
            "the lazy dog", "that is the question", "and all the men", "a stage and"]
WORDS = ["fox", "dog", "stage", "question", "players", "men", "women", "lazy", "brown", "world"]


def _ours(path: Path, examples: list[dict], **extra) -> Path:
    path.write_text(json.dumps({"format": "edge-recover-task", "format_version": 1, "examples": examples, **extra}))
    return path


@pytest.fixture(scope="module")
def teacher(tiny_model):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(tiny_model).eval(), AutoTokenizer.from_pretrained(tiny_model)


@pytest.fixture(scope="module")
def teacher_task(teacher, tmp_path_factory) -> Path:
    """Our format: 4 word choices per context; the answer is the one the teacher itself scores highest (the
    full continuation log-prob, computed here independently of the backend, one choice at a time)."""
    model, tok = teacher
    rng = np.random.default_rng(0)
    examples = []
    for ctx in CONTEXTS:
        words = [str(w) for w in rng.choice(WORDS, size=4, replace=False)]
        scores = []
        for w in words:
            c_ids = tok(ctx, add_special_tokens=False)["input_ids"]
            ids = tok(ctx + " " + w, add_special_tokens=False)["input_ids"]
            with torch.no_grad():
                logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0, :-1], -1)
            scores.append(sum(float(logp[j - 1, ids[j]]) for j in range(len(c_ids), len(ids))))
        examples.append({"context": ctx, "choices": words, "answer": int(np.argmax(scores))})
    return _ours(tmp_path_factory.mktemp("task") / "teacher_pick.json", examples, name="teacher_pick")


def test_our_format_loads_with_delimiter_and_gold(tmp_path):
    t = load_task_file(_ours(tmp_path / "t.json", [{"context": "Q", "choices": ["a", "b", "c"], "answer": [2, 0]}],
                             name="mine", delimiter=": "))
    assert t.name == "mine" and t.examples[0].choices == (": a", ": b", ": c") and t.examples[0].gold == (0, 2)
    assert t.chance == pytest.approx(2 / 3)


def test_bigbench_format_as_bigbench_formats_it(tmp_path):
    path = tmp_path / "task.json"
    path.write_text(json.dumps({"name": "bb", "task_prefix": "Decide.", "examples": [
        {"input": "Is it wet?", "target_scores": {"yes": 1, "no": 0}},
        {"input": "Is it wet?", "target_scores": {"yes": 1, "no": 0}},  # a duplicate: dropped, as BIG-bench does
        {"input": "Pick", "target_scores": {"x": 0, "y": 1, "z": 1}}]}))
    t = load_task_file(path, name="bb")
    assert len(t.examples) == 2
    e = t.examples[0]
    perm = list(np.random.RandomState(seed=42).permutation(["no", "yes"]))
    assert e.context == "Decide.\nQ: Is it wet?" + "".join(f"\n  choice: {c}" for c in perm) + "\nA: "
    assert e.choices == ("yes", "no") and e.gold == (0,)
    assert t.examples[1].gold == (1, 2)
    path.write_text(json.dumps({"append_choices_to_input": "false", "example_output_prefix": " ->",
                                "examples": [{"input": "a", "target_scores": {"p": 0, "q": 1}}]}))
    assert load_task_file(path).examples[0].context == "\nQ: a ->"


@pytest.mark.parametrize("body, words", [
    ("[1, 2]", "not a JSON object"),
    ('{"examples": [{"input": "a", "target": "b"}]}', "neither an edge-recover task"),
    ('{"format": "edge-recover-task", "examples": []}', "no `examples`"),
    ('{"format": "edge-recover-task", "examples": [{"context": 1, "choices": ["a", "b"], "answer": 0}]}', "context"),
    ('{"format": "edge-recover-task", "examples": [{"context": "c", "choices": ["a", "b"], "answer": 2}]}', "answer"),
    ('{"format": "edge-recover-task", "format_version": 9, "examples": []}', "newer"),
    ('{"examples": [{"input": "a", "target_scores": {"x": 1, "y": 1}}]}', "no choice scored above"),
])
def test_malformed_task_files_raise_one_clear_error(tmp_path, body, words):
    path = tmp_path / "bad.json"
    path.write_text(body)
    with pytest.raises(EdgeRecoverError, match=words.replace("`", ".")):
        load_task_file(path)


def test_unknown_and_unfetched_tasks_name_the_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGE_RECOVER_CACHE", str(tmp_path / "cache"))
    with pytest.raises(EdgeRecoverError, match="fetch bigbench"):
        resolve_task(BIGBENCH_TASKS[0])
    with pytest.raises(EdgeRecoverError, match="unknown task 'nope'"):
        resolve_task("nope")
    with pytest.raises(EdgeRecoverError, match="more than once"):
        resolve_tasks([str(_ours(tmp_path / "a.json", [{"context": "c", "choices": ["a", "b"], "answer": 0}]))] * 2)


def test_encode_pair_moves_trailing_space_and_splits_like_lm_eval(teacher):
    _, tok = teacher

    def enc(s):
        return tok(s, add_special_tokens=False)["input_ids"]

    ctx, cont = encode_pair(enc, "to be or not to ", "be")
    assert ctx == enc("to be or not to") and ctx + cont == enc("to be or not to be")
    assert encode_pair(enc, "", "fox", prefix_id=0)[0] == [0]
    with pytest.raises(EdgeRecoverError, match="empty context"):
        encode_pair(enc, "", "fox")


def test_torch_batch_equals_one_by_one_and_teacher_pick_scores_first(teacher, teacher_task):
    from edge_recover.recovery.task_eval import TorchLoglikelihood

    model, tok = teacher
    ll = TorchLoglikelihood(model, tok)
    task = load_task_file(teacher_task)
    for ex in task.examples:
        reqs = [(ex.context, c) for c in ex.choices]  # choices of different token lengths: real padding
        np.testing.assert_allclose([s[0] for s in ll(reqs)], [ll([r])[0][0] for r in reqs], atol=1e-4)
    res = score_task(task, ll, progress=False)
    assert res.acc == 1.0 and res.examples == len(CONTEXTS) and res.chance == 0.25
    assert score_task(task, ll, progress=False, questions_per_call=3).correct == res.correct


def test_stats_and_recovery_share():
    mean, se = mean_stderr([1, 0, 1, 1])
    assert mean == 0.75 and se == pytest.approx(np.std([1, 0, 1, 1], ddof=1) / 2)
    assert recovery_share(0.6, 0.4, 0.55) == pytest.approx(0.75)
    assert np.isnan(recovery_share(0.5, 0.5, 0.6))
    rng = np.random.default_rng(0)
    n = 400
    fp = (rng.random(n) < 0.7).astype(int)
    q = np.where(rng.random(n) < 0.5, 0, fp)         # the quantized model loses half of fp's right answers
    r = np.where(rng.random(n) < 0.8, fp, q)         # the recovered one gets most of them back

    def res(c):
        m, s = mean_stderr(list(c))
        return TaskResult("t", n, 0.5, m, s, m, s, 0.0, list(map(int, c)), list(map(int, c)))

    rows = recovery_table([res(fp)], [res(q)], [res(r)])
    assert rows[0]["share"] == pytest.approx((r.mean() - q.mean()) / (fp.mean() - q.mean()))
    assert 0.02 < rows[0]["share_stderr"] < 0.15  # paired: far tighter than the accuracies' own errors imply
    assert reach(rows) == int(rows[0]["share"] >= 0.8)


def test_cli_eval_tasks_fp_and_quantized(tiny_model, teacher_task, tmp_path):
    report = tmp_path / "report"
    code, out, err = _cli("eval", tiny_model, "--tasks", teacher_task, "--method", "rtn", "--limit", "6",
                          "--report", report, "--json", tmp_path / "r.json")
    assert code == 0, err
    data = json.loads((report / "report.json").read_text())
    assert [m["label"] for m in data["models"]] == ["fp", "quantized"]
    fp = data["models"][0]["results"][0]
    assert fp["examples"] == 6 and fp["acc"] == 1.0  # a subset of the teacher's own picks
    assert json.loads((tmp_path / "r.json").read_text())["tasks"] == data["tasks"]
    assert "teacher_pick" in out and (report / "accuracy.png").is_file()
    code, _, err = _cli("eval", tiny_model, "--tasks", teacher_task, "--method", "rtn", "--limit", "6", "--no-fp",
                        "--json", tmp_path / "q.json")
    assert code == 0, err
    alone = json.loads((tmp_path / "q.json").read_text())["models"]
    assert [m["label"] for m in alone] == ["quantized"] and [{k: v for k, v in r.items() if k != "seconds"} for r in alone[0]["results"]] == \
        [{k: v for k, v in r.items() if k != "seconds"} for r in data["models"][1]["results"]]
    code, out, err = _cli("eval", tiny_model, "--tasks", teacher_task, "--limit", "6", "--fp-only",
                          "--json", tmp_path / "fp.json")
    assert code == 0, err
    fp_alone = json.loads((tmp_path / "fp.json").read_text())["models"]  # the fp row, the same figures, no quantizer
    assert [m["label"] for m in fp_alone] == ["fp"] and "quantize" not in err
    assert [{k: v for k, v in r.items() if k != "seconds"} for r in fp_alone[0]["results"]] == \
        [{k: v for k, v in r.items() if k != "seconds"} for r in data["models"][0]["results"]]
    code, _, err = _cli("eval", tiny_model, "--tasks", teacher_task, "--limit", "6", "--fp-only", "--batch-size", "4",
                        "--json", tmp_path / "fp4.json")  # 4 questions a forward: the same outcomes
    assert code == 0, err
    batched = json.loads((tmp_path / "fp4.json").read_text())["models"][0]["results"]
    assert [r["correct"] for r in batched] == [r["correct"] for r in fp_alone[0]["results"]]
    code, _, err = _cli("eval", tiny_model, "--tasks", teacher_task, "--fp-only", "--batch-size", "0")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "--batch-size" in err
    code, _, err = _cli("eval", tiny_model, "--tasks", "no_such_task", "--report", tmp_path / "r2")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "unknown task" in err
    assert not (tmp_path / "r2").exists()
    code, _, err = _cli("eval", "--tasks", teacher_task)
    assert code == 2 and "MODEL is missing" in err


def test_cli_fetch_bigbench_extracts_only_the_task_files(tmp_path, monkeypatch):
    """`edge-recover fetch bigbench` with pip replaced by a stand-in that writes a small sdist of the same
    layout: the named task files land in the cache, nothing else; a second fetch reuses them."""
    import edge_recover.tasks as tasks

    monkeypatch.setenv("EDGE_RECOVER_CACHE", str(tmp_path / "cache"))
    calls = []

    def fake_pip(pip, args, what):
        dest = Path(args[args.index("-d") + 1])
        dest.mkdir(parents=True, exist_ok=True)
        calls.append(what)
        if what.startswith("pip"):
            (dest / "pip-25.3-py3-none-any.whl").write_bytes(b"")
            return
        src = tmp_path / "src" / "bigbench-1.0.0" / "bigbench" / "benchmark_tasks"
        for name in BIGBENCH_TASKS + ("not_wanted",):
            (src / name).mkdir(parents=True, exist_ok=True)
            (src / name / "task.json").write_text(json.dumps(
                {"examples": [{"input": name, "target_scores": {"a": 1, "b": 0}}]}))
        with tarfile.open(dest / "bigbench-1.0.0.tar.gz", "w:gz") as tf:
            tf.add(tmp_path / "src" / "bigbench-1.0.0", arcname="bigbench-1.0.0")

    monkeypatch.setattr(tasks, "_run_pip", fake_pip)
    code, out, err = _cli("fetch", "bigbench")
    assert code == 0, err
    folder = Path(out.strip())
    assert sorted(p.stem for p in folder.glob("*.json")) == sorted(BIGBENCH_TASKS)
    assert resolve_task(f"bigbench:{BIGBENCH_TASKS[0]}").examples[0].context == f"\nQ: {BIGBENCH_TASKS[0]}" \
        + "".join(f"\n  choice: {c}" for c in np.random.RandomState(seed=42).permutation(["a", "b"])) + "\nA: "
    assert _cli("fetch", "bigbench").code == 0 and len(calls) == 2  # cached: no second download


def test_cli_eval_default_suite_with_quantized_and_adapter(tiny_model, tmp_path, monkeypatch):
    """`eval MODEL --tasks default --quantized Q --adapter A`: fp, quantized and recovered rows, and a recovery
    share per task; the default suite read from the cache (task files made here, named as the suite)."""
    import edge_recover.tasks as tasks
    from edge_recover.models import load_model
    from edge_recover.recovery.student import (ADAPTER_MARKER, adapter_metadata, add_lora, load_student_checkpoint,
                                               quant_hash)

    monkeypatch.setenv("EDGE_RECOVER_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "cache" / "tasks" / "bigbench"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(1)
    for name in tasks.DEFAULT_SUITE:
        examples = [{"input": ctx, "target_scores": {w: int(j == 0) for j, w in
                                                     enumerate(rng.choice(WORDS, 3, replace=False))}}
                    for ctx in CONTEXTS]
        (folder / f"{name}.json").write_text(json.dumps({"examples": examples}))
    q = tmp_path / "q"
    code, _, err = _cli("quantize", tiny_model, "--method", "rtn", "--calibration", "0", "-o", q)
    assert code == 0, err
    teacher = load_model(tiny_model)
    base, manifest, scheme = load_student_checkpoint(q, teacher, None)
    qhash = quant_hash(base)
    peft = add_lora(base, ["model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj"], rank=4, alpha=8)
    with torch.no_grad():  # a LoRA that changes the model (PEFT starts B at zero)
        for n, p in peft.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    adapter = tmp_path / "adapter"
    peft.save_pretrained(str(adapter))
    (adapter / ADAPTER_MARKER).write_text(json.dumps(adapter_metadata(
        teacher.source_hash, scheme, "rtn", qhash, ["gate_proj", "up_proj"], 4, 8)))
    report = tmp_path / "report"
    code, out, err = _cli("eval", tiny_model, "--tasks", "default", "--quantized", q, "--adapter", adapter,
                          "--limit", "4", "--report", report)
    assert code == 0, err
    data = json.loads((report / "report.json").read_text())
    assert [m["label"] for m in data["models"]] == ["fp", "quantized", "recovered"]
    assert [t["name"] for t in data["tasks"]] == list(tasks.DEFAULT_SUITE)
    assert len(data["recovery"]) == 1 and len(data["recovery"][0]["rows"]) == len(tasks.DEFAULT_SUITE)
    assert all(row["metric"] == "acc" for row in data["recovery"][0]["rows"])
    assert "recovery share (recovered over quantized)" in out

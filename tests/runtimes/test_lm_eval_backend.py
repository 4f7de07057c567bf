"""lm-evaluation-harness runs our package backend through its own command line, offline, on local tasks.

One `edge-recover-lm-eval run --model edge-recover --model_args package=PKG ...` (lm-eval's CLI, with the
`lm_eval.models` entry points registered) on three local tasks (custom YAML via --include_path, local JSON
data, HF_DATASETS_OFFLINE=1), one per request type:
- multiple_choice (loglikelihood): lm-eval's acc and acc_norm equal `edge-recover eval`'s own scoring of the
  same examples in our task format;
- loglikelihood_rolling: lm-eval's word perplexity equals the one from our scorer's token log-probs;
- generate_until: the generated text is the package's own greedy continuation, cut at the stop string.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from edge_recover.tasks import load_task_file
from edge_recover.tasks_score import score_task

CONTEXTS = ["the cat sat on", "to be or not", "a stitch in time", "all the world", "now is the winter",
            "quick brown fox", "lazy dog runs", "merely players", "glorious summer", "in time saves"]
TEXTS = ["the quick brown fox jumps over the lazy dog", "a stitch in time saves nine"]


def _write_tasks(root: Path) -> tuple[Path, Path]:
    rng = np.random.default_rng(0)
    docs = []
    for ctx in CONTEXTS:
        choices = ["".join(rng.choice(list("abcdefghij"), size=int(rng.integers(1, 5)))) for _ in range(3)]
        docs.append({"context": ctx, "choices": choices, "answer": int(rng.integers(0, 3))})
    data = root / "data"
    data.mkdir()
    (data / "mc.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    (data / "roll.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    (data / "gen.jsonl").write_text("".join(json.dumps({"context": c, "target": "x"}) + "\n" for c in CONTEXTS[:3]))
    ours = root / "er_mc.json"
    ours.write_text(json.dumps({"format": "edge-recover-task", "name": "er_mc", "examples": docs}))
    tasks = root / "tasks"
    tasks.mkdir()

    def yaml(name: str, body: str, file: str) -> None:
        (tasks / f"{name}.yaml").write_text(f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
                                            f"    test: {data / file}\ntest_split: test\n{body}")

    yaml("er_mc", 'output_type: multiple_choice\ndoc_to_text: "{{context}}"\ndoc_to_choice: "{{choices}}"\n'
                  'doc_to_target: "{{answer}}"\ntarget_delimiter: " "\nmetric_list:\n  - metric: acc\n'
                  '  - metric: acc_norm\n', "mc.jsonl")
    yaml("er_roll", 'output_type: loglikelihood_rolling\ndoc_to_text: ""\ndoc_to_target: "{{text}}"\n'
                    'metric_list:\n  - metric: word_perplexity\n', "roll.jsonl")
    yaml("er_gen", 'output_type: generate_until\ndoc_to_text: "{{context}}"\ndoc_to_target: "{{target}}"\n'
                   'generation_kwargs:\n  until: ["e"]\n  max_gen_toks: 6\n  do_sample: false\n'
                   'metric_list:\n  - metric: exact_match\n', "gen.jsonl")
    return tasks, ours


def _results(out: Path) -> tuple[dict, dict]:
    found = sorted(out.rglob("results_*.json"))
    assert found, list(out.rglob("*"))
    samples = {}
    for f in out.rglob("samples_*.jsonl"):
        task = f.name.split("_", 1)[1].rsplit("_", 1)[0]
        samples[task] = [json.loads(line) for line in f.read_text().splitlines()]
    return json.loads(found[-1].read_text())["results"], samples


@pytest.fixture(scope="module")
def lm_eval_run(tiny_package, tmp_path_factory):
    root = tmp_path_factory.mktemp("lmeval")
    tasks, ours = _write_tasks(root)
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_CACHE": str(root / "hf"),
           "TOKENIZERS_PARALLELISM": "false"}
    script = Path(sys.executable).with_name("edge-recover-lm-eval")
    proc = subprocess.run([str(script), "run", "--model", "edge-recover", "--model_args",
                           f"package={tiny_package},threads=2", "--tasks", "er_mc,er_roll,er_gen",
                           "--include_path", str(tasks), "--output_path", str(root / "out"), "--log_samples"],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return (*_results(root / "out"), ours)


def test_lm_eval_multiple_choice_equals_our_scoring(lm_eval_run, tiny_package):
    from edge_recover.runtimes.task_eval import PackageLoglikelihood

    results, _, ours = lm_eval_run
    mine = score_task(load_task_file(ours), PackageLoglikelihood(tiny_package), progress=False)
    assert results["er_mc"]["acc,none"] == pytest.approx(mine.acc)
    assert results["er_mc"]["acc_norm,none"] == pytest.approx(mine.acc_norm)
    assert results["er_mc"]["acc_stderr,none"] == pytest.approx(mine.acc_stderr)


def test_lm_eval_rolling_loglikelihood_equals_our_scorer(lm_eval_run, tiny_package):
    from edge_recover.runtimes.task_eval import PackageLoglikelihood

    results, _, _ = lm_eval_run
    ll = PackageLoglikelihood(tiny_package)
    total = sum(ll.score_ids([([ll.prefix_id], ll.encode(t))])[0][0] for t in TEXTS)
    words = sum(len(t.split()) for t in TEXTS)
    assert results["er_roll"]["word_perplexity,none"] == pytest.approx(math.exp(-total / words), rel=1e-4)


def test_lm_eval_generate_until_is_the_package_greedy_text(lm_eval_run, tiny_package):
    from edge_recover.runtimes.generate import Generator

    _, samples, _ = lm_eval_run
    gen = Generator(tiny_package)
    assert len(samples["er_gen"]) == 3 and any(s["resps"][0][0] for s in samples["er_gen"])
    for s in samples["er_gen"]:
        full = gen.generate(s["doc"]["context"], max_new_tokens=6).text
        got = s["resps"][0][0]
        assert got == (full[:full.index("e")] if "e" in full else full), (got, full)

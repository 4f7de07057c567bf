"""Recovery on several processes (recovery/distributed.py): two gloo CPU processes give one process's result.

The slow tests start real `accelerate launch` runs (torchrun, 2 ranks, gloo) on the tiny model, through the
CLI both ways (`edge-recover recover --num-processes 2` and `accelerate launch -m edge_recover recover`),
and compare them with one process given the same global batch.
"""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from edge_recover.models import load_model
from edge_recover.recovery.data import SampleSettings, generate_dataset, load_dataset, merge_shards, shard_rows
from edge_recover.recovery.distributed import ERRORS_DIR, FAIL_ENV, LAUNCH_LOG, _failure, cli_argv, record_failure
from tests.fixtures.cli import run_cli

# 48 rows: 4 held out, 44 train -> 5 optimizer steps of 8 rows (4 per rank); the teacher samples 6 batches of 8
ARGS = ["--samples", "48", "--seq-len", "32", "--batch-size", "8", "--epochs", "1", "--calibration", "4",
        "--gen-batch-size", "8", "--device", "cpu", "--checkpoint-every", "2"]
# LoRA on a float head: with the cpu default's 8-bit head the two schedules' adapters differed by up to 8e-5
# (below 1e-5 with the float head). They agree within 2.1e-7 after one step, so the gradients match; after five a
# few of 28,672 elements drift to ~1e-5 (Adam's normalised steps amplifying reduction-order noise). qat keeps the
# default head and meets TOL
LORA_ARGS = ["--rule", "lm_head=keep"]
TOL = 1e-5


def _max_diff(a, b) -> float:
    x, y = load_file(str(a)), load_file(str(b))
    assert x.keys() == y.keys()
    return max((x[k].double() - y[k].double()).abs().max().item() for k in x)


def test_shards_put_together_are_the_one_process_file(tiny_model):
    lm = load_model(tiny_model)
    settings = SampleSettings(samples=10, seq_len=12, seed=5, batch_size=3)
    whole = generate_dataset(lm.model, lm.tokenizer, settings, lm.source_hash, progress=False)
    for world in (2, 3):
        parts = [generate_dataset(lm.model, lm.tokenizer, settings, lm.source_hash, progress=False, shard=(r, world))
                 for r in range(world)]
        assert sorted(torch.cat([shard_rows(settings, (r, world)) for r in range(world)]).tolist()) == list(range(10))
        assert torch.equal(merge_shards(parts).input_ids, whole.input_ids)
        assert not torch.equal(parts[0].input_ids, whole.input_ids)  # a shard alone is not the file


def test_cli_argv_gives_the_same_options_back():
    import typer

    from edge_recover.cli import _register_parts, app

    _register_parts()
    cmd = typer.main.get_command(app).commands["recover"]
    args = ["m", "-o", "out", "--mode", "lora", "--no-train-norms", "--resume", "--lr", "0.01", "--num-processes", "2",
            "--rule", "lm_head=4", "--rule", "down_proj$=8"]
    ctx = cmd.make_context("recover", list(args))
    again = cmd.make_context("recover", cli_argv(ctx))
    assert again.params == {**ctx.params, "num_processes": 1}
    assert "--num-processes" not in cli_argv(ctx) and "--no-train-norms" in cli_argv(ctx)


def test_failure_names_the_first_rank(tmp_path):
    log = tmp_path / LAUNCH_LOG
    log.write_text("noise")
    (tmp_path / "checkpoint").mkdir()
    (tmp_path / "checkpoint" / "state.json").write_text(json.dumps({"step": 4}))
    record_failure(tmp_path, 1, 2, RuntimeError("boom\nmore"))
    record_failure(tmp_path, 0, 2, RuntimeError("Connection closed by peer"))  # the consequence, later
    exc = _failure(tmp_path, log, 2, 1)
    assert str(exc).startswith("rank 1 of 2 failed: RuntimeError: boom;") and "step 4" in str(exc)
    assert exc.exit_code == 1 and "\n" not in str(exc)
    # a rank killed without a word: torchrun's summary names it
    for p in (tmp_path / ERRORS_DIR).iterdir():
        p.unlink()
    log.write_text("Root Cause (first observed failure):\n[0]:\n  time : x\n  rank      : 1 (local_rank: 1)\n"
                   "  exitcode  : -9 (pid: 77)\n")
    assert str(_failure(tmp_path, log, 2, 1)).startswith("rank 1 of 2 died (exit code -9)")


def test_cli_refuses_a_batch_that_does_not_split(tiny_model, tmp_path):
    code, _, err = run_cli("recover", tiny_model, "-o", tmp_path / "x", *ARGS[:4], "--batch-size", "3",
                           "--num-processes", "2")
    assert code == 2 and err.count("\n") == 1 and "`--batch-size` 3 does not split over 2 processes" in err
    code, _, err = run_cli("recover", tiny_model, "-o", tmp_path / "x", "--num-processes", "0")
    assert code == 2 and "`--num-processes` must be at least 1" in err
    assert not (tmp_path / "x").exists() and not (tmp_path / "x.work").exists()


@pytest.fixture(scope="module")
def one_process(tiny_model, tmp_path_factory):
    """The reference: one process, qat and lora, the same global batch."""
    root = tmp_path_factory.mktemp("one")
    for mode in ("qat", "lora"):
        extra = ["--dataset", root / "qat.work" / "dataset.safetensors", *LORA_ARGS] if mode == "lora" else []
        code, out, err = run_cli("recover", tiny_model, "-o", root / mode, "--mode", mode, "--method", "rtn", *ARGS,
                                 *extra)
        assert code == 0, err
    return root


@pytest.mark.slow
def test_two_processes_give_one_process_result_qat(one_process, tiny_model, tmp_path):
    code, out, err = run_cli("recover", tiny_model, "-o", tmp_path / "qat", "--method", "rtn", *ARGS,
                             "--num-processes", "2")
    assert code == 0, err + (tmp_path / "qat.work" / LAUNCH_LOG).read_text()[-3000:]
    assert "wrote" in out and out.count("KL on held-out") == 1  # rank 0 speaks for the run
    # the sharded teacher data is the one-process file, bit for bit
    two = load_dataset(tmp_path / "qat.work" / "dataset.safetensors")
    one = load_dataset(one_process / "qat.work" / "dataset.safetensors")
    assert torch.equal(two.input_ids, one.input_ids)
    # the trained integers, scales and norms: the same up to float reduction order
    a, b = load_file(str(tmp_path / "qat" / "model.safetensors")), load_file(str(one_process / "qat" / "model.safetensors"))
    codes = [k for k in a if not a[k].is_floating_point()]
    assert codes and all(torch.equal(a[k], b[k]) for k in codes)
    assert _max_diff(tmp_path / "qat" / "model.safetensors", one_process / "qat" / "model.safetensors") < TOL
    report = json.loads((tmp_path / "qat" / "recovery_report.json").read_text())
    ref = json.loads((one_process / "qat" / "recovery_report.json").read_text())
    assert report["processes"] == 2 and ref["processes"] == 1
    assert report["kl_after"] == pytest.approx(ref["kl_after"], abs=TOL)
    losses = [[json.loads(x)["loss"] for x in (d / "metrics.jsonl").read_text().splitlines()]
              for d in (tmp_path / "qat", one_process / "qat")]
    assert losses[0] == pytest.approx(losses[1], abs=TOL)


@pytest.mark.slow
def test_accelerate_launch_lora_gives_one_process_adapter(one_process, tiny_model, tmp_path):
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "edge_recover", "recover",
           str(tiny_model), "-o", str(tmp_path / "lora"), "--mode", "lora", "--method", "rtn", *ARGS,
           "--batch-size", "4", "--grad-accum", "2",  # the same global batch of 8, in 2 micro-batches of 2 per rank
           "--dataset", str(one_process / "qat.work" / "dataset.safetensors"), *LORA_ARGS]
    out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    diff = _max_diff(tmp_path / "lora" / "adapter_model.safetensors", one_process / "lora" / "adapter_model.safetensors")
    assert diff < TOL, diff
    assert json.loads((tmp_path / "lora" / "recovery_report.json").read_text())["processes"] == 2


@pytest.mark.slow
def test_a_dead_rank_keeps_the_checkpoint_and_a_resume_on_one_process_finishes_it(one_process, tiny_model, tmp_path,
                                                                                  monkeypatch):
    monkeypatch.setenv(FAIL_ENV, "1:3")  # rank 1 raises before step 4; the checkpoint of step 2 is on disk
    code, out, err = run_cli("recover", tiny_model, "-o", tmp_path / "q", "--method", "rtn", *ARGS,
                             "--num-processes", "2")
    assert code == 1 and err.count("\n") == 1, err
    assert err.startswith("error: rank 1 of 2 failed: RuntimeError: injected failure") and "(step 2) is whole" in err
    ckpt = tmp_path / "q.work" / "checkpoint"
    assert json.loads((ckpt / "state.json").read_text())["step"] == 2 and load_file(str(ckpt / "qat.safetensors"))
    assert not (tmp_path / "q").exists()
    monkeypatch.delenv(FAIL_ENV)
    code, out, err = run_cli("recover", tiny_model, "-o", tmp_path / "q", "--method", "rtn", *ARGS, "--resume")
    assert code == 0, err
    assert _max_diff(tmp_path / "q" / "model.safetensors", one_process / "qat" / "model.safetensors") < TOL
    steps = [json.loads(x)["step"] for x in (tmp_path / "q" / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps))

"""Recovery on several processes (GPUs over NCCL, or CPU processes over gloo) through Hugging Face accelerate.

    edge-recover recover MODEL -o OUT ... --num-processes N           (`launch`, below)
      └─ accelerate launch --multi_gpu --num_processes N -m edge_recover recover MODEL -o OUT ...
            (torchrun underneath)  rank 0 .. N-1, each: Accelerator() -> the process group, DDP

Nothing here builds process groups: accelerate's launcher starts the ranks and its `Accelerator` joins
them (NCCL on GPUs, gloo on CPUs); this module only decides what each rank does, so that N processes give
the result of one process with the same global batch:

- teacher data: batch b of the one-process sampling schedule is sampled by rank b % N, with batch b's own
  generator (data.py), and gathered; rank 0 writes the one file (atomically). Every batch ran with the same
  rows, shapes and generator as in one process, so the file is the one-process file, bit for bit.
- training: data parallel (accelerate's `prepare_model`: DDP). An optimizer step takes the same global
  rows whatever N is (`epoch_order(seed, epoch)`); each micro-batch of `batch_size` rows is cut into N
  equal slices, one per rank; DDP averages the gradients, and the mean of N equal-size means is the mean,
  so a step is one process's up to the order of float reductions. Loss, divergence test and log lines use
  the mean over ranks, so every rank takes the same decisions.
- checkpoints: the full unsharded state (the unwrapped student's trainable tensors, the AdamW state and
  the step), the same on every rank under DDP, written by rank 0 only (atomic_dir): `--resume` works from
  any number of processes, one included.
- failures: a rank that raises writes WORK/rank_errors/rank{r}.json (rank, message, time) and exits
  non-zero; torchrun stops the other ranks; `launch` reports the earliest failure as one line on stderr
  (or torchrun's own summary for a rank killed without a word, e.g. by the OOM killer) and exits non-zero.
  The checkpoint on disk is the last complete one (atomic_dir: a reader sees the old folder or the new).
  `EDGE_RECOVER_FAIL_AT=RANK:STEP` makes rank RANK raise before optimizer step STEP + 1 (a test hook).
- FSDP: accelerate 1.15 turns FSDP on only for accelerator devices (accelerate/state.py: MULTI_GPU, NPU,
  XPU, ...); with CPU processes it falls back to DDP without a word (checked here: an `Accelerator(cpu=True,
  fsdp_plugin=FullyShardedDataParallelPlugin(fsdp_version=2))` on 2 gloo processes hands back a
  DistributedDataParallel). It cannot be tested on a CPU, so it is not offered; docs/scale.md says when
  it would be needed and what it takes.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import torch

from edge_recover.errors import EdgeRecoverError, require

from .data import SampleSettings, SyntheticDataset, generate_dataset, shard_rows

FAIL_ENV = "EDGE_RECOVER_FAIL_AT"
ERRORS_DIR = "rank_errors"
LAUNCH_LOG = "launch.log"


def launched() -> tuple[int, int] | None:
    """(rank, world size) when this process is one rank of a launch of several (torchrun's env), else None."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return (int(os.environ.get("RANK", "0")), world) if world > 1 else None


def check_split(batch_size: int, world: int) -> None:
    """Refuse a micro-batch that N processes cannot cut into equal slices."""
    require(batch_size % world == 0,
            f"`--batch-size` {batch_size} does not split over {world} processes; pass a multiple of {world} "
            f"(each rank takes batch-size / {world} rows of every micro-batch)")


class Ranks:
    """What one rank needs to know about the others: its index, their number, and the reductions it takes part in.

    Example:
        >>> ranks = Ranks(Accelerator())  # doctest: +SKIP
        >>> ranks.slice(torch.arange(8))  # rank 1 of 2 -> tensor([4, 5, 6, 7])  # doctest: +SKIP
    """

    def __init__(self, acc) -> None:
        self.acc = acc
        self.rank, self.world = acc.process_index, acc.num_processes
        self.is_main = acc.is_main_process

    def slice(self, rows: torch.Tensor) -> torch.Tensor:
        """This rank's equal share of a micro-batch's rows (contiguous)."""
        per = rows.numel() // self.world
        return rows[self.rank * per:(self.rank + 1) * per]

    def reduce(self, values: list[float], how: str = "mean") -> list[float]:
        """`values` reduced over the ranks (`mean`, `sum` or `max`); one collective for the whole list."""
        if self.world == 1:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self.acc.device)
        if how == "max":
            return [float(v) for v in self.acc.gather(t).view(self.world, -1).max(0).values]
        return [float(v) for v in self.acc.reduce(t, how)]

    def maybe_fail(self, step: int) -> None:
        """The test hook `EDGE_RECOVER_FAIL_AT=RANK:STEP`: raise on that rank before optimizer step STEP + 1."""
        spec = os.environ.get(FAIL_ENV)
        if spec and tuple(int(x) for x in spec.split(":")) == (self.rank, step):
            raise RuntimeError(f"injected failure ({FAIL_ENV}={spec}) after optimizer step {step}")


def sample_dataset(model, tokenizer, settings: SampleSettings, teacher_hash: str, ranks: Ranks,
                   progress: bool = True) -> SyntheticDataset:
    """The teacher's data set, sampled by all ranks (batch b on rank b % N) and gathered on every rank.

    Example:
        >>> ds = sample_dataset(teacher, tok, cfg.sample_settings(), lm.source_hash, ranks)  # doctest: +SKIP
    """
    shard = (ranks.rank, ranks.world)
    part = generate_dataset(model, tokenizer, settings, teacher_hash, device=ranks.acc.device,
                            progress=progress and ranks.is_main, shard=shard)
    if ranks.world == 1:
        return part
    # acc.gather concatenates equal shapes: pad every rank's rows to the largest share, index -1 = padding
    size = max(len(shard_rows(settings, (r, ranks.world))) for r in range(ranks.world))
    rows = shard_rows(settings, shard)
    ids = torch.zeros(size, settings.seq_len, dtype=torch.long)
    ids[:len(rows)] = part.input_ids[rows]
    index = torch.full((size,), -1, dtype=torch.long)
    index[:len(rows)] = rows
    all_ids = ranks.acc.gather(ids.to(ranks.acc.device)).cpu()
    all_index = ranks.acc.gather(index.to(ranks.acc.device)).cpu()
    keep = all_index >= 0
    out = torch.zeros_like(part.input_ids)
    out[all_index[keep]] = all_ids[keep]
    (seconds,) = ranks.reduce([part.seconds], "max")
    return SyntheticDataset(out, part.temperature, settings, teacher_hash, seconds=seconds)


def record_failure(work: Path, rank: int, world: int, exc: BaseException) -> None:
    """Leave this rank's failure where `launch` looks for it (WORK/rank_errors/rank{r}.json)."""
    from edge_recover.atomic import write_json_atomic

    message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    if not isinstance(exc, EdgeRecoverError):
        message = f"{type(exc).__name__}: {message}"
    folder = Path(work) / ERRORS_DIR
    folder.mkdir(parents=True, exist_ok=True)
    write_json_atomic(folder / f"rank{rank}.json", json.dumps(
        {"rank": rank, "world": world, "message": message, "time": time.time(),
         "user_error": isinstance(exc, EdgeRecoverError)}))


def cli_argv(ctx, drop: tuple[str, ...] = ("num_processes",)) -> list[str]:
    """The command line that gives the click context `ctx`'s values again (every option spelled out)."""
    positional, options = [], []
    for p in ctx.command.params:
        value = ctx.params.get(p.name)
        if p.name in drop or value is None:
            continue
        if p.param_type_name == "argument":
            positional.append(str(value))
        elif getattr(p, "is_flag", False) and isinstance(value, bool):
            flag = p.opts if value else p.secondary_opts
            if flag:
                options.append(max(flag, key=len))
        elif isinstance(value, (list, tuple)):  # a repeatable option (`--rule`): once per value
            for v in value:
                options += [max(p.opts, key=len), str(v)]
        else:
            options += [max(p.opts, key=len), str(value)]
    return positional + options


def launch(args: list[str], num_processes: int, work: Path, echo=print) -> None:
    """Run `edge-recover recover ARGS` on `num_processes` processes through `accelerate launch`.

    The ranks' stdout comes through `echo`; their stderr (progress, warnings, tracebacks) goes to
    WORK/launch.log. A failed run raises one `EdgeRecoverError` naming the rank that failed first.

    Example:
        >>> launch(["smollm2", "-o", "out/r"], 2, Path("out/r.work"))  # doctest: +SKIP
    """
    require(launched() is None, "`--num-processes` inside `accelerate launch`: leave it out, accelerate already "
                                "started the processes")
    require(num_processes >= 1, f"`--num-processes` must be at least 1, got {num_processes!r}")
    work = Path(work)
    work.mkdir(parents=True, exist_ok=True)
    errors = work / ERRORS_DIR
    for old in errors.glob("rank*.json"):
        old.unlink()
    log = work / LAUNCH_LOG
    threads = max(1, (os.cpu_count() or 1) // num_processes)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(num_processes),
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--num_cpu_threads_per_process", str(threads), "-m", "edge_recover", "recover", *args]
    with open(log, "w") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True)
        for line in proc.stdout:
            echo(line.rstrip("\n"))
        code = proc.wait()
    if code != 0:
        raise _failure(work, log, num_processes, code)


def _failure(work: Path, log: Path, world: int, code: int) -> EdgeRecoverError:
    """One line for a failed launch: the rank that failed first, what it said, where the checkpoint is."""
    records = [json.loads(p.read_text()) for p in sorted((work / ERRORS_DIR).glob("rank*.json"))]
    if records:
        first = min(records, key=lambda r: r["time"])
        what, user = f"rank {first['rank']} of {world} failed: {first['message']}", first["user_error"]
    else:
        text = log.read_text(errors="replace") if log.is_file() else ""
        cause = re.search(r"Root Cause.*?rank\s*:\s*(\d+).*?exitcode\s*:\s*(-?\d+)", text, re.S)
        what = (f"rank {cause.group(1)} of {world} died (exit code {cause.group(2)})" if cause
                else f"`accelerate launch` exited with code {code}")
        user = False
    state = work / "checkpoint" / "state.json"
    kept = (f"the last checkpoint (step {json.loads(state.read_text())['step']}) is whole in {str(state.parent)!r}; "
            "continue with `--resume` (any `--num-processes`)") if state.is_file() else "no checkpoint was written"
    exc = EdgeRecoverError(f"{what}; {kept}; log: {str(log)!r}")
    if not user:
        exc.exit_code = 1
    return exc

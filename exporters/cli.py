"""CLI commands of the exporter: `edge-recover export` and `edge-recover targets`.

A thin layer over `edge_recover.exporters.api`; no torch or onnx import at module import time.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer


def register(app: typer.Typer) -> None:
    """Add the exporter's commands to the `edge-recover` app."""

    @app.command()
    def export(
        model: str = typer.Argument(..., help="HF model folder, .gguf file, quantized checkpoint, or `smollm2`"),
        output: Path = typer.Option(..., "-o", "--output", help="package folder to create"),
        scheme: str = typer.Option("w4w2gateup", help="scheme name or JSON file (ignored for a quantized checkpoint)"),
        target: str = typer.Option("cpu", help="cpu, dml, npu, qnn, openvino or vitisai (see `edge-recover targets`)"),
        vendor: Optional[str] = typer.Option(None, help="with --target npu: amd, qualcomm or intel (default amd)"),
        method: str = typer.Option("mse", help="quantizer method when the model is full precision: rtn or mse"),
        block_size: Optional[int] = typer.Option(None, help="block size when quantizing (default: the target's)"),
        calibration: int = typer.Option(16, help="teacher samples for the mse method's activation importance"),
        verify: bool = typer.Option(True, "--verify/--no-verify", help="compare ORT and torch logits; fail if they disagree"),
        fuse: Optional[bool] = typer.Option(None, "--fuse/--no-fuse", help="ORT fused ops (default: as the target says)"),
        overwrite: bool = typer.Option(False, help="replace an existing output folder"),
    ) -> None:
        """Export a model to an ONNX package (MatMulNBits with the quantizer's integers) for a target."""
        from edge_recover.atomic import check_new_dir

        from .api import export_package, read_package_manifest
        from .targets import resolve_target

        resolve_target(target, vendor)
        check_new_dir(output, overwrite)
        path = export_package(model, output, scheme=scheme, target=target, method=method, vendor=vendor,
                              verify=verify, overwrite=overwrite, calibration=calibration, block_size=block_size,
                              fuse=fuse)
        m = read_package_manifest(path)
        bits: dict[str, int] = {}
        for layer in m["layers"].values():
            key = f"{layer['bits']}-bit b{layer['block_size']}" + (
                f" (in {layer['storage_bits']}-bit containers)" if layer["storage_bits"] != layer["bits"] else "")
            bits[key] = bits.get(key, 0) + 1
        typer.echo(f"target {m['target']['name']} ({m['target']['provider']}): "
                   + ", ".join(f"{n} layers {k}" for k, n in bits.items()))
        if m["fusions"]:
            typer.echo(f"fusions: {', '.join(m['fusions'])}")
        if m["parity"]:
            p = m["parity"]
            ex = p["exact"]
            typer.echo(f"parity vs torch over {p['positions']} positions: exact graph top-1 {ex['top1_agreement']:.1%}, "
                       f"max abs diff {ex['max_abs_diff']:.3g}; shipped graph (accuracy_level {p['accuracy_level']}) "
                       f"top-1 {p['top1_agreement']:.1%}, max abs diff {p['max_abs_diff']:.3g} (logits up to {p['logit_scale']:.3g})")
        size = sum(f.stat().st_size for f in path.iterdir() if f.is_file())
        typer.echo(f"wrote {path} ({size / 1e6:.1f} MB)")

    @app.command()
    def targets(as_json: bool = typer.Option(False, "--json", help="print the profiles as JSON")) -> None:
        """List the export targets: bits and block sizes their kernels take, accuracy level, fallbacks."""
        from .targets import DEFAULT_NPU_VENDOR, NPU_VENDORS, TARGETS

        if as_json:
            typer.echo(json.dumps({n: t.to_json() for n, t in TARGETS.items()}, indent=2))
            return
        for t in TARGETS.values():
            typer.echo(t.describe())
        vendors = ", ".join(f"{v} -> {t}" for v, t in NPU_VENDORS.items())
        typer.echo(f"npu       alias: --vendor {vendors} (default {DEFAULT_NPU_VENDOR})")

"""CLI commands of the exporter: `edge-recover export`, `edge-recover targets` and `edge-recover adapter add`.

A thin layer over `edge_recover.exporters.api`: `export` builds one `ExportOptions` from its flags and runs
the target's pass list (passes.py); no torch or onnx import at module import time.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from edge_recover.options import DEFAULT_SCHEME, QuantOptions, quant_options


def register(app: typer.Typer) -> None:
    """Add the exporter's commands to the `edge-recover` app."""

    @app.command()
    @quant_options("export")
    def export(
        model: str = typer.Argument(..., help="HF model folder, .gguf file, quantized checkpoint, or `smollm2`"),
        output: Path = typer.Option(..., "-o", "--output", help="package folder to create"),
        target: str = typer.Option("cpu", help="cpu, dml, npu, qnn, openvino or vitisai (see `edge-recover targets`)"),
        vendor: Optional[str] = typer.Option(None, help="with --target npu: amd, qualcomm or intel (default amd)"),
        quant: QuantOptions = QuantOptions(),  # --scheme --method --calibration --block-size --rule (sdk/options.py)
        verify: bool = typer.Option(True, "--verify/--no-verify", help="compare ORT and torch logits; fail if they disagree"),
        fuse: Optional[bool] = typer.Option(None, "--fuse/--no-fuse", help="ORT fused ops (default: as the target says)"),
        kv_dtype: str = typer.Option("float32", help="KV cache element type: float32, float16 or int8 (fused graphs; "
                                                     "a half / a quarter of the cache reads at long contexts)"),
        share_embedding: bool = typer.Option(True, "--share-embedding/--float-embedding",
                                             help="a tied embedding reads the quantized lm_head's integers, an "
                                                  "untied one its own 8-bit table (default), or keeps a float32 table"),
        pack_qkv: bool = typer.Option(True, "--pack-qkv/--no-pack-qkv",
                                      help="fused graphs: q/k/v as one MatMulNBits read packed by the attention "
                                           "(default; bit-identical, fewer kernel calls per token) or three nodes"),
        context_length: Optional[int] = typer.Option(None, help="qnn: KV cache slots of the static graphs (prompt + "
                                                                 "answer; default: the model's, at most 256)"),
        prefill_window: Optional[int] = typer.Option(None, help="qnn: prompt tokens per static prefill step (default 64)"),
        soc: Optional[str] = typer.Option(None, help="qnn: Snapdragon SoC to verify and compile EPContext binaries "
                                                     "for, e.g. SM8650 (8 Gen 3, default), SM8750 (8 Elite), SC8380XP (X Elite)"),
        htp_tolerance: Optional[str] = typer.Option(None, metavar="TOP1[,REL]",
                                                    help="qnn: the HTP-vs-CPU-EP parity gate on real text, per graph: "
                                                         "top-1 agreement >= TOP1 and max abs diff <= REL x the logit "
                                                         "scale (default 0.9,0.15; docs/npu.md)"),
        overwrite: bool = typer.Option(False, help="replace an existing output folder"),
        adapter: Optional[Path] = typer.Option(None, help="LoRA adapter folder of `edge-recover recover` to put in the package"),
        adapter_mode: str = typer.Option("sidecar", help="sidecar (LoRA nodes + .onnx_adapter files, swappable) or "
                                                         "merge (folded into the weights, re-quantized)"),
        adapter_name: Optional[str] = typer.Option(None, help="name of the adapter in the package (default: its folder name)"),
        merge_method: Optional[str] = typer.Option(None, help="with merge: re-quantize with rtn, mse or gptq (default: the adapter's method)"),
        merge_calibration: Optional[int] = typer.Option(None, help="with merge: samples for the mse/gptq Hessians"),
        eval_text: Optional[Path] = typer.Option(None, help="with merge: UTF-8 text for the survival figures (default: built-in prompts)"),
        base: Optional[str] = typer.Option(None, help="source model of a slim checkpoint (`quantize --slim`): HF folder, "
                                                      ".gguf file or `smollm2`, when its recorded path is not here"),
    ) -> None:
        """Export a model to an ONNX package (MatMulNBits with the quantizer's integers) for a target."""
        from edge_recover.atomic import check_new_dir

        from .api import ExportOptions, export, read_package_manifest
        from .targets import resolve_target

        prof = resolve_target(target, vendor)
        check_new_dir(output, overwrite)
        static = _static_options(prof, context_length, prefill_window, soc, htp_tolerance)
        options = ExportOptions(
            target=target, vendor=vendor, scheme=quant.scheme or DEFAULT_SCHEME, rules=quant.rules, method=quant.method,
            calibration=quant.calibration, block_size=quant.block_size, fuse=fuse, kv_dtype=kv_dtype, share_embedding=share_embedding, pack_qkv=pack_qkv,
            adapter=adapter, adapter_mode=adapter_mode, adapter_name=adapter_name, merge_method=merge_method,
            merge_calibration=merge_calibration, eval_text=_read_text(eval_text), verify=verify,
            static=static, base=base, overwrite=overwrite)
        path = export(model, output, options)
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
        for a in m.get("adapters") or []:
            typer.echo(_describe_adapter(a))
        for line in _describe_npu(m):
            typer.echo(line)
        size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
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

    adapter_app = typer.Typer(help="Side-car LoRA adapters of a package.", no_args_is_help=True)
    app.add_typer(adapter_app, name="adapter")

    @adapter_app.command("add")
    def adapter_add(
        package: Path = typer.Argument(..., help="side-car package folder (`export --adapter-mode sidecar`)"),
        adapter: Path = typer.Argument(..., help="LoRA adapter folder of `edge-recover recover`, same base and rank layout"),
        name: str = typer.Option(..., "--name", help="the adapter's name in the package (`run --adapter NAME`)"),
        overwrite: bool = typer.Option(False, help="replace an adapter of the same name"),
    ) -> None:
        """Write another adapter into a side-car package as adapters/NAME.onnx_adapter."""
        from .lora import add_adapter

        entry = add_adapter(package, adapter, name, overwrite=overwrite)
        typer.echo(_describe_adapter(entry))

    @adapter_app.command("list")
    def adapter_list(package: Path = typer.Argument(..., help="package folder")) -> None:
        """List the adapters a package holds."""
        from .api import read_package_manifest

        m = read_package_manifest(package)
        for a in m.get("adapters") or []:
            typer.echo(_describe_adapter(a))
        if not m.get("adapters"):
            typer.echo("no adapters")


def _static_options(prof, context_length: Optional[int], window: Optional[int], soc: Optional[str],
                    tolerance: Optional[str] = None):
    """The qnn target's static shapes and parity gate from the CLI flags (None: the model's defaults); the
    flags are refused for targets without static graphs."""
    from edge_recover.errors import require

    given = [f for f, v in (("--context-length", context_length), ("--prefill-window", window), ("--soc", soc),
                            ("--htp-tolerance", tolerance)) if v is not None]
    if not prof.static_graphs:
        require(not given, f"{', '.join(given)} apply to static NPU graphs (`--target qnn` or `--target npu "
                           f"--vendor qualcomm`), not target {prof.name!r}; drop them")
        return None
    if not given:
        return None
    from edge_recover.qnn import resolve_soc

    from .static_options import HtpTolerance, StaticOptions

    soc_name = resolve_soc(soc).name  # an unknown SoC or a bad tolerance is refused here, before the model loads
    tol = HtpTolerance.parse(tolerance) if tolerance is not None else HtpTolerance()
    return StaticOptions(context_length=context_length or 0, window=window or 0, soc=soc_name, tolerance=tol)


def _describe_npu(m: dict) -> list[str]:
    """What the package was verified on: provider, backend, SoC, nodes on the NPU, parity vs the CPU EP."""
    st = m.get("static")
    if isinstance(st, dict) and st.get("verified"):
        v = st["verified"]
        soc = v["soc"]
        lines = [f"static graphs: context {st['context_length']}, prefill window {st['window']}; verified on "
                 f"{v['provider']} ({v['backend']}), SoC {soc['name']} ({soc['marketing']}, soc_model "
                 f"{soc['soc_model']}, htp_arch v{soc['htp_arch']}), CPU fallback disabled: "
                 f"{v['nodes_on_npu_pct']:.0f} % of nodes on the NPU"]
        for role, g in v["graphs"].items():
            p = g["parity_vs_cpu"]
            lines.append(f"  {role}: {g['graph_nodes']} nodes, compiled in {g['compile_seconds']:.1f} s, one step "
                         f"{g['emulator_step_seconds']:.2f} s (emulator time, not NPU speed); vs the CPU EP max abs "
                         f"diff {p['max_abs_diff']:.3g} (logits up to {p['logit_scale']:.3g}), top-1 "
                         f"{p['top1_agreement']:.0%}"
                         + (f" over {p['positions']} real position(s)" if "positions" in p else ""))
        gate = v.get("parity_gate")
        if gate:
            lines.append(f"  parity gate on real text ({gate['tokens']} tokens): " + (
                f"passed (top-1 >= {gate['min_top1']:.0%}, max abs diff <= {gate['max_rel_diff']:g} x the logit scale)"
                if gate.get("passed") else gate.get("note", "not applied")))
        for role, ctx in (v.get("contexts") or {}).items():
            lines.append(f"  {role} EPContext: {ctx['file']} + {', '.join(ctx['binaries'])} "
                         f"({ctx['binary_bytes'] / 1e6:.1f} MB), reloads in {ctx['load_seconds']:.2f} s")
        cb = v.get("context_binaries")
        if cb and not cb.get("weights_shared"):
            lines.append(f"  context binaries: {cb['count']}, {cb['bytes'] / 1e6:.1f} MB; one shared binary would save up "
                         f"to {cb['duplicate_bytes_at_most'] / 1e6:.1f} MB, but the HTP emulator cannot load one "
                         "(docs/npu.md)")
        return lines
    note = m.get("npu_verification")
    return [note] if note else []


def _read_text(path: Optional[Path]) -> Optional[str]:
    from edge_recover.errors import require

    if path is None:
        return None
    require(path.is_file(), f"`--eval-text` {str(path)!r} does not exist; pass a UTF-8 text file")
    return path.read_text(encoding="utf-8", errors="replace")


def _describe_adapter(a: dict) -> str:
    ranks = sorted(set(a.get("rank_layout", {}).values()))
    layout = f"rank {'/'.join(map(str, ranks))} on {len(a.get('rank_layout', {}))} layers"
    if a.get("mode") == "merge":
        s = (a.get("merge") or {})
        kept = s.get("recovery_kept_ce_pct")
        return (f"adapter {a['name']!r} merged ({layout}, re-quantized with {s.get('merge', {}).get('method')}); "
                f"recovery kept on {s.get('tokens')} tokens: {kept:.1f} % of the CE gain, "
                f"{s.get('recovery_kept_kl_pct', float('nan')):.1f} % by KL")
    return f"adapter {a['name']!r} side-car ({layout}, {a.get('dtype')}): {a['file']}" + (" [default]" if a.get("default") else "")

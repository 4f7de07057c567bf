"""The export API: a model in, a verified package folder out (the contract of docs/design.md).

    model spec / LoadedModel
      └─ quantize (only if it has no QuantLinear yet; the target's preferred block size)
      └─ Optimum export, text-generation-with-past        (torch -> ONNX, float MatMuls)
      └─ untie transposes, MatMul -> MatMulNBits          (rewrite.py: the QuantLinear integers, checked)
      └─ fusions (cpu)                                    (fusions.py)
      └─ target validator                                 (validate.py)
      └─ tokenizer, config, genai_config.json
      └─ parity: ORT CPU vs torch                         (verify.py)
      └─ manifest.json
    all inside `atomic_dir`: the folder appears complete or not at all.

The package contract (file names, manifest kind and version, the file table, validation) is
`edge_recover.contract`'s; the names below are re-exported from it for older callers.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from pathlib import Path

from edge_recover.atomic import atomic_dir, check_new_dir
from edge_recover.contract import (DATA_FILE, MANIFEST, MODEL_FILE, PACKAGE_FORMAT_VERSION, PACKAGE_KIND,  # noqa: F401
                                   read_manifest, write_manifest)
from edge_recover.errors import require
from edge_recover.models import LoadedModel, check_architecture
from edge_recover.versions import library_versions, tool_version

from .targets import TargetProfile, resolve_target


def _load(model: "str | Path | LoadedModel", base=None) -> LoadedModel:
    if isinstance(model, LoadedModel):
        check_architecture(model.model.config)
        return model
    from edge_recover.pipeline import resolve_model

    return resolve_model(model, base=base)


def _ensure_quantized(lm: LoadedModel, scheme, target: TargetProfile, method: str, calibration: int,
                      block_size) -> tuple[dict, str]:
    """Quantize `lm` in place unless it already is; returns (scheme JSON, method). Every layer gets the
    target's preferred block size, then `block_size` (one size, or {bits: size}) overrides."""
    from edge_recover.apply import quantized_layers
    from edge_recover.pipeline import quantize_loaded
    from edge_recover.scheme import Scheme, load_scheme, parse_block_sizes

    if quantized_layers(lm.model):
        qm = lm.quantized_manifest or {}
        return qm.get("scheme", {"name": "pre-quantized"}), qm.get("method", "unknown")
    sch = scheme if isinstance(scheme, Scheme) else load_scheme(str(scheme))
    sch = sch.with_block_size(target.preferred_block_size)
    if block_size is not None:
        sch = sch.with_block_size(parse_block_sizes(block_size))
    target.check_scheme(sch)  # refused before minutes of quantizing, not after
    quantize_loaded(lm, sch, method=method, calibration=calibration, progress=False)
    return sch.to_json(), method


def _optimum_export(torch_model, out_dir: Path, post_process: bool = True) -> None:
    """torch -> ONNX through Optimum (task text-generation-with-past: a graph with a KV cache).

    `post_process=False` skips Optimum's tied-weight deduplication, which loads the whole ONNX model into one
    protobuf (2 GB limit) and would take the low-memory placeholders for tied weights; torch's exporter has
    already stored each shared tensor once (Identity nodes, which rewrite.py follows)."""
    import logging
    import warnings

    from optimum.exporters.onnx import onnx_export_from_model

    logging.getLogger("optimum").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        onnx_export_from_model(torch_model, out_dir, task="text-generation-with-past", do_validation=False,
                               no_post_process=not post_process)


# Above this many bytes of float weights in quantized layers, export through placeholders (rewrite.py).
LOW_MEMORY_BYTES = 2 << 30


def build_graph(lm: LoadedModel, target: TargetProfile, fuse: bool | None = None, sidecar=None,
                low_memory: bool = False, restore: bool = True, kv_dtype: str = "float32",
                share_embedding: bool = False):
    """The package graph of a quantized `lm` for `target`: (onnx.ModelProto, rewritten layers, fusions applied).

    `kv_dtype` "float16" (fused graphs only; export_package refuses it otherwise) halves the KV cache a decode
    step reads (fusions.fuse_attention); "int8" builds the float32 cache that kv_cache.calibrate reads.

    `share_embedding` (when `embedding.plan` allows it) makes the tied embedding read the quantized head's
    integers (embedding.py). `sidecar` (`lora.Sidecar`) adds an adapter's LoRA path beside its MatMulNBits nodes, before fusions.
    `low_memory` exports under `rewrite.low_memory_weights` (the float weights of quantized layers are never
    all in memory; same graph function); `restore=False` then leaves those float weights freed.
    """
    import contextlib

    import onnx

    from edge_recover.apply import quantized_layers

    from .fusions import apply_fusions
    from .matmulnbits import IR_VERSION
    from .rewrite import low_memory_weights, replace_matmuls, untie_transposes

    layers = {name: q.quantized() for name, q in quantized_layers(lm.model).items()}
    swap = low_memory_weights(lm.model, restore) if low_memory else contextlib.nullcontext()
    with tempfile.TemporaryDirectory(prefix="edge-recover-optimum-") as tmp, swap as placeholders:
        _optimum_export(lm.model, Path(tmp), post_process=not low_memory)
        graph = onnx.load(str(Path(tmp) / MODEL_FILE))  # external data (if any) is read in
    untie_transposes(graph)
    rewritten = replace_matmuls(graph, layers, target, placeholders)
    if sidecar is not None:
        sidecar.apply(graph, {r.name: r for r in rewritten})
    fusions = apply_fusions(graph, lm.model, kv_dtype) if (target.fuse if fuse is None else fuse) else []
    if share_embedding:
        from . import embedding

        head = next(r for r in rewritten if r.name == embedding.HEAD)
        fusions.append(embedding.share_head_integers(graph, head, embedding.head_zero_points(graph, head)))
    graph.ir_version = IR_VERSION
    return graph, {r.name: r for r in rewritten}, fusions


def save_graph(graph, folder: Path) -> None:
    """model.onnx (graph) + model.onnx.data (all initializers above 1 KiB)."""
    import onnx

    onnx.save_model(graph, str(folder / MODEL_FILE), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=DATA_FILE, size_threshold=1024)
    if (folder / DATA_FILE).exists():  # onnx creates it owner-only; a package is shared like its model.onnx
        shutil.copymode(folder / MODEL_FILE, folder / DATA_FILE)


def export_package(model: "str | Path | LoadedModel", output: str | Path, scheme="w4w2gateup", target: str = "cpu",
                   method: str = "mse", vendor: str | None = None, verify: bool = True, overwrite: bool = False,
                   calibration: int = 16, block_size: "int | dict | str | None" = None, fuse: bool | None = None,
                   low_memory: bool | None = None, adapter: str | Path | None = None, adapter_mode: str = "sidecar",
                   adapter_name: str | None = None, merge_method: str | None = None,
                   merge_calibration: int | None = None, eval_text: str | None = None,
                   kv_dtype: str = "float32", share_embedding: bool = True, static=None,
                   base: "str | Path | LoadedModel | None" = None) -> Path:
    """Export `model` as a package folder at `output` for `target`; returns the folder.

    `model` is `"smollm2"`, a HF folder, a .gguf file, a quantized checkpoint or a `LoadedModel` (quantized
    in place when it is not yet). `base` is the source model of a slim checkpoint (`quantize --slim`) when
    its recorded source path is not on this machine. A full-precision model is quantized under `scheme` with the target's
    preferred block size (or `block_size`: one size, or per bit width as {2: 128} / "4:64,2:128"); a quantized
    one keeps its integers and is refused if the target cannot take its blocks. With `verify`, ORT CPU logits are compared with torch and the export fails
    when the exact graph's top-1 agreement is below `verify.MIN_TOP1` (see verify.py). `low_memory`
    (default: when the quantized layers' float weights exceed `LOW_MEMORY_BYTES`) exports through shared
    placeholder weights, so a 1.7B model exports on a 24 GiB machine (rewrite.low_memory_weights).

    `kv_dtype` "float16" stores the KV cache in half precision (fused graphs: the cpu target), halving what
    a decode step reads of it at long contexts; "int8" a quarter, with per-channel scales calibrated on the
    float32-KV graph (kv_cache.py; the exact-graph gate runs before that change, the shipped parity after).

    `share_embedding`: a tied embedding whose head is quantized reads the head's integers instead of a float
    table (embedding.py: the 1.7B shape's package 2.4 -> 1.2 GB with an 8-bit head); torch's embedding is
    re-tied to the quantized head before verification, so parity compares the same function (a `LoadedModel`
    passed in keeps that change, as it keeps its quantization).

    `adapter` (a folder of `edge-recover recover`, trained on this model's integers) goes into the package
    as `adapter_mode` `sidecar` (LoRA nodes beside the MatMulNBits, weights as overridable graph inputs,
    plus `adapters/NAME.onnx_adapter`; lora.py) or `merge` (folded into the weights and re-quantized with
    `merge_method`, default the adapter's quantizer method; merge.py, `eval_text` feeds its survival
    figures). Parity is then checked against the torch model with the adapter (PEFT), or merged.

    `static` (`static_graph.StaticOptions`; targets with `static_graphs`, i.e. qnn): the fixed-context
    prefill/decode graphs and their verification on the QNN HTP (qnn.py); default: the model's context up to
    256 positions, a 64-token window.

    Example:
        >>> export_package("smollm2", "out/pkg", scheme="w4w2gateup", target="cpu")  # doctest: +SKIP
        PosixPath('out/pkg')
    """
    from edge_recover.quantizer import METHODS

    from .fusions import KV_DTYPES

    prof = resolve_target(target, vendor)
    require(method in METHODS, f"unknown `method` {method!r}; choose one of {', '.join(METHODS)}")
    require(kv_dtype in KV_DTYPES, f"unknown `kv_dtype` {kv_dtype!r}; choose one of {', '.join(KV_DTYPES)}")
    require(kv_dtype == "float32" or (prof.fuse if fuse is None else fuse),
            f"a {kv_dtype} KV cache needs the fused attention, which target {prof.name!r} does not use; "
            f"pass `--fuse` or `--kv-dtype float32`")
    from . import adapter_export

    plan = adapter_export.plan_adapter(adapter, adapter_mode, adapter_name, prof) if adapter is not None else None
    out = check_new_dir(output, overwrite)
    t0 = time.time()
    lm = _load(model, base)
    quantized_as = adapter_export.quantize_for(lm, plan) if plan is not None else None  # the adapter's scheme
    scheme_json, method_used = quantized_as or _ensure_quantized(lm, scheme, prof, method, calibration, block_size)
    if low_memory is None:
        from edge_recover.apply import quantized_layers

        low_memory = sum(4 * q.in_features * q.out_features for q in quantized_layers(lm.model).values()) > LOW_MEMORY_BYTES
    if low_memory and plan is None:  # never the linears in fp32: their float weights are rebuilt from the integers
        from .rewrite import release_float_weights

        release_float_weights(lm.model)
    lm.model.float().eval()
    if plan is not None:
        adapter_export.bind_base(lm, plan, scheme_json)
        if plan.mode == "merge":
            adapter_export.merge(lm, plan, merge_method, merge_calibration, eval_text)
    # low memory: float weights come back (rebuilt from the integers) only after the graph is written, and only
    # for verification or a caller's model
    fused = prof.fuse if fuse is None else fuse
    from . import embedding

    why_float = ("kept with an adapter" if plan is not None else None) or (
        None if fused else f"target {prof.name!r} runs unfused graphs") or embedding.plan(lm.model)
    share = share_embedding and why_float is None
    graph, rewritten, fusions = build_graph(lm, prof, fuse, sidecar=plan.sidecar if plan else None,
                                            low_memory=low_memory, restore=False, kv_dtype=kv_dtype,
                                            share_embedding=share)
    if prof.static_graphs:  # refused before anything is written
        from .qnn import preflight

        static = preflight(rewritten, prof.name, static, lm.model.config)
    from .validate import validate_or_raise

    validate_or_raise(graph, prof, rewritten)
    with atomic_dir(out, overwrite) as tmp:
        save_graph(graph, tmp)
        from .fusions import kv_share_buffer

        share_kv = kv_share_buffer(graph.graph)  # fused attention: onnxruntime-genai may share past/present
        del graph
        if low_memory and (verify or isinstance(model, LoadedModel)):
            from .rewrite import restore_float_weights

            restore_float_weights(lm.model)
        if share:  # torch then computes what the package does: the embedding reads the quantized head
            embedding.retie_torch(lm.model)
        _write_hf_files(lm, tmp)
        from .genai import genai_config

        config = genai_config(lm.model.config, lm.tokenizer, prof.provider, share_buffer=share_kv)
        (tmp / "genai_config.json").write_text(json.dumps(config, indent=2))
        parity = exact = None
        reference = adapter_export.reference(lm, plan) if plan is not None and verify else lm.model
        if verify and kv_dtype == "int8":
            from .verify import exact_parity

            exact = exact_parity(tmp / MODEL_FILE, reference, lm.tokenizer, prof.accuracy_level)
        if kv_dtype == "int8":
            from . import kv_cache

            cfg = lm.model.config
            scales = kv_cache.calibrate(tmp / MODEL_FILE, lm.tokenizer, cfg.vocab_size, cfg.max_position_embeddings)
            kv_cache.convert_file(tmp / MODEL_FILE, scales)
            fusions.append(f"int8 KV cache (per-channel scales from {scales.tokens} calibration positions)")
        if verify:
            from .verify import verify_package

            parity = verify_package(tmp / MODEL_FILE, reference, lm.tokenizer, prof.accuracy_level, exact=exact)
            ex = parity["exact"]
            require(parity["ok"], f"verification failed: ONNX Runtime (exact dequantization) and torch agree on "
                                  f"top-1 for only {ex['top1_agreement']:.1%} of positions (< {ex['threshold']:.0%}, "
                                  f"max abs diff {ex['max_abs_diff']:.3g}); pass --no-verify to keep the package anyway")
        manifest = _manifest(lm, prof, scheme_json, method_used, rewritten, fusions, kv_dtype, parity,
                             time.time() - t0)
        if prof.static_graphs:
            from .qnn import export_static

            manifest["static"] = export_static(tmp, static, int(lm.model.config.vocab_size))
        elif prof.name in ("vitisai", "openvino"):  # NPU targets that no check here covers
            manifest["npu_verification"] = (
                f"not verified on an NPU: target {prof.name} ({prof.provider}) cannot run on this machine and its "
                f"graph keeps dynamic shapes; only the CPU parity above was checked (`--target qnn` is verified "
                f"on the QNN HTP)")
        manifest["embedding"] = ("lm_head integers" if share else
                                 f"float32 ({why_float or 'share_embedding=False'})")
        if plan is not None:
            manifest.update(adapter_export.write(plan, tmp))
        write_manifest(tmp, manifest)  # last: it records the size and sha256 of every file above
    return out


def _write_hf_files(lm: LoadedModel, folder: Path) -> None:
    lm.model.config.save_pretrained(folder)
    if getattr(lm.model, "generation_config", None) is not None:
        lm.model.generation_config.save_pretrained(folder)
    if lm.tokenizer is not None:
        lm.tokenizer.save_pretrained(folder)


def _manifest(lm: LoadedModel, prof: TargetProfile, scheme_json: dict, method: str, rewritten: dict,
              fusions: list[str], kv_dtype: str, parity, seconds: float) -> dict:
    containers = [n for n, r in rewritten.items() if r.storage_bits != r.bits]
    return {
        "kind": PACKAGE_KIND,
        "format_version": PACKAGE_FORMAT_VERSION,
        "model_file": MODEL_FILE,
        "architecture": lm.model.config.model_type,
        "scheme": scheme_json,
        "method": method,
        "target": prof.to_json(),
        "layers": {n: r.to_json() for n, r in rewritten.items()},
        "containers": {
            "layers": len(containers),
            "note": (f"{len(containers)} 2-bit layers stored in 4-bit containers (same codes, scales and zero "
                     f"points: identical numerics, twice the weight bytes) because {prof.name} has no 2-bit kernel")
            if containers else "none",
        },
        "fusions": fusions,
        "kv_dtype": kv_dtype,
        "source": lm.source,
        "source_hash": lm.source_hash,
        "tool_version": tool_version(),
        "versions": library_versions(),
        "parity": parity,
        "adapters": [],
        "export_seconds": round(seconds, 1),
    }


def read_package_manifest(path: str | Path) -> dict:
    """Validate that `path` is an edge-recover package and return its manifest (`contract.read_manifest`).

    Example:
        >>> read_package_manifest("out/pkg")["target"]["name"]  # doctest: +SKIP
        'cpu'
    """
    return read_manifest(path)

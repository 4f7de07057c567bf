"""The export API: a model in, a verified package folder out (the contract of docs/design.md).

    model spec / LoadedModel + ExportOptions (one frozen object: target, scheme, blocks, KV dtype, adapter, ...)
      └─ build passes, in memory       quantize -> adapter base -> Optimum graph -> MatMulNBits -> LoRA
                                        side-car -> fusions -> embedding -> [static preflight] -> check graph
      └─ write passes, in atomic_dir   graph -> HF files -> KV dtype -> adapters -> verify -> [static graphs]
                                        -> manifest
    the folder appears complete or not at all (passes.py has the list and what each pass does).

`export(model, output, options)` runs `passes.pass_list(target)`; `export_package(model, output, **kw)` is the
same with the options as keyword arguments (`ExportOptions` field names). The package contract (file names,
manifest kind and version, the file table, validation) is `edge_recover.contract`'s; the names below are
re-exported from it for older callers.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from tqdm import tqdm

from edge_recover.atomic import atomic_dir, check_new_dir
from edge_recover.contract import (DATA_FILE, MANIFEST, MODEL_FILE, PACKAGE_FORMAT_VERSION, PACKAGE_KIND,  # noqa: F401
                                   read_manifest)
from edge_recover.models import LoadedModel, check_architecture

from . import adapter_export
from .passes import LOW_MEMORY_BYTES, ExportOptions, ExportState, pass_list, save_graph  # noqa: F401

__all__ = ["ExportOptions", "export", "export_package", "read_package_manifest"]


def export(model: "str | Path | LoadedModel", output: str | Path, options: ExportOptions = ExportOptions()) -> Path:
    """Export `model` as a package folder at `output` under `options`; returns the folder.

    `model` is `"smollm2"`, a HF folder, a .gguf file, a quantized checkpoint or a `LoadedModel` (quantized
    in place when it is not yet, and keeping what the export does to it: its quantization, an embedding
    re-tied to the quantized head). A full-precision model is quantized under `options.scheme`: a scheme
    name at the target's preferred block size, a JSON file (or a rule's explicit BLOCK) at its own blocks,
    `options.block_size` overriding either (passes._ensure_quantized); a quantized one keeps its integers
    and is refused if the target cannot take its blocks. With `options.verify`, ORT CPU logits are compared
    with torch and the export fails when the exact graph's top-1 agreement is below `verify.MIN_TOP1` (see
    verify.py). Bad options are refused before the model loads; nothing is written until every build pass
    has run.

    Example:
        >>> export("smollm2", "out/pkg", ExportOptions(scheme="w4w2gateup", target="cpu"))  # doctest: +SKIP
        PosixPath('out/pkg')
    """
    prof = options.profile()
    plan = (adapter_export.plan_adapter(options.adapter, options.adapter_mode, options.adapter_name, prof)
            if options.adapter is not None else None)
    out = check_new_dir(output, options.overwrite)
    t0 = time.time()
    state = ExportState(lm=_load(model, options.base), target=prof, plan=plan,
                        caller_model=isinstance(model, LoadedModel), started=t0)
    passes = pass_list(prof)
    # which pass runs, on a terminal (a real model's quantize and verify passes take minutes; tqdm stays silent
    # when stderr is not a terminal, so logs and the CLI's one-line errors are unchanged)
    bar = tqdm(total=len(passes.build) + len(passes.write), desc="export", unit="pass", leave=False, disable=None)
    try:
        for step in passes.build:
            bar.set_postfix_str(step.__name__)
            state = step(state, options)
            bar.update(1)
        with atomic_dir(out, options.overwrite) as tmp:
            state.folder = tmp
            for step in passes.write:
                bar.set_postfix_str(step.__name__)
                state = step(state, options)
                bar.update(1)
    finally:
        bar.close()
    return out


def export_package(model: "str | Path | LoadedModel", output: str | Path, **options: Any) -> Path:
    """`export(model, output, ExportOptions(**options))`: the options as keyword arguments.

    Example:
        >>> export_package("smollm2", "out/pkg", scheme="w4w2gateup", target="cpu")  # doctest: +SKIP
        PosixPath('out/pkg')
    """
    return export(model, output, ExportOptions(**options))


def _load(model: "str | Path | LoadedModel", base=None) -> LoadedModel:
    if isinstance(model, LoadedModel):
        check_architecture(model.model.config)
        return model
    from edge_recover.pipeline import resolve_model

    return resolve_model(model, base=base)


def read_package_manifest(path: str | Path) -> dict:
    """Validate that `path` is an edge-recover package and return its manifest (`contract.read_manifest`).

    Example:
        >>> read_package_manifest("out/pkg")["target"]["name"]  # doctest: +SKIP
        'cpu'
    """
    return read_manifest(path)

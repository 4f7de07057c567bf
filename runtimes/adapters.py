"""Side-car LoRA adapters at run time: pick one of a package's `.onnx_adapter` files for a session.

A side-car package (exporters/lora.py) holds LoRA weights as graph inputs whose defaults are the adapter
it was exported with; each file in `adapters/` overrides them. Two ways to activate one, both here:

- reference path: `onnxruntime.LoraAdapter().Load(file)` + `RunOptions.add_active_adapter` (what ORT
  documents; `session.run` only: ORT 1.31 warns that `run_with_iobinding` ignores active adapters);
- fast path: the adapter's parameters (`AdapterFormat.read_adapter(file).get_parameters()`, memory-mapped
  OrtValues) bound as inputs on the IO binding, so a switch costs no copy.

`load_adapter` refuses, with one line that names the fix: a package without side-car inputs, a name the
manifest does not list, a missing or altered file, parameters that do not fit the graph.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edge_recover.errors import EdgeRecoverError, require

from .package import Package

__all__ = ["ActiveAdapter", "adapter_names", "load_adapter", "genai_greedy"]


@dataclass
class ActiveAdapter:
    """One adapter ready for a session: its parameters (fast path) and run options (reference path)."""

    name: str
    file: Path
    params: dict[str, Any]  # input name -> OrtValue
    run_options: Any        # onnxruntime.RunOptions with the adapter active
    keepalive: Any = None


def adapter_names(package: Package) -> list[str]:
    """Names of the side-car adapters a package lists (the first is the graph's default)."""
    return [a["name"] for a in package.manifest.get("adapters") or [] if a.get("mode") == "sidecar"]


def _entry(package: Package, name: str) -> dict:
    mode = package.manifest.get("adapter_mode")
    where = f"package {str(package.path)!r}"
    if mode == "merge":
        merged = ", ".join(a.get("name", "?") for a in package.manifest.get("adapters") or [])
        raise EdgeRecoverError(f"{where} has its adapter ({merged}) merged into the weights; run it without "
                               "`--adapter`, or export with `--adapter-mode sidecar` to switch adapters")
    require(mode == "sidecar", f"{where} has no side-car adapters; export it with `--adapter DIR --adapter-mode "
                               "sidecar` to run adapters")
    names = adapter_names(package)
    found = [a for a in package.manifest["adapters"] if a.get("name") == name]
    require(bool(found), f"{where} has no adapter named {name!r} (it has: {', '.join(names)}); add one with "
                         f"`edge-recover adapter add {package.path} ADAPTER_DIR --name {name}`")
    return found[0]


def load_adapter(package: Package, name: str, session, check_hash: bool = True) -> ActiveAdapter:
    """The adapter `name` of `package`, checked against the manifest and `session`'s graph inputs.

    Example:
        >>> active = load_adapter(lm.package, "b", lm.session)  # doctest: +SKIP
        >>> sorted(active.params)[:1]  # doctest: +SKIP
        ['model.layers.0.mlp.down_proj.lora_A']
    """
    import onnxruntime as ort

    entry = _entry(package, name)
    path = package.path / entry["file"]
    fix = f"re-add it with `edge-recover adapter add {package.path} ADAPTER_DIR --name {name}`"
    require(path.is_file(), f"adapter {name!r}: file {entry['file']!r} is missing from package "
                            f"{str(package.path)!r}; {fix}")
    if check_hash and entry.get("sha256"):
        from edge_recover.contract import file_sha256

        require(file_sha256(path) == entry["sha256"],
                f"adapter {name!r}: {entry['file']!r} differs from the file the manifest records (sha256); {fix}")
    try:
        fmt = ort.AdapterFormat.read_adapter(str(path))
        params = dict(fmt.get_parameters())
        lora = ort.LoraAdapter()
        lora.Load(str(path))
    except Exception as exc:  # ORT raises RuntimeError/Fail subclasses for an unreadable file
        raise EdgeRecoverError(f"adapter {name!r}: {entry['file']!r} is not a readable ONNX Runtime adapter "
                               f"({str(exc).splitlines()[0][:120]}); {fix}") from None
    inputs = {i.name: i for i in session.get_overridable_initializers()}
    for key, value in params.items():
        arg = inputs.get(key)
        require(arg is not None, f"adapter {name!r}: parameter {key!r} is not an adapter input of this package's "
                                 f"graph; {fix}")
        require(list(arg.shape) == list(value.shape()),
                f"adapter {name!r}: parameter {key!r} has shape {value.shape()}, the graph takes {arg.shape}; {fix}")
    missing = [k for k in inputs if k.endswith((".lora_A", ".lora_B")) and k not in params]
    require(not missing, f"adapter {name!r} lacks {len(missing)} of the package's adapter inputs "
                         f"(e.g. {missing[0] if missing else ''}); {fix}")
    options = ort.RunOptions()
    options.add_active_adapter(lora)
    return ActiveAdapter(name, path, params, options, keepalive=(fmt, lora))


def genai_greedy(package: str | Path, prompt_ids: list[int], max_new_tokens: int, adapter: str | None = None) -> list[int]:
    """Greedy tokens from onnxruntime-genai on `package`, with side-car `adapter` active (og.Adapters).

    Example:
        >>> genai_greedy("out/pkg", [1, 2, 3], 8, adapter="b")  # doctest: +SKIP
    """
    try:
        import onnxruntime_genai as og
    except ImportError:
        raise EdgeRecoverError("onnxruntime-genai is not installed; `pip install onnxruntime-genai`") from None
    from .package import open_package

    pkg = open_package(package)
    model = og.Model(str(pkg.path))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(prompt_ids) + max_new_tokens, do_sample=False)
    generator = og.Generator(model, params)
    if adapter is not None:
        entry = _entry(pkg, adapter)
        path = pkg.path / entry["file"]
        require(path.is_file(), f"adapter {adapter!r}: file {entry['file']!r} is missing from package {str(pkg.path)!r}")
        adapters = og.Adapters(model)
        adapters.load(str(path), adapter)
        generator.set_active_adapter(adapters, adapter)
    generator.append_tokens(list(prompt_ids))
    out: list[int] = []
    while not generator.is_done() and len(out) < max_new_tokens:
        generator.generate_next_token()
        out.append(int(generator.get_next_tokens()[0]))
    return out

"""LoRA adapters in ONNX packages: read a PEFT adapter, put its path beside each MatMulNBits, write
ONNX Runtime adapter files (`.onnx_adapter`), and add more adapters to an existing package.

Side-car mode. For each adapted layer the exporter leaves the quantized MatMulNBits as it is and adds
the low-rank path beside it, in the dtype the target runs activations in (`TargetProfile.sidecar_dtype`):

    X ─┬─► MatMulNBits(codes, scales, zero points) ─────────────────────────────► Y_q ─┐
       └─► [Cast] ─► MatMul(lora_A [K, r]) ─► MatMul(lora_B [r, N]) ─► [Cast] ─► Y_l ─┴─► Add ─► Y
           /model/layers.3/mlp/gate_proj/lora_A/MatMul   .../lora_B/MatMul           .../lora/Add

`lora_A` is A^T and `lora_B` is scale * B^T, with PEFT's A [r, K], B [N, r] and scale = alpha / r
(alpha / sqrt(r) with rsLoRA): Y = X W_q^T + scale * (X A^T) B^T, exactly PEFT's forward. Folding the scale
into B keeps it per adapter, so adapters with other alphas share one graph. Both are graph inputs
(`model.layers.3.mlp.gate_proj.lora_A` / `.lora_B`) with initializers of the same name as defaults: the
package runs the exported adapter when nothing else is active, and an `.onnx_adapter` file (written with
`onnxruntime.AdapterFormat`) overrides them per run (`onnxruntime.LoraAdapter` +
`RunOptions.add_active_adapter`, or onnxruntime-genai's `Adapters`). Shapes are static, so a package takes
adapters of one rank layout (layer -> rank); `add_adapter` refuses others before writing anything.

Provenance: an adapter is only meaningful on the integers it was trained against. The package records its
base (teacher source hash, scheme, sha256 of all quantized integers); every adapter is checked against it
with `recovery.student.check_adapter`, the same check `edge-recover eval` makes.

Untrusted files: PEFT weights are read from `adapter_model.safetensors` only (no pickle).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edge_recover.atomic import atomic_file
from edge_recover.contract import file_sha256, read_manifest, write_manifest  # noqa: F401  (file_sha256: importable here too)
from edge_recover.errors import EdgeRecoverError, require

ADAPTERS_DIR = "adapters"
ADAPTER_SUFFIX = ".onnx_adapter"
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_PEFT_PREFIX = "base_model.model."


@dataclass(frozen=True)
class LoraLayer:
    """One adapted layer: PEFT's A [r, K] and B [N, r] (fp32) and its scale."""

    name: str
    a: np.ndarray
    b: np.ndarray
    scale: float

    @property
    def rank(self) -> int:
        return int(self.a.shape[0])

    def graph_weights(self, dtype: str) -> tuple[np.ndarray, np.ndarray]:
        """(A^T [K, r], scale * B^T [r, N]) in `dtype`: what the side-car MatMuls read."""
        np_dtype = np.dtype(dtype)
        return (np.ascontiguousarray(self.a.T).astype(np_dtype),
                np.ascontiguousarray(self.scale * self.b.T.astype(np.float64)).astype(np_dtype))

    def delta(self):
        """scale * B @ A [N, K] as a float64 torch tensor (what `merge` folds into the weight)."""
        import torch

        return self.scale * (torch.from_numpy(self.b).double() @ torch.from_numpy(self.a).double())


@dataclass
class LoraAdapterData:
    """A PEFT adapter folder written by `edge-recover recover`, read without torch or pickle."""

    path: Path
    meta: dict  # edge_recover_adapter.json
    layers: dict[str, LoraLayer]

    def rank_layout(self) -> dict[str, int]:
        return {n: layer.rank for n, layer in sorted(self.layers.items())}

    def provenance(self) -> dict:
        """What a package manifest records about where this adapter came from."""
        m = self.meta
        rep = _recovery_summary(self.path)
        return {"path": str(self.path), "base_source_hash": m.get("base_source_hash"),
                "scheme": (m.get("scheme") or {}).get("name"), "method": m.get("method"),
                "quant_hash": m.get("quant_hash"), "rank": m.get("rank"), "alpha": m.get("alpha"),
                "layers": len(self.layers), **({"recovery": rep} if rep else {})}


def _recovery_summary(path: Path) -> dict | None:
    f = path / "recovery_report.json"
    if not f.is_file():
        return None
    try:
        rep = json.loads(f.read_text())
    except (OSError, ValueError):
        return None
    keys = ("kl_before", "kl_after", "samples", "epochs", "step")
    return {k: rep[k] for k in keys if k in rep} or None


def _pattern_value(patterns: dict, layer: str, default):
    """PEFT's rank_pattern / alpha_pattern lookup: a key matches a layer name ending in it (regex)."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", layer):
            return value
    return default


def read_lora_adapter(path: str | Path) -> LoraAdapterData:
    """Read a PEFT LoRA adapter folder (config, safetensors weights, edge-recover provenance).

    Example:
        >>> data = read_lora_adapter("out/adapter")  # doctest: +SKIP
        >>> sorted(set(data.rank_layout().values()))  # doctest: +SKIP
        [32]
    """
    from safetensors.numpy import load_file

    from edge_recover.recovery.student import read_adapter_metadata

    p = Path(path).expanduser()
    meta = read_adapter_metadata(p)
    cfg_file, weights = p / "adapter_config.json", p / "adapter_model.safetensors"
    require(cfg_file.is_file(), f"adapter {str(p)!r} lacks adapter_config.json; pass a folder written by `edge-recover recover`")
    require(weights.is_file(), f"adapter {str(p)!r} lacks adapter_model.safetensors (pickled .bin weights are not read); "
                               "save the adapter with safetensors")
    try:
        cfg = json.loads(cfg_file.read_text())
        tensors = load_file(str(weights))
    except (OSError, ValueError) as exc:
        raise EdgeRecoverError(f"adapter {str(p)!r} cannot be read ({str(exc).splitlines()[0][:160]}); "
                               "is the folder complete?") from None
    require(cfg.get("peft_type", "LORA") == "LORA", f"adapter {str(p)!r} is a {cfg.get('peft_type')} adapter; only LoRA is supported")
    for flag, what in (("use_dora", "DoRA"), ("fan_in_fan_out", "fan_in_fan_out weights")):
        require(not cfg.get(flag), f"adapter {str(p)!r} uses {what}, which the exporter does not support; train plain LoRA")
    require(cfg.get("bias", "none") == "none" and not cfg.get("lora_bias") and not cfg.get("modules_to_save"),
            f"adapter {str(p)!r} trains biases or whole modules; only LoRA A/B matrices can be exported")
    layers: dict[str, LoraLayer] = {}
    for key in sorted(tensors):
        m = re.match(r"^(?:base_model\.model\.)?(.+)\.lora_A(?:\.[^.]+)?\.weight$", key)
        if not m:
            continue
        name = m.group(1)
        b_key = key.replace(".lora_A", ".lora_B")
        require(b_key in tensors, f"adapter {str(p)!r}: {key} has no matching lora_B; the adapter is damaged")
        a, b = tensors[key].astype(np.float32), tensors[b_key].astype(np.float32)
        require(a.ndim == 2 and b.ndim == 2 and a.shape[0] == b.shape[1],
                f"adapter {str(p)!r}: layer {name!r} has A {a.shape} and B {b.shape}, not a LoRA pair")
        r = a.shape[0]
        alpha = float(_pattern_value(cfg.get("alpha_pattern"), name, cfg.get("lora_alpha", r)))
        scale = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
        layers[name] = LoraLayer(name, a, b, scale)
    unknown = [k for k in tensors if ".lora_" not in k]
    require(not unknown, f"adapter {str(p)!r} holds tensors other than LoRA A/B ({unknown[:2]}); "
                         "only LoRA matrices can be exported")
    require(bool(layers), f"adapter {str(p)!r} holds no LoRA weights; pass a folder written by `edge-recover recover`")
    return LoraAdapterData(p, meta, layers)


def base_record(source_hash: str, scheme_json: dict, qhash: str) -> dict:
    """What a package records about the integers its adapters must have been trained against."""
    return {"source_hash": source_hash, "scheme": scheme_json, "quant_hash": qhash}


def check_against_base(data: LoraAdapterData, base: dict, shapes: dict[str, tuple[int, int]]) -> None:
    """Refuse an adapter for another base model, scheme or set of integers, or for layers the base lacks.

    `shapes` maps each quantized layer name to its [N, K].
    """
    from edge_recover.recovery.student import check_adapter

    where = f"adapter {str(data.path)!r}"
    meta = data.meta
    if meta.get("base_source_hash") == base["source_hash"] and meta.get("scheme") == base["scheme"]:
        require(meta.get("quant_hash") == base["quant_hash"],
                f"{where} was trained on other quantized integers (method {meta.get('method')!r}) than this "
                "package's; export from the quantized checkpoint it was trained on (`recover --save-quantized DIR`)")
    check_adapter(meta, base["source_hash"], base["scheme"], base["quant_hash"], where=where)
    for name, layer in data.layers.items():
        require(name in shapes, f"{where} adapts {name!r}, which is not a quantized layer of this model; "
                                "use an adapter trained on this model")
        n, k = shapes[name]
        require(layer.a.shape[1] == k and layer.b.shape[0] == n,
                f"{where}: layer {name!r} is {layer.b.shape[0]}x{layer.a.shape[1]} in the adapter but {n}x{k} in "
                "the model; use an adapter trained on this model")


def check_rank_layout(data: LoraAdapterData, layout: dict[str, int]) -> None:
    """Refuse an adapter whose layers or ranks differ from the package's side-car inputs."""
    got = data.rank_layout()
    if got == layout:
        return
    missing, extra = sorted(set(layout) - set(got)), sorted(set(got) - set(layout))
    ranks = sorted({f"{n}: {got[n]} vs {layout[n]}" for n in set(got) & set(layout) if got[n] != layout[n]})
    detail = "; ".join(x for x in (
        f"rank differs ({ranks[0]}{' and others' if len(ranks) > 1 else ''})" if ranks else "",
        f"{len(missing)} package layers not in the adapter (e.g. {missing[0]})" if missing else "",
        f"{len(extra)} adapter layers not in the package (e.g. {extra[0]})" if extra else "") if x)
    raise EdgeRecoverError(f"adapter {str(data.path)!r} has another rank layout than the package ({detail}); "
                           "export a package for it with `edge-recover export ... --adapter DIR`")


def _graph_input(name: str, dtype: int, shape: tuple[int, int]):
    from onnx import helper

    return helper.make_tensor_value_info(name, dtype, list(shape))


def input_names(layer: str) -> tuple[str, str]:
    """Graph input names of a layer's side-car weights (also the parameter names in `.onnx_adapter` files)."""
    return f"{layer}.lora_A", f"{layer}.lora_B"


def add_sidecar(model, data: LoraAdapterData, rewritten: dict, dtype: str) -> dict[str, dict]:
    """Insert the side-car LoRA path (diagram above) after each adapted MatMulNBits node, in place.

    `rewritten` maps a layer name to its `RewrittenLayer` (node name). Returns the manifest's `layers`
    record: layer -> {rank, inputs, nodes}.
    """
    from onnx import TensorProto, helper, numpy_helper

    require(dtype in ("float32", "float16"), f"internal: side-car dtype {dtype!r} is not float32/float16")
    onnx_dtype = TensorProto.FLOAT if dtype == "float32" else TensorProto.FLOAT16
    g = model.graph
    producer = {n.name: i for i, n in enumerate(g.node)}
    inserts: dict[int, list] = {}
    casts: dict[str, str] = {}  # X -> X in the side-car dtype (q/k/v share one Cast)
    record: dict[str, dict] = {}
    for layer_name, layer in sorted(data.layers.items()):
        info = rewritten.get(layer_name)
        require(info is not None, f"internal: adapted layer {layer_name!r} has no MatMulNBits node")
        idx = producer[info.node]
        node = g.node[idx]
        base = info.node.rsplit("/", 1)[0]
        x, y = node.input[0], node.output[0]
        node.output[0] = f"{y}/base"
        a_name, b_name = input_names(layer_name)
        a_t, b_t = layer.graph_weights(dtype)
        g.initializer.extend([numpy_helper.from_array(a_t, a_name), numpy_helper.from_array(b_t, b_name)])
        g.input.extend([_graph_input(a_name, onnx_dtype, a_t.shape), _graph_input(b_name, onnx_dtype, b_t.shape)])
        new = []
        xin = x
        if dtype != "float32":
            if x not in casts:
                casts[x] = f"{x}/lora_{dtype}"
                new.append(helper.make_node("Cast", [x], [casts[x]], name=f"{base}/lora/Cast", to=onnx_dtype))
            xin = casts[x]
        new.append(helper.make_node("MatMul", [xin, a_name], [f"{base}/lora_A/output_0"], name=f"{base}/lora_A/MatMul"))
        new.append(helper.make_node("MatMul", [f"{base}/lora_A/output_0", b_name], [f"{base}/lora_B/output_0"],
                                    name=f"{base}/lora_B/MatMul"))
        delta = f"{base}/lora_B/output_0"
        if dtype != "float32":
            new.append(helper.make_node("Cast", [delta], [f"{delta}/float"], name=f"{base}/lora/CastBack",
                                        to=TensorProto.FLOAT))
            delta = f"{delta}/float"
        new.append(helper.make_node("Add", [node.output[0], delta], [y], name=f"{base}/lora/Add"))
        inserts[idx] = new
        record[layer_name] = {"rank": layer.rank, "inputs": [a_name, b_name], "shape": list(layer.b.shape[:1]) + [layer.a.shape[1]],
                              "nodes": [n.name for n in new]}
    nodes = list(g.node)
    out = []
    for i, node in enumerate(nodes):
        out.append(node)
        out.extend(inserts.get(i, []))
    del g.node[:]
    g.node.extend(out)
    return record


def write_adapter_file(data: LoraAdapterData, dtype: str, path: str | Path) -> str:
    """Write `data` as an ONNX Runtime adapter file at `path` (atomically); returns its sha256.

    Parameters are named like the package's side-car graph inputs (`input_names`).
    """
    import onnxruntime as ort

    arrays = {}
    for layer_name, layer in sorted(data.layers.items()):
        a_name, b_name = input_names(layer_name)
        arrays[a_name], arrays[b_name] = layer.graph_weights(dtype)
    fmt = ort.AdapterFormat()
    fmt.set_adapter_version(1)
    fmt.set_model_version(1)
    fmt.set_parameters({k: ort.OrtValue.ortvalue_from_numpy(v) for k, v in arrays.items()})
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(p) as tmp:
        fmt.export_adapter(str(tmp))
        digest = file_sha256(tmp)
    return digest


def adapter_entry(name: str, data: LoraAdapterData, dtype: str, digest: str, default: bool) -> dict:
    """A `manifest.adapters` entry for a side-car adapter file."""
    return {"name": name, "mode": "sidecar", "file": f"{ADAPTERS_DIR}/{name}{ADAPTER_SUFFIX}", "sha256": digest,
            "dtype": dtype, "default": default, "rank_layout": data.rank_layout(), "source": data.provenance()}


def check_name(name: str) -> str:
    require(bool(NAME_RE.match(name or "")),
            f"adapter `--name` {name!r} must be 1-64 letters, digits, '.', '_' or '-' (starting with a letter or digit)")
    return name


def add_adapter(package: str | Path, adapter: str | Path, name: str, overwrite: bool = False) -> dict:
    """Write `adapter` as one more `.onnx_adapter` file of the side-car `package`; returns its manifest entry.

    The adapter must belong to the package's base (model, scheme, integers) and have its rank layout.

    Example:
        >>> add_adapter("out/pkg", "out/adapter-b", name="b")["file"]  # doctest: +SKIP
        'adapters/b.onnx_adapter'
    """
    pkg = Path(package).expanduser()
    manifest = read_manifest(pkg)
    lora = manifest.get("lora") or {}
    require(lora.get("mode") == "sidecar",
            f"package {str(pkg)!r} has no side-car adapter inputs; re-export it with `--adapter DIR --adapter-mode sidecar`")
    check_name(name)
    entries = [e for e in manifest.get("adapters", []) if e.get("name") != name]
    require(overwrite or len(entries) == len(manifest.get("adapters", [])),
            f"package {str(pkg)!r} already has an adapter named {name!r}; pick another `--name` or pass --overwrite")
    data = read_lora_adapter(adapter)
    shapes = {n: tuple(v["shape"]) for n, v in lora["layers"].items()}
    check_against_base(data, lora["base"], shapes)
    check_rank_layout(data, {n: v["rank"] for n, v in lora["layers"].items()})
    digest = write_adapter_file(data, lora["dtype"], pkg / ADAPTERS_DIR / f"{name}{ADAPTER_SUFFIX}")
    entry = adapter_entry(name, data, lora["dtype"], digest, default=False)
    manifest["adapters"] = entries + [entry]
    write_manifest(pkg, manifest)  # the file table now lists the new adapter file too
    return entry


@dataclass
class Sidecar:
    """A side-car request for the `lora_sidecar` export pass (passes.py): which adapter, in which dtype; `layers` is filled by `apply`."""

    data: LoraAdapterData
    dtype: str
    layers: dict | None = None

    def apply(self, model, rewritten: dict) -> None:
        self.layers = add_sidecar(model, self.data, rewritten, self.dtype)

"""Open a package folder (the contract in docs/design.md) and read what the runtime needs from it.

`open_package` checks the folder before any session is created, through the package contract
(`edge_recover.contract`): `manifest.json` of kind `edge-recover-package`, a `format_version` this runtime
knows, `model.onnx`, `config.json`, and every file's size against the manifest's file table (its sha256
too with `verify_hashes=True`, the CLI's `--verify-hashes`). It reads the
graph's structure without loading weights (`onnx.load(..., load_external_data=False)`), which gives the
KV-cache layout, the MatMulNBits bit widths actually in the graph, and the bytes of weights one decoded
token reads (all initializers, except that an embedding table feeding a Gather costs one row).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from edge_recover.contract import (CONFIG_FILE, MODEL_FILE, PACKAGE_KIND, check_external_data,  # noqa: F401
                                   check_files, kv_share_buffer, read_manifest)
from edge_recover.errors import EdgeRecoverError

__all__ = ["Package", "GraphStats", "open_package", "graph_stats", "folder_size"]


@dataclass(frozen=True)
class GraphStats:
    """What the ONNX graph says about memory traffic and quantization."""

    weight_bytes: int              # all initializers
    weight_bytes_per_token: int    # what one decode step reads (embedding tables count one row)
    matmulnbits_bits: dict[int, int]  # bits -> number of MatMulNBits nodes
    num_layers: int
    kv_heads: int
    head_dim: int
    kv_dtype_bytes: int
    kv_share_buffer: bool = False  # every present.* is written by GroupQueryAttention: past/present can share a buffer

    def kv_bytes_per_position(self) -> int:
        """Bytes of K and V, all layers, for one cached position (what each decode step reads per position)."""
        return 2 * self.num_layers * self.kv_heads * self.head_dim * self.kv_dtype_bytes


@dataclass(frozen=True)
class Package:
    """A validated package folder.

    Example:
        >>> pkg = open_package("out/demo/w4w2gateup")  # doctest: +SKIP
        >>> pkg.context_length, pkg.stats.weight_bytes_per_token  # doctest: +SKIP
    """

    path: Path
    manifest: dict
    config: dict
    generation_config: dict
    stats: GraphStats
    name: str = field(default="")

    @property
    def model_file(self) -> Path:
        return self.path / self.manifest.get("model_file", MODEL_FILE)

    @property
    def context_length(self) -> int:
        """The longest sequence (prompt + generated) the model was configured for."""
        return int(self.config.get("max_position_embeddings") or self.config.get("max_sequence_length") or 2048)

    @property
    def vocab_size(self) -> int:
        return int(self.config["vocab_size"])

    @property
    def eos_token_ids(self) -> list[int]:
        """End-of-sequence ids from generation_config.json, else config.json."""
        ids = self.generation_config.get("eos_token_id", self.config.get("eos_token_id"))
        if ids is None:
            return []
        return [int(i) for i in (ids if isinstance(ids, list) else [ids])]

    @property
    def scheme_name(self) -> str:
        scheme = self.manifest.get("scheme")
        if isinstance(scheme, str):
            try:
                scheme = json.loads(scheme)
            except ValueError:
                return scheme
        if isinstance(scheme, dict):
            return str(scheme.get("name", "custom"))
        return "fp32" if scheme is None else str(scheme)


def _read_json(path: Path, what: str) -> dict:
    try:
        data = json.loads(path.read_text())
    except ValueError as exc:
        raise EdgeRecoverError(f"{what} {str(path)!r} is not valid JSON ({exc}); re-export the package") from None
    if not isinstance(data, dict):
        raise EdgeRecoverError(f"{what} {str(path)!r} must hold a JSON object; re-export the package")
    return data


def open_package(path: str | Path, verify_hashes: bool = False) -> Package:
    """Validate a package folder and read its manifest, configs and graph structure.

    Raises `EdgeRecoverError` for a folder that is not a package, a package of a newer format than this
    runtime reads, a missing file, or a file whose size (or, with `verify_hashes`, sha256) differs from the
    manifest's file table.
    """
    p = Path(path).expanduser()
    manifest = read_manifest(p)
    check_files(p, manifest, hashes=verify_hashes)
    model_file = p / manifest.get("model_file", MODEL_FILE)
    if manifest.get("files") is None:  # an older package: at least its data file must hold every tensor
        check_external_data(model_file)
    if not (p / CONFIG_FILE).is_file():
        raise EdgeRecoverError(f"package {str(p)!r} lacks {CONFIG_FILE}; re-export it")
    config = _read_json(p / CONFIG_FILE, "config")
    gen_path = p / "generation_config.json"
    generation = _read_json(gen_path, "generation config") if gen_path.is_file() else {}
    return Package(p, manifest, config, generation, graph_stats(model_file), name=p.name)


def graph_stats(model_file: str | Path, kv_layout: tuple[int, int] | None = None) -> GraphStats:
    """Read weight sizes, MatMulNBits bit widths and the KV layout from an ONNX file, without its weights.

    `kv_layout` (kv_heads, head_dim) fills KV dimensions the graph leaves symbolic (onnxruntime-genai's
    builder names head_dim `head_size`)."""
    import numpy as np
    import onnx
    from onnx import helper

    try:
        model = onnx.load(str(model_file), load_external_data=False)
    except Exception as exc:  # protobuf's DecodeError and friends for a damaged file
        raise EdgeRecoverError(f"package file {str(model_file)!r} is not a readable ONNX model "
                               f"({type(exc).__name__}); re-export the package") from None
    graph = model.graph
    sizes: dict[str, tuple[int, int]] = {}  # name -> (bytes, rows)
    for init in graph.initializer:
        itemsize = np.dtype(helper.tensor_dtype_to_np_dtype(init.data_type)).itemsize
        count = int(np.prod(init.dims)) if len(init.dims) else 1
        sizes[init.name] = (count * itemsize, int(init.dims[0]) if len(init.dims) else 1)
    total = sum(b for b, _ in sizes.values())
    per_token = total
    bits: dict[int, int] = {}
    # a table read only by Gathers costs one slice per token; one also read by another node (a tied
    # embedding that is the lm_head's weight too) is read in full
    read_fully = {i for n in graph.node if n.op_type not in ("Gather", "GatherBlockQuantized") for i in n.input}
    rotary = {i for n in graph.node if n.op_type == "GroupQueryAttention" for i in n.input[7:9] if i in sizes}
    for name in rotary:  # cos/sin caches: GroupQueryAttention reads the rows of the positions it rotates
        nbytes, rows = sizes[name]
        per_token -= nbytes - nbytes // max(rows, 1)
    read_fully -= rotary
    for node in graph.node:
        if node.op_type in ("Gather", "GatherBlockQuantized") and node.input and node.input[0] in sizes:
            axis = next((a.i for a in node.attribute if a.name in ("axis", "gather_axis")), 0)
            for name in node.input:
                if name in sizes and name != node.input[1] and name not in read_fully:
                    init = next(i for i in graph.initializer if i.name == name)
                    nbytes = sizes[name][0]
                    slices = int(init.dims[axis]) if len(init.dims) > axis and node.op_type == "Gather" else sizes[name][1]
                    per_token -= nbytes - nbytes // max(slices, 1)
                    read_fully.add(name)  # counted once
        if node.op_type == "MatMulNBits":
            b = next((a.i for a in node.attribute if a.name == "bits"), 4)
            bits[b] = bits.get(b, 0) + 1
    kv = [i for i in graph.input if i.name.startswith("past_key_values.") and i.name.endswith(".key")]
    if not kv or not any(i.name == "input_ids" for i in graph.input):
        raise EdgeRecoverError(f"{str(model_file)!r} lacks the inputs input_ids / past_key_values.N.key of a "
                               f"text-generation-with-past graph; re-export the package")
    t = kv[0].type.tensor_type
    dims = [d.dim_value if d.HasField("dim_value") else 0 for d in t.shape.dim]
    if kv_layout is not None and len(dims) == 4:
        dims[1], dims[3] = dims[1] or kv_layout[0], dims[3] or kv_layout[1]
    if len(dims) != 4 or not dims[1] or not dims[3]:
        raise EdgeRecoverError(f"{str(model_file)!r}: KV input {kv[0].name} has shape {dims}, expected "
                               f"[batch, kv_heads, seq, head_dim]; re-export the package")
    kv_bytes = np.dtype(helper.tensor_dtype_to_np_dtype(t.elem_type)).itemsize
    return GraphStats(total, per_token, dict(sorted(bits.items())), len(kv), dims[1], dims[3], kv_bytes,
                      kv_share_buffer(graph))


def folder_size(path: str | Path) -> int:
    """Bytes on disk of every file under `path`."""
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())

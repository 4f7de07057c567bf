"""The package contract: what a package folder holds, how its manifest reads, and how its files are checked.

Exporters write packages through this module and runtimes read them through it, so neither imports the
other (sdk <- exporters <- runtimes). It owns:

- the names: `PACKAGE_KIND`, `PACKAGE_FORMAT_VERSION`, `MODEL_FILE`, `DATA_FILE`, `MANIFEST`, `CONFIG_FILE`;
- the KV cache element types a package may declare (`KV_DTYPES`);
- the file table: `manifest["files"]` maps every file of the folder (but the manifest) to its size and
  sha256. `write_manifest` computes it last, after every other file is written; `check_files` compares
  sizes always (cheap: one stat per file) and hashes on request (`--verify-hashes`, `edge-recover verify`);
- `read_manifest`: a folder in, a validated manifest out, or one `EdgeRecoverError` line naming the fix;
- `check_graph`: the MatMulNBits nodes of `model.onnx` against `manifest["layers"]` (bits, block, shape; a
  layer packed with others into one node, e.g. q/k/v, records its `rows` [start, stop) of that node's N).

A package written before the file table existed has no `files` key: it still loads, with one warning per
folder, and `edge-recover verify` says that it cannot check its bytes.

    export ──► files ──► write_manifest (file table last) ──► manifest.json
    run / profile / verify ──► read_manifest ──► check_files (sizes; hashes on request) ──► session

Example:
    >>> manifest = read_manifest("out/pkg")                      # doctest: +SKIP
    >>> check_files("out/pkg", manifest, hashes=True)            # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import json
import sys
from dataclasses import dataclass
from pathlib import Path

from .atomic import write_json_atomic
from .errors import EdgeRecoverError, require
from .versions import PACKAGE_FORMAT_VERSION

__all__ = ["PACKAGE_KIND", "PACKAGE_FORMAT_VERSION", "MODEL_FILE", "DATA_FILE", "MANIFEST", "CONFIG_FILE",
           "KV_DTYPES", "file_sha256", "file_table", "write_manifest", "read_manifest", "check_files",
           "check_graph", "check_external_data", "kv_share_buffer", "ProviderKernels", "PROVIDER_KERNELS",
           "STATIC_CACHE", "static_chunks", "static_window"]

PACKAGE_KIND = "edge-recover-package"
MODEL_FILE = "model.onnx"
DATA_FILE = "model.onnx.data"
MANIFEST = "manifest.json"
CONFIG_FILE = "config.json"
# KV cache element types a package may hold (manifest "kv_dtype") and their bytes per element.
KV_DTYPES: dict[str, int] = {"float32": 4, "float16": 2, "int8": 1}

_warned: set[str] = set()


@dataclass(frozen=True)
class ProviderKernels:
    """What one ONNX Runtime execution provider's MatMulNBits runs natively: bit widths and block sizes."""

    bits: tuple[int, ...]
    block_sizes: tuple[int, ...]
    source: str


_ALL_BLOCKS = (16, 32, 64, 128, 256)
# The one table of what each provider runs (FACTS.md). exporters/targets.py builds its target profiles from
# it and runtimes/providers.py refuses packages with it, so export and runtime cannot disagree.
PROVIDER_KERNELS: dict[str, ProviderKernels] = {
    "CPUExecutionProvider": ProviderKernels((2, 4, 8), _ALL_BLOCKS, "ORT >= 1.24 CPU EP: 2/4/8-bit (measured here)"),
    "CUDAExecutionProvider": ProviderKernels((4, 8), _ALL_BLOCKS, "ORT CUDA EP: 4/8-bit only (not run here)"),
    "DmlExecutionProvider": ProviderKernels((4, 8), (16, 32, 64, 128), "DirectML: 4/8-bit, dequantize + GEMM"),
    "QNNExecutionProvider": ProviderKernels((2, 4), (32, 64, 128), "QNN HTP: 2/4-bit (onnxruntime-qnn emulator)"),
    "OpenVINOExecutionProvider": ProviderKernels((2, 4, 8), _ALL_BLOCKS, "OpenVINO: 2 -> u2, 4 -> u4, 8 -> u8"),
    "VitisAIExecutionProvider": ProviderKernels((4,), (32, 64, 128), "Ryzen AI NPU: int4 (g128 in its LLM flow); "
                                                                     "no evidence of 2- or 8-bit MatMulNBits"),
}


def file_sha256(path: str | Path) -> str:
    """`"sha256:<hex>"` of a file's bytes, read in 4 MiB blocks.

    Example:
        >>> file_sha256("out/pkg/model.onnx")  # doctest: +SKIP
        'sha256:9f86d0...'
    """
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(1 << 22):
            h.update(block)
    return "sha256:" + h.hexdigest()


def file_table(folder: str | Path) -> dict[str, dict]:
    """{relative posix path: {"size", "sha256"}} of every file under `folder` but the manifest (and hidden
    temporary files)."""
    root = Path(folder)
    out = {}
    for f in sorted(root.rglob("*")):
        rel = f.relative_to(root).as_posix()
        if not f.is_file() or rel == MANIFEST or any(part.startswith(".") for part in f.relative_to(root).parts):
            continue
        out[rel] = {"size": f.stat().st_size, "sha256": file_sha256(f)}
    return out


def write_manifest(folder: str | Path, manifest: dict) -> dict:
    """Record the file table of `folder` in `manifest` and write it as `folder/manifest.json` (atomically).

    Call it last, after every other file of the package is written (and again after adding one, as
    `edge-recover adapter add` does). Returns the manifest as written.
    """
    manifest = {**manifest, "files": file_table(folder)}
    write_json_atomic(Path(folder) / MANIFEST, json.dumps(manifest, indent=2))
    return manifest


def read_manifest(path: str | Path) -> dict:
    """Validate that `path` is a package folder of a format this edge-recover reads; return its manifest.

    Checks: a folder, `manifest.json` holding a JSON object of kind `PACKAGE_KIND`, an integer
    `format_version` not newer than `PACKAGE_FORMAT_VERSION`, and the model file present. File sizes and
    hashes are `check_files`'s job.
    """
    p = Path(path).expanduser()
    require(p.is_dir(), f"package {str(p)!r} is not a folder; pass a folder written by `edge-recover export`")
    mf = p / MANIFEST
    require(mf.is_file(), f"{str(p)!r} is not an edge-recover package (no {MANIFEST}); "
                          f"pass a folder written by `edge-recover export`")
    try:
        manifest = json.loads(mf.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise EdgeRecoverError(f"{str(mf)!r} is not valid JSON ({exc}); re-export the package") from None
    require(isinstance(manifest, dict), f"{str(mf)!r} must hold a JSON object; re-export the package")
    require(manifest.get("kind") == PACKAGE_KIND, f"{str(mf)!r} is not an edge-recover package manifest (kind "
                                                  f"{manifest.get('kind')!r}); pass a folder written by `edge-recover export`")
    version = manifest.get("format_version")
    require(isinstance(version, int) and version >= 1,
            f"{str(mf)!r} has an invalid format_version {version!r}; re-export the package")
    require(version <= PACKAGE_FORMAT_VERSION,
            f"package {str(p)!r} has format_version {version}, newer than this runtime reads "
            f"({PACKAGE_FORMAT_VERSION}); upgrade edge-recover (pip install -U edge-recover)")
    model_file = manifest.get("model_file", MODEL_FILE)
    require(isinstance(model_file, str) and (p / model_file).is_file(),
            f"package {str(p)!r} lacks {model_file}; the package is incomplete, re-export it")
    files = manifest.get("files")
    require(files is None or (isinstance(files, dict) and all(
        isinstance(v, dict) and isinstance(v.get("size"), int) and isinstance(v.get("sha256"), str)
        for v in files.values())), f"{str(mf)!r} has a malformed `files` table; re-export the package")
    return manifest


def check_files(path: str | Path, manifest: dict, hashes: bool = False) -> list[str]:
    """Compare the package's files with `manifest["files"]`: sizes always, sha256 when `hashes`.

    Raises `EdgeRecoverError` naming the first bad file (missing, other size, other hash) and the fix.
    Returns the files on disk that the table does not list (a note, not an error). A package without a
    file table (written before it existed) passes with one warning per folder.
    """
    p = Path(path).expanduser()
    files = manifest.get("files")
    if files is None:
        if str(p.resolve()) not in _warned:
            _warned.add(str(p.resolve()))
            print(f"warning: package {str(p)!r} has no file table (written by an older edge-recover); its files "
                  f"cannot be checked: re-export it to get one", file=sys.stderr)
        return []
    for rel, entry in files.items():
        f = p / rel
        require(f.is_file(), f"package file {str(f)!r} is missing; the package is incomplete: {_fix(p, rel)}")
        size = f.stat().st_size
        require(size == entry["size"], f"package file {str(f)!r} has {size} bytes, the manifest says "
                                       f"{entry['size']}; it is truncated or replaced: {_fix(p, rel)}")
    if hashes:
        for rel, entry in files.items():
            f = p / rel
            require(file_sha256(f) == entry["sha256"],
                    f"package file {str(f)!r} does not match its sha256 in the manifest; it is corrupt: "
                    f"{_fix(p, rel)} (or copy it again)")
    on_disk = {f.relative_to(p).as_posix() for f in p.rglob("*") if f.is_file()
               and not any(part.startswith(".") for part in f.relative_to(p).parts)}
    return sorted(on_disk - set(files) - {MANIFEST})


def _fix(package: Path, rel: str) -> str:
    """What to do about a bad file: re-add a side-car adapter, else re-export the package."""
    if rel.startswith("adapters/") and rel.endswith(".onnx_adapter"):
        name = rel[len("adapters/"):-len(".onnx_adapter")]
        return f"re-add it with `edge-recover adapter add {package} ADAPTER_DIR --name {name} --overwrite`"
    return "re-export the package"


def check_graph(path: str | Path, manifest: dict) -> int:
    """Check that `model.onnx` holds the MatMulNBits node of every layer in `manifest["layers"]` with its
    bits (the stored width), block size and shape [N, K] (a packed node: the layer's `rows` of its N);
    returns the number of layers checked.

    Reads the graph without its weights. Raises `EdgeRecoverError` naming the first layer that differs.
    """
    import onnx

    p = Path(path).expanduser()
    model_file = p / manifest.get("model_file", MODEL_FILE)
    try:
        graph = onnx.load(str(model_file), load_external_data=False).graph
    except Exception as exc:  # protobuf raises DecodeError and others for a damaged file
        raise EdgeRecoverError(f"package file {str(model_file)!r} is not a readable ONNX model "
                               f"({type(exc).__name__}); re-export the package") from None
    nodes = {n.name: n for n in graph.node}
    layers = manifest.get("layers") or {}
    for name, layer in layers.items():
        node = nodes.get(layer.get("node", ""))
        require(node is not None and node.op_type == "MatMulNBits",
                f"package {str(p)!r}: layer {name!r} has no MatMulNBits node {layer.get('node')!r} in "
                f"{model_file.name}; the graph does not match the manifest, re-export the package")
        attrs = {a.name: a.i for a in node.attribute}
        want = {"bits": layer.get("storage_bits", layer.get("bits")), "block_size": layer.get("block_size")}
        if layer.get("shape"):
            want["N"], want["K"] = layer["shape"]
            if layer.get("rows"):  # the layer's rows of a packed node (q/k/v in one MatMulNBits)
                start, stop = layer["rows"]
                require(stop - start == want["N"] and 0 <= start < stop <= attrs.get("N", 0),
                        f"package {str(p)!r}: layer {name!r} rows {start}:{stop} do not fit node {node.name!r} "
                        f"(N={attrs.get('N')}); the graph does not match the manifest, re-export the package")
                want["N"] = attrs.get("N")
        for key, value in want.items():
            require(attrs.get(key) == value,
                    f"package {str(p)!r}: layer {name!r} node {node.name!r} has {key}={attrs.get(key)}, the manifest "
                    f"says {value}; the graph does not match the manifest, re-export the package")
    return len(layers)


def check_external_data(model_file: str | Path) -> None:
    """Refuse an ONNX file whose external tensors do not lie inside their data files (a truncated or missing
    `model.onnx.data`): the check a package without a file table still gets. Reads no weights."""
    import onnx

    model_file = Path(model_file)
    try:
        graph = onnx.load(str(model_file), load_external_data=False).graph
    except Exception as exc:  # protobuf raises DecodeError and others for a damaged file
        raise EdgeRecoverError(f"package file {str(model_file)!r} is not a readable ONNX model "
                               f"({type(exc).__name__}); re-export the package") from None
    sizes: dict[str, int] = {}
    for init in graph.initializer:
        if init.data_location != onnx.TensorProto.EXTERNAL:
            continue
        info = {e.key: e.value for e in init.external_data}
        f = model_file.parent / info.get("location", "")
        if f.name not in sizes:
            require(f.is_file(), f"package file {str(f)!r} is missing; the package is incomplete, re-export it")
            sizes[f.name] = f.stat().st_size
        end = int(info.get("offset", 0)) + int(info.get("length", 0))
        require(end <= sizes[f.name], f"package file {str(f)!r} has {sizes[f.name]} bytes but tensor "
                                      f"{init.name!r} ends at byte {end}; it is truncated: re-export the package")


def kv_share_buffer(graph) -> bool:
    """True when every `present.*` output of an ONNX `graph` is written by GroupQueryAttention, so a runtime
    may bind past and present to one preallocated buffer (GQA writes the new positions in place;
    onnxruntime-genai's `past_present_share_buffer`). The growing-cache graph of Optimum's attention cannot.

    Example:
        >>> kv_share_buffer(onnx.load("pkg/model.onnx", load_external_data=False).graph)  # doctest: +SKIP
        True
    """
    presents = {o.name for o in graph.output if o.name.startswith("present.")}
    by_gqa = {o for n in graph.node if n.op_type == "GroupQueryAttention" and n.domain == "com.microsoft"
              for o in n.output[1:3]}
    return bool(presents) and presents <= by_gqa


# ─── the static (NPU) graphs' cache contract ──────────────────────────────────────────────────────────
#
# One contract for the fixed-shape prefill (W tokens) and decode (1 token) graphs of a qnn package, which both
# edge-recover's runtime (runtimes/static_session.py) and onnxruntime-genai's decoder pipeline
# (exporters/genai.py, `static_pipeline_config`) drive:
#
#     input_ids [1, W]  position_ids [1, W]  past_key_values.{i}.key/value [1, kv, C, d]
#     -> logits [1, W, V]  present.{i}.key/value [1, kv, C, d]
#
# The cache slot of a token is its position: the graph writes the window's real entries at slot = position
# and returns the whole buffer (so past and present may be one buffer); keys at slots >= the window's first
# position are masked, the window orders itself causally. A prompt goes in windows of W; only the FIRST
# window is padded, at its front, and the padding takes the window's first real position (0 for a prompt on
# an empty cache: what onnxruntime-genai 0.18 feeds with `sliding_window.alignment` "right"; the first real
# position after a cache of L tokens). A token is padding when the next token's position is not larger:
#
#     n = 6, W = 4:   input_ids [pad pad t0 t1] [t2 t3 t4 t5]   position_ids [0 0 0 1] [2 3 4 5]
#
# The padding's entries are never written, and its keys are masked. Packages of this contract say
# `"cache": STATIC_CACHE` in their manifest's "static" section.
STATIC_CACHE = "positional"


def static_chunks(n: int, window: int) -> list[int]:
    """How many real tokens each prefill window of an `n`-token prompt holds: the first window the
    remainder (padded at its front), the others full.

    Example:
        >>> static_chunks(6, 4)
        [2, 4]
    """
    first = n % window or window
    return ([first] if n else []) + [window] * ((n - first) // window if n else 0)


def static_window(tokens, start: int, window: int, pad_id: int = 0):
    """`(input_ids, position_ids)` [1, window] int64 of `tokens` (at most `window`) at positions `start..`,
    padded at the front with `pad_id` at position `start` (the contract above).

    Example:
        >>> static_window([7, 8], 0, 4)[1].tolist()
        [[0, 0, 0, 1]]
    """
    import numpy as np

    tokens = np.asarray(tokens, np.int64).reshape(-1)
    n = int(tokens.shape[0])
    require(1 <= n <= window, f"internal: a static window of {window} takes 1..{window} tokens, got {n}")
    ids = np.full((1, window), pad_id, np.int64)
    pos = np.full((1, window), start, np.int64)
    ids[0, window - n:] = tokens
    pos[0, window - n:] = np.arange(start, start + n)
    return ids, pos

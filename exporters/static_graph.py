"""Static-shape graphs for NPUs: the package graph as a fixed-context prefill window and a one-token step.

QNN's HTP (and OpenVINO's NPU) compile a graph for fixed tensor shapes. The Optimum graph is dynamic (batch,
sequence and past lengths are symbols, and Shape -> Gather -> Range chains build the causal mask and the
positions at run time); with every dimension fixed, ONNX Runtime's basic optimizer folds those chains into
constants and what is left is operators the HTP takes (FACTS.md, "The NPU target on this machine").

The KV cache becomes C fixed slots, slot = position (sdk/contract.py, the contract edge-recover's runtime and
onnxruntime-genai's decoder pipeline both follow). Both graphs take the whole cache as the past and return it
with the window's real entries written at their positions; the attention mask is computed inside from
position_ids (slots before the window's first position, and the window's real tokens; the first prompt
window's front padding sits at position 0 and is neither written nor attended), and the graph's own causal
mask orders the window:

    input_ids [1, W]  position_ids [1, W]  past.{i}.key/value [1, kv, C, d]
        └──────────────────────── the model, every shape fixed ───────────────────────┘
    logits [1, W, V]                                                present.{i}.key/value [1, kv, C, d]

Two such graphs, W = `window` (prefill) and W = 1 (decode), reference ONE external data file: the package's
model.onnx.data, whose weights they share with identical offsets (`write_static_graphs`).

The passes, each `(graph, options) -> graph` with its picture above it (static_passes.py), in the order
`STATIC_PASSES` runs them: rotary tables (cos/sin looked up, not computed in fp16 from large angles), fixed
shapes, the positional cache (present = past with the new entries at slot = position), constant folding, no
empty tensors (the HTP refuses them), a finite attention-mask value (fp16 has no -3.4e38), an RMS norm that
squares x / max|x| (x² overflows fp16). What they are asked for, and the HTP parity gate's tolerance:
static_options.py. This module runs them (`static_graph`) and writes the two graphs over one data file.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Callable

from .static_options import GRAPH_FILES, NUMERICS, StaticOptions
from .static_passes import (drop_empty, finite_mask, fix_shapes, fold_constants, positional_cache, rotary_tables,
                            safe_rms_norm)

__all__ = ["STATIC_PASSES", "static_graph", "write_static_graphs"]


Pass = Callable[..., object]
# (name, pass, takes the window); run in this order by `static_graph`
STATIC_PASSES: tuple[tuple[str, Pass, bool], ...] = (
    ("rotary tables", rotary_tables, False),
    ("fixed shapes", fix_shapes, True),
    ("positional cache", positional_cache, True),
    ("constant folding", fold_constants, False),
    ("no empty tensors", drop_empty, False),
    ("finite mask", finite_mask, False),
    ("scale-safe RMS norm", safe_rms_norm, False),
)


def static_graph(dynamic_model: str | Path, opts: StaticOptions, window: int):
    """The static graph of window `window` from a package's dynamic `model.onnx` (weights read in).

    Example:
        >>> g = static_graph("out/pkg/model.onnx", StaticOptions(128, 32), window=1)  # doctest: +SKIP
    """
    import onnx

    graph = onnx.load(str(dynamic_model))
    for name, fn, windowed in STATIC_PASSES:
        if name in NUMERICS and name not in opts.numerics:
            continue
        graph = fn(graph, opts, window) if windowed else fn(graph, opts)
    return graph


def write_static_graphs(graphs: dict, folder: Path, data_file: str = "model.onnx.data",
                        threshold: int = 1024) -> dict:
    """Save `graphs` ({role: ModelProto}) as GRAPH_FILES[role] in `folder`, every tensor above `threshold`
    bytes in `data_file`: one that is already there (same bytes, e.g. a weight of the dynamic graph) is
    referenced at its offset, a new one is appended. Returns {"shared_tensors": n, "appended_bytes": n}."""
    import onnx
    from onnx import numpy_helper
    from onnx.external_data_helper import ExternalDataInfo, uses_external_data

    folder = Path(folder)
    data_path = folder / data_file
    index: dict[str, tuple[int, int]] = {}
    dyn = folder / "model.onnx"
    if dyn.exists() and data_path.exists():
        blob = data_path.read_bytes()
        for t in onnx.load(str(dyn), load_external_data=False).graph.initializer:
            if uses_external_data(t):
                info = ExternalDataInfo(t)
                index.setdefault(hashlib.sha256(blob[info.offset:info.offset + info.length]).hexdigest(),
                                 (info.offset, info.length))
        del blob
    shared = appended = 0
    with open(data_path, "ab") as out:
        for role, graph in graphs.items():
            for t in graph.graph.initializer:
                if not t.HasField("raw_data"):
                    t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t), t.name))
                raw = t.raw_data
                if len(raw) < threshold:
                    continue
                key = hashlib.sha256(raw).hexdigest()
                if key in index:
                    shared += 1
                else:
                    pad = (-out.tell()) % 64  # aligned, as onnx writes them
                    out.write(b"\0" * pad)
                    index[key] = (out.tell(), len(raw))
                    out.write(raw)
                    appended += len(raw) + pad
                offset, length = index[key]
                t.ClearField("raw_data")
                t.data_location = onnx.TensorProto.EXTERNAL
                del t.external_data[:]
                for k, v in (("location", data_file), ("offset", str(offset)), ("length", str(length))):
                    e = t.external_data.add()
                    e.key, e.value = k, v
            onnx.save_model(graph, str(folder / GRAPH_FILES[role]))
    return {"shared_tensors": shared, "appended_bytes": appended}

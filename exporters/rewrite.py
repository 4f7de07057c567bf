"""Rewrite an Optimum ONNX graph so every quantized layer runs as MatMulNBits with the torch integers.

Optimum names the MatMul of a linear layer after its module, so the layer `model.layers.3.mlp.gate_proj`
is the node `/model/layers.3/mlp/gate_proj/MatMul`:

    X ──► MatMul(X, W_t: f32 [K, N])                          before (W_t = the QuantLinear's float weight, transposed)
    X ──► MatMulNBits(X, qweight, scales, qzeros; K, N, bits, block_size, accuracy_level)   after

The node is renamed `/model/layers.3/mlp/gate_proj/MatMulNBits` and its integers come from the layer's
`QuantLinear.quantized()`, never from the float weight. A wrong mapping cannot pass silently: every
quantized layer must match exactly one MatMul, and that MatMul's weight must equal the dequantized
integers transposed (`_check_weight`); anything else raises.

Two more rewrites make the graph fast:
- `untie_transposes`: a tied lm_head is exported as `Transpose(embed_tokens.weight) -> MatMul`, which
  transposes the whole vocabulary matrix on every decode step (FACTS.md). The transpose is folded into an
  initializer once, and the embedding Gather reads that same matrix along axis 1, so it is stored once.
- unused float weights are dropped, so the package holds each tensor once.

The low-memory path (`low_memory_weights`, for models whose float weights do not fit twice in RAM, such as
a 1.7B model on a 24 GiB machine): during the Optimum export every QuantLinear's float weight is swapped for
a placeholder shared by all layers of the same (shape, role) — one `gate_proj` placeholder for all 28
layers — so the exporter serialises about one layer of float weights instead of all of them. Roles get
distinct values, or ONNX common-subexpression elimination would merge k/v or gate/up (same input, same
weight). The graph is the same Optimum graph; only the float initializers that the MatMulNBits rewrite
replaces anyway differ. Its check is weaker than the exact-weight check (it proves the role and shape of
each MatMul, the node name proves the layer index), and a test compares the outputs of both paths.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import onnx
from onnx import numpy_helper

from edge_recover.errors import EdgeRecoverError
from edge_recover.layouts import LAYOUTS
from edge_recover.quantizer import QuantizedWeight, dequantize
from edge_recover.scheme import QuantConfig

from .matmulnbits import matmulnbits_initializers, matmulnbits_node
from .targets import TargetProfile


@dataclass
class RewrittenLayer:
    """What one layer became in the graph (for the manifest)."""

    name: str
    node: str
    bits: int  # the scheme's bits (what the codes hold)
    storage_bits: int  # what the node stores (a 4-bit container for 2-bit codes where 2-bit is not native)
    block_size: int
    shape: tuple[int, int]  # [N, K]
    rows: tuple[int, int] | None = None  # the layer's output rows [start, stop) of a packed node (packed_qkv.py)

    def to_json(self) -> dict:
        out = {"bits": self.bits, "storage_bits": self.storage_bits, "block_size": self.block_size,
               "node": self.node, "shape": list(self.shape)}
        return {**out, "rows": list(self.rows)} if self.rows else out


def node_name_for(layer: str) -> str:
    """`model.layers.3.mlp.gate_proj` -> `/model/layers.3/mlp/gate_proj` (Optimum's module path)."""
    parts = layer.split(".")
    out: list[str] = []
    for p in parts:  # Optimum keeps `layers.3` together: a numeric part joins the one before it
        if p.isdigit() and out:
            out[-1] = f"{out[-1]}.{p}"
        else:
            out.append(p)
    return "/" + "/".join(out)


def _input_rank(model: onnx.ModelProto, name: str) -> int | None:
    for i in model.graph.input:
        if i.name == name:
            return len(i.type.tensor_type.shape.dim)
    return None


def untie_transposes(model: onnx.ModelProto) -> list[str]:
    """Fold every `Transpose(initializer)` into a new initializer; returns the folded node names.

    A tied embedding then reads the transposed matrix too, so the package holds the vocabulary matrix once:

        Gather(E [V, K], ids)                     ──►  Transpose(Gather(E_t [K, V], ids, axis=1), perm=[1, .., 0])
        MatMul(x, Transpose(E))                   ──►  MatMul(x, E_t)

    The Gather then reads K strided values per token (cheap) instead of a second copy of V x K floats.
    Without Optimum's post-processing (the low-memory path) torch has already folded the transpose into its
    own initializer `E_t`: a MatMul weight equal to a Gather table transposed is recognised by value
    (`_folded_twins`) and the Gather rewritten the same way, so both paths store the matrix once.
    """
    g = model.graph
    inits = {i.name: i for i in g.initializer}
    folded = []
    keep = []
    transposed = _folded_twins(model, inits)  # source initializer -> its transposed initializer
    for node in g.node:
        perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), None)
        if node.op_type == "Transpose" and node.input[0] in inits:
            arr = numpy_helper.to_array(inits[node.input[0]])
            t = np.ascontiguousarray(np.transpose(arr, perm))
            g.initializer.append(numpy_helper.from_array(t, node.output[0]))
            folded.append(node.name)
            if arr.ndim == 2 and perm in (None, [1, 0]):
                transposed[node.input[0]] = node.output[0]
        else:
            keep.append(node)
    out = []
    for node in keep:
        axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
        rank = _input_rank(model, node.input[1]) if node.op_type == "Gather" else None
        if node.op_type == "Gather" and node.input[0] in transposed and axis == 0 and rank:
            gathered = f"{node.output[0]}_t"
            out.append(onnx.helper.make_node("Gather", [transposed[node.input[0]], node.input[1]], [gathered],
                                             name=node.name, axis=1))
            out.append(onnx.helper.make_node("Transpose", [gathered], [node.output[0]], name=f"{node.name}/Transpose",
                                             perm=[*range(1, rank + 1), 0]))
            folded.append(node.name)
        else:
            out.append(node)
    if folded:
        del g.node[:]
        g.node.extend(out)
        drop_unused_initializers(model)
    return folded


def _roles(model) -> dict[str, int]:
    """A projection's local name -> its placeholder role, in the order of the family's layout (sdk/layouts.py: q, k,
    v, o, gate, up, down for the split families; qkv, o, gate_up, down for Phi-3); a name the layout does not list
    (lm_head) takes the next free role as it comes."""
    layout = LAYOUTS.get(getattr(getattr(model, "config", None), "model_type", None))
    names = layout.attention.projections() + layout.mlp.projections() if layout else ()
    return {r: i for i, r in enumerate(names)}


def _placeholder(shape: tuple[int, int], role: int) -> np.ndarray:
    """Deterministic float values [N, K] (a ramp from -1 to 1, plus 2 * role + 3), built in place in fp32:
    distinct per role by at least 2 everywhere, and no float64 temporary for a 1.2 GB lm_head placeholder."""
    n, k = shape
    values = np.arange(n * k, dtype=np.float32)
    values *= np.float32(2.0 / max(n * k - 1, 1))
    values += np.float32(-1.0 + 2 * role + 3)
    return values.reshape(n, k)


@dataclass
class Placeholders:
    """What `low_memory_weights` swapped in: layer -> (shape, role index); the expected ONNX weights by key."""

    keys: dict[str, tuple[tuple[int, int], int]]


@contextmanager
def low_memory_weights(model, restore: bool = True) -> Iterator[Placeholders]:
    """Swap every QuantLinear's float weight for a placeholder shared per (shape, role) while the block runs.

    On exit with `restore`, each layer gets its own float weight back, rebuilt from its integers (what torch
    forward and verification need); without it the float weights stay freed (a model loaded only to export).

    Example:
        >>> with low_memory_weights(lm.model) as ph:  # doctest: +SKIP
        ...     passes._optimum_export(lm.model, tmp)
    """
    import torch

    from edge_recover.apply import quantized_layers

    layers = quantized_layers(model)
    shared: dict[tuple, torch.nn.Parameter] = {}
    keys: dict[str, tuple[tuple[int, int], int]] = {}
    roles = _roles(model)
    for name, q in layers.items():
        role = roles.setdefault(name.rsplit(".", 1)[-1], len(roles))
        key = ((q.out_features, q.in_features), role)
        if key not in shared:
            shared[key] = torch.nn.Parameter(torch.from_numpy(_placeholder(*key)), requires_grad=False)
        q.weight = shared[key]
        keys[name] = key
    shared.clear()
    try:
        yield Placeholders(keys)
    finally:
        for q in layers.values():
            q.weight = torch.nn.Parameter(torch.empty(0), requires_grad=False)
        if restore:
            restore_float_weights(model)


def restore_float_weights(model) -> int:
    """Give every QuantLinear whose float weight was released its fp32 weight back, rebuilt from its integers;
    returns the number of layers restored."""
    import torch

    from edge_recover.apply import quantized_layers

    n = 0
    for q in quantized_layers(model).values():
        if q.weight.numel() == 0:
            q.weight = torch.nn.Parameter(torch.empty(0), requires_grad=False)
            q.refresh_weight()
            n += 1
    return n


def release_float_weights(model) -> int:
    """Free every QuantLinear's float weight (derived data: `refresh_weight` rebuilds it from the integers).

    The low-memory export calls this before casting the model to fp32, so a bf16-loaded 1.7B model never
    holds its linear weights in fp32. Returns the bytes released.
    """
    import torch

    from edge_recover.apply import quantized_layers

    freed = 0
    for q in quantized_layers(model).values():
        freed += q.weight.numel() * q.weight.element_size()
        q.weight = torch.nn.Parameter(torch.empty(0, dtype=q.weight.dtype), requires_grad=False)
    return freed


def _resolve_initializer(name: str, producers: dict[str, onnx.NodeProto], inits: dict) -> str | None:
    """The initializer `name` reads, through the Identity nodes the exporter adds for deduplicated tensors."""
    while name not in inits:
        node = producers.get(name)
        if node is None or node.op_type != "Identity":
            return None
        name = node.input[0]
    return name


def _view(init: onnx.TensorProto) -> np.ndarray:
    """An initializer as a numpy array, without a copy when it holds raw bytes (a 1.2 GB table stays 1.2 GB)."""
    if init.raw_data and init.data_type != onnx.TensorProto.STRING:
        dtype = onnx.helper.tensor_dtype_to_np_dtype(init.data_type)
        return np.frombuffer(init.raw_data, dtype=dtype).reshape(tuple(init.dims))
    return numpy_helper.to_array(init)


def _folded_twins(model: onnx.ModelProto, inits: dict) -> dict[str, str]:
    """Gather tables E [V, K] whose transpose is already stored as a MatMul weight [K, V] (equal values)."""
    g = model.graph
    tables = {n.input[0] for n in g.node if n.op_type == "Gather" and n.input[0] in inits
              and len(inits[n.input[0]].dims) == 2}
    weights = {n.input[1] for n in g.node if n.op_type == "MatMul" and n.input[1] in inits}
    twins: dict[str, str] = {}
    for e in tables:
        dims = tuple(inits[e].dims)
        for w in weights:
            if tuple(inits[w].dims) != dims[::-1] or inits[w].data_type != inits[e].data_type:
                continue
            a, b = _view(inits[e]), _view(inits[w])
            if np.array_equal(a[:8], b[:, :8].T) and all(  # row blocks: no transposed copy of the whole table
                    np.array_equal(a[r:r + 4096], b[:, r:r + 4096].T) for r in range(0, a.shape[0], 4096)):
                twins[e] = w
                break
    return twins


def _check_weight(layer: str, w_t: np.ndarray, qw: QuantizedWeight, rows: int = 1 << 14) -> None:
    """`w_t` [K, N] must equal the dequantized integers transposed, to 1e-6 of their largest value; compared
    `rows` output rows at a time (a whole 151,936-row lm_head would need a few GB of fp32 temporaries)."""
    n, k = qw.shape
    if w_t.shape != (k, n):
        raise EdgeRecoverError(f"internal: MatMul weight of {layer!r} has shape {w_t.shape}, expected {(k, n)}")
    err = top = 0.0
    for r in range(0, n, rows):
        expected = dequantize(qw.codes[r:r + rows], qw.scales[r:r + rows], qw.zero_points[r:r + rows],
                              qw.config.block_size).numpy().T
        err = max(err, float(np.abs(w_t[:, r:r + rows] - expected).max()))
        top = max(top, float(np.abs(expected).max()))
    tol = 1e-6 * max(top, 1.0)
    if err > tol:
        raise EdgeRecoverError(f"internal: the ONNX weight of {layer!r} differs from its quantized integers by "
                               f"{err:.3g}; the graph does not match the model, refusing to export")


def _stored(qw: QuantizedWeight, storage_bits: int) -> QuantizedWeight:
    """The same integers in a wider container: codes and zero points unchanged, so numerics are identical."""
    if storage_bits == qw.config.bits:
        return qw
    cfg = QuantConfig(storage_bits, qw.config.block_size, qw.config.symmetric)
    return QuantizedWeight(qw.codes, qw.scales, qw.zero_points, cfg)


def _check_placeholder(layer: str, init: str, w_t: np.ndarray, ph: Placeholders, seen: dict[str, tuple]) -> None:
    """`w_t` [K, N] must be the transposed placeholder of the layer's (shape, role): checked on 4,096 evenly
    spread entries (roles differ by >= 2 everywhere, shapes by the pattern), without building the placeholder."""
    key = ph.keys[layer]
    if seen.get(init) == key:
        return
    (n, k), role = key
    flat = np.linspace(0, n * k - 1, min(4096, n * k)).astype(np.int64)  # indices into the [N, K] placeholder
    step = 2.0 / max(n * k - 1, 1)
    expected = (-1.0 + flat * step).astype(np.float32) + np.float32(2 * role + 3)
    if w_t.shape != (k, n) or not np.allclose(w_t[flat % k, flat // k], expected, atol=1e-4, rtol=0):
        raise EdgeRecoverError(f"internal: the ONNX weight of {layer!r} is not its low-memory placeholder; the graph "
                               "does not match the model, refusing to export (retry with low_memory=False)")
    seen[init] = key


def replace_matmuls(model: onnx.ModelProto, layers: dict[str, QuantizedWeight], target: TargetProfile,
                    placeholders: Placeholders | None = None) -> list[RewrittenLayer]:
    """Swap the MatMul of each layer in `layers` (name -> integers) for a MatMulNBits node, in place.

    With `placeholders` (the graph was exported under `low_memory_weights`), each MatMul must read its
    (shape, role) placeholder instead of the layer's dequantized weight.
    """
    g = model.graph
    inits = {i.name: i for i in g.initializer}
    by_name = {n.name: n for n in g.node}
    producers = {o: n for n in g.node for o in n.output}
    seen: dict[str, tuple] = {}
    done: list[RewrittenLayer] = []
    for layer, qw in layers.items():
        base = node_name_for(layer)
        node = by_name.get(f"{base}/MatMul")
        if node is None or node.op_type != "MatMul":
            raise EdgeRecoverError(f"cannot find the MatMul of layer {layer!r} (expected node {base}/MatMul) in the "
                                   "exported graph; this architecture's export is not supported")
        w_name = _resolve_initializer(node.input[1], producers, inits)
        if w_name is None:
            raise EdgeRecoverError(f"internal: the MatMul of {layer!r} does not read an initializer ({node.input[1]!r})")
        if placeholders is None:
            _check_weight(layer, _view(inits[w_name]), qw)
        elif seen.get(w_name) != placeholders.keys[layer]:
            _check_placeholder(layer, w_name, _view(inits[w_name]), placeholders, seen)
        target.check_config(layer, qw.config)
        storage = target.storage_bits(qw.config.bits)
        prefix = layer
        g.initializer.extend(matmulnbits_initializers(_stored(qw, storage), prefix))  # per layer: no second copy of all
        new = matmulnbits_node(_stored(qw, storage), node.input[0], node.output[0], prefix,
                               f"{base}/MatMulNBits", accuracy_level=target.accuracy_level)
        node.CopyFrom(new)
        done.append(RewrittenLayer(layer, new.name, qw.config.bits, storage, qw.config.block_size, qw.shape))
    _drop_dead_identities(model)
    drop_unused_initializers(model)
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))
    return done


def _drop_dead_identities(model: onnx.ModelProto) -> None:
    """Remove Identity nodes whose output nothing reads any more (the deduplicated float weights)."""
    g = model.graph
    used = {i for n in g.node for i in n.input} | {o.name for o in g.output}
    keep = [n for n in g.node if n.op_type != "Identity" or n.output[0] in used]
    if len(keep) != len(g.node):
        del g.node[:]
        g.node.extend(keep)


def node_attrs(node: onnx.NodeProto) -> dict:
    """A node's attributes as {name: Python value}."""
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def producer_index(graph: onnx.GraphProto) -> dict[str, onnx.NodeProto]:
    """Tensor name -> the node that writes it."""
    return {o: n for n in graph.node for o in n.output}


def consumer_index(graph: onnx.GraphProto) -> dict[str, list[onnx.NodeProto]]:
    """Tensor name -> the nodes that read it, in graph order."""
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for n in graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    return consumers


def drop_unused_initializers(model: onnx.ModelProto) -> int:
    """Remove initializers no node reads (the float weights the rewrite replaced)."""
    g = model.graph
    used = {i for n in g.node for i in n.input} | {o.name for o in g.output}
    for n in g.node:  # subgraphs (If/Loop) read outer-scope names too
        for a in n.attribute:
            if a.g is not None:
                used |= {i for sn in a.g.node for i in sn.input}
    unused = [k for k, init in enumerate(g.initializer) if init.name not in used]
    for k in reversed(unused):  # in place: re-adding the kept ones would copy every weight once more
        del g.initializer[k]
    return len(unused)

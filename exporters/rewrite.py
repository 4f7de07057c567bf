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
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper

from edge_recover.errors import EdgeRecoverError
from edge_recover.quantizer import QuantizedWeight
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

    def to_json(self) -> dict:
        return {"bits": self.bits, "storage_bits": self.storage_bits, "block_size": self.block_size,
                "node": self.node, "shape": list(self.shape)}


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
    """
    g = model.graph
    inits = {i.name: i for i in g.initializer}
    folded = []
    keep = []
    transposed: dict[str, str] = {}  # source initializer -> its transposed initializer
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


def _check_weight(layer: str, w_t: np.ndarray, qw: QuantizedWeight) -> None:
    n, k = qw.shape
    if w_t.shape != (k, n):
        raise EdgeRecoverError(f"internal: MatMul weight of {layer!r} has shape {w_t.shape}, expected {(k, n)}")
    expected = qw.dequantize().numpy().T
    err = float(np.abs(w_t - expected).max())
    tol = 1e-6 * max(float(np.abs(expected).max()), 1.0)
    if err > tol:
        raise EdgeRecoverError(f"internal: the ONNX weight of {layer!r} differs from its quantized integers by "
                               f"{err:.3g}; the graph does not match the model, refusing to export")


def _stored(qw: QuantizedWeight, storage_bits: int) -> QuantizedWeight:
    """The same integers in a wider container: codes and zero points unchanged, so numerics are identical."""
    if storage_bits == qw.config.bits:
        return qw
    cfg = QuantConfig(storage_bits, qw.config.block_size, qw.config.symmetric)
    return QuantizedWeight(qw.codes, qw.scales, qw.zero_points, cfg)


def replace_matmuls(model: onnx.ModelProto, layers: dict[str, QuantizedWeight],
                    target: TargetProfile) -> list[RewrittenLayer]:
    """Swap the MatMul of each layer in `layers` (name -> integers) for a MatMulNBits node, in place."""
    g = model.graph
    inits = {i.name: i for i in g.initializer}
    by_name = {n.name: n for n in g.node}
    new_inits = []
    done: list[RewrittenLayer] = []
    for layer, qw in layers.items():
        base = node_name_for(layer)
        node = by_name.get(f"{base}/MatMul")
        if node is None or node.op_type != "MatMul":
            raise EdgeRecoverError(f"cannot find the MatMul of layer {layer!r} (expected node {base}/MatMul) in the "
                                   "exported graph; this architecture's export is not supported")
        w_name = node.input[1]
        if w_name not in inits:
            raise EdgeRecoverError(f"internal: the MatMul of {layer!r} does not read an initializer ({w_name!r})")
        _check_weight(layer, numpy_helper.to_array(inits[w_name]), qw)
        target.check_config(layer, qw.config)
        storage = target.storage_bits(qw.config.bits)
        prefix = layer
        new_inits += matmulnbits_initializers(_stored(qw, storage), prefix)
        new = matmulnbits_node(_stored(qw, storage), node.input[0], node.output[0], prefix,
                               f"{base}/MatMulNBits", accuracy_level=target.accuracy_level)
        node.CopyFrom(new)
        done.append(RewrittenLayer(layer, new.name, qw.config.bits, storage, qw.config.block_size, qw.shape))
    g.initializer.extend(new_inits)
    drop_unused_initializers(model)
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))
    return done


def drop_unused_initializers(model: onnx.ModelProto) -> int:
    """Remove initializers no node reads (the float weights the rewrite replaced)."""
    g = model.graph
    used = {i for n in g.node for i in n.input} | {o.name for o in g.output}
    for n in g.node:  # subgraphs (If/Loop) read outer-scope names too
        for a in n.attribute:
            if a.g is not None:
                used |= {i for sn in a.g.node for i in sn.input}
    keep = [i for i in g.initializer if i.name in used]
    dropped = len(g.initializer) - len(keep)
    if dropped:
        del g.initializer[:]
        g.initializer.extend(keep)
    return dropped

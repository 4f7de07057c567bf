"""Packed QKV for the cpu target: one MatMulNBits per layer for q, k and v, read by GroupQueryAttention packed.

A decode step of a small model is a chain of small kernels, and each MatMulNBits call has a fixed cost
(thread-pool dispatch, activation quantization of the same input at accuracy level 4). q_proj, k_proj and
v_proj read the same normed hidden state, so their integers stacked along N are one node that quantizes the
input once and dispatches once; GroupQueryAttention takes the packed output as its query and leaves key and
value empty (onnxruntime-genai's builder emits the same layout):

    x ─► q_proj ─┐                               x ─► qkv_proj (N = Nq + Nk + Nv) ─► GroupQueryAttention
    x ─► k_proj ─┼─► GroupQueryAttention   =>        rows [0, Nq) [Nq, Nq+Nk) [Nq+Nk, N)   (key, value: "")
    x ─► v_proj ─┘

Where q and k pass through per-head norms first (Qwen3's q_norm / k_norm), one Split after the packed node gives
the three outputs back under their own names, so the norms and the attention read them as before (the builder
does the same); the activation is still quantized once and the three dispatches are one:

    x ─► qkv_proj ─► Split ─► q ─► q_norm ─┐
                           ├► k ─► k_norm ─┼─► GroupQueryAttention
                           └► v ───────────┘

Where each projection has a bias (Qwen2's q/k/v: an Add of a constant [N] after its node), the three Adds become
one Add of the three biases stacked in the same order, after the packed node; under a Split the Adds stay, each
reading its own output:

    x ─► qkv_proj ─► Add(bias_q | bias_k | bias_v) ─► GroupQueryAttention

The integers are the layers' own, unchanged: B [N, blocks, bytes], scales [N * blocks] and zero points
[N, bytes] are row-major in N, so stacking rows is exact and the node computes each output column as the
layer's node did (tests: logits equal bit for bit). The manifest keeps one record per layer, with the fused
node's name and the layer's `rows` in it.

Left as three nodes: layers whose q/k/v outputs feed anything else first (a float16-KV Cast, a LoRA side-car),
or whose nodes differ in bits, block size, accuracy level or input.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .fusions import match_head_norm
from .rewrite import RewrittenLayer, consumer_index, drop_unused_initializers, node_attrs, producer_index

# the attributes the three nodes must share (N differs: it is summed)
_SHARED = ("K", "bits", "block_size", "accuracy_level")


def _source(name: str, producers: dict, consumers: dict,
            inits: dict) -> tuple[onnx.NodeProto | None, bool, onnx.NodeProto | None]:
    """(the MatMulNBits whose output reaches `name`, read by nothing else; whether through a per-head norm; the
    Add of its bias, or None).

    Directly, or through Qwen3's per-head norm (fusions._head_norm): MatMulNBits ─► Reshape ─► SimplifiedLayer-
    Normalization ─► Reshape ─► `name`; either way perhaps through the Add of a bias first."""
    node, normed, bias = producers.get(name), False, None
    if node is not None and node.op_type == "Reshape":
        matched = match_head_norm(name, producers)
        if matched is None or any(len(consumers.get(n.output[0], [])) != 1 for n in matched):
            return None, False, None
        node, normed = producers.get(matched[1].input[0]), True
    if node is not None and node.op_type == "Add" and len(consumers.get(node.output[0], [])) == 1:
        others = [i for i in node.input if i not in inits]
        if len(others) == 1 and len(node.input) == 2:  # x + a constant
            bias, node = node, producers.get(others[0])
    if node is None or node.op_type != "MatMulNBits" or len(node.input) != 4:
        return None, False, None
    if bias is not None and list(inits[_bias(bias, inits)].dims) != [node_attrs(node)["N"]]:
        return None, False, None
    return (node, normed, bias) if len(consumers.get(node.output[0], [])) == 1 else (None, False, None)


def _bias(add: onnx.NodeProto, inits: dict) -> str:
    """The initializer input of a bias Add."""
    return next(i for i in add.input if i in inits)


def _packable(gqa: onnx.NodeProto, producers: dict, consumers: dict,
              inits: dict) -> tuple[list[onnx.NodeProto] | None, bool, list[onnx.NodeProto]]:
    """(the q, k, v MatMulNBits feeding `gqa` only, sharing input and attributes, or None; whether any reaches
    it through a per-head norm; their bias Adds, all three or none)."""
    if len(gqa.input) < 3 or not all(gqa.input[:3]):
        return None, False, []
    found = [_source(name, producers, consumers, inits) for name in gqa.input[:3]]
    nodes, biases = [n for n, _, _ in found], [b for _, _, b in found if b is not None]
    if any(n is None for n in nodes) or len({n.input[0] for n in nodes}) != 1 or len(biases) not in (0, 3):
        return None, False, []
    shared = [tuple(node_attrs(n).get(k) for k in _SHARED) for n in nodes]
    return (nodes if len(set(shared)) == 1 else None), any(normed for _, normed, _ in found), biases


def pack_qkv(graph_model: onnx.ModelProto, rewritten: dict[str, RewrittenLayer]) -> int:
    """Stack each layer's q/k/v MatMulNBits into one node read packed by its GroupQueryAttention (in place).

    `rewritten` (layer -> RewrittenLayer) is updated: the three layers name the packed node and their rows.
    Returns the number of layers packed.

    Example:
        >>> pack_qkv(graph, state.rewritten)  # doctest: +SKIP
        30
    """
    g = graph_model.graph
    producers, consumers = producer_index(g), consumer_index(g)
    by_node = {r.node: r for r in rewritten.values()}
    inits = {t.name: t for t in g.initializer}
    packed_at: dict[str, onnx.NodeProto] = {}  # q_proj's node name -> the packed node that takes its place
    dropped: set[str] = set()  # k_proj's and v_proj's nodes (and the bias Adds that one Add replaces)
    new_inits: list[onnx.TensorProto] = []
    for gqa in (n for n in g.node if n.op_type == "GroupQueryAttention"):
        nodes, normed, biases = _packable(gqa, producers, consumers, inits)
        if nodes is None or any(n.name not in by_node for n in nodes):
            continue
        prefix = nodes[0].name.rsplit("/", 2)[0]  # /model/layers.i/self_attn
        arrays = [[numpy_helper.to_array(inits[n.input[j]]) for n in nodes] for j in (1, 2, 3)]
        names = [f"{prefix}/qkv_proj.{s}" for s in ("qweight", "scales", "qzeros")]
        new_inits += [numpy_helper.from_array(np.concatenate(a, axis=0), nm) for a, nm in zip(arrays, names)]
        sizes = [node_attrs(n)["N"] for n in nodes]
        a = node_attrs(nodes[0])
        packed = helper.make_node("MatMulNBits", [nodes[0].input[0], *names], [f"{prefix}/qkv_proj/output_0"],
                                  name=f"{prefix}/qkv_proj/MatMulNBits", domain=nodes[0].domain, N=sum(sizes),
                                  **{k: a[k] for k in _SHARED})
        packed_at[nodes[0].name] = [packed]
        dropped.update(n.name for n in nodes[1:])
        if normed:  # the norms read q and k apart: Split gives back the three outputs under their own names
            new_inits.append(numpy_helper.from_array(np.array(sizes, np.int64), f"{prefix}/qkv_proj/split"))
            packed_at[nodes[0].name].append(helper.make_node(
                "Split", [packed.output[0], f"{prefix}/qkv_proj/split"], [n.output[0] for n in nodes],
                name=f"{prefix}/qkv_proj/Split", axis=-1))
        elif biases:  # one Add of the stacked biases in place of the three
            stacked = np.concatenate([numpy_helper.to_array(inits[_bias(b, inits)]) for b in biases])
            new_inits.append(numpy_helper.from_array(stacked, f"{prefix}/qkv_proj.bias"))
            add = helper.make_node("Add", [packed.output[0], f"{prefix}/qkv_proj.bias"],
                                   [f"{prefix}/qkv_proj/Add_output_0"], name=f"{prefix}/qkv_proj/Add")
            packed_at[nodes[0].name].append(add)
            dropped.update(b.name for b in biases)
            gqa.input[0], gqa.input[1], gqa.input[2] = add.output[0], "", ""
        else:
            gqa.input[0], gqa.input[1], gqa.input[2] = packed.output[0], "", ""
        start = 0
        for n, size in zip(nodes, sizes):
            layer = by_node[n.name]
            layer.node, layer.rows = packed.name, (start, start + size)
            start += size
    if not packed_at:
        return 0
    ordered = [m for n in g.node if n.name not in dropped for m in packed_at.get(n.name, [n])]
    del g.node[:]
    g.node.extend(ordered)
    g.initializer.extend(new_inits)
    drop_unused_initializers(graph_model)
    return len(packed_at)

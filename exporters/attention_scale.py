"""GroupQueryAttention at scale 1: the attention's 1/sqrt(head_dim) moved into the query's norm.

ONNX Runtime's CPU GroupQueryAttention scores each head with one SGEMM call, Q [S x H] times the cached K
[T x H] transposed, alpha = the node's `scale`. For a decode step (S = 1) MLAS takes its copy-free M = 1
kernel only when alpha is 1; any other alpha takes the general path, which first packs the transposed K
block into a panel: a copy of the whole cached key, per head, per layer, per step. Where the query comes
out of a per-head RMS norm (Qwen3's q_norm), the scale folds into the norm's weight for free:

    Reshape ─► SimplifiedLayerNormalization(weight)     ─► Reshape ─► GroupQueryAttention(scale s)
    Reshape ─► SimplifiedLayerNormalization(weight * s) ─► Reshape ─► GroupQueryAttention(scale 1)

Rotary embedding is linear, so scaling the query before GroupQueryAttention's rotary equals scaling the
scores after it; the quantized layers' integers and scales are not touched. Without such a norm (Llama,
SmolLM2) the scale stays in the node: a Mul on the query costs about as much as the M = 1 kernel saves there
(SmolLM2, head_dim 64: GroupQueryAttention 5 % faster at 1,024 tokens, the Mul 0.15 ms of a 9 ms step).
Measured: docs/runtime-results.md, "Attention at scale 1".
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from .fusions import match_head_norm
from .rewrite import consumer_index, producer_index


def _attr(node: onnx.NodeProto, name: str) -> onnx.AttributeProto | None:
    return next((a for a in node.attribute if a.name == name), None)


def unit_attention_scale(graph_model: onnx.ModelProto) -> int:
    """Move each GroupQueryAttention's `scale` into its query's norm weight (in place); returns the nodes changed.

    Example:
        >>> unit_attention_scale(graph)  # doctest: +SKIP
        28
    """
    g = graph_model.graph
    producers, consumers = producer_index(g), consumer_index(g)
    inits = {t.name: t for t in g.initializer}
    changed = 0
    for node in g.node:
        if node.op_type != "GroupQueryAttention":
            continue
        scale = _attr(node, "scale")
        s = scale.f if scale is not None else 0.0
        if s in (0.0, 1.0):  # 1 already, or 0 / absent (1/sqrt(head_dim), which our fusion never writes): as is
            continue
        query = node.input[0]
        matched = match_head_norm(query, producers)
        weight = matched[0].input[1] if matched else None
        if weight not in inits or len(consumers.get(weight, [])) != 1 or len(consumers.get(query, [])) != 1:
            continue  # no per-head norm of its own before the attention: the scale stays in the node
        w = numpy_helper.to_array(inits[weight])
        inits[weight].CopyFrom(numpy_helper.from_array((w.astype(np.float32) * np.float32(s)).astype(w.dtype), weight))
        scale.f = 1.0
        changed += 1
    return changed

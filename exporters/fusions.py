"""Fused attention for the cpu target: one GroupQueryAttention node per layer instead of Optimum's ~100.

Optimum exports attention op by op: views (Shape/Gather/Unsqueeze/Concat/Reshape), rotary embedding
(Slice/Neg/Concat/Mul/Add), the KV concatenation, a causal mask built from `attention_mask` (Range, Where,
Expand, ...), MatMul/Softmax/MatMul. ONNX Runtime's own session optimizer fuses the RMS norms
(SimplifiedLayerNormalization) and SiLU but none of the attention, so the decode step runs thousands of
tiny kernels. This module replaces each layer's attention by com.microsoft GroupQueryAttention with
rotary inside (`do_rotary=1`), the op onnxruntime-genai's builder emits:

    q_proj ─► [Reshape ─► SimplifiedLayerNorm(q_norm) ─► Reshape] ─┐   (Qwen3 only: per-head RMS norm)
    k_proj ─► [Reshape ─► SimplifiedLayerNorm(k_norm) ─► Reshape] ─┤
    v_proj ───────────────────────────────────────────────────────┤
    past_key_values.i.key / .value ───────────────────────────────┤
    seqlens_k, total_sequence_length (from attention_mask) ───────┤
    cos_cache, sin_cache (the model's own rotary module) ─────────┴─► GroupQueryAttention ─► o_proj
                                                                          └─► present.i.key / .value

A family whose layout fuses q | k | v into one projection (Phi-3's `qkv_proj`, sdk/layouts.py) hands it over
packed, as packed_qkv.py hands over the other families' stacked q/k/v:

    qkv_proj ─► GroupQueryAttention (query: the packed rows; key, value: "")

Anchors are names, not op patterns: the projection nodes `/model/layers.i/self_attn/{q,k,v,o}_proj/...` (the
layout's names: `qkv_proj`, `o_proj` for Phi-3; MatMulNBits or MatMul), the graph inputs/outputs
`past_key_values.i.*` / `present.i.*`, and the torch module's norm weights and rotary tables; every module path
comes from the family's layout (sdk/layouts.py: layers, attention, q/k norms, norms, rotary), so this module
names none. Everything Optimum had between the anchors is dead code and is removed.
Inputs and outputs keep their names and layouts ([batch, kv_heads, seq, head_dim]), so the graph runs with
a cache that grows by concatenation, as Optimum's does, and also with one buffer bound as both past and
present (`kv_share_buffer`: runtimes/session.py's default for fused graphs, onnxruntime-genai's
`past_present_share_buffer`).

Then each residual Add and the RMS norm after it become one SkipSimplifiedLayerNormalization
(`fuse_skip_norms`, anchored on `/model/layers.i/{input,post_attention}_layernorm/` and `/model/norm/`, the
layout's norms):
ONNX Runtime fuses the norms itself but not the Add before them.

Projection biases (Qwen2's q/k/v, a Llama's `attention_bias`) need nothing: each is an Add after its projection
node, which attention reads through (`_projected`), and o_proj's stays after o_proj.

Refused (left unfused, the reason recorded): sliding-window attention, partial rotary, LongRoPE (its tables
change with the sequence length), layouts where an anchor is missing. GroupQueryAttention takes positions from
`seqlens_k` (the count of ones in `attention_mask`), which is right for left-aligned batches without padding:
what the runtime feeds.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from edge_recover.contract import kv_share_buffer  # noqa: F401  (the package contract's; importable here too)
from edge_recover.errors import EdgeRecoverError, require
from edge_recover.layouts import LAYOUTS, Layout, supported

from .rewrite import consumer_index, node_name_for, producer_index

MS = "com.microsoft"
_SEQLENS = "/model/attn_mask/seqlens_k"
_TOTAL = "/model/attn_mask/total_seq_len"


def fused_archs() -> tuple[str, ...]:
    """The model types whose layout says fused attention applies (sdk/layouts.py `fused_attention`).

    Example:
        >>> fused_archs()  # doctest: +SKIP
        ('llama', 'mistral', 'qwen2', 'qwen3')
    """
    return tuple(t for t in supported() if LAYOUTS[t].fused_attention)


def fusion_plan(model) -> tuple[bool, str]:
    """Whether `model` (a HF causal LM) can get fused attention, and why not when it cannot.

    Example:
        >>> fusion_plan(model)  # doctest: +SKIP
        (True, '')
    """
    cfg = model.config
    layout = LAYOUTS.get(cfg.model_type)
    if layout is None or not layout.fused_attention:
        return False, f"architecture {cfg.model_type!r} has no fused-attention mapping (fused: {', '.join(fused_archs())})"
    if getattr(cfg, "use_sliding_window", False) and getattr(cfg, "sliding_window", None):
        return False, "sliding-window attention is not mapped to GroupQueryAttention"
    if float(getattr(cfg, "partial_rotary_factor", 1.0) or 1.0) != 1.0:
        return False, "partial rotary embeddings are not mapped"
    rope = getattr(cfg, "rope_scaling", None) or {}
    if rope.get("rope_type", rope.get("type")) == "longrope":  # Phi-3's 128k variants
        return False, "LongRoPE switches its rotary tables with the sequence length, which one cos/sin cache cannot"
    if layout.attention.qkv and (layout.attention.q_norm or layout.attention.k_norm):
        return False, "per-head q/k norms after a fused qkv projection are not mapped"
    return True, ""


def _rotary_tables(model) -> tuple[np.ndarray, np.ndarray]:
    """cos/sin caches [max_positions, head_dim / 2] from the model's own rotary module (rope scaling included)."""
    import torch

    rot = model.get_submodule(LAYOUTS[model.config.model_type].rotary)
    n = int(model.config.max_position_embeddings)
    dim = _head_dim(model.config)
    with torch.no_grad():
        x = torch.zeros(1, 1, dim, dtype=torch.float32)
        cos, sin = rot(x, torch.arange(n).unsqueeze(0))
    cos, sin = cos[0].float().numpy(), sin[0].float().numpy()
    half = dim // 2
    # HF duplicates the half-table ([f, f]); GroupQueryAttention wants one half (non-interleaved rotate_half)
    if not (np.array_equal(cos[:, :half], cos[:, half:]) and np.array_equal(sin[:, :half], sin[:, half:])):
        raise EdgeRecoverError("internal: the rotary tables are not of the rotate_half layout; export with fuse=False")
    return np.ascontiguousarray(cos[:, :half]), np.ascontiguousarray(sin[:, :half])


def _head_dim(cfg) -> int:
    return int(getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads)


def _attention_path(layout: Layout, layer: int) -> str:
    """Layer `layer`'s attention module as the layout names it, e.g. 'model.layers.3.self_attn'."""
    return f"{layout.layer(layer)}.{layout.attention.module}"


def _proj(by_name: dict, layout: Layout, layer: int, proj: str) -> onnx.NodeProto:
    prefix = node_name_for(f"{_attention_path(layout, layer)}.{proj}")  # /model/layers.i/self_attn/q_proj
    for op in ("MatMulNBits", "MatMul"):
        node = by_name.get(f"{prefix}/{op}")
        if node is not None:
            return node
    raise EdgeRecoverError(f"fusion: no node for layer {layer} {proj} (expected {prefix}/MatMulNBits or /MatMul); "
                           "export with fuse=False")


def _projected(node: onnx.NodeProto, consumers: dict[str, list[onnx.NodeProto]]) -> str:
    """The projection's result as attention reads it: past any Add chain after it (its bias, a LoRA sidecar's
    `base + B(A(x))`), up to the first node that is not a lone Add."""
    name = node.output[0]
    while len(consumers.get(name, [])) == 1 and consumers[name][0].op_type == "Add":
        name = consumers[name][0].output[0]
    return name


def _mask_nodes() -> list[onnx.NodeProto]:
    """seqlens_k = sum(attention_mask) - 1 (int32 [batch]); total_sequence_length = mask width (int32 scalar)."""
    mk = helper.make_node
    p = "/model/attn_mask"
    return [
        mk("ReduceSum", ["attention_mask", f"{p}/axes"], [f"{p}/sum"], name=f"{p}/ReduceSum", keepdims=0),
        mk("Sub", [f"{p}/sum", f"{p}/one"], [f"{p}/sum_m1"], name=f"{p}/Sub"),
        mk("Cast", [f"{p}/sum_m1"], [_SEQLENS], name=f"{p}/Cast", to=TensorProto.INT32),
        mk("Shape", ["attention_mask"], [f"{p}/shape"], name=f"{p}/Shape"),
        mk("Gather", [f"{p}/shape", f"{p}/one"], [f"{p}/width"], name=f"{p}/Gather", axis=0),
        mk("Cast", [f"{p}/width"], [_TOTAL], name=f"{p}/Cast_1", to=TensorProto.INT32),
    ]


def _head_norm(x: str, weight: str, heads: int, dim: int, eps: float, prefix: str) -> tuple[list, list, str]:
    """Per-head RMS norm (Qwen3 q_norm/k_norm): [B, S, heads*dim] -> [B, S, heads, dim] -> norm -> back."""
    mk = helper.make_node
    inits = [numpy_helper.from_array(np.array([0, 0, heads, dim], np.int64), f"{prefix}/shape_4d"),
             numpy_helper.from_array(np.array([0, 0, heads * dim], np.int64), f"{prefix}/shape_3d")]
    nodes = [
        mk("Reshape", [x, f"{prefix}/shape_4d"], [f"{prefix}/heads"], name=f"{prefix}/Reshape"),
        mk("SimplifiedLayerNormalization", [f"{prefix}/heads", weight], [f"{prefix}/normed"],
           name=f"{prefix}/SimplifiedLayerNormalization", axis=-1, epsilon=eps, stash_type=1),
        mk("Reshape", [f"{prefix}/normed", f"{prefix}/shape_3d"], [f"{prefix}/output_0"], name=f"{prefix}/Reshape_1"),
    ]
    return nodes, inits, f"{prefix}/output_0"


def match_head_norm(name: str, producers: dict) -> tuple[onnx.NodeProto, onnx.NodeProto] | None:
    """(the SimplifiedLayerNormalization, its first Reshape) when `name` is the output of a per-head norm as
    `_head_norm` builds it (x ─► Reshape ─► SimplifiedLayerNormalization ─► Reshape ─► `name`), else None."""
    last = producers.get(name)
    norm = producers.get(last.input[0]) if last is not None and last.op_type == "Reshape" else None
    first = producers.get(norm.input[0]) if norm is not None and norm.op_type == "SimplifiedLayerNormalization" else None
    return (norm, first) if first is not None and first.op_type == "Reshape" else None


KV_DTYPES = {"float32": TensorProto.FLOAT, "float16": TensorProto.FLOAT16, "int8": TensorProto.INT8}
GRAPH_KV_DTYPES = ("float32", "float16")  # what fuse_attention builds; int8 follows calibration (kv_cache.py)


def fuse_attention(graph_model: onnx.ModelProto, model, kv_dtype: str = "float32") -> int:
    """Replace every layer's attention in `graph_model` by GroupQueryAttention (in place); returns the layer count.

    `model` is the torch model the graph was exported from (config, norm weights, rotary tables).
    `kv_dtype` "float16" halves the KV cache (past/present inputs and outputs): q, k and v are cast to
    float16 before the attention node, its output back to float32 after it, and the rotary tables are
    stored in float16 (GroupQueryAttention takes one element type for all of them):

        q, k, v (f32) ─► Cast f16 ─► GroupQueryAttention (past/present f16) ─► Cast f32 ─► o_proj
    """
    require(kv_dtype in GRAPH_KV_DTYPES, f"`kv_dtype` must be one of {', '.join(GRAPH_KV_DTYPES)}, got "
                                         f"{kv_dtype!r} (an int8 cache: kv_cache.to_int8 after calibration)")
    half = kv_dtype == "float16"
    cfg = model.config
    g = graph_model.graph
    by_name = {n.name: n for n in g.node}
    heads, kv_heads, dim = int(cfg.num_attention_heads), int(cfg.num_key_value_heads), _head_dim(cfg)
    eps = float(getattr(cfg, "rms_norm_eps", 1e-6))
    outputs = {o.name for o in g.output}
    producers = producer_index(g)
    consumers = consumer_index(g)
    cos, sin = _rotary_tables(model)
    if half:
        cos, sin = cos.astype(np.float16), sin.astype(np.float16)
    inits = [numpy_helper.from_array(cos, "/model/rotary/cos_cache"), numpy_helper.from_array(sin, "/model/rotary/sin_cache"),
             numpy_helper.from_array(np.array([1], np.int64), "/model/attn_mask/axes"),
             numpy_helper.from_array(np.array(1, np.int64), "/model/attn_mask/one")]
    new_before: dict[str, list[onnx.NodeProto]] = {}  # o_proj node name -> nodes to insert before it
    layout = LAYOUTS[cfg.model_type]
    at = layout.attention
    layers = model.get_submodule(layout.layers)
    for i, layer in enumerate(layers):
        attn = layer.get_submodule(at.module)
        if at.qkv:  # one fused projection (Phi-3): GroupQueryAttention reads it packed, key and value ""
            q, o = _proj(by_name, layout, i, at.qkv), _proj(by_name, layout, i, at.o)
        else:
            q, k, v, o = (_proj(by_name, layout, i, p) for p in (at.q, at.k, at.v, at.o))
        pk, pv = f"past_key_values.{i}.key", f"past_key_values.{i}.value"
        ok_, ov_ = f"present.{i}.key", f"present.{i}.value"
        if not {ok_, ov_} <= outputs:
            raise EdgeRecoverError(f"fusion: graph outputs {ok_}/{ov_} missing; export with fuse=False")
        prefix = node_name_for(_attention_path(layout, i))
        nodes: list[onnx.NodeProto] = []
        q_in, k_in, v_in = ((_projected(q, consumers), "", "") if at.qkv else
                            (_projected(p, consumers) for p in (q, k, v)))
        for which, norm in (("q", at.q_norm), ("k", at.k_norm)):
            norm_mod = getattr(attn, norm, None) if norm else None
            if norm_mod is None:
                continue
            w_name = f"{_attention_path(layout, i)}.{norm}.weight.fused"
            inits.append(numpy_helper.from_array(norm_mod.weight.detach().float().numpy(), w_name))
            n_heads = heads if which == "q" else kv_heads
            src = q_in if which == "q" else k_in
            nn_, ni, out = _head_norm(src, w_name, n_heads, dim, float(getattr(norm_mod, "variance_epsilon", eps)),
                                      f"{prefix}/{norm}")
            nodes += nn_
            inits += ni
            if which == "q":
                q_in = out
            else:
                k_in = out
        # the old producers of present.i.* become dead: give their outputs another name
        for name in (ok_, ov_):
            old = producers.get(name)
            if old is not None:
                old.output[list(old.output).index(name)] = f"{name}/unfused"
        attn_out = f"{prefix}/GroupQueryAttention/output_0"
        gqa_out = attn_out
        if half:
            casts = [helper.make_node("Cast", [x], [f"{prefix}/{w}_f16/output_0"], name=f"{prefix}/{w}_f16/Cast",
                                      to=TensorProto.FLOAT16)
                     for w, x in (("q", q_in), ("k", k_in), ("v", v_in)) if x]  # packed qkv: one Cast
            nodes += casts
            q_in, k_in, v_in = [c.output[0] for c in casts] + ["", ""][:3 - len(casts)]
            gqa_out = f"{prefix}/GroupQueryAttention/output_0_f16"
        nodes.append(helper.make_node(
            "GroupQueryAttention",
            [q_in, k_in, v_in, pk, pv, _SEQLENS, _TOTAL, "/model/rotary/cos_cache", "/model/rotary/sin_cache"],
            [gqa_out, ok_, ov_], name=f"{prefix}/GroupQueryAttention", domain=MS,
            num_heads=heads, kv_num_heads=kv_heads, do_rotary=1, rotary_interleaved=0,
            scale=float(getattr(attn, "scaling", dim ** -0.5)), local_window_size=-1))
        if half:
            nodes.append(helper.make_node("Cast", [gqa_out], [attn_out], name=f"{prefix}/GroupQueryAttention_f32/Cast",
                                          to=TensorProto.FLOAT))
        old_in = o.input[0]
        for reader in consumers.get(old_in, []):  # o_proj, and a sidecar's LoRA branch beside it
            for j, name in enumerate(reader.input):
                if name == old_in:
                    reader.input[j] = attn_out
        new_before[o.name] = nodes
    ordered = _mask_nodes()
    for node in g.node:
        ordered += new_before.get(node.name, [])
        ordered.append(node)
    del g.node[:]
    g.node.extend(ordered)
    g.initializer.extend(inits)
    for value in list(g.input) + list(g.output):  # the cache's element type, as the session binds it
        if value.name.startswith(("past_key_values.", "present.")):
            value.type.tensor_type.elem_type = KV_DTYPES[kv_dtype]
    remove_dead_nodes(graph_model)
    if not any(op.domain == MS for op in graph_model.opset_import):
        graph_model.opset_import.append(helper.make_opsetid(MS, 1))
    return len(layers)


_NORM_OPS = {"Cast", "Constant", "Pow", "ReduceMean", "Add", "Sqrt", "Div", "Reciprocal", "Mul"}


def _norm_modules(model) -> list[tuple[str, object]]:
    """(ONNX name prefix, torch RMS norm module) of every decoder norm, in graph order, where the layout puts them:
    `/model/layers.i/input_layernorm`, `/model/layers.i/post_attention_layernorm`, ..., `/model/norm`."""
    layout = LAYOUTS[model.config.model_type]
    out = []
    for i, layer in enumerate(model.get_submodule(layout.layers)):
        out += [(node_name_for(f"{layout.layer(i)}.{name}"), layer.get_submodule(name))
                for name in (layout.input_norm, layout.post_attention_norm)]
    return out + [(node_name_for(layout.final_norm), model.get_submodule(layout.final_norm))]


def fuse_skip_norms(graph_model: onnx.ModelProto, model) -> tuple[int, int]:
    """Replace each residual Add + RMS norm by com.microsoft SkipSimplifiedLayerNormalization (in place).

    Optimum writes a norm as ~12 nodes under `/model/layers.i/{input,post_attention}_layernorm/` or
    `/model/norm/` (Cast, Pow, ReduceMean, Add eps, Sqrt, Div, Mul, Cast, Mul weight); ONNX Runtime fuses
    those into SimplifiedLayerNormalization itself but leaves the residual Add before it. Here:

        residual a ─┐                                  a ─┐
        branch b  ──┴─► Add ─► x ─► RMSNorm ─► y   =>  b ──┴─► SkipSimplifiedLayerNorm ─► y (output 0)
                               └──► next residual Add              └─► x = a + b (output 3)

    A norm whose input is not an Add (layer 0's, after the embedding) becomes SimplifiedLayerNormalization.
    Gamma and epsilon come from the torch module. A norm whose nodes are not the expected ops is left alone.
    Returns (skip norms, plain norms) written.
    """
    g = graph_model.graph
    producers = producer_index(g)
    by_name = {n.name: n for n in g.node}
    in_layers = node_name_for(LAYOUTS[model.config.model_type].layers) + "."  # a decoder layer's residual Add
    drop: set[str] = set()
    at: dict[str, onnx.NodeProto] = {}   # node name -> new node taking its place
    rename: dict[str, str] = {}          # tensor name -> name its readers use instead
    inits, skip, plain = [], 0, 0
    for prefix, module in _norm_modules(model):
        group = [n for n in g.node if n.name.startswith(prefix + "/")]
        names = {n.name for n in group}
        cast, pow_ = by_name.get(f"{prefix}/Cast"), by_name.get(f"{prefix}/Pow")
        if not group or pow_ is None or {n.op_type for n in group} - _NORM_OPS:
            continue
        x, alias = pow_.input[0], None
        if cast is not None and x == cast.output[0]:
            if next(a.i for a in cast.attribute if a.name == "to") != TensorProto.FLOAT:
                continue
            x, alias = cast.input[0], cast.output[0]
        produced = {o for n in group for o in n.output}
        exits = {o for n in g.node if n.name not in names for o in n.input if o in produced and o != alias}
        exits |= {o.name for o in g.output if o.name in produced}
        if len(exits) != 1:
            continue
        y = exits.pop()
        gamma = f"{prefix}/weight.fused"
        inits.append(numpy_helper.from_array(module.weight.detach().float().numpy(), gamma))
        eps = float(getattr(module, "variance_epsilon", getattr(module, "eps", 1e-6)))
        add = producers.get(x)
        drop |= names
        if alias:
            rename[alias] = x
        if add is not None and add.op_type == "Add" and add.name.startswith(in_layers) and add.name not in at:
            at[add.name] = helper.make_node(
                "SkipSimplifiedLayerNormalization", [rename.get(i, i) for i in add.input[:2]] + [gamma],
                [y, "", "", x], name=f"{prefix}/SkipSimplifiedLayerNormalization", domain=MS, epsilon=eps)
            drop.add(add.name)
            skip += 1
        else:
            first = cast.name if alias else pow_.name
            at[first] = helper.make_node("SimplifiedLayerNormalization", [x, gamma], [y],
                                         name=f"{prefix}/SimplifiedLayerNormalization", axis=-1, epsilon=eps, stash_type=1)
            plain += 1
    ordered = []
    for node in g.node:
        new = at.get(node.name)
        if new is not None:
            ordered.append(new)
        if node.name in drop:
            continue
        ordered.append(node)
    for node in ordered:
        for j, name in enumerate(node.input):
            if name in rename:
                node.input[j] = rename[name]
    read = {i for n in ordered for i in n.input} | {o.name for o in g.output}
    for node in ordered:  # the final norm's sum feeds nothing: drop the optional output
        if node.op_type == "SkipSimplifiedLayerNormalization" and node.output[3] not in read:
            del node.output[1:]
    del g.node[:]
    g.node.extend(ordered)
    g.initializer.extend(inits)
    remove_dead_nodes(graph_model)
    return skip, plain


def remove_dead_nodes(model: onnx.ModelProto) -> int:
    """Drop nodes whose outputs nothing reads (walking back from the graph outputs), then unused initializers."""
    from .rewrite import drop_unused_initializers

    g = model.graph
    needed = {o.name for o in g.output}
    keep = []
    for node in reversed(g.node):
        if any(o in needed for o in node.output if o):
            keep.append(node)
            needed |= {i for i in node.input if i}
            for a in node.attribute:  # subgraphs read outer names
                if a.g is not None:
                    needed |= {i for sn in a.g.node for i in sn.input}
    removed = len(g.node) - len(keep)
    del g.node[:]
    g.node.extend(reversed(keep))
    drop_unused_initializers(model)
    return removed


def apply_fusions(graph: onnx.ModelProto, model, kv_dtype: str = "float32") -> list[str]:
    """Apply the fusions that pay on CPU to `graph` (exported from torch `model`); returns what was applied.

    Returns e.g. `["GroupQueryAttention x28 (rotary inside)", "SkipSimplifiedLayerNormalization x56 (...)"]`, or
    `["none: <reason>"]` when the architecture is not mapped (the graph is then left as Optimum made it).

    Example:
        >>> apply_fusions(graph, lm.model)  # doctest: +SKIP
        ['GroupQueryAttention x2 (rotary inside, q_norm/k_norm as SimplifiedLayerNormalization)']
    """
    ok, reason = fusion_plan(model)
    if not ok:
        require(kv_dtype == "float32", f"a {kv_dtype} KV cache needs the fused attention, which this model "
                                       f"cannot take ({reason}); export with `--kv-dtype float32`")
        return [f"none: {reason}"]
    graph_kv = kv_dtype if kv_dtype in GRAPH_KV_DTYPES else "float32"  # int8: converted after calibration
    n = fuse_attention(graph, model, graph_kv)
    layout = LAYOUTS[model.config.model_type]
    first = model.get_submodule(f"{_attention_path(layout, 0)}")
    norms = [n for n in (layout.attention.q_norm, layout.attention.k_norm) if n and hasattr(first, n)]
    extra = f", {'/'.join(norms)} as SimplifiedLayerNormalization" if norms else ""
    extra += f", {graph_kv} KV cache" if graph_kv != "float32" else ""
    done = [f"GroupQueryAttention x{n} (rotary inside{extra})"]
    skip, plain = fuse_skip_norms(graph, model)
    if skip:
        done.append(f"SkipSimplifiedLayerNormalization x{skip} (residual Add + RMS norm)"
                    + (f", SimplifiedLayerNormalization x{plain}" if plain else ""))
    return done

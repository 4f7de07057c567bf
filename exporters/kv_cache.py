"""An int8 KV cache for fused packages: per-channel scales calibrated on the package's own graph.

At long prompts a decode step reads the KV cache as well as the weights (Qwen3-1.7B: 112 KiB per position
in float32, 229 MB at 2,048 tokens, a fifth of a 4-bit model's weight bytes). ONNX Runtime's
GroupQueryAttention can keep that cache in int8 (`kv_cache_bit_width=8`) with a fixed scale per channel,
dequantizing inside the attention kernel: a quarter of the float32 bytes, and on CPU faster than float32
at every length we timed (bench/kv_cache_decode.py). The scales are what this module adds:

    float32-KV graph ─► run on the calibration prompts, each continued by sampling ─► present.i.key/value
                     ─► per layer, head and channel: max |value|              (V)
                                                     max over rotary pairs    (K, see below)
                     ─► scale = max / 127 * headroom ─► GroupQueryAttention(k_scale, v_scale), int8 past/present

The cache holds keys after the rotary embedding, which turns each channel pair (i, i + head_dim/2) by a
position-dependent angle: a key's channel i can take any value up to the pair's norm sqrt(k_i^2 + k_{i+d/2}^2)
at some position. So both channels of a pair get the largest pair norm seen, which calibration prompts of
~100 tokens bound for every position; values beyond `headroom` times that saturate at +-127 (the kernel
clamps). Values are not rotated: their own per-channel maximum.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from edge_recover.errors import EdgeRecoverError

from .verify import DEFAULT_PROMPTS, empty_past, prompt_ids, run_step, session

QMAX = 127
HEADROOM = 2.0  # scale = calibrated max / 127 * HEADROOM: clipping costs more than resolution (docs/export.md)
NEW_TOKENS = 96  # sampled after each calibration prompt


@dataclass(frozen=True)
class KVScales:
    """Per-layer scales, each [1, kv_heads, 1, head_dim] (GroupQueryAttention's PER_CHANNEL shape)."""

    key: list[np.ndarray]
    value: list[np.ndarray]
    tokens: int  # calibration positions per layer
    headroom: float

    def to_json(self) -> dict:
        return {"dtype": "int8", "quantization": "per-channel, symmetric", "calibration_tokens": self.tokens,
                "headroom": self.headroom}


def _cache_max(present: np.ndarray, rotary: bool) -> np.ndarray:
    """[1, H, T, D] cache -> [H, D] largest magnitude per channel (rotary: per channel pair, both channels)."""
    x = np.abs(present[0].astype(np.float64))
    if rotary:
        half = x.shape[-1] // 2
        pair = np.sqrt(x[..., :half] ** 2 + x[..., half:] ** 2)
        x = np.concatenate([pair, pair], axis=-1)
    return x.max(axis=1)


def calibrate(model_path: str | Path, tokenizer, vocab_size: int, context: int, prompts=DEFAULT_PROMPTS,
              new_tokens: int = NEW_TOKENS, headroom: float = HEADROOM, seed: int = 0, threads: int = 2) -> KVScales:
    """KV scales of the float32-KV graph at `model_path` from `prompts`, each continued by `new_tokens` sampled
    ones (all within `context` positions, the graph's rotary table).

    Example:
        >>> scales = calibrate(pkg / "model.onnx", tok, 49152, context=8192)  # doctest: +SKIP
        >>> scales.key[0].shape
        (1, 3, 1, 64)
    """
    sess = session(model_path, threads=threads)
    rng = np.random.default_rng(seed)
    names = sorted((n for n in empty_past(sess) if n.endswith(".key")), key=lambda n: int(n.split(".")[1]))
    kmax: list[np.ndarray] = []
    vmax: list[np.ndarray] = []
    tokens = 0
    for ids in prompt_ids(tokenizer, vocab_size, prompts, seed):
        ids = ids[:, :context]
        logits, past = run_step(sess, ids, empty_past(sess), 0)
        length = ids.shape[1]
        for _ in range(min(new_tokens, context - length)):  # sample (temperature 1): the model's own distribution, not one greedy path
            p = np.exp(logits[0, -1] - logits[0, -1].max())
            token = rng.choice(p.size, p=p / p.sum())
            logits, past = run_step(sess, np.array([[token]]), past, length)
            length += 1
        tokens += length
        for i, name in enumerate(names):
            k = _cache_max(past[name], rotary=True)
            v = _cache_max(past[name[: -len("key")] + "value"], rotary=False)
            if len(kmax) <= i:
                kmax.append(k)
                vmax.append(v)
            else:
                kmax[i], vmax[i] = np.maximum(kmax[i], k), np.maximum(vmax[i], v)

    def scale(m: np.ndarray) -> np.ndarray:
        s = np.maximum(m, 1e-6) / QMAX * headroom  # a channel that stays 0 still needs a positive scale
        return s.astype(np.float32)[None, :, None, :]

    return KVScales([scale(m) for m in kmax], [scale(m) for m in vmax], tokens, headroom)


def to_int8(graph: onnx.ModelProto, scales: KVScales) -> int:
    """Give every GroupQueryAttention of `graph` an int8 cache with `scales` (in place); returns the layer count.

        q, k, v ─► GroupQueryAttention(..., k_scale, v_scale; kv_cache_bit_width=8, PER_CHANNEL) ─► o_proj
                   past/present int8 [1, kv_heads, seq, head_dim]
    """
    g = graph.graph
    attn = [n for n in g.node if n.op_type == "GroupQueryAttention"]
    if len(attn) != len(scales.key):
        raise EdgeRecoverError(f"the graph has {len(attn)} GroupQueryAttention nodes but the KV scales cover "
                               f"{len(scales.key)} layers; calibrate on this graph")
    for i, node in enumerate(attn):
        prefix = node.name.rsplit("/", 1)[0]
        k_name, v_name = f"{prefix}/k_scale", f"{prefix}/v_scale"
        g.initializer.extend([numpy_helper.from_array(scales.key[i], k_name),
                              numpy_helper.from_array(scales.value[i], v_name)])
        inputs = list(node.input) + [""] * (12 - len(node.input))  # k_scale, v_scale are inputs 12 and 13
        del node.input[:]
        node.input.extend(inputs[:12] + [k_name, v_name])
        node.attribute.extend([onnx.helper.make_attribute("kv_cache_bit_width", 8),
                               onnx.helper.make_attribute("k_quant_type", "PER_CHANNEL"),
                               onnx.helper.make_attribute("v_quant_type", "PER_CHANNEL")])
    for value in list(g.input) + list(g.output):
        if value.name.startswith(("past_key_values.", "present.")):
            value.type.tensor_type.elem_type = TensorProto.INT8
    return len(attn)


def convert_file(model_path: str | Path, scales: KVScales) -> None:
    """Rewrite the graph file at `model_path` (external data untouched) with an int8 cache."""
    m = onnx.load(str(model_path), load_external_data=False)
    to_int8(m, scales)
    onnx.save_model(m, str(model_path))

"""A tied embedding read from the quantized lm_head's own integers, so the vocabulary matrix is not stored in float.

A tied model shares one [V, K] matrix between the embedding (a row lookup per token) and the lm_head (a
MatMul every step). Once a scheme quantizes the head (`--rule lm_head=8`), the package held that matrix
twice: packed in the head's MatMulNBits, and in float32 for the embedding's Gather (Qwen3-1.7B: 1.24 GB of
a 2.4 GB package). com.microsoft GatherBlockQuantized reads rows straight from MatMulNBits' layout:

    input_ids ─► GatherBlockQuantized(lm_head.qweight [V, k_blocks, blob]   (the head's B, shared)
                                      lm_head.embed_scales [V, k_blocks, 1]
                                      lm_head.embed_zeros  [V, k_blocks, 1]; quantize_axis 2)
              ─► [.., k_blocks, block] ─► Reshape [.., K] ─► layer 0

Only the scales and zero points are stored again (MatMulNBits wants them as [V, k_blocks] and packed,
GatherBlockQuantized with the data's rank: 19 MB at V = 151,936, block 64). The embedding then returns the
head's dequantized rows, the same values a tied torch model gets after quantization when its embedding
reads the quantized head's weight (sdk/shared_head.py: export applies it before verification, so the parity
check stays exact, and recovery trains against the same). Applies to tied models whose head is quantized with
K a multiple of its block size (`shared_head.shares`); otherwise the float embedding stays and the reason is
reported.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from edge_recover.packing import pack_codes, unpack_zero_points
from edge_recover.quantizer import QuantizedWeight

from .matmulnbits import MS_DOMAIN
from .rewrite import RewrittenLayer, drop_unused_initializers

HEAD = "lm_head"


def _embedding_gather(g: onnx.GraphProto) -> tuple[list[onnx.NodeProto], str, str]:
    """The nodes that look up `input_ids` in a float table, the table's name and the embedding output."""
    gather = next((n for n in g.node if n.op_type == "Gather" and n.input[1] == "input_ids"), None)
    if gather is None:
        raise onnx.checker.ValidationError("no Gather reads input_ids")
    transpose = next((n for n in g.node if n.op_type == "Transpose" and n.input[0] == gather.output[0]), None)
    if transpose is not None:  # untie_transposes' Gather(E_t, ids, axis=1) -> Transpose
        return [gather, transpose], gather.input[0], transpose.output[0]
    return [gather], gather.input[0], gather.output[0]


def share_head_integers(graph: onnx.ModelProto, head: RewrittenLayer, zero_points: np.ndarray) -> str:
    """Replace the embedding's float Gather in `graph` by GatherBlockQuantized over the head's B (in place).

    `zero_points` are the head's unpacked zero points [V, k_blocks] (uint8). Returns a line for the manifest.
    """
    inits = {i.name: i for i in graph.graph.initializer}
    n, k = head.shape
    scales = numpy_helper.to_array(inits[f"{HEAD}.scales"]).reshape(n, -1, 1)
    bits, block = head.storage_bits, head.block_size
    table = _gather_block_quantized(graph, f"{HEAD}.qweight", scales, zero_points, bits, block, k, HEAD)
    return (f"embedding from the lm_head's {bits}-bit integers (GatherBlockQuantized, block {block})"
            + ("" if table else "; float table still used elsewhere"))


#   input_ids ─► GatherBlockQuantized(embed_tokens.qweight [V, k_blocks, blob], its scales, its zero points)
#             ─► Reshape [.., K] ─► layer 0
def own_table_integers(graph: onnx.ModelProto, qw: QuantizedWeight) -> str:
    """Replace an untied embedding's float Gather in `graph` by GatherBlockQuantized over its own table's integers
    `qw` (`shared_head.table_quantization`; in place). Returns a line for the manifest."""
    cfg = qw.config
    v, k = qw.shape
    name = "model.embed_tokens"
    b = pack_codes(qw.codes.cpu().numpy(), cfg.bits, cfg.block_size)
    graph.graph.initializer.append(numpy_helper.from_array(b, f"{name}.qweight"))
    scales = qw.scales.detach().float().cpu().numpy().astype(np.float32).reshape(v, -1, 1)
    table = _gather_block_quantized(graph, f"{name}.qweight", scales, qw.zero_points.cpu().numpy(), cfg.bits,
                                    cfg.block_size, k, name)
    return (f"embedding from its own {cfg.bits}-bit table (GatherBlockQuantized, block {cfg.block_size})"
            + ("" if table else "; float table still used elsewhere"))


def _gather_block_quantized(graph: onnx.ModelProto, data: str, scales: np.ndarray, zero_points: np.ndarray,
                            bits: int, block: int, k: int, prefix: str) -> bool:
    """The Gather (+ Transpose) that reads input_ids replaced by GatherBlockQuantized over the initializer `data`;
    True when the float table it read is gone from the graph."""
    g = graph.graph
    old, table, out = _embedding_gather(g)
    g.initializer.extend([numpy_helper.from_array(np.ascontiguousarray(scales), f"{prefix}.embed_scales"),
                          numpy_helper.from_array(zero_points.astype(np.uint8)[:, :, None], f"{prefix}.embed_zeros"),
                          numpy_helper.from_array(np.array([0, 0, k], np.int64), "/model/embed_tokens/shape")])
    p = "/model/embed_tokens"
    new = [helper.make_node("GatherBlockQuantized", [data, "input_ids", f"{prefix}.embed_scales",
                                                     f"{prefix}.embed_zeros"], [f"{p}/blocks"],
                            name=f"{p}/GatherBlockQuantized", domain=MS_DOMAIN, gather_axis=0, quantize_axis=2,
                            block_size=block, bits=bits),
           helper.make_node("Reshape", [f"{p}/blocks", f"{p}/shape"], [out], name=f"{p}/Reshape")]
    at = list(g.node).index(old[0])
    kept = [x for x in g.node if all(x is not o for o in old)]
    del g.node[:]
    g.node.extend(kept[:at] + new + kept[at:])
    drop_unused_initializers(graph)
    return table not in {i.name for i in g.initializer}


def head_zero_points(graph: onnx.ModelProto, head: RewrittenLayer) -> np.ndarray:
    """The head's zero points unpacked to [V, k_blocks] from its MatMulNBits initializer."""
    inits = {i.name: i for i in graph.graph.initializer}
    n, k = head.shape
    packed = numpy_helper.to_array(inits[f"{HEAD}.qzeros"])
    return unpack_zero_points(packed, head.storage_bits, -(-k // head.block_size))

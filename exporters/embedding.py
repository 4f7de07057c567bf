"""A tied embedding read from the quantized lm_head's own integers, so the vocabulary matrix is not stored in float.

A tied model shares one [V, K] matrix between the embedding (a row lookup per token) and the lm_head (a
MatMul every step). Once a scheme quantizes the head (`--rule lm_head=8`), the package held that matrix
twice: packed in the head's MatMulNBits, and in float32 for the embedding's Gather (Qwen3-1.7B: 1.24 GB of
a 2.4 GB package). com.microsoft GatherBlockQuantized reads rows straight from MatMulNBits' layout:

    input_ids ─► GatherBlockQuantized(lm_head.qweight [V, k_blocks, blob]   (the head's B, shared)
                                      lm_head.embed_scales [V, k_blocks, 1]
                                      lm_head.embed_zeros  [V, k_blocks, 1]; quantize_axis 2)
              ─► [.., k_blocks, block] ─► Reshape [.., K] ─► layer 0

Targets that run unfused graphs (the NPUs: qnn, openvino, vitisai, dml) have no GatherBlockQuantized; there the
same integers are read with plain ops (`lower="ops"`), one byte per code:

    input_ids ─► Gather(DequantizeLinear(embed_codes uint8 [V, K], 1, 0)) ─► Reshape [.., k_blocks, block]
              ─► Sub(Gather(embed_zeros_f [V, k_blocks, 1])) ─► Mul(Gather(embed_scales [V, k_blocks, 1])) ─► Reshape [.., K]

(the QNN HTP takes every one of these; 1 byte a weight against the float table's 4: Qwen2.5-Coder-0.5B 545 ->
136 MB).

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

from edge_recover.packing import pack_codes, unpack_codes, unpack_zero_points
from edge_recover.quantizer import QuantizedWeight

from .matmulnbits import MS_DOMAIN
from .rewrite import RewrittenLayer, drop_unused_initializers, node_name_for

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


def share_head_integers(graph: onnx.ModelProto, head: RewrittenLayer, zero_points: np.ndarray, lower: str = "contrib",
                        *, embedding: str) -> str:
    """Replace the embedding's float Gather in `graph` by GatherBlockQuantized over the head's B (in place).

    `zero_points` are the head's unpacked zero points [V, k_blocks] (uint8); `embedding` the embedding's module
    path (the family layout's, `model.embed_tokens`), which names the new nodes. Returns a line for the manifest.
    """
    inits = {i.name: i for i in graph.graph.initializer}
    n, k = head.shape
    scales = numpy_helper.to_array(inits[f"{HEAD}.scales"]).reshape(n, -1, 1)
    bits, block = head.storage_bits, head.block_size
    if lower == "ops":
        codes = unpack_codes(numpy_helper.to_array(inits[f"{HEAD}.qweight"]), bits, k)
        table = _gather_dequantize(graph, codes, scales, zero_points, block, HEAD, node_name_for(embedding))
        how = "uint8 codes, Gather, Sub, Mul"
    else:
        table = _gather_block_quantized(graph, f"{HEAD}.qweight", scales, zero_points, bits, block, k, HEAD,
                                        node_name_for(embedding))
        how = "GatherBlockQuantized"
    return (f"embedding from the lm_head's {bits}-bit integers ({how}, block {block})"
            + ("" if table else "; float table still used elsewhere"))


#   input_ids ─► GatherBlockQuantized(embed_tokens.qweight [V, k_blocks, blob], its scales, its zero points)
#             ─► Reshape [.., K] ─► layer 0
def own_table_integers(graph: onnx.ModelProto, qw: QuantizedWeight, lower: str = "contrib", *, embedding: str) -> str:
    """Replace an untied embedding's float Gather in `graph` by GatherBlockQuantized (`lower="ops"`: plain ops) over
    its own table's integers `qw` (`shared_head.table_quantization`; in place); `embedding` is the embedding's module
    path (the family layout's), which names the initializers and nodes. Returns a line for the manifest."""
    cfg = qw.config
    v, k = qw.shape
    name = embedding
    codes, zero_points = qw.codes.cpu().numpy(), qw.zero_points.cpu().numpy()
    scales = qw.scales.detach().float().cpu().numpy().astype(np.float32).reshape(v, -1, 1)
    if lower == "ops":
        table = _gather_dequantize(graph, codes, scales, zero_points, cfg.block_size, name, node_name_for(name))
        how = "uint8 codes, Gather, Sub, Mul"
    else:
        graph.graph.initializer.append(numpy_helper.from_array(pack_codes(codes, cfg.bits, cfg.block_size),
                                                               f"{name}.qweight"))
        table = _gather_block_quantized(graph, f"{name}.qweight", scales, zero_points, cfg.bits, cfg.block_size, k,
                                        name, node_name_for(name))
        how = "GatherBlockQuantized"
    return (f"embedding from its own {cfg.bits}-bit table ({how}, block {cfg.block_size})"
            + ("" if table else "; float table still used elsewhere"))


def _gather_block_quantized(graph: onnx.ModelProto, data: str, scales: np.ndarray, zero_points: np.ndarray,
                            bits: int, block: int, k: int, prefix: str, p: str) -> bool:
    """The Gather (+ Transpose) that reads input_ids replaced by GatherBlockQuantized over the initializer `data`,
    its nodes named under `p` (the embedding's, `/model/embed_tokens`); True when the float table it read is gone."""
    g = graph.graph
    old, table, out = _embedding_gather(g)
    g.initializer.extend([numpy_helper.from_array(np.ascontiguousarray(scales), f"{prefix}.embed_scales"),
                          numpy_helper.from_array(zero_points.astype(np.uint8)[:, :, None], f"{prefix}.embed_zeros"),
                          numpy_helper.from_array(np.array([0, 0, k], np.int64), f"{p}/shape")])
    new = [helper.make_node("GatherBlockQuantized", [data, "input_ids", f"{prefix}.embed_scales",
                                                     f"{prefix}.embed_zeros"], [f"{p}/blocks"],
                            name=f"{p}/GatherBlockQuantized", domain=MS_DOMAIN, gather_axis=0, quantize_axis=2,
                            block_size=block, bits=bits),
           helper.make_node("Reshape", [f"{p}/blocks", f"{p}/shape"], [out], name=f"{p}/Reshape")]
    return _swap_in(graph, old, new, table)


def _gather_dequantize(graph: onnx.ModelProto, codes: np.ndarray, scales: np.ndarray, zero_points: np.ndarray,
                       block: int, prefix: str, p: str) -> bool:
    """The Gather (+ Transpose) that reads input_ids replaced by plain ops over uint8 `codes` [V, K] (one byte each),
    `scales` [V, k_blocks, 1] and `zero_points` [V, k_blocks], its nodes named under `p` (the embedding's); True
    when the float table it read is gone.

    The codes become floats by a per-tensor DequantizeLinear (scale 1, zero point 0): the one form of a uint8 table
    the QNN HTP gathers from (a Gather of uint8 data, or a per-row or blockwise DequantizeLinear before it, are
    refused there: measured on onnxruntime-qnn 2.7.0's emulator); the blocks' zero points and scales follow as a
    Sub and a Mul of rows gathered from their own small tables."""
    g = graph.graph
    old, table, out = _embedding_gather(g)
    v, k = codes.shape
    nb = k // block
    g.initializer.extend([
        numpy_helper.from_array(np.ascontiguousarray(codes.astype(np.uint8)), f"{prefix}.embed_codes"),
        numpy_helper.from_array(np.asarray(1.0, np.float32), f"{p}/one"),
        numpy_helper.from_array(np.asarray(0, np.uint8), f"{p}/zero"),
        numpy_helper.from_array(np.ascontiguousarray(scales.astype(np.float32)), f"{prefix}.embed_scales"),
        numpy_helper.from_array(zero_points.astype(np.float32).reshape(v, nb, 1), f"{prefix}.embed_zeros_f"),
        numpy_helper.from_array(np.array([0, 0, nb, block], np.int64), f"{p}/block_shape"),
        numpy_helper.from_array(np.array([0, 0, k], np.int64), f"{p}/shape")])
    new = [helper.make_node("DequantizeLinear", [f"{prefix}.embed_codes", f"{p}/one", f"{p}/zero"], [f"{p}/table"],
                            name=f"{p}/DequantizeLinear"),
           helper.make_node("Gather", [f"{p}/table", "input_ids"], [f"{p}/codes"], name=f"{p}/GatherCodes"),
           helper.make_node("Reshape", [f"{p}/codes", f"{p}/block_shape"], [f"{p}/code_blocks"], name=f"{p}/ReshapeBlocks"),
           helper.make_node("Gather", [f"{prefix}.embed_zeros_f", "input_ids"], [f"{p}/zeros"], name=f"{p}/GatherZeros"),
           helper.make_node("Gather", [f"{prefix}.embed_scales", "input_ids"], [f"{p}/scales"], name=f"{p}/GatherScales"),
           helper.make_node("Sub", [f"{p}/code_blocks", f"{p}/zeros"], [f"{p}/centred"], name=f"{p}/Sub"),
           helper.make_node("Mul", [f"{p}/centred", f"{p}/scales"], [f"{p}/blocks"], name=f"{p}/Mul"),
           helper.make_node("Reshape", [f"{p}/blocks", f"{p}/shape"], [out], name=f"{p}/Reshape")]
    return _swap_in(graph, old, new, table)


def _swap_in(graph: onnx.ModelProto, old: list[onnx.NodeProto], new: list[onnx.NodeProto], table: str) -> bool:
    """`new` where `old` (the float lookup) was, unused initializers dropped; True when the float `table` is gone."""
    g = graph.graph
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

"""Building com.microsoft MatMulNBits nodes from the quantizer core's integers.

    A [.., K] ──► MatMulNBits(K, N, bits, block_size, accuracy_level) ──► Y [.., N]
                  ▲ B (uint8, packed)  ▲ scales (f32)  ▲ zero_points (uint8, packed)

`matmulnbits_initializers` packs a `QuantizedWeight` into the three initializers and `matmulnbits_node`
makes the node; `single_node_model` wraps one layer in a runnable model (used by the bit-exactness tests
and handy to check a kernel/provider on its own).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from edge_recover.packing import pack_codes, pack_zero_points
from edge_recover.quantizer import QuantizedWeight

MS_DOMAIN = "com.microsoft"
# ONNX Runtime 1.24-1.31 accepts IR version 10 at most; onnx 1.23 writes a newer one by default (FACTS.md).
IR_VERSION = 10
OPSET = 17


def matmulnbits_initializers(qw: QuantizedWeight, prefix: str) -> list[TensorProto]:
    """[B, scales, zero_points] initializers named `{prefix}.qweight|scales|qzeros`."""
    cfg = qw.config
    codes = qw.codes.cpu().numpy()
    b = pack_codes(codes, cfg.bits, cfg.block_size)
    scales = qw.scales.detach().float().cpu().numpy().astype(np.float32)
    zp = pack_zero_points(qw.zero_points.cpu().numpy(), cfg.bits)
    return [
        numpy_helper.from_array(b, f"{prefix}.qweight"),
        numpy_helper.from_array(scales.reshape(-1), f"{prefix}.scales"),
        numpy_helper.from_array(zp, f"{prefix}.qzeros"),
    ]


def matmulnbits_node(qw: QuantizedWeight, input_name: str, output_name: str, prefix: str, name: str,
                     accuracy_level: int = 4, bias: str | None = None) -> onnx.NodeProto:
    """The MatMulNBits node reading the initializers of `matmulnbits_initializers(qw, prefix)`."""
    n, k = qw.shape
    inputs = [input_name, f"{prefix}.qweight", f"{prefix}.scales", f"{prefix}.qzeros"]
    if bias:
        inputs += ["", bias]  # g_idx unused
    return helper.make_node(
        "MatMulNBits", inputs, [output_name], name=name, domain=MS_DOMAIN,
        K=k, N=n, bits=qw.config.bits, block_size=qw.config.block_size, accuracy_level=accuracy_level,
    )


def single_node_model(qw: QuantizedWeight, accuracy_level: int = 0) -> onnx.ModelProto:
    """A model `Y = MatMulNBits(A)` with A float32 [M, K] (M dynamic)."""
    n, k = qw.shape
    node = matmulnbits_node(qw, "A", "Y", "w", "/layer/MatMulNBits", accuracy_level)
    graph = helper.make_graph(
        [node], "matmulnbits",
        [helper.make_tensor_value_info("A", TensorProto.FLOAT, ["M", k])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["M", n])],
        initializer=matmulnbits_initializers(qw, "w"),
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid(MS_DOMAIN, 1)])
    model.ir_version = IR_VERSION
    return model

"""Bit-exactness: the torch QuantLinear and a one-node ONNX MatMulNBits graph are the same function."""

import numpy as np
import onnxruntime as ort
import pytest
import torch

from edge_recover.exporters.matmulnbits import single_node_model
from edge_recover.qlinear import QuantLinear
from edge_recover.quantizer import quantize_weight
from edge_recover.scheme import QuantConfig


def _run_ort(model, a):
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return sess.run(None, {"A": a})[0]


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("block_size", [16, 32, 64, 128, 256])
@pytest.mark.parametrize("n,k", [(24, 64), (40, 576), (16, 100), (8, 1536)])
@pytest.mark.parametrize("method", ["rtn", "mse"])
def test_matmulnbits_matches_torch(bits, block_size, n, k, method):
    w = torch.randn(n, k) * 0.05
    qw = quantize_weight(w, QuantConfig(bits, block_size), method)
    layer = QuantLinear.from_quantized(qw)
    a = torch.randn(3, k)
    expected = layer(a).detach().numpy()
    got = _run_ort(single_node_model(qw, accuracy_level=0), a.numpy())
    scale = np.abs(expected).max()
    assert np.abs(got - expected).max() <= 1e-5 * max(scale, 1.0) + 1e-6


@pytest.mark.parametrize("bits", [2, 4])
def test_accuracy_level_4_close(bits):
    """The fast int8-activation kernel is an approximation: close, not exact."""
    qw = quantize_weight(torch.randn(64, 256) * 0.05, QuantConfig(bits, 64))
    a = torch.randn(1, 256)
    exact = QuantLinear.from_quantized(qw)(a).detach().numpy()
    got = _run_ort(single_node_model(qw, accuracy_level=4), a.numpy())
    assert np.abs(got - exact).max() < 0.02 * np.abs(exact).max()

"""The MatMulNBits rewrite's weight check (`rewrite._check_weight`), which compares in slices of rows."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from edge_recover.errors import EdgeRecoverError
from edge_recover.exporters.rewrite import _check_weight
from edge_recover.quantizer import quantize_weight
from edge_recover.scheme import QuantConfig


def _weight():
    qw = quantize_weight(torch.randn(10, 64), QuantConfig(4, 32))
    return qw, np.ascontiguousarray(qw.dequantize().numpy().T)  # what the ONNX MatMul reads: [K, N]


@pytest.mark.parametrize("rows", [3, 10, 1 << 14])
def test_exact_weight_passes_in_any_slices(rows):
    qw, w_t = _weight()
    _check_weight("layer", w_t, qw, rows=rows)


@pytest.mark.parametrize("rows", [3, 1 << 14])
def test_a_wrong_entry_in_the_last_slice_is_refused(rows):
    qw, w_t = _weight()
    w_t[5, 9] += 1e-3  # output row 9: the last slice of 3 rows holds only it
    with pytest.raises(EdgeRecoverError, match="differs from its quantized integers"):
        _check_weight("layer", w_t, qw, rows=rows)


def test_a_transposed_shape_is_refused():
    qw, w_t = _weight()
    with pytest.raises(EdgeRecoverError, match="has shape"):
        _check_weight("layer", w_t.T.copy(), qw)

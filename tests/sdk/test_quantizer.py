import pytest
import torch

from edge_recover.errors import EdgeRecoverError
from edge_recover.qlinear import QuantLinear
from edge_recover.quantizer import dequantize, quantize_weight, sqnr_db
from edge_recover.scheme import QuantConfig


def _correlated_inputs(k, n=2048):
    mix = torch.randn(k, k) / k ** 0.5 + torch.eye(k)
    return (torch.randn(n, k) * torch.linspace(0.2, 3.0, k)) @ mix


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("symmetric", [False, True])
def test_codes_in_range_and_dequantize(bits, symmetric):
    w = torch.randn(16, 100)
    qw = quantize_weight(w, QuantConfig(bits, 32, symmetric), "rtn")
    assert qw.codes.dtype == torch.uint8 and int(qw.codes.max()) < 2 ** bits
    assert qw.scales.shape == (16, 4) and qw.zero_points.shape == (16, 4)
    if symmetric:
        assert (qw.zero_points == 2 ** (bits - 1)).all()
    # reference dequantization, written out independently
    ref = torch.empty_like(w)
    for j in range(100):
        b = j // 32
        ref[:, j] = (qw.codes[:, j].float() - qw.zero_points[:, b].float()) * qw.scales[:, b]
    torch.testing.assert_close(qw.dequantize(), ref)
    assert sqnr_db(w, ref) > {2: 3 if symmetric else 5, 4: 15, 8: 30}[bits]


def test_rtn_8bit_is_near_lossless():
    w = torch.randn(32, 256)
    assert sqnr_db(w, quantize_weight(w, QuantConfig(8, 32)).dequantize()) > 40


@pytest.mark.parametrize("bits", [2, 4])
def test_mse_never_worse_than_rtn_on_weight_error(bits):
    w = torch.randn(64, 576) * 0.05
    w[0, 5] = 1.0  # an outlier
    cfg = QuantConfig(bits, 32)
    err = {m: (quantize_weight(w, cfg, m).dequantize() - w).pow(2).sum().item() for m in ("rtn", "mse")}
    assert err["mse"] <= err["rtn"] + 1e-9
    if bits == 2:
        assert err["mse"] < 0.9 * err["rtn"]


def test_gptq_lowers_output_error():
    k = 256
    x = _correlated_inputs(k)
    h = x.T @ x / x.shape[0]
    w = torch.randn(128, k) * 0.05
    cfg = QuantConfig(2, 32)
    out = {m: sqnr_db(x @ w.T, x @ quantize_weight(w, cfg, m, importance=torch.diag(h), hessian=h).dequantize().T)
           for m in ("rtn", "mse", "gptq")}
    assert out["gptq"] > out["rtn"] + 1.0, out
    assert out["gptq"] > out["mse"], out


def test_gptq_handles_k_not_multiple_of_block():
    x = _correlated_inputs(100)
    h = x.T @ x / x.shape[0]
    qw = quantize_weight(torch.randn(8, 100), QuantConfig(4, 64), "gptq", hessian=h)
    assert qw.codes.shape == (8, 100) and qw.scales.shape == (8, 2)


def test_gptq_without_hessian_is_refused():
    with pytest.raises(EdgeRecoverError, match="needs the layer's input Hessian"):
        quantize_weight(torch.randn(8, 64), QuantConfig(2, 32), "gptq")


def test_unknown_method():
    with pytest.raises(EdgeRecoverError, match="unknown `method`"):
        quantize_weight(torch.randn(8, 64), QuantConfig(2, 32), "awq")


def test_quant_linear_keeps_integers_under_dtype_cast():
    qw = quantize_weight(torch.randn(16, 64), QuantConfig(2, 16))
    layer = QuantLinear.from_quantized(qw, torch.randn(16))
    layer.to(torch.bfloat16)
    assert layer.codes.dtype == torch.uint8 and layer.scales.dtype == torch.float32
    torch.testing.assert_close(layer.scales, qw.scales)
    assert layer.weight.dtype == torch.bfloat16 and not layer.weight.requires_grad
    layer.to(torch.float32).refresh_weight()
    torch.testing.assert_close(layer.weight, dequantize(qw.codes, qw.scales, qw.zero_points, 16))


def test_methods_are_registered_handlers():
    """quantize_weight dispatches through the handler table; a registered method is usable by name."""
    from edge_recover import quantizer

    assert tuple(quantizer._HANDLERS)[:3] == quantizer.METHODS
    calls = []

    @quantizer.register_method("test-rtn-twice")
    def _twice(w, config, importance, hessian):
        calls.append(tuple(w.shape))
        return quantizer._HANDLERS["rtn"](w, config, importance, hessian)

    try:
        w = torch.randn(8, 64)
        qw = quantizer.quantize_weight(w, QuantConfig(4, 32), "test-rtn-twice")
        assert calls == [(8, 64)] and torch.equal(qw.codes, quantizer.quantize_weight(w, QuantConfig(4, 32)).codes)
    finally:
        del quantizer._HANDLERS["test-rtn-twice"]
    with pytest.raises(EdgeRecoverError, match="unknown `method` 'nope'; choose one of rtn, mse, gptq"):
        quantizer.quantize_weight(w, QuantConfig(4, 32), "nope")


@pytest.mark.parametrize("method", ["rtn", "mse"])
@pytest.mark.parametrize("bits,symmetric", [(2, False), (4, False), (4, True), (8, False)])
def test_row_slices_give_the_same_integers(monkeypatch, method, bits, symmetric):
    """rtn/mse run on slices of rows for big weights (memory); the integers equal one whole-weight pass."""
    from edge_recover import quantizer

    w = torch.randn(45, 100) * 0.05
    w[3, 7] = 1.0  # an outlier
    cfg, imp = QuantConfig(bits, 32, symmetric), torch.rand(100) + 0.1
    whole = quantize_weight(w, cfg, method, importance=imp if method == "mse" else None)
    monkeypatch.setattr(quantizer, "ROW_CHUNK_ELEMENTS", 7 * 100)  # slices of 7 rows, the last one of 3
    sliced = quantize_weight(w, cfg, method, importance=imp if method == "mse" else None)
    for a, b in zip((whole.codes, whole.scales, whole.zero_points), (sliced.codes, sliced.scales, sliced.zero_points)):
        assert a.shape == b.shape and torch.equal(a, b)


def test_only_row_wise_methods_are_sliced(monkeypatch):
    from edge_recover import quantizer

    monkeypatch.setattr(quantizer, "ROW_CHUNK_ELEMENTS", 3 * 64)
    calls = {"sliced": [], "whole": []}
    for name, row_wise in (("sliced", True), ("whole", False)):
        @quantizer.register_method(f"test-{name}", row_wise=row_wise)
        def _record(w, config, importance, hessian, name=name):
            calls[name].append(w.shape[0])
            return quantizer._HANDLERS["rtn"](w, config, importance, hessian)
    try:
        w = torch.randn(8, 64)
        for name in calls:
            qw = quantizer.quantize_weight(w, QuantConfig(4, 32), f"test-{name}")
            assert qw.codes.shape == (8, 64)
        assert calls == {"sliced": [3, 3, 2], "whole": [8]}
    finally:
        for name in calls:
            del quantizer._HANDLERS[f"test-{name}"]
            quantizer._ROW_WISE.discard(f"test-{name}")


@pytest.mark.parametrize("k", [96, 100])
def test_dequantize_equals_the_per_column_gather(k):
    """The in-place block view gives the very floats of (codes - z[:, col // bs]) * s[:, col // bs]."""
    qw = quantize_weight(torch.randn(12, k), QuantConfig(4, 32), "mse")
    idx = torch.arange(k) // 32
    ref = (qw.codes.float() - qw.zero_points.float()[:, idx]) * qw.scales[:, idx]
    got = dequantize(qw.codes, qw.scales, qw.zero_points, 32)
    assert got.shape == (12, k) and got.is_contiguous() and torch.equal(got, ref)

"""GPTQ within a memory budget (sdk/pipeline.py, HESSIAN_BUDGET_BYTES): over the budget the layers are calibrated
and quantized in groups, so a 1.5B model's 9.8 GB of K x K Hessians never sit in memory at once."""

from __future__ import annotations

import math

import torch

from edge_recover.apply import linear_layers, quantized_layers
from edge_recover.models import load_model
from edge_recover.pipeline import _quantize_gptq_grouped, hessian_groups, quantize_loaded
from edge_recover.scheme import KEEP, named_scheme


def _codes(model) -> dict:
    return {n: (q.codes.clone(), q.scales.clone(), q.zero_points.clone()) for n, q in quantized_layers(model).items()}


def test_groups_cover_the_quantized_layers_in_order_within_the_budget(tiny_qwen2_dir):
    lm = load_model(tiny_qwen2_dir)
    scheme = named_scheme("w4w2gateup")
    order = [n for n in linear_layers(lm.model) if scheme.resolve(n) != KEEP]
    size = {n: 4 * m.in_features ** 2 for n, m in linear_layers(lm.model).items()}
    budget = 3 * max(size.values())
    groups = hessian_groups(lm, scheme, budget)
    assert [n for g in groups for n in g] == order and len(groups) > 1
    assert all(sum(size[n] for n in g) <= budget for g in groups)
    assert hessian_groups(lm, scheme, sum(size.values())) == [order]  # under the budget: one pass
    assert all(len(g) == 1 for g in hessian_groups(lm, scheme, 1))  # a layer larger than the budget: alone


def test_one_group_is_the_one_pass_bit_for_bit(tiny_qwen2_dir):
    """The grouped path with every layer in one group equals the one-pass GPTQ: same integers, same report."""
    scheme = named_scheme("w4w2gateup")
    one = load_model(tiny_qwen2_dir)
    r1 = quantize_loaded(one, scheme, "gptq", calibration=4, progress=False)
    grouped = load_model(tiny_qwen2_dir)
    r2 = _quantize_gptq_grouped(grouped, scheme, hessian_groups(grouped, scheme), calibration=4, seed=0, progress=False)
    a, b = _codes(one.model), _codes(grouped.model)
    assert a.keys() == b.keys() and all(all(torch.equal(x, y) for x, y in zip(a[n], b[n])) for n in a)
    assert r1.to_json() == r2.to_json()


def test_small_budget_quantizes_every_layer_in_groups(tiny_qwen2_dir, capsys):
    """A budget of one layer's Hessian: every layer its own group (GPTQ's sequential order); all layers quantized,
    the report in model order with the kept head, the integers close to the one-pass ones in quality."""
    from edge_recover.calibration import teacher_samples
    from edge_recover.evaluate import evaluate

    scheme = named_scheme("w4w2gateup")
    one = load_model(tiny_qwen2_dir)
    quantize_loaded(one, scheme, "gptq", calibration=4, progress=False)
    lm = load_model(tiny_qwen2_dir)
    ids = teacher_samples(lm.model, lm.tokenizer, n=4, seq_len=32, seed=1)
    rep = quantize_loaded(lm, scheme, "gptq", calibration=4, progress=True, hessian_budget=1)
    assert "layer group" in capsys.readouterr().err
    assert [layer.name for layer in rep.layers] == list(linear_layers(lm.model))
    assert set(quantized_layers(lm.model)) == {n for n in linear_layers(lm.model) if scheme.resolve(n) != KEEP}
    assert next(layer for layer in rep.layers if layer.name == "lm_head").config == KEEP
    ce = [evaluate(m.model, ids, batch_size=2, device="cpu").cross_entropy for m in (one, lm)]
    assert all(math.isfinite(c) for c in ce) and abs(ce[0] - ce[1]) < 0.5, ce

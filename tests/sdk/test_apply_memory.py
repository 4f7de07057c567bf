"""quantize_model's memory: each float layer it replaces is freed as it goes, not held to the end (a 1.5B
model's float linears are 6 GB; holding them beside their QuantLinears' own float weights doubled that)."""

from __future__ import annotations

import gc
import weakref

from torch import nn

from edge_recover import quantizer
from edge_recover.apply import linear_layers, quantize_model
from edge_recover.scheme import named_scheme


def test_replaced_float_layers_are_freed_during_the_loop(tiny_llama_dir):
    from edge_recover.models import load_model

    model = load_model(tiny_llama_dir).model
    originals = [weakref.ref(m) for m in linear_layers(model).values() if isinstance(m, nn.Linear)]
    alive = []

    @quantizer.register_method("test-count-alive", row_wise=True)
    def _count(w, config, importance, hessian):
        gc.collect()
        alive.append(sum(r() is not None for r in originals))
        return quantizer._HANDLERS["rtn"](w, config, importance, hessian)

    try:
        quantize_model(model, named_scheme("w4"), "test-count-alive", progress=False)
    finally:
        del quantizer._HANDLERS["test-count-alive"]
        quantizer._ROW_WISE.discard("test-count-alive")
    assert len(alive) >= 4
    # at the k-th call, the k layers already replaced are gone (the loop's last one at most still held)
    assert all(a <= len(originals) - k + 1 for k, a in enumerate(alive)), alive
    assert alive[-1] <= 2

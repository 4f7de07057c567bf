"""The int8 KV cache's calibration: scales cover what calibration saw, rotary pairs share a scale, and the
graph change refuses scales of another graph."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from edge_recover.errors import EdgeRecoverError
from edge_recover.exporters import kv_cache
from edge_recover.exporters.api import export_package
from edge_recover.exporters.verify import empty_past, prompt_ids, run_step, session

from .conftest import make_loaded


def test_rotary_channels_take_their_pair_norm():
    # one head, head_dim 4: pairs (0, 2) and (1, 3); a key rotated by any angle keeps each pair's norm
    cache = np.array([[[[3.0, 0.0, 4.0, 1.0], [0.0, -2.0, 0.0, 0.0]]]])  # [1, H=1, T=2, D=4]
    np.testing.assert_allclose(kv_cache._cache_max(cache, rotary=True), [[5.0, 2.0, 5.0, 2.0]])
    np.testing.assert_allclose(kv_cache._cache_max(cache, rotary=False), [[3.0, 2.0, 4.0, 1.0]])


@pytest.fixture(scope="module")
def float_kv(tmp_path_factory):
    lm = make_loaded("qwen3")
    pkg = export_package(lm, tmp_path_factory.mktemp("kv") / "pkg", scheme="w4", method="rtn", calibration=0)
    return pkg, lm


def _prefill_cache(model_path, ids) -> dict:
    sess = session(model_path)
    return run_step(sess, ids, empty_past(sess), 0)[1]


def test_scales_cover_the_calibration_values(float_kv, tmp_path):
    """Calibrated on prompts alone with headroom 1, the int8 cache of those prompts uses the full range and
    never saturates: every value channel reaches +-127, every key pair's norm reaches 127."""
    pkg, lm = float_kv
    cfg = lm.model.config
    scales = kv_cache.calibrate(pkg / "model.onnx", lm.tokenizer, cfg.vocab_size, cfg.max_position_embeddings,
                                new_tokens=0, headroom=1.0)
    assert len(scales.key) == cfg.num_hidden_layers and scales.key[0].shape == (1, cfg.num_key_value_heads, 1, cfg.head_dim)
    graph = onnx.load(str(pkg / "model.onnx"))
    assert kv_cache.to_int8(graph, scales) == cfg.num_hidden_layers
    onnx.save_model(graph, str(tmp_path / "model.onnx"), save_as_external_data=True, location="model.onnx.data")
    vmax = kmax = None
    for ids in prompt_ids(lm.tokenizer, cfg.vocab_size):
        past = _prefill_cache(tmp_path / "model.onnx", ids)
        assert past["past_key_values.0.key"].dtype == np.int8
        k = kv_cache._cache_max(past["past_key_values.0.key"], rotary=True)
        v = kv_cache._cache_max(past["past_key_values.0.value"], rotary=False)
        kmax = k if kmax is None else np.maximum(kmax, k)
        vmax = v if vmax is None else np.maximum(vmax, v)
    assert np.all(vmax == 127)  # the largest value of each channel maps to the top code, no more
    assert np.all(kmax >= 125) and np.all(kmax <= 127 * np.sqrt(2))  # pair norms: rounding of two codes


def test_int8_cache_logits_follow_the_float_cache(float_kv, tmp_path):
    pkg, lm = float_kv
    cfg = lm.model.config
    scales = kv_cache.calibrate(pkg / "model.onnx", lm.tokenizer, cfg.vocab_size, cfg.max_position_embeddings,
                                new_tokens=8)
    assert scales.tokens > 0 and scales.to_json()["dtype"] == "int8"
    graph = onnx.load(str(pkg / "model.onnx"))
    kv_cache.to_int8(graph, scales)
    onnx.save_model(graph, str(tmp_path / "model.onnx"), save_as_external_data=True, location="model.onnx.data")
    sess32, sess8 = session(pkg / "model.onnx"), session(tmp_path / "model.onnx")
    ids = np.arange(5, 45)[None]
    ref, _ = run_step(sess32, ids, empty_past(sess32), 0)
    got, _ = run_step(sess8, ids, empty_past(sess8), 0)
    assert np.abs(got - ref).max() < 0.03 * np.abs(ref).max()


def test_scales_of_another_graph_are_refused(float_kv):
    pkg, lm = float_kv
    cfg = lm.model.config
    scales = kv_cache.calibrate(pkg / "model.onnx", lm.tokenizer, cfg.vocab_size, cfg.max_position_embeddings,
                                new_tokens=0)
    short = kv_cache.KVScales(scales.key[:1], scales.value[:1], scales.tokens, scales.headroom)
    with pytest.raises(EdgeRecoverError, match="calibrate on this graph"):
        kv_cache.to_int8(onnx.load(str(pkg / "model.onnx")), short)


def test_perplexity_through_the_cache_equals_one_forward(float_kv):
    """`ort_perplexity(chunk=1)` (every position read back from the cache) equals the one-forward score on a
    float32 cache: the decoding-time score the int8 benchmark uses is the same measure."""
    from edge_recover.exporters.verify import ort_perplexity

    pkg, _ = float_kv
    windows = np.random.default_rng(1).integers(0, 256, (2, 24))
    whole, n = ort_perplexity(pkg / "model.onnx", windows)
    stepped, m = ort_perplexity(pkg / "model.onnx", windows, chunk=1)
    chunked, _ = ort_perplexity(pkg / "model.onnx", windows, chunk=5)
    assert n == m == 2 * 23
    assert abs(stepped / whole - 1) < 1e-4 and abs(chunked / whole - 1) < 1e-4

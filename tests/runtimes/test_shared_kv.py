"""The shared-buffer KV cache (past and present bound to one buffer) against the growing cache and numpy.

Three paths on the same fused package (GroupQueryAttention, cpu target): shared buffers (the default fast
path for fused graphs), the growing-cache fast path (`share_buffer=False`) and the reference path
(`io_binding=False`). Teacher-forced logits over a fixed continuation, prompts of several lengths, a
multi-token chunk after a cache, and growth across several buffer chunks.
"""

from __future__ import annotations

import numpy as np
import pytest

from edge_recover.errors import EdgeRecoverError
from edge_recover.runtimes import session as session_mod
from edge_recover.runtimes.generate import generate_ids
from edge_recover.runtimes.session import OrtCausalLM

RNG = np.random.default_rng(0)
TOKENS = [int(t) for t in RNG.integers(3, 290, size=120)]


@pytest.fixture(scope="module", params=["llama", "qwen3"])
def fused(request, tmp_path_factory):
    """A fused w4w2gateup package of a tiny random `arch` model (context 256)."""
    from edge_recover.exporters.api import export_package
    from edge_recover.models import LoadedModel
    from tests.fixtures.tiny_models import make_tiny_model

    model, tok = make_tiny_model(request.param)
    lm = LoadedModel(model, tok, f"random-{request.param}", "sha256:random")
    return export_package(lm, tmp_path_factory.mktemp("shared-kv") / request.param, scheme="w4w2gateup",
                          target="cpu", method="rtn", calibration=0, verify=False)


def _forced(lm: OrtCausalLM, prompt_len: int, chunks: tuple[int, ...] = (), capacity=None) -> np.ndarray:
    """Logits after the prompt (prefilled in pieces of `chunks`, then the rest), then one token at a time."""
    cache = lm.empty_cache(capacity) if capacity else lm.empty_cache()
    rows, start = [], 0
    for size in list(chunks) + [prompt_len - sum(chunks)]:
        logits, cache = lm.step(np.array([TOKENS[start:start + size]]), cache)
        start += size
    rows.append(logits)
    for tok in TOKENS[prompt_len:]:
        logits, cache = lm.step(np.array([[tok]]), cache)
        rows.append(logits)
    assert cache.length == len(TOKENS)
    return np.stack(rows)


def _three(pkg):
    return (OrtCausalLM(pkg, threads=1), OrtCausalLM(pkg, threads=1, share_buffer=False),
            OrtCausalLM(pkg, threads=1, io_binding=False))


def test_used_for_fused_packages_only(fused, tiny_package):
    shared, growing, ref = _three(fused)
    assert shared.share_buffer and not growing.share_buffer and not ref.share_buffer
    assert shared.package.stats.kv_share_buffer and "shared-buffer KV" in shared.describe()
    cache = shared.empty_cache(40)
    assert cache.shared and cache.capacity == 40 and cache.length == 0
    _, after = shared.step(np.array([TOKENS[:5]]), cache)
    assert after.values[0] is cache.values[0] and after.length == 5  # written in place, no new buffer
    plain = OrtCausalLM(tiny_package, threads=1)  # Optimum graph, no GroupQueryAttention
    assert not plain.package.stats.kv_share_buffer and not plain.share_buffer
    with pytest.raises(EdgeRecoverError, match="share_buffer=True"):
        OrtCausalLM(tiny_package, threads=1, share_buffer=True)
    with pytest.raises(EdgeRecoverError, match="reference path"):
        OrtCausalLM(fused, threads=1, io_binding=False, share_buffer=True)


@pytest.mark.parametrize("prompt_len", [1, 7, 33, 64])
def test_logits_equal_growing_and_reference(fused, prompt_len):
    shared, growing, ref = _three(fused)
    a = _forced(shared, prompt_len, capacity=len(TOKENS))
    b = _forced(growing, prompt_len)
    c = _forced(ref, prompt_len)
    print(f"prompt {prompt_len}: shared vs growing max {np.abs(a - b).max():.2e}, "
          f"vs reference max {np.abs(a - c).max():.2e} mean {np.abs(a - c).mean():.2e}")
    np.testing.assert_array_equal(a, b)  # same kernel, same numbers: only where the cache lives differs
    np.testing.assert_allclose(a, c, atol=1e-5, rtol=0)


def test_growth_across_chunks_and_multi_token_steps(fused, monkeypatch):
    monkeypatch.setattr(session_mod, "GROW_CHUNK", 16)
    shared, growing, _ = _three(fused)
    cache = shared.empty_cache(capacity=10)
    _, cache = shared.step(np.array([TOKENS[:9]]), cache)
    _, grown = shared.step(np.array([TOKENS[9:12]]), cache)  # 12 > 10: moved to 16 positions
    assert grown.capacity == 16 and cache.capacity == 10
    a = _forced(shared, 20, chunks=(9, 3), capacity=10)  # grows 10 -> 16 -> 32 -> ... -> 128
    b = _forced(growing, 20, chunks=(9, 3))
    print(f"growth: shared vs growing max {np.abs(a - b).max():.2e}")
    np.testing.assert_array_equal(a, b)


def test_greedy_tokens_equal(fused):
    shared, growing, ref = _three(fused)
    prompt = TOKENS[:21]
    out = [generate_ids(lm, prompt, max_new_tokens=40, stop_token_ids=()).tokens for lm in (shared, growing, ref)]
    assert out[0] == out[1] == out[2]
    assert len(set(out[0])) > 1, "the reference should not be a constant sequence"


def test_shared_cache_on_reference_path(fused):
    shared, _, ref = _three(fused)
    _, cache = shared.step(np.array([TOKENS[:9]]), shared.empty_cache(32))
    la, _ = shared.step(np.array([[TOKENS[9]]]), cache)
    lb, plain = ref.step(np.array([[TOKENS[9]]]), cache)  # the reference path reads the valid positions
    np.testing.assert_allclose(la, lb, atol=1e-5, rtol=0)
    assert not plain.shared and plain.length == 10


def test_chunked_prefill_equals_one_step(fused):
    """`prefill` in chunks of 7 gives the logits and cache of one whole-prompt step (and generate uses it)."""
    whole = OrtCausalLM(fused, threads=1, prefill_chunk=None)
    chunked = OrtCausalLM(fused, threads=1, prefill_chunk=7)
    prompt = np.array([TOKENS[:30]])
    la, ca = whole.prefill(prompt, whole.empty_cache(64))
    lb, cb = chunked.prefill(prompt, chunked.empty_cache(64))
    assert ca.length == cb.length == 30
    print(f"chunked prefill vs one step: max {np.abs(la - lb).max():.2e}")
    np.testing.assert_allclose(la, lb, atol=1e-4 * np.abs(la).max(), rtol=0)
    for a, b in zip(ca.values, cb.values):
        np.testing.assert_allclose(a[:, :, :30], b[:, :, :30], atol=1e-5, rtol=0)
    steps = []
    monkey = chunked.step
    chunked.step = lambda ids, cache: (steps.append(ids.shape[1]), monkey(ids, cache))[1]
    generate_ids(chunked, TOKENS[:30], max_new_tokens=2, stop_token_ids=())
    assert steps[:5] == [7, 7, 7, 7, 2] and steps[5:] == [1]
    with pytest.raises(EdgeRecoverError, match="`prefill_chunk` must be >= 1"):
        OrtCausalLM(fused, threads=1, prefill_chunk=0)


def test_last_position_logits_equal_the_full_graph(fused):
    """The session's lm_head on the last position only (the default on CPU) gives the full graph's last row."""
    last = OrtCausalLM(fused, threads=1)
    full = OrtCausalLM(fused, threads=1, last_logits_only=False)
    assert last.last_logits_only and not full.last_logits_only
    assert last.session.get_outputs()[0].shape[1] == 1
    prompt = np.array([TOKENS[:25]])
    la, _ = last.step(prompt, last.empty_cache(64))
    lb, _ = full.step(prompt, full.empty_cache(64))
    print(f"last-position head vs full graph: max {np.abs(la - lb).max():.2e}")
    np.testing.assert_allclose(la, lb, atol=1e-5 * np.abs(lb).max(), rtol=0)
    ref = OrtCausalLM(fused, threads=1, io_binding=False)  # the reference path reads the same edited graph
    assert [generate_ids(lm, TOKENS[:25], 12, stop_token_ids=()).tokens for lm in (last, full, ref)].count(
        generate_ids(full, TOKENS[:25], 12, stop_token_ids=()).tokens) == 3

"""The generation loop against torch, the fast path against the reference path, and sampling."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from edge_recover.errors import EdgeRecoverError
from edge_recover.runtimes.generate import Generator, generate_ids
from edge_recover.runtimes.sampling import Sampling, choose_token
from edge_recover.runtimes.session import OrtCausalLM

PROMPT = [72, 101, 108, 108, 111, 32, 119, 111, 114, 108, 100]


def torch_greedy(hf_dir, prompt, n):
    """Reference: the HF model, full forward each step, argmax."""
    from transformers import AutoModelForCausalLM

    return torch_greedy_model(AutoModelForCausalLM.from_pretrained(hf_dir).eval(), prompt, n)


def torch_greedy_model(model, prompt, n):
    """Greedy tokens of a torch causal LM without a KV cache (the reference path)."""
    ids = torch.tensor([prompt])
    out = []
    with torch.no_grad():
        for _ in range(n):
            nxt = int(model(ids).logits[0, -1].argmax())
            out.append(nxt)
            ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
    return out


@pytest.mark.parametrize("io_binding", [True, False])
def test_greedy_equals_torch(tiny_hf, tiny_package, io_binding):
    lm = OrtCausalLM(tiny_package, threads=1, io_binding=io_binding)
    res = generate_ids(lm, PROMPT, max_new_tokens=24, stop_token_ids=())
    expected = torch_greedy(tiny_hf, PROMPT, 24)
    assert res.tokens == expected
    assert len(set(expected)) > 3, "the reference should not be a constant sequence"
    assert res.stop_reason == "max_new_tokens" and len(res.step_latencies_s) == 23


def test_fast_path_matches_reference_logits(tiny_package):
    fast = OrtCausalLM(tiny_package, threads=1, io_binding=True)
    ref = OrtCausalLM(tiny_package, threads=1, io_binding=False)
    lf, cf = fast.step(np.array([PROMPT]), fast.empty_cache())
    lr, cr = ref.step(np.array([PROMPT]), ref.empty_cache())
    diffs = [np.abs(lf - lr).max()]
    for tok in (5, 9, 200):
        lf, cf = fast.step(np.array([[tok]]), cf)
        lr, cr = ref.step(np.array([[tok]]), cr)
        diffs.append(np.abs(lf - lr).max())
    print(f"fast vs reference: max {max(diffs):.2e}, mean {np.mean(diffs):.2e}")
    assert max(diffs) < 1e-5
    assert cf.length == cr.length == len(PROMPT) + 3


def test_stop_token_and_streaming(tiny_package):
    gen = Generator(tiny_package, threads=1)
    free = generate_ids(gen.lm, PROMPT, max_new_tokens=10, stop_token_ids=())
    stop = free.tokens[3]
    first = free.tokens.index(stop)
    pieces = []
    res = gen.generate(PROMPT, max_new_tokens=10, stop_token_ids=[stop], on_text=pieces.append)
    assert res.tokens == free.tokens[: first + 1] and res.stop_reason == "stop_token"
    assert "".join(pieces) == res.text == gen.decode(res.tokens)


def test_text_round_trip_and_eos_default(tiny_package):
    gen = Generator(tiny_package, threads=1)
    assert gen.decode(gen.encode("héllo wörld")) == "héllo wörld"
    assert gen.lm.package.eos_token_ids == [256]


def test_context_overflow_is_clear(tiny_package):
    gen = Generator(tiny_package, threads=1)
    with pytest.raises(EdgeRecoverError, match="context of 96"):
        gen.generate(list(range(100)), max_new_tokens=4)
    res = gen.generate(list(range(90)), max_new_tokens=50, stop_token_ids=())
    # 90 prompt positions + 6 decode steps fill the 96-position context; the 7th token needs no position
    assert res.stop_reason == "context" and len(res.tokens) == 7


def test_sampling_rules():
    rng = np.random.default_rng(0)
    logits = np.array([0.0, 5.0, 4.9, -3.0, 1.0])
    assert choose_token(logits, Sampling(), rng) == 1
    picks = {choose_token(logits, Sampling(temperature=1.0, top_k=2, seed=0), rng) for _ in range(200)}
    assert picks == {1, 2}
    picks = {choose_token(logits, Sampling(temperature=1.0, top_p=0.3), rng) for _ in range(50)}
    assert picks == {1}
    picks = {choose_token(logits, Sampling(temperature=5.0), rng) for _ in range(400)}
    assert picks == {0, 1, 2, 3, 4}
    with pytest.raises(EdgeRecoverError, match="top_p"):
        Sampling(top_p=0.0)


def test_sampling_is_seeded(tiny_package):
    gen = Generator(tiny_package, threads=1)
    s = Sampling(temperature=1.0, top_k=20, top_p=0.95, seed=3)
    a = gen.generate(PROMPT, 12, s, stop_token_ids=()).tokens
    b = gen.generate(PROMPT, 12, s, stop_token_ids=()).tokens
    assert a == b

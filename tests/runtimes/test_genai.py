"""The same package under onnxruntime-genai (installed with the test extras, so these tests always run)."""

from __future__ import annotations

import sys

import pytest

from edge_recover.errors import EdgeRecoverError
from edge_recover.runtimes.generate import Generator
from edge_recover.runtimes.genai import genai_generate


def test_genai_same_greedy_tokens(tiny_w4w2):
    pkg = tiny_w4w2[0]
    ours = Generator(pkg).generate("Hello world", max_new_tokens=16, stop_token_ids=())
    theirs = genai_generate(pkg, "Hello world", max_new_tokens=16)
    assert theirs.prompt_tokens == ours.prompt_tokens
    assert theirs.tokens == ours.tokens


@pytest.mark.parametrize("kv_dtype", ["float16", "int8"])
def test_genai_smaller_kv_cache_same_greedy_tokens(tiny_hf, tmp_path, kv_dtype):
    """A package with a float16 or int8 KV cache runs under onnxruntime-genai as it runs here."""
    from .conftest import export_quantized

    pkg, _ = export_quantized(tiny_hf, tmp_path / kv_dtype, kv_dtype=kv_dtype)
    ours = Generator(pkg).generate("Hello world", max_new_tokens=16, stop_token_ids=())
    theirs = genai_generate(pkg, "Hello world", max_new_tokens=16)
    assert len(ours.tokens) == 16 and theirs.tokens == ours.tokens


def test_genai_shared_buffer_same_logits(tiny_w4w2):
    """The fused package asks onnxruntime-genai for one past/present buffer; teacher-forced logits stay ours."""
    import json

    import numpy as np
    import onnxruntime_genai as og

    from edge_recover.runtimes.session import OrtCausalLM

    pkg = tiny_w4w2[0]
    assert json.loads((pkg / "genai_config.json").read_text())["search"]["past_present_share_buffer"] is True
    tokens = [int(t) for t in np.random.default_rng(0).integers(3, 250, size=40)]
    model = og.Model(str(pkg))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=48)
    gen = og.Generator(model, params)
    lm = OrtCausalLM(pkg, threads=1)
    cache = lm.empty_cache(48)
    theirs, ours = [], []
    for chunk in [tokens[:9]] + [[t] for t in tokens[9:]]:
        gen.append_tokens(chunk)
        theirs.append(np.asarray(gen.get_output("logits"))[0, -1])
        logits, cache = lm.step(np.array([chunk]), cache)
        ours.append(logits)
    assert np.asarray(gen.get_output("present.0.key")).shape[2] == 48  # genai bound its max_length buffer
    print(f"genai vs ours (shared buffers): max {np.abs(np.stack(theirs) - np.stack(ours)).max():.2e}")
    np.testing.assert_allclose(np.stack(theirs), np.stack(ours), atol=1e-5, rtol=0)


def test_genai_missing_is_one_line(tiny_package, monkeypatch):
    with pytest.raises(EdgeRecoverError, match="no genai_config.json"):
        genai_generate(tiny_package, "hi")  # the plain Optimum fixture has no genai_config.json
    monkeypatch.setitem(sys.modules, "onnxruntime_genai", None)  # as if not installed: import raises
    with pytest.raises(EdgeRecoverError, match="pip install onnxruntime-genai"):
        genai_generate(tiny_package, "hi")

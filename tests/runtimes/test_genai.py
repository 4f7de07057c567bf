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


def test_genai_missing_is_one_line(tiny_package, monkeypatch):
    with pytest.raises(EdgeRecoverError, match="no genai_config.json"):
        genai_generate(tiny_package, "hi")  # the plain Optimum fixture has no genai_config.json
    monkeypatch.setitem(sys.modules, "onnxruntime_genai", None)  # as if not installed: import raises
    with pytest.raises(EdgeRecoverError, match="pip install onnxruntime-genai"):
        genai_generate(tiny_package, "hi")

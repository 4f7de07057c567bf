"""Tiny random Llama, Qwen3 and Qwen2 models (hidden 64, 2 layers) with a real BPE tokenizer, made in-test.

`qwen2` has Qwen2.5's q/k/v biases, `llama-bias` a Llama with `attention_bias` (o_proj's too); both drawn at random
(zero biases would not show a dropped one)."""

from __future__ import annotations

import pytest
import torch

TEXT = [
    "The capital of France is Paris. Once upon a time, in a small village by the sea, there lived a fisher.",
    "def fibonacci(n): if n < 2: return n; return fibonacci(n - 1) + fibonacci(n - 2)",
    "Water boils at a temperature of one hundred degrees Celsius at sea level.",
]


def make_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(TEXT * 4, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")


def make_config(arch: str):
    from transformers import LlamaConfig, Qwen2Config, Qwen3Config

    common = dict(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True,
                  bos_token_id=0, eos_token_id=1)
    if arch == "llama":
        return LlamaConfig(**common)
    if arch == "llama-bias":
        return LlamaConfig(attention_bias=True, **common)
    if arch == "qwen2":
        return Qwen2Config(rope_theta=1e6, **common)
    return Qwen3Config(head_dim=16, **common)


def make_loaded(arch: str, seed: int = 0):
    """A LoadedModel of a random tiny `arch` model (fp32, eval) with a tokenizer."""
    from transformers import AutoModelForCausalLM

    from edge_recover.models import LoadedModel

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(make_config(arch)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.normal_(0, 0.5)
    return LoadedModel(model, make_tokenizer(), f"random-{arch}", "sha256:random")


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory):
    """HF folders of the tiny models: {'llama': Path, 'qwen3': Path}."""
    out = {}
    for arch in ("llama", "qwen3"):
        lm = make_loaded(arch)
        d = tmp_path_factory.mktemp(f"tiny-{arch}")
        lm.model.save_pretrained(d)
        lm.tokenizer.save_pretrained(d)
        out[arch] = d
    return out

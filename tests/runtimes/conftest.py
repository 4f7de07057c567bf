"""Tiny packages for runtime tests: a random 2-layer Llama with a byte-level tokenizer, exported once per run."""

from __future__ import annotations

from pathlib import Path

import pytest

from edge_recover.versions import PACKAGE_FORMAT_VERSION, library_versions, tool_version

VOCAB = 260
EOS = 256


def make_tiny_hf(path: Path, seed: int = 0) -> Path:
    """A random LlamaForCausalLM (hidden 64, 2 layers, GQA 4/2 heads) with a byte-level BPE tokenizer."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
                                   additional_special_tokens=["<|im_start|>", "<|im_end|>"])
    fast.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=96,
                      initializer_range=0.1, tie_word_embeddings=False, eos_token_id=EOS, bos_token_id=EOS)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).eval()
    model.generation_config.eos_token_id = EOS
    model.save_pretrained(path)
    fast.save_pretrained(path)
    return path


def write_manifest(pkg: Path, source: Path, scheme=None, format_version: int = PACKAGE_FORMAT_VERSION) -> None:
    """A manifest.json per docs/design.md (what the exporter writes, file table included), for an unquantized
    Optimum export."""
    from edge_recover import contract

    manifest = {"format_version": format_version, "kind": "edge-recover-package", "scheme": scheme, "layers": {},
                "target": "cpu", "source": str(source), "source_hash": "test", "tool_version": tool_version(),
                "versions": library_versions(), "parity": {}, "adapters": []}
    contract.write_manifest(pkg, manifest)


def make_fp32_package(hf: Path, out: Path) -> Path:
    """Optimum `text-generation-with-past` export + tokenizer files + manifest."""
    import shutil

    from optimum.exporters.onnx import main_export

    main_export(str(hf), output=str(out), task="text-generation-with-past")
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (hf / name).exists() and not (out / name).exists():
            shutil.copy(hf / name, out / name)
    write_manifest(out, hf)
    return out


@pytest.fixture(scope="session")
def tiny_hf(tmp_path_factory) -> Path:
    return make_tiny_hf(tmp_path_factory.mktemp("tiny") / "hf")


@pytest.fixture(scope="session")
def tiny_package(tiny_hf, tmp_path_factory) -> Path:
    return make_fp32_package(tiny_hf, tmp_path_factory.mktemp("pkg") / "fp32")


def export_quantized(hf: Path, out: Path, target: str = "cpu", scheme: str = "w4w2gateup", **export_options):
    """A real package from the exporter (RTN, no calibration: fast); returns (folder, quantized torch model)."""
    from edge_recover.exporters.api import export_package
    from edge_recover.models import load_model

    lm = load_model(hf)
    folder = export_package(lm, out, scheme=scheme, target=target, method="rtn", calibration=0, **export_options)
    return folder, lm.model  # export quantizes `lm` in place: the torch model holds the package's integers


@pytest.fixture(scope="session")
def tiny_w4w2(tiny_hf, tmp_path_factory):
    """(package folder, torch model with the same integers), exported for the cpu target."""
    return export_quantized(tiny_hf, tmp_path_factory.mktemp("pkg") / "w4w2gateup")


@pytest.fixture(scope="session")
def tiny_w4w2_openvino(tiny_hf, tmp_path_factory):
    """(package folder, torch model), exported for the openvino target (plain ONNX + MatMulNBits)."""
    return export_quantized(tiny_hf, tmp_path_factory.mktemp("pkg") / "w4w2gateup-ov", target="openvino")

"""The source model: a Hugging Face folder or a `.gguf` file, loaded as a `LoadedModel` with its weights' hash.

The first step of the data path, which every later one reads: `load_source` returns the model, its tokenizer,
where it came from and a content hash of its weights (`weights_hash`), so that every later step can record
provenance in its manifest. GGUF files go through transformers' GGUF reader (weights are de-quantized to fp32:
the Q4_1 weights of SmolLM2 are then an exact fp32 teacher) and get their tokenizer repaired (`fix_tokenizer`).
`check_architecture` refuses a model whose family has no layout (sdk/layouts.py). Quantized checkpoints are a
later stage (checkpoint.py); `models.load_model` takes all three kinds.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

from .errors import EdgeRecoverError, require
from .layouts import layout_for

QUANTIZED_MARKER = "edge_recover_quantized.json"


@dataclass
class LoadedModel:
    model: "object"  # transformers PreTrainedModel
    tokenizer: "object"
    source: str
    source_hash: str
    quantized_manifest: dict | None = None  # set when loaded from an edge-recover checkpoint


def weights_hash(model) -> str:
    """sha256 over the model's weights (names, shapes, fp32 bytes, in name order): the model's identity.

    A content hash of the tensors, not of files, so the same weights loaded from a `.gguf` file or from the
    Hugging Face folder made of it, on any machine and transformers version, hash the same. Tied tensors
    count once.

    Example:
        >>> weights_hash(load_model("smollm2").model)  # doctest: +SKIP
        'sha256:...'
    """
    import torch

    h = hashlib.sha256()
    seen = set()
    for name, t in sorted(model.state_dict().items()):
        if t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        data = t.detach().to("cpu", torch.float32).contiguous()
        h.update(f"{name}:{tuple(data.shape)};".encode())
        h.update(data.numpy().tobytes())
    return "sha256:" + h.hexdigest()


def check_architecture(config) -> None:
    """Refuse a Hugging Face `config` whose `model_type` has no layout in the family table (sdk/layouts.py).

    Example:
        >>> check_architecture(AutoConfig.from_pretrained("gpt2"))  # doctest: +SKIP
        EdgeRecoverError: unsupported architecture 'gpt2' (GPT2LMHeadModel); edge-recover supports llama, ...
    """
    layout_for(config)


def _gguf_token_id(path: Path, which: str) -> int | None:
    """The GGUF file's own `tokenizer.ggml.{which}_token_id`, or None where it has none."""
    from gguf import GGUFReader

    field = GGUFReader(path).fields.get(f"tokenizer.ggml.{which}_token_id")
    return int(field.parts[field.data[0]][0]) if field is not None and field.data else None


def fix_tokenizer(tokenizer, eos_id: int | None = None) -> None:
    """Repair what the GGUF conversion gets wrong: a BOS prepended to every text, a wrong EOS and a
    decoder chain that other runtimes (onnxruntime-genai) do not read as byte-level.

    `eos_id` is the GGUF file's own end-of-sequence id: transformers takes Qwen2.5-Instruct's EOS as
    `<|endoftext|>` where the file says `<|im_end|>`, so chat generation would not stop at the end of a turn."""
    if getattr(tokenizer, "add_bos_token", False):
        tokenizer.add_bos_token = False
    if str(getattr(tokenizer, "vocab_file", None) or "").endswith(".gguf"):
        tokenizer.vocab_file = None  # else save_pretrained copies the whole GGUF file as tokenizer.model
    vocab = tokenizer.get_vocab()
    if eos_id is not None and 0 <= eos_id < len(vocab) and tokenizer.eos_token_id != eos_id:
        tokenizer.eos_token = tokenizer.convert_ids_to_tokens(eos_id)
    elif tokenizer.eos_token == tokenizer.bos_token and "<|im_end|>" in vocab:
        tokenizer.eos_token = "<|im_end|>"
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and "ByteLevel" in str(backend.pre_tokenizer):
        from tokenizers import decoders

        backend.decoder = decoders.ByteLevel()
    probe = "Hello world, it's 3 o'clock."
    round_trip = tokenizer.decode(tokenizer(probe)["input_ids"], skip_special_tokens=True)
    if round_trip != probe:
        logging.getLogger(__name__).warning("tokenizer does not round-trip %r (got %r)", probe, round_trip)


def _load_hf(path: Path, gguf_file: str | None = None, dtype=None):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    try:
        config = AutoConfig.from_pretrained(path, gguf_file=gguf_file)
    except (OSError, ValueError, json.JSONDecodeError, KeyError, RuntimeError) as exc:
        what = f"{path / gguf_file}" if gguf_file else str(path)
        raise EdgeRecoverError(f"cannot read a model config from {what!r} ({str(exc).splitlines()[0][:160]}); "
                               "pass a Hugging Face model folder or a .gguf file") from None
    check_architecture(config)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, gguf_file=gguf_file)
        model = AutoModelForCausalLM.from_pretrained(path, gguf_file=gguf_file, dtype=dtype or torch.float32)
    except (OSError, ValueError, RuntimeError, KeyError) as exc:
        raise EdgeRecoverError(f"cannot load model weights from {str(path)!r}: {str(exc).splitlines()[0][:200]}; "
                               "is the file complete?") from None
    if gguf_file:
        fix_tokenizer(tokenizer, _gguf_token_id(path / gguf_file, "eos"))
        model.generation_config.eos_token_id = tokenizer.eos_token_id
        model.generation_config.bos_token_id = None
    model.eval()
    return model, tokenizer


def load_source(path: str | Path, dtype=None) -> LoadedModel:
    """Load a full-precision causal LM from a Hugging Face folder or a `.gguf` file.

    Example:
        >>> load_source("~/.cache/edge-recover/smollm2-135m").model.config.model_type  # doctest: +SKIP
        'llama'
    """
    p = Path(path).expanduser()
    require(p.exists(), f"model path {str(p)!r} does not exist; run `edge-recover fetch smollm2` or pass a HF folder / .gguf file")
    if p.is_file():
        require(p.suffix == ".gguf", f"model file {str(p)!r} is not a .gguf file; pass a .gguf file or a HF model folder")
        model, tok = _load_hf(p.parent, gguf_file=p.name, dtype=dtype)
        return LoadedModel(model, tok, str(p), weights_hash(model))
    require(not (p / QUANTIZED_MARKER).is_file(),
            f"{str(p)!r} is a quantized checkpoint; pass the full-precision model it was made from")
    require((p / "config.json").is_file(), f"{str(p)!r} has no config.json; pass a Hugging Face model folder or a .gguf file")
    model, tok = _load_hf(p, dtype=dtype)
    return LoadedModel(model, tok, str(p), weights_hash(model))

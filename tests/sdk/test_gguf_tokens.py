"""The GGUF file's own end-of-sequence id wins over what transformers' conversion picks (Qwen2.5-Instruct:
`<|im_end|>`, where the conversion says `<|endoftext|>`, so chat turns never ended)."""

from __future__ import annotations

import numpy as np

from edge_recover.models import _gguf_token_id, fix_tokenizer
from tests.fixtures.tiny_models import make_tokenizer


def _gguf_with_eos(path, eos: int | None):
    import gguf

    w = gguf.GGUFWriter(str(path), "llama")
    if eos is not None:
        w.add_eos_token_id(eos)
    w.add_tensor("token_embd.weight", np.zeros((4, 4), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_the_files_eos_id_is_read_and_applied(tmp_path):
    assert _gguf_token_id(_gguf_with_eos(tmp_path / "a.gguf", 7), "eos") == 7
    assert _gguf_token_id(_gguf_with_eos(tmp_path / "b.gguf", None), "eos") is None
    tok = make_tokenizer()
    start = tok.convert_tokens_to_ids("<|im_start|>")
    assert tok.eos_token == "<|im_end|>" and start != tok.eos_token_id
    fix_tokenizer(tok, eos_id=start)
    assert tok.eos_token_id == start and tok.eos_token == "<|im_start|>"
    fresh = make_tokenizer()
    fix_tokenizer(fresh, eos_id=None)  # no id in the file: the tokenizer keeps what it has
    assert fresh.eos_token == "<|im_end|>"

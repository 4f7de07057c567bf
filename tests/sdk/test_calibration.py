"""The one teacher sampler (sdk/calibration.py: `sample_rows`, used by `teacher_samples`)."""

from __future__ import annotations

import torch

from edge_recover.calibration import input_hessians, sample_rows, teacher_samples


def test_nucleus_of_one_token_is_greedy_decoding(tiny_llama_dir):
    """The KV-cache loop against the reference path, transformers' `generate` (greedy)."""
    from edge_recover.models import load_model

    model = load_model(tiny_llama_dir).model
    first = torch.tensor([5, 17, 42])
    rows = sample_rows(model, first, seq_len=10, top_p=1e-9)
    ref = model.generate(first.view(-1, 1), attention_mask=torch.ones(3, 1, dtype=torch.long), do_sample=False,
                         max_length=10, min_length=10, pad_token_id=0, eos_token_id=None)
    assert torch.equal(rows, ref)


def test_teacher_samples_are_seeded_and_full_length(tiny_llama_dir):
    from edge_recover.models import load_model

    lm = load_model(tiny_llama_dir)
    a = teacher_samples(lm.model, lm.tokenizer, n=5, seq_len=12, seed=3, batch_size=2)
    b = teacher_samples(lm.model, lm.tokenizer, n=5, seq_len=12, seed=3, batch_size=2)
    c = teacher_samples(lm.model, lm.tokenizer, n=5, seq_len=12, seed=4, batch_size=2)
    assert a.shape == (5, 12) and torch.equal(a, b) and not torch.equal(a, c)
    assert not set(a[:, 0].tolist()) & set(lm.tokenizer.all_special_ids)
    hs = input_hessians(lm.model, a, layers=["lm_head", "model.layers.0.mlp.down_proj"])
    assert sorted(hs) == ["lm_head", "model.layers.0.mlp.down_proj"] and hs["lm_head"].shape == (64, 64)


def test_diagonal_hessians_equal_the_full_ones_bit_for_bit(tiny_llama_dir):
    """`mse` calibrates diagonals only (K floats a layer, not K x K): the same numbers as the full H's diagonal."""
    from edge_recover.models import load_model

    lm = load_model(tiny_llama_dir)
    ids = teacher_samples(lm.model, lm.tokenizer, n=5, seq_len=12, seed=3, batch_size=2)
    full = input_hessians(lm.model, ids, batch_size=2)
    diag = input_hessians(lm.model, ids, batch_size=2, diagonal=True)
    assert sorted(diag) == sorted(full)
    for name, h in full.items():
        assert diag[name].shape == (h.shape[0],) and torch.equal(diag[name], torch.diag(h)), name

import pytest
import torch

from edge_recover.errors import EdgeRecoverError
from edge_recover.models import load_model
from edge_recover.recovery.data import SampleSettings, generate_dataset, load_dataset, sample_top_p


def test_kv_cache_sampler_matches_hf_greedy(tiny_model):
    """The fast KV-cache loop, made greedy (tiny top-p keeps only the top token), equals HF generate."""
    lm = load_model(tiny_model)
    settings = SampleSettings(samples=3, seq_len=12, top_p=1e-6, batch_size=2)
    ds = generate_dataset(lm.model, lm.tokenizer, settings, lm.source_hash, progress=False)
    ref = lm.model.generate(ds.input_ids[:, :1], attention_mask=torch.ones_like(ds.input_ids[:, :1]), do_sample=False,
                            max_length=12, min_length=12, pad_token_id=0, eos_token_id=None)
    assert torch.equal(ds.input_ids, ref)


def test_top_p_keeps_the_nucleus():
    gen = torch.Generator().manual_seed(0)
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).expand(2000, 4)
    picks = sample_top_p(logits, 0.7, gen)
    assert set(picks.tolist()) == {0, 1}  # 0.5 + 0.3 covers 0.7; tokens 2, 3 are cut
    assert 0.55 < (picks == 0).float().mean() < 0.70  # renormalised 0.5 / 0.8 = 0.625


def test_dataset_round_trip_and_refusals(tiny_model, tmp_path):
    lm = load_model(tiny_model)
    settings = SampleSettings(samples=6, seq_len=16, seed=3, batch_size=4)
    ds = generate_dataset(lm.model, lm.tokenizer, settings, lm.source_hash, progress=False)
    # diversity: every row has its own first token draw and temperature
    assert ds.temperature.min() >= 0.8 and ds.temperature.max() <= 1.2 and ds.temperature.unique().numel() == 6
    path = ds.save(tmp_path / "d.safetensors")
    back = load_dataset(path, teacher_hash=lm.source_hash)
    assert torch.equal(back.input_ids, ds.input_ids) and back.settings == settings
    with pytest.raises(EdgeRecoverError, match="another teacher"):
        load_dataset(path, teacher_hash="sha256:other")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(path.read_bytes()[:200])
    with pytest.raises(EdgeRecoverError, match="corrupt"):
        load_dataset(bad)


@pytest.mark.parametrize("kwargs", [{"samples": 0}, {"seq_len": 2}, {"top_p": 0.0}])
def test_bad_sample_settings(kwargs):
    with pytest.raises(EdgeRecoverError):
        SampleSettings(**kwargs)


def _with_chat_template(lm):
    lm.tokenizer.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                                  "{% endfor %}")
    return lm


def test_chat_share_zero_keeps_old_data_and_one_starts_every_row_at_the_user_turn(tiny_model):
    """chat_share 0 samples exactly what the sampler always did; at 1 every row opens with the template's user
    turn and goes on with the teacher's own sample; a mix forces the opening on about that share of rows."""
    from edge_recover.recovery.data import chat_prefix

    lm = _with_chat_template(load_model(tiny_model))
    base = SampleSettings(samples=6, seq_len=16, seed=3, batch_size=4)
    plain = generate_dataset(lm.model, lm.tokenizer, base, lm.source_hash, progress=False)
    again = generate_dataset(lm.model, lm.tokenizer, SampleSettings(samples=6, seq_len=16, seed=3, batch_size=4,
                                                                    chat_share=0.0), lm.source_hash, progress=False)
    assert torch.equal(plain.input_ids, again.input_ids)
    opening = torch.tensor(chat_prefix(lm.tokenizer))
    assert lm.tokenizer.decode(opening) == "<|im_start|>user\n"
    chat = generate_dataset(lm.model, lm.tokenizer, SampleSettings(samples=6, seq_len=24, seed=3, batch_size=4,
                                                                   chat_share=1.0), lm.source_hash, progress=False)
    assert torch.equal(chat.input_ids[:, :len(opening)], opening.expand(6, -1))
    assert chat.input_ids[:, len(opening):].unique().numel() > 3  # the rest is sampled, not copied
    mixed = generate_dataset(lm.model, lm.tokenizer, SampleSettings(samples=64, seq_len=20, seed=1, batch_size=16,
                                                                    chat_share=0.5), lm.source_hash, progress=False)
    opened = (mixed.input_ids[:, :len(opening)] == opening).all(dim=1).float().mean().item()
    assert 0.3 < opened < 0.7


def test_chat_share_needs_a_chat_template(tiny_model):
    lm = load_model(tiny_model)
    lm.tokenizer.chat_template = None
    with pytest.raises(EdgeRecoverError, match="no chat template"):
        generate_dataset(lm.model, lm.tokenizer, SampleSettings(samples=4, seq_len=24, chat_share=0.5), lm.source_hash,
                         progress=False)
    with pytest.raises(EdgeRecoverError, match="chat_share"):
        SampleSettings(chat_share=1.5)

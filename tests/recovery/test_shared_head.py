"""A tied model whose head is quantized embeds with the head's integers in the package; the torch student must
compute the same, in training (through the fake quantizer) and after it (sdk/shared_head.py)."""

import tempfile

import torch
import torch.nn.functional as F
from torch import nn

from edge_recover.exporters.api import export_package
from edge_recover.exporters.verify import compare, with_accuracy_level
from edge_recover.fakequant import FakeQuantLinear
from edge_recover.models import load_model
from edge_recover.recovery.distill import RecoverConfig, recover
from edge_recover.recovery.qat import make_qat_student
from edge_recover.recovery.student import quantize_student
from edge_recover.scheme import named_scheme, parse_rule
from edge_recover.shared_head import SharedHeadEmbedding, share_quantized_head, shares, unshare_quantized_head

SCHEME = named_scheme("w4w2gateup").with_block_size({4: 32, 2: 32}).with_rules([parse_rule("lm_head=4:32")])


def test_the_embedding_reads_the_quantized_head_and_stores_as_before(tiny_model):
    lm = load_model(tiny_model)
    assert shares(lm.model) == "the lm_head is not quantized" and not share_quantized_head(lm.model)
    student, _ = quantize_student(lm, SCHEME, "rtn", progress=False)
    keys = list(student.state_dict())
    table = student.get_input_embeddings().weight
    assert share_quantized_head(student) and share_quantized_head(student)  # idempotent
    emb = student.get_input_embeddings()
    assert isinstance(emb, SharedHeadEmbedding) and emb.weight is table and list(student.state_dict()) == keys
    ids = torch.tensor([[1, 5, 9, 300]])
    head = student.get_output_embeddings().weight
    assert torch.equal(emb(ids), F.embedding(ids, head)) and not torch.equal(emb(ids), F.embedding(ids, table))
    unshare_quantized_head(student)  # for graph capture: a plain table holding the head's values
    plain = student.get_input_embeddings()
    assert type(plain) is nn.Embedding and torch.equal(plain.weight, head) and plain.weight is not head
    assert list(student.state_dict()) == keys


def test_training_reaches_the_head_through_the_embedding(tiny_model):
    lm = load_model(tiny_model)
    student, _ = quantize_student(lm, SCHEME, "rtn", progress=False)
    share_quantized_head(student)
    make_qat_student(student, lm.model)
    head = student.get_output_embeddings()
    assert isinstance(head, FakeQuantLinear)
    ids = torch.tensor([[1, 5, 9]])
    out = student.get_input_embeddings()(ids)
    assert torch.allclose(out, F.embedding(ids, head.dequantized().detach()))
    out.square().sum().backward()  # the embedding's use alone
    assert head.latent.grad is not None and head.latent.grad.abs().sum() > 0
    rows_grad, head.latent.grad = head.latent.grad.clone(), None  # the rows-only path has the full W_hat's gradients
    F.embedding(ids, head.dequantized()).square().sum().backward()
    assert torch.allclose(rows_grad, head.latent.grad)


def test_the_recovered_student_is_the_package(tiny_model, tmp_path):
    """What recovery trained and reports is what ships: the exact graph of the exported package equals the
    recovered torch student (a float-table embedding would differ by the head's quantization error)."""
    cfg = RecoverConfig(samples=48, seq_len=32, epochs=1, batch_size=8, method="rtn", gen_batch_size=16,
                        checkpoint_every=1000)
    res = recover(load_model(tiny_model), SCHEME, tmp_path / "rec", cfg, device="cpu", progress=False)
    assert isinstance(res.student.get_input_embeddings(), SharedHeadEmbedding)
    pkg = export_package(str(tmp_path / "rec"), tmp_path / "pkg", target="cpu", verify=False)
    with tempfile.TemporaryDirectory() as tmp:
        parity = compare(with_accuracy_level(pkg / "model.onnx", 0, tmp), res.student, load_model(tiny_model).tokenizer)
    assert parity.max_abs_diff / parity.logit_scale < 1e-4, parity


def test_an_8_bit_head_stays_as_quantized(tiny_model, tmp_path):
    """Layers at 8 bits are not trained (recovery/qat.py FROZEN_BITS): the cpu default's head keeps its integers
    and scales, the 4-bit layers train."""
    from edge_recover.apply import quantized_layers

    scheme = named_scheme("w4w2gateup").with_block_size({4: 32, 2: 32}).with_rules([parse_rule("lm_head=8:32")])
    cfg = RecoverConfig(samples=48, seq_len=32, epochs=1, batch_size=8, method="rtn", gen_batch_size=16,
                        checkpoint_every=1000)
    res = recover(load_model(tiny_model), scheme, tmp_path / "rec", cfg, device="cpu", progress=False,
                  save_quantized_to=tmp_path / "start")
    rec, start = (quantized_layers(load_model(tmp_path / n).model) for n in ("rec", "start"))
    assert rec["lm_head"].config.bits == 8 and torch.equal(rec["lm_head"].codes, start["lm_head"].codes)
    assert torch.equal(rec["lm_head"].scales, start["lm_head"].scales)
    name = "model.layers.0.mlp.up_proj"
    assert not torch.equal(rec[name].scales, start[name].scales) and res.report["kl_after"] < res.report["kl_before"]

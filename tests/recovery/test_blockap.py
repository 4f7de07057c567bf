"""Block-wise reconstruction (recovery/blockap.py) on tiny random models: the captured layer inputs replay the
model's own forward, every layer's MSE and the end-to-end KL go down, the integers stay exact and in range,
the requires_grad flags come back, and a diverging run stops with one line."""

import contextlib
import copy
import json

import pytest
import torch
import torch.nn.functional as F

from edge_recover.errors import EdgeRecoverError
from edge_recover.models import load_model
from edge_recover.recovery.blockap import _advance, _capture, block_reconstruct
from edge_recover.recovery.qat import fake_quant_layers, freeze_qat_student, make_qat_student
from edge_recover.recovery.student import quantize_student
from edge_recover.scheme import named_scheme

SCHEME = named_scheme("w4w2gateup").with_block_size({4: 32, 2: 32})  # the tiny model's K = 64 / 128


def _student(lm, units: str = "step"):
    base, _ = quantize_student(lm, SCHEME, "rtn", progress=False)
    make_qat_student(base, lm.model, units=units)
    return base


def _ids(lm, n: int, seed: int, t: int = 32) -> torch.Tensor:
    return torch.randint(0, lm.model.config.vocab_size, (n, t), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def _kl(student, teacher, ids) -> float:
    t = F.log_softmax(teacher(input_ids=ids).logits.float(), -1)
    s = F.log_softmax(student(input_ids=ids).logits.float(), -1)
    return float((t.exp() * (t - s)).sum(-1).mean())


def _flags(model) -> dict[str, bool]:
    return {n: p.requires_grad for n, p in model.named_parameters()}


@pytest.fixture(scope="module")
def run(tiny_model):
    lm = load_model(tiny_model)
    student = _student(lm)
    start = {n: (fq.zero_points.clone(), fq.to_quantized().codes) for n, fq in fake_quant_layers(student).items()}
    flags = _flags(student)
    hold = _ids(lm, 16, seed=1)
    kl_before = _kl(student, lm.model, hold)
    report = block_reconstruct(student, lm.model, _ids(lm, 64, seed=0), steps=60, batch_size=8, progress=False)
    return lm, student, start, flags, hold, kl_before, report


@pytest.mark.parametrize("attn", ["sdpa", "eager"])  # eager: the causal mask is a [1, 1, T, T] tensor
def test_captured_inputs_and_kwargs_replay_the_models_forward(tiny_model, attn):
    lm = load_model(tiny_model)
    model, ids = lm.model, _ids(lm, 5, seed=2)
    model.config._attn_implementation = attn
    h, kwargs, dtype = _capture(model, ids, 2, torch.device("cpu"), contextlib.nullcontext)  # 3 chunks: 2, 2, 1 rows
    assert h.shape == (5, 32, model.config.hidden_size) and h.dtype == torch.float32
    for layer, kw in zip(model.model.layers, kwargs):  # kwargs of a one-row forward broadcast over batches of 3
        _advance(layer, h, kw, dtype, 3, contextlib.nullcontext)
    with torch.no_grad():
        replayed = model.lm_head(model.model.norm(h))
        ref = model(input_ids=ids).logits
    diff = (replayed - ref).abs()
    assert float(diff.max()) < 1e-4, f"max {float(diff.max()):.3g}, mean {float(diff.mean()):.3g}"


def test_every_layer_and_the_end_to_end_kl_improve(run):
    lm, student, _, _, hold, kl_before, report = run
    layers = report["layers"]
    assert [r["layer"] for r in layers] == list(range(lm.model.config.num_hidden_layers))
    for r in layers:
        assert r["mse_after"] < 0.8 * r["mse_before"], r
        assert r["trained_parameters"] > 0
    kl_after = _kl(student, lm.model, hold)  # held-out rows
    assert kl_after < 0.9 * kl_before, (kl_before, kl_after)
    assert report["settings"]["steps"] == 60 and report["seconds"] > 0
    assert json.loads(json.dumps(report)) == report  # JSON-able


def test_integers_stay_exact_and_in_range(run):
    lm, student, start, _, hold, _, _ = run
    moved = 0
    for name, fq in fake_quant_layers(student).items():
        qw = fq.to_quantized()
        assert qw.codes.dtype == torch.uint8 and int(qw.codes.max()) < 2 ** fq.config.bits
        assert torch.equal(fq.zero_points, start[name][0]) and fq.zero_points.dtype == torch.uint8
        assert bool(torch.isfinite(qw.scales).all() and (qw.scales > 0).all())
        moved += int((qw.codes != start[name][1]).sum())
    assert moved > 0  # the stage did move integers
    with torch.no_grad():
        fake = student(input_ids=hold).logits
        frozen = freeze_qat_student(copy.deepcopy(student))(input_ids=hold).logits
    assert torch.equal(fake, frozen)  # bit for bit: what trained is what ships


def test_requires_grad_flags_come_back(run):
    _, student, _, flags, _, _, _ = run
    assert _flags(student) == flags
    assert any(flags.values()) and not all(flags.values())  # latents/scales/norms on, the rest off


def test_a_diverging_layer_stops_with_one_line(tiny_model):
    lm = load_model(tiny_model)
    student = _student(lm)
    flags = _flags(student)
    layer0 = {n: p.detach().clone() for n, p in student.model.layers[0].named_parameters()}
    # log-scales trained at 1e6: one Adam step sends exp(log_scale) to inf or 0, so the next loss is not finite
    with pytest.raises(EdgeRecoverError, match=r"diverged at layer 0 \(step \d+, loss .*lower `--block-ap-lr`") as err:
        block_reconstruct(student, lm.model, _ids(lm, 16, seed=0), steps=20, lr=1e6, lr_scale=1e6, progress=False)
    assert "\n" not in str(err.value)
    assert _flags(student) == flags
    for n, p in student.model.layers[0].named_parameters():  # the diverged layer is put back as it was
        assert torch.equal(p, layer0[n]), n


def test_bad_input_is_refused(tiny_model):
    lm = load_model(tiny_model)
    with pytest.raises(EdgeRecoverError, match="FakeQuantLinear.*make_qat_student"):
        block_reconstruct(copy.deepcopy(lm.model), lm.model, _ids(lm, 4, seed=0), progress=False)
    with pytest.raises(EdgeRecoverError, match="`--block-ap-steps`"):
        block_reconstruct(_student(lm), lm.model, _ids(lm, 4, seed=0), steps=0, progress=False)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_qwen3_with_qk_norms(tiny_qwen3_dir, attn):
    lm = load_model(tiny_qwen3_dir)
    lm.model.config._attn_implementation = attn  # eager: a [1, 1, T, T] mask tensor that must broadcast
    student = _student(lm, units="weight")
    student.config._attn_implementation = attn
    flags = _flags(student)
    report = block_reconstruct(student, lm.model, _ids(lm, 16, seed=0), steps=15, batch_size=4, lr=3e-3,
                               progress=False)
    assert all(r["mse_after"] < r["mse_before"] for r in report["layers"]), report["layers"]
    assert _flags(student) == flags


def test_qwen2_with_projection_biases(tiny_qwen2_dir):
    """The block-wise stage on a tiny Qwen2 (q/k/v biases, untied): every layer's MSE goes down, the biases
    (floats that ship as they are) do not train, the codes stay exact and in range."""
    lm = load_model(tiny_qwen2_dir)
    student = _student(lm)
    biases = {n: p.detach().clone() for n, p in student.named_parameters() if n.endswith("_proj.bias")}
    assert biases, "the tiny Qwen2 has q/k/v biases"
    report = block_reconstruct(student, lm.model, _ids(lm, 16, seed=0), steps=15, batch_size=4, progress=False)
    assert all(r["mse_after"] < r["mse_before"] for r in report["layers"]), report["layers"]
    after = dict(student.named_parameters())
    assert all(torch.equal(after[n], b) for n, b in biases.items())
    for fq in fake_quant_layers(student).values():
        q = fq.to_quantized()
        assert int(q.codes.max()) < q.config.levels and int(q.zero_points.max()) < q.config.levels

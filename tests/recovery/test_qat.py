"""Integer-exact recovery (`--mode qat`) on a tiny random model: the fake quantizer is the package's function,
training lowers held-out KL, the output exports as it is, resume is bit-exact, a diverging run stops cleanly."""

import json
import subprocess
import sys

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from safetensors.torch import load_file

from edge_recover.apply import quantized_layers
from edge_recover.errors import EdgeRecoverError
from edge_recover.fakequant import FakeQuantLinear
from edge_recover.models import load_model
from edge_recover.qlinear import QuantLinear
from edge_recover.quantizer import quantize_weight
from edge_recover.recovery.distill import RecoverConfig, recover
from edge_recover.scheme import QuantConfig, named_scheme

SCHEME = named_scheme("w4w2gateup").with_block_size({4: 32, 2: 32})  # the tiny model's K = 64 / 128
CFG = dict(samples=96, seq_len=48, epochs=2, batch_size=8, method="rtn", latent_units="weight", lr=3e-3, lr_scale=1e-2, lr_norm=1e-3,
           log_every=2, checkpoint_every=4)  # the CLI test runs the default, step units


@pytest.mark.parametrize("units", ["weight", "step"])
def test_fake_quant_forward_is_the_quantlinear_of_its_integers(units):
    torch.manual_seed(0)
    lin = torch.nn.Linear(80, 24)
    cfg = QuantConfig(bits=2, block_size=32)
    q = QuantLinear.from_quantized(quantize_weight(lin.weight, cfg, "rtn"), lin.bias)
    fq = FakeQuantLinear.from_quant_linear(q, latent=lin.weight, units=units)
    assert torch.equal(fq.to_quantized().codes, q.codes)  # RTN: the teacher weight rounds to the start codes
    with torch.no_grad():  # move the latents and scales as training would
        fq.latent.add_(0.3 * torch.randn_like(fq.latent) * (1.0 if units == "step" else fq.scales().mean()))
        fq.log_scale.add_(0.1 * torch.randn_like(fq.log_scale))
    x = torch.randn(5, 80)
    frozen = fq.to_quant_linear()
    assert torch.equal(fq(x), frozen(x))  # bit for bit: the checkpoint holds what the student computed with
    qw = fq.to_quantized()
    assert qw.codes.dtype == torch.uint8 and int(qw.codes.max()) <= 3
    assert not torch.equal(qw.codes, q.codes)
    fq(x).square().sum().backward()  # the straight-through estimator passes gradients to latents and scales
    assert fq.latent.grad.abs().sum() > 0 and fq.log_scale.grad.abs().sum() > 0


@pytest.mark.parametrize("units", ["weight", "step"])
@pytest.mark.parametrize("k,bits,block", [(80, 2, 32), (96, 4, 32), (72, 2, 64)])  # partial last block, whole, one + part
def test_fused_fake_quant_has_the_gradients_of_the_plain_expression(units, k, bits, block):
    torch.manual_seed(1)
    lin = torch.nn.Linear(k, 12, bias=False)
    q = QuantLinear.from_quantized(quantize_weight(lin.weight, QuantConfig(bits=bits, block_size=block), "rtn"), None)
    fq = FakeQuantLinear.from_quant_linear(q, latent=lin.weight, units=units)
    with torch.no_grad():  # push some weights out of range, so the clamp's zero gradient is exercised too
        fq.latent.add_(2.5 * torch.randn_like(fq.latent) * (1.0 if units == "step" else fq.scales().mean()))
    g = torch.randn(12, k)
    grads = []
    for fn in (fq.dequantized, fq.dequantized_reference):
        fq.zero_grad()
        w = fn()
        (w * g).sum().backward()
        grads.append((w.detach(), fq.latent.grad.clone(), fq.log_scale.grad.clone()))
    (w1, gl1, gs1), (w2, gl2, gs2) = grads
    assert torch.equal(w1, w2)  # the same W_hat bit for bit
    torch.testing.assert_close(gl1, gl2, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(gs1, gs2, rtol=1e-5, atol=1e-6)
    assert gl1.eq(0).any() and gl1.ne(0).any()  # some weights clamped (no gradient), others not


@pytest.mark.parametrize("units", ["weight", "step"])
def test_trainable_zero_points_are_integers_in_range_with_the_plain_gradient(units):
    """`train_zero_points`: the forward still equals the QuantLinear of `to_quantized()` bit for bit after the
    zero-point latents move (rounded and clamped: uint8 in [0, 2^bits)), and the fused backward gives the zero
    points the plain expression's gradient, nonzero only in blocks with clamped weights."""
    torch.manual_seed(2)
    lin = torch.nn.Linear(80, 12, bias=False)
    q = QuantLinear.from_quantized(quantize_weight(lin.weight, QuantConfig(bits=2, block_size=32), "rtn"), None)
    fq = FakeQuantLinear.from_quant_linear(q, latent=lin.weight, units=units)
    fq.train_zero_points()
    assert torch.equal(fq.to_quantized().zero_points, q.zero_points)  # starts at the integers
    with torch.no_grad():
        fq.zero_latent.add_(1.4 * torch.randn_like(fq.zero_latent))  # some past the ends: clamped to [0, 3]
        fq.latent.add_(2.0 * torch.randn_like(fq.latent) * (1.0 if units == "step" else fq.scales().mean()))
    qw = fq.to_quantized()
    assert qw.zero_points.dtype == torch.uint8 and int(qw.zero_points.max()) <= 3
    assert not torch.equal(qw.zero_points, q.zero_points)
    assert (fq.zero_latent.detach() < -0.5).any() or (fq.zero_latent.detach() > 3.5).any()  # the clamp is exercised
    x = torch.randn(5, 80)
    assert torch.equal(fq(x), fq.to_quant_linear()(x))
    g = torch.randn(12, 80)
    grads = []
    for fn in (fq.dequantized, fq.dequantized_reference):
        fq.zero_grad()
        (fn() * g).sum().backward()
        grads.append(fq.zero_latent.grad.clone())
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-6)
    assert grads[0].ne(0).any()


def test_fake_quant_from_integers_not_made_by_rounding():
    torch.manual_seed(1)
    w = torch.randn(16, 64)
    q = QuantLinear.from_quantized(quantize_weight(w, QuantConfig(bits=4, block_size=32), "mse"))
    fq = FakeQuantLinear.from_quant_linear(q)  # latent at the dequantized weight: the centre of each code
    assert torch.equal(fq.to_quantized().codes, q.codes) and torch.equal(fq.zero_points, q.zero_points)


@pytest.mark.parametrize("units", ["weight", "step"])
def test_nearest_start_keeps_the_codes_and_puts_each_latent_nearest_the_teacher(units):
    """GPTQ-style integers (some weights rounded to a neighbouring code): the nearest start reproduces every code,
    leaves a latent at the teacher weight where it lies in its code's interval and at the interval's edge next
    to the teacher elsewhere, so it is never farther from the teacher than the centre start."""
    from edge_recover.recovery.qat import make_qat_student, nearest_latent

    torch.manual_seed(2)
    w = torch.randn(16, 64)
    q = QuantLinear.from_quantized(quantize_weight(w, QuantConfig(bits=2, block_size=32), "rtn"))
    q.codes[0, :8] = torch.clamp(q.codes[0, :8].int() + 1, max=3).to(q.codes.dtype)  # pushed across a boundary
    q.codes[1, :8] = torch.clamp(q.codes[1, :8].int() - 1, min=0).to(q.codes.dtype)
    near = nearest_latent(q, w)
    fq = FakeQuantLinear.from_quant_linear(q, latent=near, units=units)
    assert torch.equal(fq.to_quantized().codes, q.codes)
    centre = FakeQuantLinear.from_quant_linear(q).latent
    assert bool(((near - w).abs() <= (centre - w).abs() + 1e-6).all())
    inside = (near == w)
    assert inside.float().mean() > 0.8 and not bool(inside[0, :8].all())  # moved codes: latents at an edge
    teacher, student = torch.nn.Sequential(torch.nn.Linear(64, 16, bias=False)), torch.nn.Sequential(q)
    teacher[0].weight.data.copy_(w)
    start = make_qat_student(student, teacher, units=units, start="nearest")
    assert start.to_json()["latent_nearest_to_teacher"] == 1 and start.from_dequantized == 0
    assert torch.equal(student[0].to_quantized().codes, q.codes)
    student2 = torch.nn.Sequential(QuantLinear.from_quantized(quantize_weight(w, QuantConfig(bits=2, block_size=32), "rtn")))
    student2[0].codes.copy_(q.codes)
    assert make_qat_student(student2, teacher, units=units, start="centre").from_dequantized == 1
    with pytest.raises(EdgeRecoverError, match="latent-start"):
        make_qat_student(torch.nn.Sequential(QuantLinear.from_quantized(quantize_weight(w, QuantConfig(bits=2, block_size=32), "rtn"))),
                         teacher, start="middle")


@pytest.mark.parametrize("units", ["weight", "step"])
def test_teacher_start_decides_weight_by_weight(units):
    """`start="teacher"`: a few codes the teacher does not round to (float noise of an RTN start, or GPTQ's moves)
    start at their code's centre, every other latent at the teacher weight; the codes start exactly as given.
    `centre` on the same layer puts every latent at a centre (the whole-layer rule)."""
    from edge_recover.recovery.qat import make_qat_student

    torch.manual_seed(3)
    w = torch.randn(16, 64)
    q = QuantLinear.from_quantized(quantize_weight(w, QuantConfig(bits=2, block_size=32), "rtn"))
    q.codes[0, :4] = torch.where(q.codes[0, :4] == 0, 1, q.codes[0, :4] - 1).to(q.codes.dtype)  # 4 moved codes
    teacher = torch.nn.Sequential(torch.nn.Linear(64, 16, bias=False))
    teacher[0].weight.data.copy_(w)
    student = torch.nn.Sequential(QuantLinear.from_quantized(quantize_weight(w, QuantConfig(bits=2, block_size=32), "rtn")))
    student[0].codes.copy_(q.codes)
    start = make_qat_student(student, teacher, units=units, start="teacher")
    fq = student[0]
    assert torch.equal(fq.to_quantized().codes, q.codes)
    assert start.from_mixed == 1 and start.from_dequantized == 0 and start.teacher_share == pytest.approx(1 - 4 / w.numel())
    latent_w = fq.latent * fq._expand(fq.scales()) if units == "step" else fq.latent
    assert torch.allclose(latent_w[1:], w[1:], atol=1e-5) and torch.allclose(latent_w[0, 4:], w[0, 4:], atol=1e-5)
    assert not torch.allclose(latent_w[0, :4], w[0, :4], atol=1e-3)  # the moved codes sit at their centres
    student2 = torch.nn.Sequential(QuantLinear.from_quantized(quantize_weight(w, QuantConfig(bits=2, block_size=32), "rtn")))
    student2[0].codes.copy_(q.codes)
    assert make_qat_student(student2, teacher, units=units, start="centre").teacher_share == 0.0


@pytest.fixture(scope="module")
def run(tiny_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("qat")
    res = recover(load_model(tiny_model), SCHEME, root / "rec", RecoverConfig(**CFG), device="cpu", progress=False,
                  save_quantized_to=root / "start")
    return root, res


def test_a_few_steps_lower_held_out_kl_and_codes_stay_in_range(run):
    root, res = run
    r = res.report
    assert r["status"] == "done" and r["mode"] == "qat" and r["method"] == "rtn"
    assert r["kl_after"] < 0.9 * r["kl_before"], (r["kl_before"], r["kl_after"])
    assert 0 < r["codes_moved"] < 0.5 and r["start"]["latent_from_dequantized"] == 0
    rec = load_model(root / "rec")  # a quantized checkpoint, read back to the same integers
    start = load_model(root / "start")
    layers, start_layers = quantized_layers(rec.model), quantized_layers(start.model)
    assert layers.keys() == start_layers.keys() and len(layers) == 14
    for name, q in layers.items():
        assert q.zero_points.dtype == torch.uint8 and int(q.zero_points.max()) < q.config.levels
        assert torch.equal(q.zero_points, start_layers[name].zero_points)  # zero points stay the start integers
        assert q.codes.dtype == torch.uint8 and int(q.codes.max()) < q.config.levels
        assert bool((q.scales > 0).all())
        assert torch.equal(q.codes, quantized_layers(res.student)[name].codes.cpu())
    norm = "model.layers.0.input_layernorm.weight"  # the trained norm weights ship with the integers
    assert not torch.equal(rec.model.state_dict()[norm], start.model.state_dict()[norm])
    ids = torch.randint(0, rec.model.config.vocab_size, (2, 16))
    with torch.no_grad():
        assert torch.equal(rec.model(input_ids=ids).logits, res.student.cpu()(input_ids=ids).logits)
    assert json.loads((root / "rec" / "recovery_report.json").read_text())["kl_after"] == r["kl_after"]


def test_train_head_trains_the_tied_float_head_and_it_ships(run, tiny_model, tmp_path):
    from edge_recover.recovery.qat import head_parameters

    root, base = run
    cfg = RecoverConfig(**{**CFG, "train_head": True, "lr_head": 1e-3})
    res = recover(load_model(tiny_model), SCHEME, tmp_path / "h", cfg, device="cpu", progress=False,
                  dataset=root / "rec.work" / "dataset.safetensors")
    assert list(head_parameters(res.student)) == ["model.embed_tokens.weight"]  # tied: one tensor
    assert res.report["trainable_parameters"] == base.report["trainable_parameters"] + 320 * 64
    assert res.report["kl_after"] < res.report["kl_before"]
    rec, teacher = load_model(tmp_path / "h"), load_model(tiny_model)
    emb = rec.model.get_input_embeddings().weight
    assert not torch.equal(emb, teacher.model.get_input_embeddings().weight)  # trained, and in the checkpoint
    assert rec.model.get_output_embeddings().weight is emb  # still tied after loading
    ids = torch.randint(0, 320, (2, 16))
    from edge_recover.checkpoint import load_quantized, save_quantized
    from edge_recover.models import LoadedModel
    from edge_recover.recovery.qat import recovered_report, shipped_floats

    slim = save_quantized(LoadedModel(res.student, rec.tokenizer, rec.source, rec.source_hash), tmp_path / "slim",
                          recovered_report(res.student, res.teacher, SCHEME.to_json(), "rtn"), slim=True,
                          slim_include=shipped_floats(res.student, True, True))
    away = load_quantized(slim, base=teacher)  # the trained embedding wins over the source's tied head
    with torch.no_grad():
        want = res.student.cpu()(input_ids=ids).logits
        assert torch.equal(rec.model(input_ids=ids).logits, want)
        assert torch.equal(away.model(input_ids=ids).logits, want)


@pytest.mark.parametrize("extra", [{}, {"block_ap_steps": 10, "block_ap_rows": 64, "block_ap_lr": 1e-3},
                                   {"latent_update": "layer-sgd"}, {"train_zero_points": True, "lr_zero": 0.5}],
                         ids=["e2e", "block-ap-first", "layer-sgd", "zero-points"])
def test_resume_is_bit_exact(run, tiny_model, tmp_path, extra):
    root, res = run
    dataset = root / "rec.work" / "dataset.safetensors"
    cfg = {**CFG, **extra}
    stopped = recover(load_model(tiny_model), SCHEME, tmp_path / "a", RecoverConfig(**{**cfg, "max_steps": 5}),
                      device="cpu", dataset=dataset, progress=False).report
    assert stopped["status"] == "stopped" and not (tmp_path / "a").exists()
    recover(load_model(tiny_model), SCHEME, tmp_path / "a", RecoverConfig(**cfg), device="cpu", dataset=dataset,
            resume=True, progress=False)
    whole_dir = root / "rec"
    if extra:  # block reconstruction runs once, before step 0; the resumed run takes it from the checkpoint (and
        # the momentum buffers of layer-sgd come back from it)
        whole_dir = tmp_path / "whole"
        r = recover(load_model(tiny_model), SCHEME, whole_dir, RecoverConfig(**cfg), device="cpu", dataset=dataset,
                    progress=False).report
        if "block_ap_steps" in extra:
            assert r["block_ap"]["kl_after"] < r["kl_before"] and len(r["block_ap"]["layers"]) == 2
        elif "latent_update" in extra:  # the layer-normalised latent step trains too
            assert r["kl_after"] < r["kl_before"] and r["config"]["latent_update"] == "layer-sgd"
        else:  # trainable zero points: integers in range, and some moved off the start's
            assert r["kl_after"] < r["kl_before"]
            start = load_model(root / "start")
            moved = 0
            for name, q in quantized_layers(load_model(whole_dir).model).items():
                assert q.zero_points.dtype == torch.uint8 and int(q.zero_points.max()) < q.config.levels
                moved += int((q.zero_points != quantized_layers(start.model)[name].zero_points).sum())
            assert moved > 0
    resumed, whole = load_file(str(tmp_path / "a" / "model.safetensors")), load_file(str(whole_dir / "model.safetensors"))
    assert resumed.keys() == whole.keys()
    diff = [k for k in whole if not torch.equal(resumed[k], whole[k])]
    assert not diff, f"resumed run differs from the uninterrupted one in {diff[:3]}"


def test_diverging_run_stops_with_one_line(run, tiny_model, tmp_path):
    root, _ = run
    cfg = RecoverConfig(**{**CFG, "lr": 1e4, "checkpoint_every": 1, "warmup": 0.0})
    with pytest.raises(EdgeRecoverError, match=r"training diverged at step \d+ \(loss .*lower `--lr` \(now 10000\)") as err:
        recover(load_model(tiny_model), SCHEME, tmp_path / "d", cfg, device="cpu",
                dataset=root / "rec.work" / "dataset.safetensors", progress=False)
    assert "\n" not in str(err.value) and not (tmp_path / "d").exists()


def test_a_nan_loss_keeps_the_last_good_checkpoint(run, tiny_model, tmp_path, monkeypatch):
    import edge_recover.recovery.distill as distill

    root, _ = run
    calls, real = [], distill.kd_loss

    def nan_from_the_fourth_step(s, t, temperature=1.0, reverse=0.0):
        if torch.is_grad_enabled():  # training steps (the held-out KL runs without gradients)
            calls.append(1)
        loss = real(s, t, temperature, reverse)
        return loss * float("nan") if len(calls) >= 4 else loss

    monkeypatch.setattr(distill, "kd_loss", nan_from_the_fourth_step)
    with pytest.raises(EdgeRecoverError, match=r"diverged at step 4 \(loss nan.*last good checkpoint \(step 2\)"):
        recover(load_model(tiny_model), SCHEME, tmp_path / "n", RecoverConfig(**{**CFG, "checkpoint_every": 1}),
                device="cpu", dataset=root / "rec.work" / "dataset.safetensors", progress=False)
    ckpt = tmp_path / "n.work" / "checkpoint"
    assert json.loads((ckpt / "state.json").read_text())["step"] == 2
    assert all(bool(torch.isfinite(t).all()) for t in load_file(str(ckpt / "qat.safetensors")).values())
    # the kept state resumes (the patched loss is gone): the run continues from step 2 and finishes
    monkeypatch.setattr(distill, "kd_loss", real)
    done = recover(load_model(tiny_model), SCHEME, tmp_path / "n", RecoverConfig(**{**CFG, "checkpoint_every": 1}),
                   device="cpu", dataset=root / "rec.work" / "dataset.safetensors", resume=True, progress=False)
    assert done.report["status"] == "done"


def _matmulnbits_inputs(pkg, index: int) -> dict[str, np.ndarray]:
    """Each MatMulNBits node's initializer at input `index` (1: packed codes, 2: scales)."""
    m = onnx.load(str(pkg / "model.onnx"))
    inits = {t.name: t for t in m.graph.initializer}
    return {n.name: numpy_helper.to_array(inits[n.input[index]]) for n in m.graph.node if n.op_type == "MatMulNBits"}


def test_cli_recover_then_export_packs_the_trained_integers(tiny_model, tmp_path):
    exe = [sys.executable, "-c", "from edge_recover.cli import main; main()"]
    rec = subprocess.run(exe + ["recover", str(tiny_model), "-o", str(tmp_path / "rec"), "--samples", "96", "--seq-len",
                                "48", "--epochs", "1", "--batch-size", "8", "--mode", "qat", "--latent-units", "step",  # the defaults
                                "--lr", "3e-2", "--lr-scale", "1e-2", "--lr-norm", "1e-3", "--beta2", "0.95",
                                "--rule", "lm_head=keep", "--train-head", "--lr-head", "1e-4",  # a float head that trains
                                "--block-ap-steps", "20", "--block-ap-rows", "32",
                                "--block-ap-lr", "1e-2", "--train-zero-points", "--lr-zero", "0.2",
                                "--block-size", "4:32,2:32", "--gen-batch-size", "32", "--device", "cpu",
                                "--save-quantized", str(tmp_path / "start")], capture_output=True, text=True)
    assert rec.returncode == 0, rec.stderr
    assert "held-out teacher samples" in rec.stdout and "codes moved" in rec.stdout
    report = json.loads((tmp_path / "rec" / "recovery_report.json").read_text())
    assert report["block_ap"]["kl_after"] < report["kl_before"] and report["config"]["train_head"]
    assert report["config"]["train_zero_points"] and report["config"]["lr_zero"] == 0.2
    pkgs = {}
    for name in ("rec", "start"):
        out = subprocess.run(exe + ["export", str(tmp_path / name), "-o", str(tmp_path / f"pkg-{name}"), "--target",
                                    "cpu"], capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
        pkgs[name] = tmp_path / f"pkg-{name}"
    manifest = json.loads((pkgs["rec"] / "manifest.json").read_text())
    exact = manifest["parity"]["exact"]  # the package equals torch for the trained integers
    assert manifest["parity"]["ok"] and exact["max_abs_diff"] / exact["logit_scale"] < 1e-4
    a, b = onnx.load(str(pkgs["rec"] / "model.onnx")), onnx.load(str(pkgs["start"] / "model.onnx"))
    assert [n.op_type for n in a.graph.node] == [n.op_type for n in b.graph.node]  # the same nodes
    size = lambda m: sum(numpy_helper.to_array(t).nbytes for t in m.graph.initializer)  # noqa: E731
    assert size(a) == size(b)  # and the same weight bytes: no side-car
    # the default GPTQ start puts each latent at its code's centre, so a 12-step run trains the scales (the
    # integers move in longer runs, and in the RTN-start test above); the package holds the trained scales
    got, start = _matmulnbits_inputs(pkgs["rec"], 2), _matmulnbits_inputs(pkgs["start"], 2)
    assert got.keys() == start.keys() and any(not np.array_equal(got[k], start[k]) for k in got)
    assert json.loads((tmp_path / "rec" / "recovery_report.json").read_text())["method"] == "gptq"  # the default
    bad = subprocess.run(exe + ["recover", str(tiny_model), "-o", str(tmp_path / "z"), "--train-head", "--samples", "48",
                                "--seq-len", "32", "--gen-batch-size", "16", "--device", "cpu", "--method", "rtn",
                                "--block-size", "4:32,2:32,8:32"], capture_output=True, text=True)
    assert bad.returncode == 2 and "--rule lm_head=keep" in bad.stderr and "Traceback" not in bad.stderr  # 8-bit head
    bad = subprocess.run(exe + ["recover", str(tiny_model), "-o", str(tmp_path / "z"), "--train-zero-points",
                                "--lr-zero", "0"], capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.strip() == "error: `--lr-zero` must be positive, got 0.0; try 1e-2"
    bad = subprocess.run(exe + ["recover", str(tiny_model), "-o", str(tmp_path / "z"), "--mode", "qlora"],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "`--mode`" in bad.stderr and "Traceback" not in bad.stderr
    bad = subprocess.run(exe + ["recover", str(tiny_model), "-o", str(tmp_path / "z"), "--beta2", "1.5"],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "`--beta2`" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "z").exists()
    # a second run into the same folders: --save-quantized's folder is refused at once without --overwrite
    again = subprocess.run(exe + ["recover", str(tiny_model), "-o", str(tmp_path / "z"), "--save-quantized",
                                  str(tmp_path / "start")], capture_output=True, text=True)
    assert again.returncode == 2 and "start" in again.stderr and "--overwrite" in again.stderr
    assert not (tmp_path / "z").exists()


def test_cli_recover_rule_quantizes_and_trains_the_head(tiny_model, tmp_path):
    exe = [sys.executable, "-c", "from edge_recover.cli import main; main()"]
    out = subprocess.run(exe + ["recover", str(tiny_model), "-o", str(tmp_path / "rec"), "--samples", "48", "--seq-len",
                                "32", "--epochs", "1", "--batch-size", "8", "--block-size", "4:32,2:32", "--rule",
                                "lm_head=4", "--gen-batch-size", "16", "--device", "cpu", "--method", "rtn",
                                "--save-quantized", str(tmp_path / "start")], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    layers = json.loads((tmp_path / "rec" / "edge_recover_quantized.json").read_text())["layers"]
    assert layers["lm_head"]["bits"] == 4 and layers["lm_head"]["block_size"] == 32
    rec, start = quantized_layers(load_model(tmp_path / "rec").model), quantized_layers(load_model(tmp_path / "start").model)
    assert not torch.equal(rec["lm_head"].scales, start["lm_head"].scales)  # the 4-bit head trained with the rest
    bad = subprocess.run(exe + ["recover", str(tiny_model), "-o", str(tmp_path / "z"), "--quantized",
                                str(tmp_path / "start"), "--rule", "lm_head=4"], capture_output=True, text=True)
    assert bad.returncode == 2 and "`--rule`" in bad.stderr and not (tmp_path / "z").exists()

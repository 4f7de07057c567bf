"""The family matrix: every registered family (sdk/layouts.py's `supported()`) through every stage, by the CLI as a
user types it, on a tiny random model of that family (tests/fixtures/tiny_models.py). A family registered
tomorrow joins the matrix by itself, and fails it until it has a tiny-model fixture:

    tiny FAMILY ─► quantize --method rtn --calibration 0 --rule lm_head=keep   (float head: the HTP runs no 8-bit one)
               ─► recover --mode qat                                        (one CPU step: does the stage take it)
               ─► export --target cpu            exact graph vs torch (manifest parity), printed
               ─► run                            on the CPU EP
               ─► export --target npu --vendor qualcomm --soc SM8650       static graphs verified on the QNN HTP
                                                 emulator: 100 % of nodes on the HTP, HTP vs CPU EP gate, printed
               ─► run --provider qnn             on the HTP emulator

Every registered family runs on the HTP (Phi-3 since the static graphs drop its empty partial-rotary
pass-through). Gemma, which the layout table refuses for its 1 + weight RMSNorm, is refused by `quantize` in one
line naming the supported families, and that line is printed.

One checkpoint per family serves both targets, so the matrix costs one quantize and one recover per family. The
figures are smoke sizes (40-slot context, 16-token window, 8 / 4 new tokens): what is checked is that each
stage takes each architecture and that each package computes what torch does, not what recovery recovers. The
per-family chains with their own checks (biases, fused projections, decode steps) are test_qwen2.py and
test_phi3.py. Run with `pytest -s` to see the figures.
"""

from __future__ import annotations

import json
import re

import pytest

from edge_recover.layouts import supported
from tests.fixtures import tiny_models
from tests.fixtures.cli import Result, run_cli

import onnxruntime_qnn  # noqa: E402,F401  (a test dependency: CI must fail, not skip, without it)

FAMILIES = supported()
UNTIED = {"qwen2", "phi3"}  # as the real Qwen2.5-Coder GGUFs and Phi-3-mini load; the others tie
C, W = 40, 16  # the qnn packages' context slots and prefill window (small: the emulator is slow)
PROMPT = "the quick brown fox"


def ok(*args) -> Result:
    r = run_cli(*args)
    assert r.code == 0, f"edge-recover {' '.join(map(str, args))} -> {r.code}\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}"
    return r


def _one_error_line(r: Result) -> str:
    """The single `error:` line of a refused command (exit 2, nothing else said)."""
    lines = [ln for ln in (r.stdout + r.stderr).strip().splitlines() if ln.strip()]
    assert r.code == 2 and len(lines) == 1 and lines[0].startswith("error:"), (r.code, r.stdout, r.stderr)
    return lines[0]


def _new_tokens(r: Result) -> int:
    """The new-token count of `run`'s closing line (on stderr; the answer alone is on stdout)."""
    found = re.search(r"(\d+) new", r.stderr)
    assert found and r.stdout.strip(), (r.stdout, r.stderr)
    return int(found.group(1))


def test_every_registered_family_has_a_tiny_model():
    assert FAMILIES, "no family registered"
    missing = sorted(set(FAMILIES) - set(tiny_models.ARCHS))
    assert not missing, f"registered without a tiny-model fixture (tests/fixtures/tiny_models.py): {missing}"


@pytest.fixture(scope="module", params=FAMILIES)
def family(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def work(family, tmp_path_factory):
    return tmp_path_factory.mktemp(f"matrix-{family}")


@pytest.fixture(scope="module")
def quantized(family, work):
    """`quantize --method rtn --calibration 0 --rule lm_head=keep` of the tiny model (intermediate 128: every
    block of 64, the cpu and qnn targets', divides each K)."""
    hf = tiny_models.save_tiny_model(work / "hf", family, intermediate=128, tie=family not in UNTIED)
    out = work / "q"
    ok("quantize", hf, "--scheme", "w4w2gateup", "--method", "rtn", "--calibration", "0", "--rule", "lm_head=keep",
       "-o", out)
    return hf, out


@pytest.fixture(scope="module")
def recovered(work, quantized):
    """`recover --mode qat --quantized Q`: one optimizer step on the CPU (16 teacher samples of 16 tokens, half held out)."""
    hf, q = quantized
    out = work / "rec"
    ok("recover", hf, "--mode", "qat", "--quantized", q, "-o", out, "--samples", "16", "--gen-batch-size", "16",
       "--seq-len", "16", "--epochs", "1", "--batch-size", "8", "--device", "cpu")
    return out


@pytest.fixture(scope="module")
def cpu_pkg(work, recovered):
    out = work / "pkg-cpu"
    ok("export", recovered, "--target", "cpu", "-o", out)
    return out


@pytest.fixture(scope="module")
def npu_export(work, recovered) -> tuple:
    out = work / "pkg-npu"
    r = run_cli("export", recovered, "--target", "npu", "--vendor", "qualcomm", "--soc", "SM8650",
                "--context-length", C, "--prefill-window", W, "-o", out)
    return out, r


def test_quantize(family, quantized):
    """w4w2gateup by role, whatever the family names them: gate and up (or a fused gate_up) 2-bit, the rest of
    each layer 4-bit at block 64, the head kept float."""
    from edge_recover.layouts import LAYOUTS, role_names

    _, q = quantized
    meta = json.loads((q / "edge_recover_quantized.json").read_text())
    got = {r["name"]: r["config"] for r in meta["report"]["layers"]}
    layout = LAYOUTS[family]
    low = {f"{layout.layer(i)}.{layout.mlp.module}.{n}" for i in range(2) for n in role_names(layout, ("gate", "up"))}
    want = {n: "2-bit b64" if n in low else "4-bit b64" for i in range(2) for n in layout.linear_names(i)}
    assert meta["method"] == "rtn" and got == {**want, "lm_head": "keep"}, got


def test_recover_qat(family, recovered):
    report = json.loads((recovered / "recovery_report.json").read_text())
    assert (recovered / "edge_recover_quantized.json").is_file() and report["step"] >= 1, report


def test_export_cpu_equals_torch(family, cpu_pkg):
    m = json.loads((cpu_pkg / "manifest.json").read_text())
    parity, exact = m["parity"], m["parity"]["exact"]
    print(f"\n{family}: cpu parity max abs diff {exact['max_abs_diff']:.3g} (exact graph vs torch; logit scale "
          f"{exact['logit_scale']:.3g}, top-1 {exact['top1_agreement']:.0%}); shipped graph (accuracy_level "
          f"{parity['accuracy_level']}) {parity['max_abs_diff']:.3g}, top-1 {parity['top1_agreement']:.1%}")
    assert m["architecture"] == family and parity["ok"] and exact["top1_agreement"] == 1.0
    assert exact["max_abs_diff"] < 1e-4 * max(1.0, exact["logit_scale"]), exact
    assert parity["max_abs_diff"] < 0.05 * max(1.0, parity["logit_scale"]), parity  # int8 activations
    assert json.loads((cpu_pkg / "genai_config.json").read_text())["model"]["type"] == family


def test_run_cpu(family, cpu_pkg):
    r = ok("run", cpu_pkg, "--prompt", PROMPT, "--max-new-tokens", "8")
    print(f"\n{family}: cpu run {r.stdout.strip()!r} {r.stderr.strip()}")
    assert 1 <= _new_tokens(r) <= 8 and "on cpu (CPUExecutionProvider)" in r.stderr


def test_export_qnn(family, npu_export):
    pkg, r = npu_export
    assert r.code == 0, f"{family} qnn export -> {r.code}\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}"
    m = json.loads((pkg / "manifest.json").read_text())
    exact, v = m["parity"]["exact"], m["static"]["verified"]
    assert m["target"]["name"] == "qnn" and m["architecture"] == family and exact["top1_agreement"] == 1.0
    assert exact["max_abs_diff"] < 1e-4 * max(1.0, exact["logit_scale"]), exact  # the dynamic graph vs torch
    assert v["provider"] == "QNNExecutionProvider" and v["nodes_on_npu_pct"] == 100.0
    assert "disabled" in v["cpu_fallback"] and "100 % of nodes on the NPU" in r.stdout
    gate = v["parity_gate"]
    assert gate["passed"] is True, gate
    figures = []
    for role in ("prefill", "decode"):
        g = v["graphs"][role]
        assert g["kernels"] == {"QNNExecutionProvider": 1} and g["npu_share"] == 1.0, (role, g)
        p = g["parity_vs_cpu"]  # the HTP (fp16) against the CPU EP on the same static graph
        # the export's own gate: a flip between tokens within one fp16 step is a tie, not a disagreement (a random
        # tiny model's flat logits, scale ~2, have near ties; exporters/qnn.py's `_compare`)
        assert p["top1_or_fp16_tie"] >= gate["min_top1"] and p["rel_max_abs_diff"] <= gate["max_rel_diff"], (role, p)
        assert p["max_abs_diff"] < 2e-2 * max(1.0, p["logit_scale"]), (role, p)
        figures.append(f"{role} HTP vs CPU EP max abs diff {p['max_abs_diff']:.3g} (logit scale "
                       f"{p['logit_scale']:.3g}, top-1 {p['top1_agreement']:.0%}, with fp16 ties "
                       f"{p['top1_or_fp16_tie']:.0%})")
    print(f"\n{family}: qnn {v['nodes_on_npu_pct']:.0f} % of nodes on the HTP, gate passed (top-1 >= "
          f"{gate['min_top1']:.0%}, rel diff <= {gate['max_rel_diff']:.3g}); dynamic graph vs torch "
          f"max abs diff {exact['max_abs_diff']:.3g}; " + "; ".join(figures))


def test_run_qnn(family, npu_export):
    pkg, r = npu_export
    assert r.code == 0, "no qnn package (test_export_qnn says why)"
    r = ok("run", pkg, "--provider", "qnn", "--prompt", PROMPT, "--max-new-tokens", "4")
    print(f"\n{family}: qnn run {r.stdout.strip()!r} {r.stderr.strip()}")
    assert 1 <= _new_tokens(r) <= 4 and "on qnn (prefill_ctx.onnx, decode_ctx.onnx on the HTP for SM8650" in r.stderr


def test_gemma_refused_by_quantize(tmp_path):
    """Gemma's RMSNorm scales by 1 + weight, which the exporters do not map: `quantize` refuses it in one line
    that names the supported families, and writes nothing."""
    from transformers import AutoModelForCausalLM, GemmaConfig

    tok = tiny_models.make_tokenizer()
    cfg = GemmaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, head_dim=8, max_position_embeddings=32)
    hf = tmp_path / "gemma"
    AutoModelForCausalLM.from_config(cfg).save_pretrained(hf)
    tok.save_pretrained(hf)
    r = run_cli("quantize", hf, "--method", "rtn", "--calibration", "0", "-o", tmp_path / "q", cwd=tmp_path)
    line = _one_error_line(r)
    print(f"\ngemma: quantize refused: {line}")
    assert "unsupported architecture 'gemma' (GemmaForCausalLM)" in line and "1 + weight" in line
    assert f"edge-recover supports {', '.join(FAMILIES)}" in line and "Traceback" not in r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gemma"]

"""The qnn target's parity gate: HTP vs CPU EP logits on real text, per graph, through the CLI.

    export --target npu --vendor qualcomm [--htp-tolerance TOP1[,REL]]
      prefill window + one decode step of `PARITY_TEXT` on the HTP emulator and on the CPU EP
      -> passes: the manifest records the figures and the gate
      -> fails:  exit 2, one `error:` line naming the graph, its figures and the tolerance; no package folder

One tiny Llama export that passes (about 4 s with the emulator), one forced to fail (REL = 0: the HTP's fp16
logits are never bit-equal to the CPU EP's), one with the gate off (--no-verify); bad tolerances are refused
before the model loads.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from tests.fixtures.cli import run_cli
from tests.fixtures.tiny_models import save_tiny_model

import onnxruntime_qnn  # noqa: F401  (a test dependency: CI must fail, not skip, without it)

C, W = 40, 16


@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("qnn-gate") / "hf", "llama", intermediate=128)


def _export(src, out, *extra):
    return run_cli("export", src, "-o", out, "--target", "npu", "--vendor", "qualcomm", "--method", "rtn",
                   "--calibration", "0", "--context-length", C, "--prefill-window", W, *extra)


@pytest.fixture(scope="module")
def gated_pkg(tiny_hf, tmp_path_factory):
    out = tmp_path_factory.mktemp("qnn-gate-pkg") / "pkg"
    r = _export(tiny_hf, out)
    assert r.code == 0, r.stderr[-2000:]
    return out, r


def _one_error_line(r, out) -> str:
    lines = [ln for ln in r.stderr.replace("\r", "\n").splitlines() if ln.strip()]
    assert r.code == 2 and len(lines) == 1 and lines[0].startswith("error:"), (r.code, r.stderr[-2000:])
    assert not out.exists() and not list(out.parent.glob(f".{out.name}.partial-*"))  # nothing left behind
    return lines[0]


def test_the_gate_passes_on_the_tiny_llama(gated_pkg):
    pkg, r = gated_pkg
    v = json.loads((pkg / "manifest.json").read_text())["static"]["verified"]
    gate = v["parity_gate"]
    assert gate["passed"] is True and (gate["min_top1"], gate["max_rel_diff"]) == (0.9, 0.15)
    assert gate["real_positions"] == {"prefill": W, "decode": 1} and gate["tokens"] == W + 1
    for role, positions in (("prefill", W), ("decode", 1)):
        p = v["graphs"][role]["parity_vs_cpu"]
        print(f"\n{role}: top-1 {p['top1_agreement']:.0%} over {p['positions']}, max abs diff {p['max_abs_diff']:.3g}"
              f" = {p['rel_max_abs_diff']:.3g} x scale {p['logit_scale']:.3g}")
        assert p["positions"] == positions and p["top1_agreement"] == 1.0
        assert 0 < p["rel_max_abs_diff"] < 0.02  # fp16 on the HTP: close, not bit-equal
        assert p["rel_max_abs_diff"] == pytest.approx(p["max_abs_diff"] / p["logit_scale"])
    assert "parity gate on real text (17 tokens): passed (top-1 >= 90%, max abs diff <= 0.15 x" in r.stdout


def test_only_the_real_positions_of_a_padded_window_are_compared(gated_pkg, tmp_path):
    """A text shorter than the window: the prefill window is padded after its 5 real tokens, and only those
    5 positions (and the decode step on the 6th token) are compared and gated."""
    from transformers import AutoTokenizer

    from edge_recover.exporters.qnn import export_static, parity_tokens
    from edge_recover.exporters.static_options import StaticOptions

    pkg, _ = gated_pkg
    folder = tmp_path / "pkg"
    folder.mkdir()
    for name in ("model.onnx", "model.onnx.data"):  # the dynamic graph only: the static ones are remade
        shutil.copy(pkg / name, folder / name)
    tokens = parity_tokens(AutoTokenizer.from_pretrained(pkg), W)[:6]
    section = export_static(folder, StaticOptions(C, W, compile_contexts=False), tokens)
    v = section["verified"]
    assert v["parity_gate"]["real_positions"] == {"prefill": 5, "decode": 1} and v["parity_gate"]["passed"]
    assert v["graphs"]["prefill"]["parity_vs_cpu"]["positions"] == 5


def test_a_failing_gate_exits_2_in_one_line_and_writes_nothing(tiny_hf, tmp_path):
    out = tmp_path / "pkg"
    line = _one_error_line(_export(tiny_hf, out, "--htp-tolerance", "0.9,0"), out)
    print("\n" + line)
    assert "prefill graph: top-1 agreement 100.0 % over 16 real position(s), max abs diff" in line
    assert "decode graph: top-1 agreement 100.0 % over 1 real position(s)" in line
    assert "x the logit scale" in line and "tolerance: top-1 >= 90 %, max abs diff <= 0 x" in line
    assert "`--htp-tolerance 0.9,0`" in line and "--no-verify" in line and "nothing was written" in line


def test_no_verify_records_the_figures_without_the_gate(tiny_hf, tmp_path):
    out = tmp_path / "pkg"
    r = _export(tiny_hf, out, "--htp-tolerance", "0.9,0", "--no-verify")
    assert r.code == 0, r.stderr[-2000:]
    v = json.loads((out / "manifest.json").read_text())["static"]["verified"]
    assert v["parity_gate"]["passed"] is None and "not applied" in v["parity_gate"]["note"]
    assert v["graphs"]["decode"]["parity_vs_cpu"]["max_abs_diff"] > 0
    assert "parity gate on real text (17 tokens): not applied (--no-verify)" in r.stdout


@pytest.mark.parametrize("value, says", [
    ("1.5", "TOP1 must be a fraction in 0..1 (not a percentage), got 1.5"),
    ("abc", "holds a value that is not a number"),
    ("0.9,-0.1", "REL must be >= 0"),
    ("0.9,0.1,2", "is not TOP1[,REL]"),
])
def test_bad_tolerance_is_one_line(tiny_hf, tmp_path, value, says):
    out = tmp_path / "pkg"
    line = _one_error_line(_export(tiny_hf, out, "--htp-tolerance", value), out)
    assert line.startswith("error: `--htp-tolerance`") and says in line and "0.9,0.15" in line


def test_the_tolerance_flag_is_refused_for_targets_without_static_graphs(tiny_hf, tmp_path):
    out = tmp_path / "pkg"
    r = run_cli("export", tiny_hf, "-o", out, "--target", "cpu", "--htp-tolerance", "0.9")
    assert "--htp-tolerance apply to static NPU graphs" in _one_error_line(r, out)


def test_parity_figures_and_the_gate_on_arrays():
    """`check_parity` reads the figures `_compare` makes: near-equal logits pass, a flipped argmax fails."""
    from edge_recover.errors import EdgeRecoverError
    from edge_recover.exporters.qnn import _compare, check_parity
    from edge_recover.exporters.static_options import HtpTolerance

    cpu = np.random.default_rng(0).normal(0, 5, size=(10, 50)).astype(np.float32)
    close = _compare(cpu, cpu + 0.01)
    assert close["positions"] == 10 and close["top1_agreement"] == 1.0 and close["rel_max_abs_diff"] < 0.01
    check_parity({"prefill": close}, HtpTolerance())
    flipped = cpu.copy()
    flipped[:2] = -flipped[:2]  # two of ten positions pick another token: 80 % < 90 %
    with pytest.raises(EdgeRecoverError, match=r"decode graph: top-1 agreement 80.0 % over 10 real"):
        check_parity({"prefill": close, "decode": _compare(cpu, flipped)}, HtpTolerance(0.9, 10.0))


def test_a_tie_within_one_fp16_step_is_not_a_disagreement():
    """The HTP's fp16 logits cannot order two tokens closer than one fp16 step at the logit scale: a flip
    between them is counted as agreement by the gate (`top1_or_fp16_tie`), a flip past that step is not (a
    random tiny Qwen3's decode step had its top two 3.9e-5 apart and failed the gate at top-1 0 %)."""
    from edge_recover.errors import EdgeRecoverError
    from edge_recover.exporters.qnn import _compare, check_parity
    from edge_recover.exporters.static_options import HtpTolerance

    cpu = np.array([[2.0187774, 2.0187385, 1.8411543]], np.float32)  # fp16 step at 2.02: 0.00195
    tie = _compare(cpu, np.array([[2.013672, 2.0195315, 1.8408204]], np.float32))
    assert tie["top1_agreement"] == 0.0 and tie["top1_or_fp16_tie"] == 1.0
    check_parity({"decode": tie}, HtpTolerance())
    apart = _compare(cpu - np.array([[0, 0.01, 0]], np.float32), np.array([[2.0, 2.02, 1.8]], np.float32))
    assert apart["top1_or_fp16_tie"] == 0.0
    with pytest.raises(EdgeRecoverError, match=r"decode graph: top-1 agreement 0.0 % over 1 real"):
        check_parity({"decode": apart}, HtpTolerance())

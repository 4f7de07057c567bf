"""`edge-recover quantize` as the README and docs/quantization.md show it: each method, rules, --slim."""

from __future__ import annotations

import json

import pytest

from tests.cli.conftest import cli, ok, one_line_error


def _report(folder):
    return json.loads((folder / "edge_recover_quantized.json").read_text())


def test_gptq_with_a_quantized_head(q_gptq):
    """Issue 17, case 1: `--method gptq --rule lm_head=4` failed for want of the head's Hessian."""
    m = _report(q_gptq)
    assert m["method"] == "gptq"
    assert m["layers"]["lm_head"]["bits"] == 4 and m["layers"]["lm_head"]["block_size"] == 32
    head = next(layer for layer in m["report"]["layers"] if layer["name"] == "lm_head")
    assert head["config"] == "4-bit b32" and head["sqnr_db"] > 5


@pytest.mark.parametrize("method", ["rtn", "mse"])
def test_methods_and_rules(hf, work, method):
    """`--scheme w4 --rule 'down_proj$=8' --rule 'layers\\.0\\.=keep'` (README); the report's kept layers
    print '-', not nan (issue 17, case 7); the rules take the command's --block-size."""
    out = work / f"q-{method}"
    r = ok("quantize", hf, "--scheme", "w4", "--method", method, "--block-size", "16", "--calibration", "2",
           "--rule", "down_proj$=8", "--rule", r"layers\.0\.=keep", "-o", out)
    assert "nan" not in r.stdout and "- (kept)" in r.stdout and f"wrote {out}" in r.stdout
    layers = _report(out)["layers"]
    # rules are tried in order, the first regex that matches wins: layer 0's down_proj is 8-bit, the rest kept
    assert [n for n in layers if n.startswith("model.layers.0.")] == ["model.layers.0.mlp.down_proj"]
    assert layers["model.layers.1.mlp.down_proj"]["bits"] == 8
    # the head is the cpu layout's 8-bit one (sdk/options.py), as recover and export quantize it
    assert layers["lm_head"]["bits"] == 8
    # a rule without its own block size takes the command's --block-size, and so does the head
    assert {v["block_size"] for v in layers.values()} == {16}
    assert layers["model.layers.1.mlp.gate_proj"]["bits"] == 4


def test_block_size_per_bit_width_and_gptq_default(hf, work):
    """`--block-size BITS:BLOCK,...` (README: 4:64,2:128; smaller here for the tiny model) with the default
    method (gptq) and scheme (w4w2gateup)."""
    out = work / "q-b128"
    ok("quantize", hf, "--block-size", "4:32,2:64", "--calibration", "2", "-o", out)
    m = _report(out)
    assert m["method"] == "gptq" and m["scheme"]["name"] == "w4w2gateup"
    gate, down = m["layers"]["model.layers.0.mlp.gate_proj"], m["layers"]["model.layers.0.mlp.down_proj"]
    assert (gate["bits"], gate["block_size"]) == (2, 64) and (down["bits"], down["block_size"]) == (4, 32)


def test_slim_checkpoint_is_small(hf, work, q_gptq):
    out = work / "q-slim"
    ok("quantize", hf, "--slim", "--method", "rtn", "--block-size", "32", "-o", out)
    assert _report(out)["kept_weights"] == "from_source"
    full = work / "q-full"
    ok("quantize", hf, "--method", "rtn", "--block-size", "32", "-o", full)
    assert (out / "model.safetensors").stat().st_size < 0.6 * (full / "model.safetensors").stat().st_size


def test_gptq_without_calibration_is_one_line(hf, work):
    one_line_error(cli("quantize", hf, "--method", "gptq", "--calibration", "0", "-o", work / "never"),
                   "--calibration")
    assert not (work / "never").exists()


def test_schemes_and_targets_commands():
    assert "w4w2gateup" in ok("schemes").stdout
    out = ok("targets").stdout
    assert all(t in out for t in ("cpu", "dml", "qnn", "openvino", "vitisai", "npu"))
    assert json.loads(ok("targets", "--json").stdout)["vitisai"]["native_bits"] == [4]
    targets = json.loads(ok("targets", "--json").stdout)  # the head a named scheme gets on each target
    assert targets["cpu"]["head"] == {"bits": 8} and targets["qnn"]["head"] == {"bits": 4}
    assert "cpu 8-bit" in ok("schemes").stdout

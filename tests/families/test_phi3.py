"""Phi-3 through every cpu stage, by the CLI as a user types it: the family added as one layout entry
(sdk/layouts.py) plus a tiny-model fixture (tests/fixtures/tiny_models.py).

Phi-3 fuses what Llama keeps apart: q | k | v rows in one `qkv_proj`, gate | up rows in one `gate_up_proj`. So
w4w2gateup's "gate and up at 2 bits" is one 2-bit layer per decoder layer (one MatMulNBits, bits=2), qkv_proj
stays 4-bit, and GroupQueryAttention reads qkv_proj's output packed (key and value inputs empty), as it reads
the packed q/k/v node of the other families:

    tiny Phi-3 ─► quantize --method gptq (8-bit head) ─► recover --mode qat ─► export --target cpu ─► run
               └► quantize --method rtn --rule lm_head=keep ─────────────────► export --target cpu ─► run

CPU smoke sizes (a few recovery steps): what is checked is that each stage takes the architecture and that the
package computes what torch does. Run with `pytest -s` to see the parity figures.
"""

from __future__ import annotations

import json
import re
from types import SimpleNamespace

import numpy as np
import onnx
import pytest

from tests.fixtures.cli import Result, run_cli

PROMPT = "the quick brown fox"
LAYERS = 2


def ok(*args) -> Result:
    r = run_cli(*args)
    assert r.code == 0, f"edge-recover {' '.join(map(str, args))} -> {r.code}\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}"
    return r


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("phi3")


@pytest.fixture(scope="module")
def quantized(tiny_phi3_dir, work) -> dict:
    """`quantize --method gptq --rule lm_head=8` and `--method rtn --rule lm_head=keep` (a float head; the default
    is the cpu layout's 8-bit one): {method: checkpoint}."""
    out = {}
    for method, extra in (("gptq", ["--rule", "lm_head=8"]), ("rtn", ["--rule", "lm_head=keep"])):
        out[method] = work / f"q-{method}"
        ok("quantize", tiny_phi3_dir, "--scheme", "w4w2gateup", "--method", method, "--calibration", "4", *extra,
           "-o", out[method])
    return out


@pytest.fixture(scope="module")
def recovered(tiny_phi3_dir, work, quantized):
    """`recover --mode qat --quantized Q` on the gptq checkpoint (a few CPU steps)."""
    out = work / "rec-gptq"
    ok("recover", tiny_phi3_dir, "--mode", "qat", "--quantized", quantized["gptq"], "-o", out, "--samples", "16",
       "--seq-len", "16", "--epochs", "1", "--batch-size", "8", "--device", "cpu")
    return out


@pytest.fixture(scope="module")
def packages(work, quantized, recovered) -> dict:
    """`export --target cpu` of the recovered gptq checkpoint and of the rtn one: {name: package}."""
    out = {}
    for name, source in (("gptq-qat", recovered), ("rtn", quantized["rtn"])):
        out[name] = work / f"pkg-{name}"
        ok("export", source, "--target", "cpu", "-o", out[name])
    return out


def test_quantize_one_2bit_gate_up_per_layer(quantized):
    for method, q in quantized.items():
        meta = json.loads((q / "edge_recover_quantized.json").read_text())
        assert meta["method"] == method and meta["scheme"]["name"].startswith("w4w2gateup")  # +custom: the head rule
        patterns = [r["pattern"] for r in meta["scheme"]["rules"] if r["config"] != "keep"]
        assert r"mlp\.(gate_up_proj)$" in patterns and not any("gate_proj" in p for p in patterns), patterns
        bits = {r["name"]: r["config"] for r in meta["report"]["layers"]}
        for i in range(LAYERS):
            assert bits[f"model.layers.{i}.mlp.gate_up_proj"].startswith("2-bit"), bits
            for proj in ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.down_proj"):
                assert bits[f"model.layers.{i}.{proj}"].startswith("4-bit"), bits


def test_recover_qat_writes_a_checkpoint_export_packs(recovered):
    report = json.loads((recovered / "recovery_report.json").read_text())
    assert (recovered / "edge_recover_quantized.json").is_file() and report["step"] >= 1, report


def _matmulnbits(pkg) -> dict[str, int]:
    """{MatMulNBits node name: bits} of a package's graph."""
    graph = onnx.load(str(pkg / "model.onnx"), load_external_data=False)
    return {n.name: next(a.i for a in n.attribute if a.name == "bits")
            for n in graph.graph.node if n.op_type == "MatMulNBits"}


@pytest.mark.parametrize("name", ["gptq-qat", "rtn"])
def test_cpu_package_equals_torch(packages, name):
    pkg = packages[name]
    m = json.loads((pkg / "manifest.json").read_text())
    parity, exact = m["parity"], m["parity"]["exact"]
    print(f"\nphi3 {name} cpu package vs torch: exact graph max abs diff {exact['max_abs_diff']:.3g}, shipped graph "
          f"(accuracy_level {parity['accuracy_level']}) {parity['max_abs_diff']:.3g}, logit scale "
          f"{exact['logit_scale']:.3g}, top-1 {exact['top1_agreement']:.0%} / {parity['top1_agreement']:.1%}")
    assert m["architecture"] == "phi3" and parity["ok"] and exact["top1_agreement"] == 1.0
    assert exact["max_abs_diff"] < 1e-4 * max(1.0, exact["logit_scale"]), exact
    assert parity["max_abs_diff"] < 0.05 * max(1.0, parity["logit_scale"]), parity  # int8 activations
    fusions = " ".join(m["fusions"])
    assert "GroupQueryAttention x2" in fusions and "packed QKV" not in fusions, fusions  # packed by Phi-3 itself
    nodes = _matmulnbits(pkg)
    two_bit = sorted(n for n, b in nodes.items() if b == 2)
    assert two_bit == [f"/model/layers.{i}/mlp/gate_up_proj/MatMulNBits" for i in range(LAYERS)], nodes
    assert all(nodes[f"/model/layers.{i}/self_attn/qkv_proj/MatMulNBits"] == 4 for i in range(LAYERS))
    assert not any(re.search(r"/(gate|up|q|k|v)_proj/", n) for n in nodes), nodes
    head = name == "gptq-qat"  # quantized with `--rule lm_head=8`; the rtn checkpoint keeps its head float
    assert len(nodes) == 4 * LAYERS + head  # qkv, o, gate_up, down per layer (and the 8-bit head)
    assert m["layers"]["model.layers.0.mlp.gate_up_proj"]["bits"] == 2 and ("lm_head" in m["layers"]) == head
    graph = onnx.load(str(pkg / "model.onnx"), load_external_data=False)
    for gqa in (n for n in graph.graph.node if n.op_type == "GroupQueryAttention"):
        assert gqa.input[0].startswith(gqa.name.rsplit("/", 1)[0] + "/qkv_proj/") and gqa.input[1:3] == ["", ""]
    genai = json.loads((pkg / "genai_config.json").read_text())
    assert genai["model"]["type"] == "phi3"
    ok("verify", pkg)


def test_decode_steps_equal_the_full_graph(packages):
    """Token by token through the KV cache (GroupQueryAttention with its rotary at each position) against one
    pass of the whole sequence, which the export checked against torch."""
    import onnxruntime as ort

    from edge_recover.runtimes.session import OrtCausalLM

    pkg = packages["gptq-qat"]
    ids = np.random.default_rng(7).integers(3, 290, size=(1, 12))
    full = ort.InferenceSession(str(pkg / "model.onnx"), providers=["CPUExecutionProvider"])
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids), "position_ids": np.arange(ids.shape[1])[None]}
    for i in full.get_inputs():
        if i.name.startswith("past_key_values."):
            feeds[i.name] = np.zeros((1, i.shape[1], 0, i.shape[3]), np.float32)
    ref = full.run(["logits"], feeds)[0][0]
    lm = OrtCausalLM(pkg, "cpu")
    cache, steps = lm.empty_cache(capacity=ids.shape[1]), []
    for t in range(ids.shape[1]):
        logits, cache = lm.step(ids[:, t:t + 1], cache)
        steps.append(np.asarray(logits).reshape(-1))
    diff, scale = float(np.abs(np.stack(steps) - ref).max()), float(np.abs(ref).max())
    print(f"\nphi3 decode steps (shared-buffer KV) vs one full pass: max abs diff {diff:.3g} (logit scale {scale:.3g})")
    assert diff < 1e-3 * max(1.0, scale) and (np.stack(steps).argmax(-1) == ref.argmax(-1)).all()


def test_float16_kv_cache(work, quantized):
    """`--kv-dtype float16`: the packed query is cast once before GroupQueryAttention (no key / value Casts)."""
    pkg = work / "pkg-rtn-f16"
    ok("export", quantized["rtn"], "--target", "cpu", "--kv-dtype", "float16", "-o", pkg)
    m = json.loads((pkg / "manifest.json").read_text())
    exact = m["parity"]["exact"]
    print(f"\nphi3 rtn cpu package, float16 KV, vs torch: exact graph max abs diff {exact['max_abs_diff']:.3g} "
          f"(logit scale {exact['logit_scale']:.3g}), top-1 {exact['top1_agreement']:.0%}")
    assert m["kv_dtype"] == "float16" and exact["top1_agreement"] == 1.0
    assert exact["max_abs_diff"] < 1e-2 * max(1.0, exact["logit_scale"]), exact
    graph = onnx.load(str(pkg / "model.onnx"), load_external_data=False)
    casts = [n.name for n in graph.graph.node if n.op_type == "Cast" and "_f16/" in n.name]
    assert sorted(casts) == [f"/model/layers.{i}/self_attn/q_f16/Cast" for i in range(LAYERS)], casts


def _new_tokens(r: Result) -> int:
    """The new-token count of `run`'s closing line (on stderr; the answer alone is on stdout)."""
    found = re.search(r"(\d+) new", r.stderr)
    assert found and r.stdout.strip(), (r.stdout, r.stderr)
    return int(found.group(1))


@pytest.mark.parametrize("name", ["gptq-qat", "rtn"])
def test_run_the_cpu_package(packages, name):
    r = ok("run", packages[name], "--prompt", PROMPT, "--max-new-tokens", "8")
    print(f"\nphi3 {name} cpu package: {r.stdout.strip()!r} {r.stderr.strip()}")
    assert 1 <= _new_tokens(r) <= 8 and "on cpu (CPUExecutionProvider)" in r.stderr


def test_longrope_keeps_optimums_attention():
    """Phi-3's 128k variants (LongRoPE) switch rotary tables with the sequence length, which one cos/sin cache in
    GroupQueryAttention cannot: their attention stays unfused, with the reason in the manifest's fusions."""
    from edge_recover.exporters.fusions import fusion_plan

    def plan(rope_scaling):
        cfg = SimpleNamespace(model_type="phi3", rope_scaling=rope_scaling, partial_rotary_factor=1.0)
        return fusion_plan(SimpleNamespace(config=cfg))

    assert plan(None) == (True, "")
    fused, why = plan({"type": "longrope", "short_factor": [1.0], "long_factor": [1.0]})
    assert not fused and "LongRoPE" in why


def test_recover_without_quantized_records_the_fused_rule(tiny_phi3_dir, work):
    """`recover MODEL` quantizes as `quantize` does: the checkpoint's scheme names the fused gate_up_proj."""
    out = work / "rec-own"
    ok("recover", tiny_phi3_dir, "--mode", "qat", "--method", "rtn", "-o", out, "--samples", "16", "--seq-len", "16",
       "--epochs", "1", "--batch-size", "8", "--device", "cpu")
    manifest = json.loads((out / "edge_recover_quantized.json").read_text())
    rules = json.dumps(manifest["scheme"])
    assert "gate_up_proj" in rules and "gate_proj|up_proj" not in rules, rules

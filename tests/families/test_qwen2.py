"""Qwen2 (the Qwen2.5 family) through every stage, by the CLI as a user types it.

The tiny model has what sets Qwen2.5 apart from Llama: q/k/v projections with biases (o_proj without), GQA,
RoPE theta 1e6, and an untied head (as Qwen2.5-Coder's GGUFs load). Its biases are random, so a package that
dropped one would miss torch by far more than the parity tolerance (checked below):

    tiny Qwen2 ─► quantize --method gptq (8-bit head) ───────────► recover --mode qat ─► export --target cpu ─► run
               └► quantize --method rtn --rule lm_head=keep ─► recover --mode qat ─► export --target npu --vendor qualcomm
                                                                                        (static graphs, QNN HTP emulator)
                                                                                     ─► run --provider cpu

The cpu chain quantizes the head to 8 bits as the cpu target does, so the untied embedding becomes a table of
its own (GatherBlockQuantized); the NPU chain's checkpoint keeps a float head (`--rule lm_head=keep`), which the qnn export
keeps as it is (a named scheme's export for qnn gets a 4-bit head: tests/exporters/test_qnn_npu.py).

CPU smoke sizes (a few recovery steps, a 40-slot context): what is checked is that each stage takes the
architecture, not how much recovery recovers. Run with `pytest -s` to see the parity figures.
"""

from __future__ import annotations

import json
import re

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from tests.fixtures.cli import Result, run_cli

import onnxruntime_qnn  # noqa: E402,F401  (a test dependency: CI must fail, not skip, without it)

C, W = 40, 16  # the NPU package's context slots and prefill window (small: the emulator is slow)
PROMPT = "the quick brown fox"
QKV = ("q_proj", "k_proj", "v_proj")


def ok(*args) -> Result:
    r = run_cli(*args)
    assert r.code == 0, f"edge-recover {' '.join(map(str, args))} -> {r.code}\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}"
    return r


def _biases(checkpoint) -> dict[str, np.ndarray]:
    """The q/k/v biases a checkpoint holds: {'model.layers.0.self_attn.q_proj.bias': array, ...}."""
    from safetensors.numpy import load_file

    return {k: v for k, v in load_file(str(checkpoint / "model.safetensors")).items() if k.endswith(".bias")}


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("qwen2")


@pytest.fixture(scope="module")
def quantized(tiny_qwen2_dir, work) -> dict:
    """`quantize --method gptq --rule lm_head=8` and `--method rtn --block-size 32 --rule lm_head=keep` (a float
    head, which the qnn target keeps; the default is the cpu layout's 8-bit one at block 64): {method: checkpoint}."""
    out = {}
    for method, extra in (("gptq", ["--rule", "lm_head=8"]), ("rtn", ["--block-size", "32", "--rule", "lm_head=keep"])):
        out[method] = work / f"q-{method}"
        ok("quantize", tiny_qwen2_dir, "--scheme", "w4w2gateup", "--method", method, "--calibration", "4", *extra,
           "-o", out[method])
    return out


@pytest.fixture(scope="module")
def recovered(tiny_qwen2_dir, work, quantized) -> dict:
    """`recover --mode qat --quantized Q` on each checkpoint (a few CPU steps): {method: checkpoint}."""
    out = {}
    for method, q in quantized.items():
        out[method] = work / f"rec-{method}"
        ok("recover", tiny_qwen2_dir, "--mode", "qat", "--quantized", q, "-o", out[method], "--samples", "16",
           "--seq-len", "16", "--epochs", "1", "--batch-size", "8", "--device", "cpu")
    return out


@pytest.fixture(scope="module")
def cpu_pkg(work, recovered):
    out = work / "pkg-cpu"
    return out, ok("export", recovered["gptq"], "--target", "cpu", "-o", out)


@pytest.fixture(scope="module")
def npu_pkg(work, recovered):
    out = work / "pkg-npu"
    return out, ok("export", recovered["rtn"], "--target", "npu", "--vendor", "qualcomm", "--context-length", C,
                   "--prefill-window", W, "--soc", "SM8650", "-o", out)


def test_quantize_keeps_the_biases_and_the_untied_head(tiny_qwen2_dir, quantized):
    from safetensors.numpy import load_file

    source = {k: v for k, v in load_file(str(tiny_qwen2_dir / "model.safetensors")).items() if k.endswith(".bias")}
    assert sorted(source) == sorted(f"model.layers.{i}.self_attn.{p}.bias" for i in range(2) for p in QKV)
    assert json.loads((tiny_qwen2_dir / "config.json").read_text())["tie_word_embeddings"] is False
    for method, q in quantized.items():
        meta = json.loads((q / "edge_recover_quantized.json").read_text())
        assert meta["method"] == method
        got = _biases(q)
        assert sorted(got) == sorted(source) and all(np.array_equal(got[k], source[k]) for k in source)


def test_recover_qat_writes_a_checkpoint_export_packs(recovered):
    for method, rec in recovered.items():
        report = json.loads((rec / "recovery_report.json").read_text())
        assert (rec / "edge_recover_quantized.json").is_file() and report["step"] >= 1, (method, report)
        assert sorted(_biases(rec)) == sorted(f"model.layers.{i}.self_attn.{p}.bias" for i in range(2) for p in QKV)


def test_cpu_package_equals_torch_and_holds_the_biases(cpu_pkg, recovered):
    pkg, r = cpu_pkg
    m = json.loads((pkg / "manifest.json").read_text())
    parity, exact = m["parity"], m["parity"]["exact"]
    print(f"\nqwen2 cpu package vs torch: exact graph max abs diff {exact['max_abs_diff']:.3g}, shipped graph "
          f"(accuracy_level {parity['accuracy_level']}) {parity['max_abs_diff']:.3g}, logit scale "
          f"{exact['logit_scale']:.3g}, top-1 {exact['top1_agreement']:.0%} / {parity['top1_agreement']:.1%}")
    assert parity["ok"] and exact["top1_agreement"] == 1.0
    assert exact["max_abs_diff"] < 1e-4 * max(1.0, exact["logit_scale"]), exact
    assert parity["max_abs_diff"] < 0.05 * max(1.0, parity["logit_scale"]), parity  # int8 activations
    fusions = " ".join(m["fusions"])
    assert "GroupQueryAttention x2" in fusions and "packed QKV MatMulNBits x2" in fusions, fusions
    assert m["embedding"] == "own 8-bit table" and m["layers"]["lm_head"]["bits"] == 8  # untied: its own table
    # the biases, stacked q | k | v in one Add after each layer's packed q/k/v node
    graph = onnx.load(str(pkg / "model.onnx"))
    inits = {t.name: numpy_helper.to_array(t, base_dir=str(pkg)) for t in graph.graph.initializer}
    adds = {n.name: n for n in graph.graph.node if n.op_type == "Add"}
    want = _biases(recovered["gptq"])
    for i in range(2):
        prefix = f"/model/layers.{i}/self_attn"
        assert f"{prefix}/qkv_proj.bias" in adds[f"{prefix}/qkv_proj/Add"].input
        stacked = np.concatenate([want[f"model.layers.{i}.self_attn.{p}.bias"] for p in QKV])
        np.testing.assert_array_equal(inits[f"{prefix}/qkv_proj.bias"], stacked)
    ok("verify", pkg)


def test_a_dropped_bias_would_fail_the_parity_check(cpu_pkg, recovered):
    """Torch without its q/k/v biases moves the logits by far more than the exact graph's tolerance (1e-4 of
    the logit scale), so the parity above does show the biases in the package."""
    import torch

    from edge_recover.models import load_model

    model = load_model(recovered["gptq"]).model
    ids = torch.tensor([[5, 17, 42, 99, 7, 3, 250, 11]])
    with torch.no_grad():
        ref = model(ids).logits
        for layer in model.model.layers:
            for p in QKV:
                getattr(layer.self_attn, p).bias.zero_()
        dropped = model(ids).logits
    diff, scale = float((ref - dropped).abs().max()), float(ref.abs().max())
    exact = json.loads((cpu_pkg[0] / "manifest.json").read_text())["parity"]["exact"]
    print(f"\nqwen2 torch without its biases: max abs diff {diff:.3g} (logit scale {scale:.3g}); "
          f"package vs torch {exact['max_abs_diff']:.3g}")
    assert diff > 100 * 1e-4 * max(1.0, scale) and diff > 1000 * exact["max_abs_diff"]


def _new_tokens(r: Result) -> int:
    """The new-token count of `run`'s closing line (on stderr; the answer alone is on stdout)."""
    found = re.search(r"(\d+) new", r.stderr)
    assert found and r.stdout.strip(), (r.stdout, r.stderr)
    return int(found.group(1))


def test_run_the_cpu_package(cpu_pkg):
    pkg, _ = cpu_pkg
    r = ok("run", pkg, "--prompt", PROMPT, "--max-new-tokens", "8")
    print(f"\nqwen2 cpu package: {r.stdout.strip()!r} {r.stderr.strip()}")
    assert 1 <= _new_tokens(r) <= 8 and "on cpu (CPUExecutionProvider)" in r.stderr


def test_npu_package_every_node_on_the_htp_and_the_biases_inside(npu_pkg, recovered):
    pkg, r = npu_pkg
    m = json.loads((pkg / "manifest.json").read_text())
    exact, v = m["parity"]["exact"], m["static"]["verified"]
    assert m["target"]["name"] == "qnn" and exact["top1_agreement"] == 1.0
    assert exact["max_abs_diff"] < 1e-4 * max(1.0, exact["logit_scale"]), exact  # the dynamic graph vs torch
    assert v["provider"] == "QNNExecutionProvider" and v["nodes_on_npu_pct"] == 100.0
    assert "disabled" in v["cpu_fallback"] and "100 % of nodes on the NPU" in r.stdout
    figures = [f"dynamic graph vs torch {exact['max_abs_diff']:.3g}"]
    want = _biases(recovered["rtn"])
    for role in ("prefill", "decode"):
        g = v["graphs"][role]
        assert g["kernels"] == {"QNNExecutionProvider": 1} and g["npu_share"] == 1.0
        p = g["parity_vs_cpu"]  # the HTP (fp16) against the CPU EP on the same static graph
        assert p["top1_agreement"] == 1.0 and p["max_abs_diff"] < 2e-2 * max(1.0, p["logit_scale"]), (role, p)
        figures.append(f"{role} HTP vs CPU EP {p['max_abs_diff']:.3g} (logit scale {p['logit_scale']:.3g})")
        graph = onnx.load(str(pkg / m["static"]["graphs"][role]["file"]))  # its weights: model.onnx.data
        inits = {t.name: numpy_helper.to_array(t) for t in graph.graph.initializer}
        adds = {n.name: n for n in graph.graph.node if n.op_type == "Add"}
        for i in range(2):  # each bias an Add after its projection, the checkpoint's values
            for proj in QKV:
                bias = next(x for x in adds[f"/model/layers.{i}/self_attn/{proj}/Add"].input if x in inits)
                np.testing.assert_array_equal(inits[bias], want[f"model.layers.{i}.self_attn.{proj}.bias"])
    print("\nqwen2 npu package: " + "; ".join(figures))


def test_static_graphs_equal_the_dynamic_graph(npu_pkg):
    """The static graphs (rotary tables for theta 1e6, fixed shapes, folded constants) on the CPU EP against the
    package's dynamic graph, which the export checked against torch: a full prefill window, then a padded one."""
    import onnxruntime as ort

    from edge_recover.runtimes.static_session import StaticCausalLM

    pkg, _ = npu_pkg
    ids = np.random.default_rng(7).integers(3, 290, size=(1, W + 9))
    dyn = ort.InferenceSession(str(pkg / "model.onnx"), providers=["CPUExecutionProvider"])
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids), "position_ids": np.arange(ids.shape[1])[None]}
    for i in dyn.get_inputs():
        if i.name.startswith("past_key_values."):
            feeds[i.name] = np.zeros((1, i.shape[1], 0, i.shape[3]), np.float32)
    ref = dyn.run(["logits"], feeds)[0][0]
    lm = StaticCausalLM(pkg, "cpu")
    static, _ = lm.prefill(ids, lm.empty_cache(), all_logits=True)
    diff, scale = float(np.abs(static - ref).max()), float(np.abs(ref).max())
    print(f"\nqwen2 static graphs (cpu EP) vs the dynamic graph: max abs diff {diff:.3g} (logit scale {scale:.3g})")
    assert diff < 1e-4 * max(1.0, scale)


def test_run_the_npu_package_on_the_cpu_provider(npu_pkg):
    pkg, _ = npu_pkg
    r = ok("run", pkg, "--provider", "cpu", "--prompt", PROMPT, "--max-new-tokens", "8")
    print(f"\nqwen2 npu package on cpu: {r.stdout.strip()!r} {r.stderr.strip()}")
    assert 1 <= _new_tokens(r) <= 8 and f"on cpu (portable static graphs; static context {C}" in r.stderr

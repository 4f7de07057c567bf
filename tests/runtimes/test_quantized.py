"""Runtime on real exported W4/W2-GateUp packages: torch parity, structure, and the same tokens on OpenVINO."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from edge_recover.runtimes.generate import generate_ids
from edge_recover.runtimes.package import open_package
from edge_recover.runtimes.profiler import PackageEntry, Worker
from edge_recover.runtimes.session import OrtCausalLM

from .test_generate import PROMPT, torch_greedy_model

REPO = Path(__file__).resolve().parents[2]
OV_PYTHON = REPO / ".venv-openvino" / "bin" / "python"


def _exact_copy(pkg: Path, dest: Path) -> Path:
    """The package with MatMulNBits accuracy_level 0 (fp32 activations: the exact kernel torch matches)."""
    shutil.copytree(pkg, dest)
    model = onnx.load(str(dest / "model.onnx"), load_external_data=False)
    for node in model.graph.node:
        for a in node.attribute:
            if node.op_type == "MatMulNBits" and a.name == "accuracy_level":
                a.i = 0
    onnx.save(model, str(dest / "model.onnx"))  # weights stay in model.onnx.data
    return dest


def test_package_structure(tiny_w4w2, tiny_package):
    pkg = open_package(tiny_w4w2[0])
    # nodes: gate/up of 2 layers 2-bit; qkv (packed), o, down 4-bit; the cpu target's 8-bit head
    assert pkg.stats.matmulnbits_bits == {2: 4, 4: 6, 8: 1}
    assert pkg.scheme_name == "w4w2gateup"
    fp32 = open_package(tiny_package).stats
    # the same graph in fp32 reads 8-16x more linear-layer bytes and 3-4x more head bytes
    linear_fp32 = 2 * 4 * (64 * 64 + 2 * 64 * 32 + 64 * 64 + 3 * 64 * 128)
    head_fp32 = 4 * 64 * json.loads((tiny_w4w2[0] / "config.json").read_text())["vocab_size"]
    saved = fp32.weight_bytes_per_token - pkg.stats.weight_bytes_per_token
    assert 0.8 * linear_fp32 + 0.65 * head_fp32 < saved < linear_fp32 + 0.75 * head_fp32


def test_greedy_equals_torch_quantized(tiny_w4w2, tmp_path):
    """With the exact kernel, the loop reproduces torch's greedy tokens on the quantized model."""
    exact = _exact_copy(tiny_w4w2[0], tmp_path / "exact")
    res = generate_ids(OrtCausalLM(exact, threads=1), PROMPT, 24, stop_token_ids=())
    assert res.tokens == torch_greedy_model(tiny_w4w2[1], PROMPT, 24)


def test_fast_kernel_close_to_exact(tiny_w4w2, tmp_path):
    """accuracy_level 4 (int8 activations, what the cpu target ships) changes logits by a little only."""
    exact = OrtCausalLM(_exact_copy(tiny_w4w2[0], tmp_path / "exact"), threads=1)
    fast = OrtCausalLM(tiny_w4w2[0], threads=1)
    le, _ = exact.step(np.array([PROMPT]), exact.empty_cache())
    lf, _ = fast.step(np.array([PROMPT]), fast.empty_cache())
    diff = np.abs(le - lf)
    print(f"acc4 vs acc0 logits: max {diff.max():.3g}, mean {diff.mean():.3g}, scale {np.abs(le).max():.3g}")
    assert diff.max() < 0.1 * np.abs(le).max()
    assert int(le.argmax()) == int(lf.argmax())


def test_lut_kernel_session_config_close_to_exact(tiny_w4w2, tmp_path):
    """`mlas.use_lut_gemm` (the table-lookup 2-bit kernel) reaches the session and keeps the logits close."""
    exact = OrtCausalLM(_exact_copy(tiny_w4w2[0], tmp_path / "exact"), threads=1)
    lut = OrtCausalLM(tiny_w4w2[0], threads=1, session_config={"mlas.use_lut_gemm": "1"})
    assert lut.session_config == {"mlas.use_lut_gemm": "1"}
    assert lut.session.get_session_options().get_session_config_entry("mlas.use_lut_gemm") == "1"
    le, _ = exact.step(np.array([PROMPT]), exact.empty_cache())
    ll, _ = lut.step(np.array([PROMPT]), lut.empty_cache())
    diff = np.abs(le - ll)
    print(f"lut vs acc0 logits: max {diff.max():.3g}, mean {diff.mean():.3g}, scale {np.abs(le).max():.3g}")
    assert diff.max() < 0.1 * np.abs(le).max()
    assert int(le.argmax()) == int(ll.argmax())


def _ensure_openvino_venv() -> Path:
    if not OV_PYTHON.exists():
        subprocess.run(["bash", str(REPO / "runtimes" / "openvino_venv.sh")], check=True, timeout=1500)
    return OV_PYTHON


@pytest.mark.slow
def test_openvino_same_greedy_tokens(tiny_w4w2_openvino):
    """The OpenVINO EP (its own venv, created here if missing) generates the CPU provider's greedy tokens."""
    python = _ensure_openvino_venv()
    pkg, torch_model = tiny_w4w2_openvino
    tokens = {}
    for provider, py in (("cpu", sys.executable), ("openvino", str(python))):
        w = Worker(PackageEntry(str(pkg), python=py))
        try:
            info = w.ask(op="load", package=str(pkg), provider=provider, threads=1)
            assert not info["fell_back"] and info["session_providers"][0] == {
                "cpu": "CPUExecutionProvider", "openvino": "OpenVINOExecutionProvider"}[provider]
            tokens[provider] = w.ask(op="run", ids=PROMPT, new_tokens=24)["ids"]
        finally:
            w.close()
    assert tokens["openvino"] == tokens["cpu"]
    assert tokens["cpu"] == torch_greedy_model(torch_model, PROMPT, 24)  # openvino target: accuracy_level 0
    # the MatMulNBits nodes (2-bit and 4-bit) really run inside OpenVINO, not on ORT's CPU fallback
    probe = ("import onnxruntime as ort, sys; so = ort.SessionOptions(); so.log_severity_level = 0; "
             "ort.InferenceSession(sys.argv[1], so, providers=[('OpenVINOExecutionProvider', "
             "{'device_type': 'CPU', 'precision': 'ACCURACY'})])")
    log = subprocess.run([str(python), "-c", probe, str(pkg / "model.onnx")], capture_output=True, text=True,
                         timeout=600, env={**os.environ, "PYTHONWARNINGS": "ignore"}).stderr
    cpu_part = log.split("Node(s) placed on [CPUExecutionProvider]")[-1] if "placed on [CPUExecutionProvider]" in log else ""
    assert "Node(s) placed on [OpenVINOExecutionProvider]" in log
    assert "MatMulNBits" not in cpu_part.split("VerifyEachNodeIsAssignedToAnEp] Some nodes")[0]

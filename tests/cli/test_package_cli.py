"""A package after export: `adapter add` / `adapter list`, `run`, `profile`, `verify`, and the integrity
checks (issue 17, case 6): a truncated or altered file is one line naming it, exit 2; `python -m`."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from tests.cli.conftest import cli, ok, one_line_error


@pytest.fixture(scope="session")
def two_adapters(work, sidecar_pkg, adapter):
    """The side-car package with a second adapter `b` added (`adapter add PKG DIR --name b`)."""
    pkg = shutil.copytree(sidecar_pkg, work / "pkg-two")
    r = ok("adapter", "add", pkg, adapter, "--name", "b")
    assert "adapter 'b' side-car" in r.stdout
    return pkg


def test_adapter_add_updates_the_file_table(two_adapters):
    m = json.loads((two_adapters / "manifest.json").read_text())
    assert [a["name"] for a in m["adapters"]] == ["recovery", "b"]
    assert m["files"]["adapters/b.onnx_adapter"]["size"] == (two_adapters / "adapters/b.onnx_adapter").stat().st_size
    assert "ok: " in ok("verify", two_adapters).stdout
    listed = ok("adapter", "list", two_adapters).stdout
    assert "'recovery'" in listed and "'b'" in listed
    one_line_error(cli("adapter", "add", two_adapters, two_adapters, "--name", "b"), "already has an adapter")


def test_run(two_adapters, plain_pkg):
    r = ok("run", two_adapters, "--prompt", "to be or", "--adapter", "b", "--max-new-tokens", "4", "--threads", "1")
    assert "4 new" in r.stderr
    r = ok("run", plain_pkg, "--prompt", "the quick", "--chat", "--temperature", "0.7", "--top-p", "0.9",
           "--max-new-tokens", "4", "--verify-hashes")
    assert "prompt tokens" in r.stderr
    r = ok("run", plain_pkg, "--prompt", "Hi", "--provider", "openvino", "--fallback-cpu", "--max-new-tokens", "2")
    assert "running on the CPU provider" in r.stderr or "openvino" in r.stderr
    r = ok("run", plain_pkg, "--prompt", "Hi", "--engine", "genai", "--max-new-tokens", "2")
    assert "onnxruntime-genai" in r.stderr


def test_profile(work, plain_pkg, sidecar_pkg):
    """`profile A B --prompt-lengths ... --new-tokens ... --threads ... --huge-pages --session-config ...`."""
    out = work / "report"
    r = ok("profile", plain_pkg, sidecar_pkg, "--prompt-lengths", "8,16", "--new-tokens", "4", "--repeats", "1",
           "--warmup", "0", "--threads", "1", "--huge-pages", "--session-config", "mlas.use_lut_gemm=1",
           "--verify-hashes", "-o", out)
    data = json.loads((out / "report.json").read_text())
    assert (out / "report.md").is_file() and len(data["packages"]) == 2 and "wrote" in r.stdout


def test_profile_ops(work, plain_pkg):
    """`profile-ops PKG --prompt-lengths ... --new-tokens ... --threads ... --session-config ...`: the decode
    step's time split by kind, the 2-bit and 4-bit kernels apart, summing to the step's wall time."""
    out = work / "ops"
    r = ok("profile-ops", plain_pkg, "--prompt-lengths", "8,24", "--new-tokens", "4", "--threads", "1",
           "--session-config", "mlas.use_lut_gemm=0", "-o", out)
    data = json.loads((out / "ops.json").read_text())
    assert [row["prompt_length"] for row in data["rows"]] == [8, 24] and "wrote" in r.stdout
    for row in data["rows"]:
        ms = row["ms_per_token"]
        assert row["decode_steps"] == 3 and ms["MatMulNBits 2-bit"] > 0 and ms["MatMulNBits 4-bit"] > 0
        assert ms["GroupQueryAttention"] > 0 and abs(sum(ms.values()) - row["ms_per_token_total"]) < 0.01
    assert (out / "ops.png").stat().st_size > 0 and "| GroupQueryAttention |" in (out / "ops.md").read_text()
    one_line_error(cli("profile-ops", plain_pkg, "-o", out), "exists")
    one_line_error(cli("profile-ops", plain_pkg, "--new-tokens", "1", "-o", work / "ops1"), "new_tokens")
    assert not (work / "ops1").exists()


def _damaged(src, dest, how):
    pkg = shutil.copytree(src, dest)
    data = pkg / "model.onnx.data"
    raw = bytearray(data.read_bytes())
    if how == "flip":
        raw[len(raw) // 2] ^= 0x01
    else:
        raw = raw[: len(raw) // 3]
    data.write_bytes(bytes(raw))
    return pkg


def test_a_flipped_byte(work, plain_pkg):
    pkg = _damaged(plain_pkg, work / "pkg-flip", "flip")
    for args in (("verify", pkg), ("run", pkg, "--prompt", "hi", "--verify-hashes"),
                 ("profile", pkg, "--verify-hashes", "-o", work / "never")):
        one_line_error(cli(*args), "model.onnx.data' does not match its sha256")
    assert not (work / "never").exists()


def test_a_truncated_data_file(work, plain_pkg):
    """Sizes are checked on every load: no ONNX Runtime traceback."""
    pkg = _damaged(plain_pkg, work / "pkg-cut", "cut")
    for args in (("verify", pkg), ("run", pkg, "--prompt", "hi")):
        one_line_error(cli(*args), "model.onnx.data' has")


def test_graph_against_manifest(work, plain_pkg):
    pkg = shutil.copytree(plain_pkg, work / "pkg-lies")
    m = json.loads((pkg / "manifest.json").read_text())
    layer = next(iter(m["layers"]))
    m["layers"][layer]["block_size"] = 16
    (pkg / "manifest.json").write_text(json.dumps(m))
    one_line_error(cli("verify", pkg), f"layer {layer!r}")


def test_an_older_package_without_file_table(work, plain_pkg):
    """Loads with one warning; a truncated data file is still caught (from the graph's tensor offsets)."""
    pkg = shutil.copytree(plain_pkg, work / "pkg-old")
    m = json.loads((pkg / "manifest.json").read_text())
    del m["files"]
    (pkg / "manifest.json").write_text(json.dumps(m))
    r = ok("run", pkg, "--prompt", "hi", "--max-new-tokens", "2")
    assert r.stderr.count("has no file table") == 1
    assert "sizes and hashes not checked" in ok("verify", pkg).stdout
    data = pkg / "model.onnx.data"
    data.write_bytes(data.read_bytes()[:1000])
    one_line_error(cli("run", pkg, "--prompt", "hi"), "is truncated")


@pytest.mark.parametrize("module", ["edge_recover", "edge_recover.cli"])
def test_python_dash_m(module):
    """Issue 17, case 5: `python -m edge_recover.cli --help` printed nothing."""
    r = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "quantize" in r.stdout and "export" in r.stdout and "verify" in r.stdout

"""Bad input gives one clear line: not a package, a newer format, unknown or missing providers."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from edge_recover.errors import EdgeRecoverError
from edge_recover.runtimes.package import open_package
from edge_recover.runtimes.providers import PROVIDERS, check_package_bits, resolve_provider
from edge_recover.runtimes.session import OrtCausalLM
from edge_recover.versions import PACKAGE_FORMAT_VERSION


def test_open_reads_structure(tiny_package):
    pkg = open_package(tiny_package)
    st = pkg.stats
    assert (st.num_layers, st.kv_heads, st.head_dim, st.kv_dtype_bytes) == (2, 2, 16, 4)
    assert pkg.context_length == 96 and pkg.vocab_size == 260
    # untied fp32: embedding 260x64 is read one row per token, everything else in full
    emb = 260 * 64 * 4
    assert st.weight_bytes - st.weight_bytes_per_token == emb - 64 * 4
    assert st.matmulnbits_bits == {}


def test_not_a_package(tmp_path):
    with pytest.raises(EdgeRecoverError, match="not an edge-recover package"):
        open_package(tmp_path)
    with pytest.raises(EdgeRecoverError, match="not a folder"):
        open_package(tmp_path / "missing")
    (tmp_path / "manifest.json").write_text(json.dumps({"kind": "something-else", "format_version": 1}))
    with pytest.raises(EdgeRecoverError, match="kind"):
        open_package(tmp_path)


def test_newer_format_is_refused(tiny_package, tmp_path):
    pkg = shutil.copytree(tiny_package, tmp_path / "newer")
    manifest = json.loads((pkg / "manifest.json").read_text())
    manifest["format_version"] = PACKAGE_FORMAT_VERSION + 1
    (pkg / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(EdgeRecoverError, match=r"newer than this runtime reads.*upgrade edge-recover"):
        open_package(pkg)


def test_missing_model_file(tiny_package, tmp_path):
    pkg = shutil.copytree(tiny_package, tmp_path / "broken")
    (pkg / "model.onnx").unlink()
    with pytest.raises(EdgeRecoverError, match="lacks model.onnx"):
        open_package(pkg)


def test_unknown_provider():
    with pytest.raises(EdgeRecoverError, match="choose one of cpu, cuda, dml, qnn, openvino, vitisai"):
        resolve_provider("tpu")


def test_qnn_is_installed_whatever_ran_before():
    """onnxruntime-qnn is a test dependency and a plugin EP: resolving `qnn` registers it (no order dependence)."""
    choice = resolve_provider("qnn")
    assert not choice.fell_back and choice.spec.ep == "QNNExecutionProvider"


@pytest.mark.parametrize("name", ["dml", "vitisai", "openvino"])
def test_missing_provider_names_installed_and_pip(name):
    spec = PROVIDERS[name]
    with pytest.raises(EdgeRecoverError) as info:
        resolve_provider(name)
    msg = str(info.value)
    assert "\n" not in msg and "CPUExecutionProvider" in msg and spec.pip.split()[0] in msg
    assert "--fallback-cpu" in msg
    choice = resolve_provider(name, fallback=True)
    assert choice.fell_back and choice.spec.key == "cpu" and spec.ep in choice.reason
    assert "fell back from " + name in choice.describe()


@pytest.mark.parametrize("provider", ["qnn", "dml"])
def test_fallback_session_runs_on_cpu(tiny_package, provider):
    """dml is not installed; qnn is, but a plain session does not enable the plugin EP: both fall back."""
    lm = OrtCausalLM(tiny_package, provider=provider, fallback=True, threads=1)
    assert lm.session.get_providers() == ["CPUExecutionProvider"] and lm.choice.fell_back
    assert lm.choice.reason


def test_provider_aliases_and_options():
    choice = resolve_provider("CPUExecutionProvider")
    assert choice.spec.key == "cpu" and choice.providers_arg() == ["CPUExecutionProvider"]
    ov = resolve_provider("openvino", {"device_type": "GPU"}, fallback=True)
    assert ov.fell_back  # not installed in the main venv


def test_two_bit_refused_where_not_native():
    with pytest.raises(EdgeRecoverError, match="2-bit layers"):
        check_package_bits(resolve_provider("cpu").__class__("cuda", PROVIDERS["cuda"], {}), {2, 4})
    check_package_bits(resolve_provider("cpu"), {2, 4})


def _cli(*args):
    return subprocess.run([sys.executable, "-c", "from edge_recover.cli import main; main()", *args],
                          capture_output=True, text=True, timeout=300)


def test_cli_errors_are_one_line(tiny_package, tmp_path):
    proc = _cli("run", str(tmp_path), "--prompt", "hi")
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0
    assert "not an edge-recover package" in proc.stderr and "Traceback" not in proc.stderr
    proc = _cli("run", str(tiny_package), "--prompt", "x" * 200)
    assert proc.returncode == 2 and "does not fit the model's context of 96" in proc.stderr
    proc = _cli("run", str(tiny_package), "--prompt", "hi", "--provider", "qnn")
    assert proc.returncode == 2 and "onnxruntime-qnn" in proc.stderr


def test_cli_run_streams(tiny_package):
    proc = _cli("run", str(tiny_package), "--prompt", "Hello", "--max-new-tokens", "8", "--threads", "1")
    assert proc.returncode == 0, proc.stderr
    assert "prompt tokens" in proc.stderr and "decode" in proc.stderr
    proc2 = _cli("run", str(tiny_package), "--prompt", "Hello", "--max-new-tokens", "8", "--chat",
                 "--temperature", "0.8", "--top-k", "10", "--seed", "1")
    assert proc2.returncode == 0, proc2.stderr

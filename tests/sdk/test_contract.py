"""The package contract (sdk/contract.py): file table, checks, and the one provider table."""

from __future__ import annotations

import json

import pytest

from edge_recover import contract
from edge_recover.errors import EdgeRecoverError


def _package(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "adapters").mkdir(parents=True)
    (pkg / contract.MODEL_FILE).write_bytes(b"graph")
    (pkg / contract.DATA_FILE).write_bytes(bytes(range(256)) * 4)
    (pkg / "adapters" / "a.onnx_adapter").write_bytes(b"lora")
    (pkg / ".partial-tmp").write_bytes(b"ignored")
    return pkg, contract.write_manifest(pkg, {"kind": contract.PACKAGE_KIND, "format_version": 1, "layers": {}})


def test_file_table_lists_every_file_but_the_manifest(tmp_path):
    pkg, m = _package(tmp_path)
    assert sorted(m["files"]) == ["adapters/a.onnx_adapter", "model.onnx", "model.onnx.data"]
    assert m["files"]["model.onnx.data"]["size"] == 1024
    assert m["files"]["model.onnx"]["sha256"] == contract.file_sha256(pkg / "model.onnx")
    assert contract.read_manifest(pkg) == json.loads((pkg / contract.MANIFEST).read_text()) == m
    assert contract.check_files(pkg, m, hashes=True) == []


def test_bad_files_are_named(tmp_path):
    pkg, m = _package(tmp_path)
    data = pkg / contract.DATA_FILE
    orig = data.read_bytes()
    raw = bytearray(orig)
    raw[7] ^= 0xFF
    data.write_bytes(bytes(raw))
    contract.check_files(pkg, m)  # same size: only the hash sees it
    with pytest.raises(EdgeRecoverError, match="model.onnx.data' does not match its sha256"):
        contract.check_files(pkg, m, hashes=True)
    data.write_bytes(bytes(raw[:100]))
    with pytest.raises(EdgeRecoverError, match="has 100 bytes, the manifest says 1024"):
        contract.check_files(pkg, m)
    (pkg / "adapters" / "a.onnx_adapter").unlink()
    with pytest.raises(EdgeRecoverError, match="a.onnx_adapter' is missing"):
        contract.check_files(pkg, m)
    (pkg / "extra.txt").write_text("x")
    data.write_bytes(orig)
    (pkg / "adapters" / "a.onnx_adapter").write_bytes(b"lora")
    assert contract.check_files(pkg, m, hashes=True) == ["extra.txt"]


def test_older_package_warns_once(tmp_path, capsys):
    pkg, m = _package(tmp_path)
    del m["files"]
    assert contract.check_files(pkg, m) == [] and contract.check_files(pkg, m) == []
    assert capsys.readouterr().err.count("has no file table") == 1


def test_malformed_file_table_is_refused(tmp_path):
    pkg, m = _package(tmp_path)
    m["files"]["model.onnx"] = {"size": "big"}
    (pkg / contract.MANIFEST).write_text(json.dumps(m))
    with pytest.raises(EdgeRecoverError, match="malformed `files` table"):
        contract.read_manifest(pkg)


def test_targets_and_providers_read_one_table():
    """exporters/targets.py and runtimes/providers.py disagreed on VitisAI; both now read PROVIDER_KERNELS."""
    from edge_recover.exporters.targets import TARGETS
    from edge_recover.runtimes.providers import PROVIDERS

    by_ep = {p.ep: p for p in PROVIDERS.values()}
    assert set(by_ep) == set(contract.PROVIDER_KERNELS)
    for t in TARGETS.values():
        k = contract.PROVIDER_KERNELS[t.provider]
        assert t.native_bits == by_ep[t.provider].native_bits == k.bits and t.block_sizes == k.block_sizes
    assert contract.PROVIDER_KERNELS["VitisAIExecutionProvider"].bits == (4,)


def test_runtime_constants_come_from_the_contract():
    from edge_recover.exporters import api
    from edge_recover.runtimes import package

    assert api.MANIFEST == contract.MANIFEST and api.PACKAGE_KIND == package.PACKAGE_KIND == contract.PACKAGE_KIND

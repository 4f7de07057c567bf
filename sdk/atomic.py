"""Write output folders all-or-nothing.

`atomic_dir(path)` yields a temporary sibling folder; on success it is renamed to `path`, on any error
(Ctrl-C included) it is removed. A reader never sees a half-written package or checkpoint, and an
existing folder is never overwritten unless `overwrite=True` (then it is replaced only after the new one
is complete).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from .errors import require


def check_new_dir(path: str | Path, overwrite: bool = False) -> Path:
    """Refuse an existing output folder early, before any long work starts."""
    p = Path(path).expanduser()
    require(overwrite or not p.exists(), f"output {str(p)!r} already exists; choose another `-o` or pass --overwrite")
    return p


@contextlib.contextmanager
def atomic_dir(path: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder that becomes `path` only if the block finishes.

    Example:
        >>> with atomic_dir("out/pkg") as tmp:  # doctest: +SKIP
        ...     (tmp / "model.onnx").write_bytes(data)
    """
    final = check_new_dir(path, overwrite)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.partial-", dir=final.parent))
    try:
        yield tmp
        tmp.chmod(0o777 & ~_umask())  # mkdtemp makes it owner-only; the result is a folder like any other
        if final.exists():
            old = final.with_name(f".{final.name}.old-{os.getpid()}")
            final.rename(old)
            tmp.rename(final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling path to write; it replaces `path` only if the block finishes.

    Example:
        >>> with atomic_file("pkg/adapters/a.onnx_adapter") as tmp:  # doctest: +SKIP
        ...     fmt.export_adapter(str(tmp))
    """
    p = Path(path)
    tmp = p.with_name(f".{p.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        tmp.replace(p)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_json_atomic(path: str | Path, text: str) -> None:
    """Write a text file via a temporary file and rename, so a crash leaves the old file or the new one."""
    with atomic_file(path) as tmp:
        tmp.write_text(text)

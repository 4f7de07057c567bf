"""Join a checkpoint that came back from the GPU machine in parts (bench/recovery_modes.py --save) into a folder.

    python bench/gpu/join_checkpoint.py /work/.device/N/best out/rm/qat   # then: edge-recover export out/rm/qat --base smollm2

SAVE_DIR holds model.safetensors.part0, .part1, ..., edge_recover_quantized.json and meta.tar (config and tokenizer
files; older runs lack it: copy those files from any checkpoint of the same model). OUT_DIR is written whole or
not at all.
"""

from __future__ import annotations

import shutil
import sys
import tarfile
from pathlib import Path

from edge_recover.atomic import atomic_dir
from edge_recover.errors import EdgeRecoverError, require


def join(src: Path, out: Path) -> Path:
    """Write OUT/model.safetensors (the parts in order), the manifest and meta.tar's files; returns OUT."""
    parts = sorted(src.glob("model.safetensors.part*"), key=lambda p: int(p.name.rsplit("part", 1)[1]))
    require(bool(parts), f"{str(src)!r} has no model.safetensors.part* files")
    require((src / "edge_recover_quantized.json").is_file(), f"{str(src)!r} has no edge_recover_quantized.json")
    with atomic_dir(out, overwrite=False) as tmp:
        with open(tmp / "model.safetensors", "wb") as f:
            for part in parts:
                f.write(part.read_bytes())
        shutil.copyfile(src / "edge_recover_quantized.json", tmp / "edge_recover_quantized.json")
        if (src / "meta.tar").is_file():
            with tarfile.open(src / "meta.tar") as tf:
                for m in tf.getmembers():
                    require(m.isfile() and "/" not in m.name and not m.name.startswith("."), f"meta.tar: unexpected {m.name!r}")
                    (tmp / m.name).write_bytes(tf.extractfile(m).read())
    return out


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    try:
        print(f"wrote {join(Path(sys.argv[1]), Path(sys.argv[2]))}")
    except EdgeRecoverError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)

"""Re-draw the weights of carried random-weight packages on the offline machine.

The Qwen3-1.7B-shaped packages are 1-2 GB each, and a device call carries 64 MiB. Their weights are random
anyway (speed depends on shapes and bit widths, not values), so what travels is each package without its
`model.onnx.data`: the graph (every tensor's name, dtype, offset and length in the data file), manifest and
tokenizer. This writes the data file back with values of the same kind:

    uint8 (packed codes, zero points)  random bytes          every code and zero point occurs
    float (scales, norms, embedding)   N(0, 0.02), norms 1   no NaN, no denormals: the kernels' usual path
    other                              zeros

    python bench/gpu/materialize.py PKG [PKG ...]

A folder that already has its data file is left alone. The graph is not changed, so the package the
profiler opens there is the one built here, byte for byte, except for the weight values.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import helper

PATTERN_BYTES = 1 << 22  # a 4 MiB random pattern, tiled: draws 2 GB in seconds


def _pattern(dtype: np.dtype, rng: np.random.Generator, norm: bool) -> np.ndarray:
    n = PATTERN_BYTES // dtype.itemsize
    if dtype == np.uint8:
        return rng.integers(0, 256, n, dtype=np.uint8)
    if dtype.kind == "f":
        return (np.ones(n) if norm else rng.normal(0.0, 0.02, n)).astype(dtype)
    return np.zeros(n, dtype)


def materialize(folder: Path, seed: int = 0) -> None:
    graph = onnx.load(str(folder / "model.onnx"), load_external_data=False)
    rng = np.random.default_rng(seed)
    files: dict[str, list] = {}
    for t in graph.graph.initializer:
        if t.data_location != onnx.TensorProto.EXTERNAL:
            continue
        info = {e.key: e.value for e in t.external_data}
        dtype = np.dtype(helper.tensor_dtype_to_np_dtype(t.data_type))
        files.setdefault(info["location"], []).append((int(info.get("offset", 0)), int(info["length"]), dtype, "norm" in t.name))
    for location, tensors in files.items():
        path = folder / location
        if path.exists():
            print(f"{folder.name}: {location} exists, kept", flush=True)
            continue
        patterns: dict = {}
        tmp = path.with_suffix(".partial")
        with open(tmp, "wb") as f:
            f.truncate(max(off + n for off, n, _, _ in tensors))
            for off, n, dtype, norm in tensors:
                key = (dtype.str, norm)
                if key not in patterns:
                    patterns[key] = _pattern(dtype, rng, norm).tobytes()
                pat = patterns[key]
                f.seek(off)
                for start in range(0, n, len(pat)):
                    f.write(pat[: min(len(pat), n - start)])
        tmp.rename(path)
        print(f"{folder.name}: wrote {location} ({sum(n for _, n, _, _ in tensors) / 1e9:.2f} GB, {len(tensors)} tensors)", flush=True)


if __name__ == "__main__":
    for arg in sys.argv[1:]:
        materialize(Path(arg))

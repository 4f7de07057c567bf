"""The packages of the tiny Llama (SmolLM2's family) and the tiny Qwen3 hold the same nodes and bytes as recorded.

Issue 30 moved every module path into one table (sdk/layouts.py) and the quantization options into one definition
(sdk/options.py); none of that may change what `export --scheme w4w2gateup --target cpu` writes. Each package is
exported through the CLI and reduced to a fingerprint:

    nodes         the graph's nodes in order, `domain:op_type:name` (a node added, dropped, moved or renamed)
    initializers  name -> `sha256 dtype shape` of an integer tensor's bytes (the MatMulNBits codes, zero points,
                  8-bit tables), and for a float tensor (scales, norms, biases, float weights) its dtype, shape,
                  sum of magnitudes, sum of squares and largest magnitude
    inputs        name -> element type, outputs likewise (the KV cache's dtype among them)

and compared with tests/fixtures/package_fingerprints.json: nodes, inputs, outputs and integer bytes exactly, float
tensors' statistics within a relative 1e-5. The export is deterministic on one machine (two runs, in one process and
in two, gave the same bytes), but not every byte across CPUs: on the fourteenth session's Intel Xeon (AVX512-FP16)
the block scales came out different from the recorded ones in their last bits (12 of 45 initializers, every code the same),
so float bytes are compared up to that rounding; a real change to a scale moves these sums far more than 1e-5.
The integers equal those of the same exports at 252f963 (the commit issue 30 was filed against).

A change that means to alter the packages regenerates the file and says why in its commit:

    EDGE_RECOVER_UPDATE_FINGERPRINTS=1 .venv/bin/python -m pytest -q tests/exporters/test_package_fingerprint.py
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from tests.fixtures.cli import run_cli

RECORDED = Path(__file__).resolve().parents[1] / "fixtures" / "package_fingerprints.json"
UPDATE = os.environ.get("EDGE_RECOVER_UPDATE_FINGERPRINTS") == "1"
EXPORT = ("--scheme", "w4w2gateup", "--target", "cpu")


def fingerprint(package: Path) -> dict:
    """The nodes, initializer bytes and graph inputs/outputs of `package`'s model.onnx (its external data read in)."""
    model = onnx.load(str(package / "model.onnx"))
    g = model.graph

    def digest(t: onnx.TensorProto) -> str | dict:
        a = numpy_helper.to_array(t)
        if not np.issubdtype(a.dtype, np.floating):
            return f"{hashlib.sha256(a.tobytes()).hexdigest()} {a.dtype} {list(a.shape)}"
        m = np.abs(a.astype(np.float64))
        return {"dtype": str(a.dtype), "shape": list(a.shape), "abs_sum": float(m.sum()),
                "sum_sq": float((m * m).sum()), "abs_max": float(m.max()) if m.size else 0.0}

    return {"nodes": [f"{n.domain or 'ai.onnx'}:{n.op_type}:{n.name}" for n in g.node],
            "initializers": {t.name: digest(t) for t in sorted(g.initializer, key=lambda t: t.name)},
            "inputs": {v.name: v.type.tensor_type.elem_type for v in g.input},
            "outputs": {v.name: v.type.tensor_type.elem_type for v in g.output}}


def _same(want: str | dict, got: str | dict) -> bool:
    """An integer tensor's digest exactly; a float tensor's dtype and shape exactly, its statistics within 1e-5."""
    if isinstance(want, str) or isinstance(got, str):
        return want == got
    return (want["dtype"], want["shape"]) == (got["dtype"], got["shape"]) and all(
        abs(want[k] - got[k]) <= 1e-5 * max(abs(want[k]), 1e-30) for k in ("abs_sum", "sum_sq", "abs_max"))


def _differences(want: dict, got: dict) -> list[str]:
    """What differs, in a few lines: the first node that differs, initializers added, dropped or changed."""
    out = []
    first = next((i for i, (a, b) in enumerate(zip(want["nodes"], got["nodes"])) if a != b), None)
    if first is not None or len(want["nodes"]) != len(got["nodes"]):
        at = first if first is not None else min(len(want["nodes"]), len(got["nodes"]))
        out.append(f"nodes: {len(want['nodes'])} recorded, {len(got['nodes'])} now; first difference at {at}: "
                   f"{want['nodes'][at:at + 1]} -> {got['nodes'][at:at + 1]}")
    w, g = want["initializers"], got["initializers"]
    for what, names in (("dropped", sorted(set(w) - set(g))), ("added", sorted(set(g) - set(w))),
                        ("changed", sorted(n for n in set(w) & set(g) if not _same(w[n], g[n])))):
        if names:
            out.append(f"initializers {what}: {names[:8]}{' ...' if len(names) > 8 else ''}")
    out += [f"{k} differ" for k in ("inputs", "outputs") if want[k] != got[k]]
    return out


def _record(family: str, fp: dict) -> None:
    recorded = json.loads(RECORDED.read_text()) if RECORDED.is_file() else {}
    recorded[family] = fp
    tmp = RECORDED.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(recorded, indent=1, sort_keys=True) + "\n")
    tmp.replace(RECORDED)


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_package_matches_its_recorded_fingerprint(family, request, tmp_path):
    hf = request.getfixturevalue(f"tiny_{family}_dir")
    r = run_cli("export", hf, *EXPORT, "-o", tmp_path / "pkg")
    assert r.code == 0, r.stderr[-2000:]
    got = fingerprint(tmp_path / "pkg")
    assert any(n.startswith("com.microsoft:MatMulNBits:") for n in got["nodes"])  # a package, not an empty graph
    if UPDATE:
        _record(family, got)
    want = json.loads(RECORDED.read_text())[family]
    problems = _differences(want, got)
    assert not problems, (f"the {family} package changed ({' '.join(EXPORT)}):\n  " + "\n  ".join(problems)
                          + "\nif that is meant, regenerate: EDGE_RECOVER_UPDATE_FINGERPRINTS=1 (module docstring)")

"""One context binary for both static graphs (QNN weight sharing): what it would save, and why the package does
not ship it.

The qnn package holds prefill_ctx_qnn.bin and decode_ctx_qnn.bin, each with every weight. QNN's weight sharing
compiles both graphs into one binary (both sessions with `ep.share_ep_contexts=1`, the last one also with
`ep.stop_share_ep_contexts=1`; onnxruntime-qnn 2.7.0 turns HTP weight sharing on from that), and the tests show
it is smaller than the two. Loading it the documented way (every session with `ep.share_ep_contexts=1`) crashes
the x86 HTP emulator (SIGSEGV inside libQnnHtp.so), so no logits can be compared and the export keeps two
binaries, saying why in the manifest. Each compile and load runs in its own process: a crash must not take
pytest with it.

If `test_the_emulator_cannot_load_a_shared_binary` fails because the load now works, the emulator has learned to
run weight-shared binaries: compare both graphs' logits with the two-binary package's and ship one binary.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap

import onnx
import pytest

from tests.exporters.test_qnn_npu import _export
from tests.fixtures.tiny_models import save_tiny_model

import onnxruntime_qnn  # noqa: E402,F401  (a test dependency: CI must fail, not skip, without it)

_PRELUDE = """
import sys
from pathlib import Path
import numpy as np
import onnxruntime as ort
from edge_recover.qnn import htp_session_options, resolve_soc
soc = resolve_soc("SM8650")
d = Path(sys.argv[1])
"""

# Compile prefill.onnx then decode.onnx in one process into one shared context binary (embed mode 0).
_COMPILE = _PRELUDE + """
for k, role in enumerate(["prefill", "decode"]):
    cfg = {"ep.context_enable": "1", "ep.context_file_path": str(d / f"{role}_ctx.onnx"),
           "ep.context_embed_mode": "0", "ep.share_ep_contexts": "1"}
    if k == 1:
        cfg["ep.stop_share_ep_contexts"] = "1"
    ort.InferenceSession(str(d / f"{role}.onnx"), htp_session_options(soc, None, cfg))
print("COMPILED")
"""

# Open both EPContext models in one process, as onnxruntime documents for shared binaries, and run a prefill
# window then a decode step; print the logits' checksum.
_LOAD = _PRELUDE + """
s = {r: ort.InferenceSession(str(d / f"{r}_ctx.onnx"), htp_session_options(soc, None, {"ep.share_ep_contexts": "1"}))
     for r in ("prefill", "decode")}
print("LOADED", flush=True)
def feeds(sess, ids, pos, past=None):
    f = {"input_ids": ids, "position_ids": pos}
    for i in sess.get_inputs():
        if i.name.startswith("past_key_values."):
            f[i.name] = past[i.name] if past else np.zeros(i.shape, np.float32)
    return f
w = s["prefill"].get_inputs()[0].shape[1]
toks = np.arange(5, 5 + w + 1, dtype=np.int64)
out = s["prefill"].run(None, feeds(s["prefill"], toks[None, :w], np.arange(w, dtype=np.int64)[None]))
names = [o.name for o in s["prefill"].get_outputs()]
past = {"past_key_values." + n[8:]: v for n, v in zip(names, out) if n.startswith("present.")}
dec = s["decode"].run(["logits"], feeds(s["decode"], toks[None, w:], np.array([[w]], np.int64), past))[0]
print("LOGITS", repr(out[names.index("logits")].tolist()), repr(dec.tolist()))
"""


def _python(script: str, folder) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(script), str(folder)], capture_output=True,
                          text=True, timeout=600)


@pytest.fixture(scope="module")
def pkg(tmp_path_factory):
    d = tmp_path_factory.mktemp("qnn-shared")
    return _export(save_tiny_model(d / "hf", "llama", intermediate=128), d / "pkg")[0]


@pytest.fixture(scope="module")
def shared(pkg, tmp_path_factory):
    """The package's portable graphs compiled into one shared context binary, in a folder of its own."""
    d = tmp_path_factory.mktemp("qnn-shared-ctx")
    for name in ("prefill.onnx", "decode.onnx", "model.onnx.data"):
        (d / name).write_bytes((pkg / name).read_bytes())
    res = _python(_COMPILE, d)
    assert res.returncode == 0 and "COMPILED" in res.stdout, res.stderr[-2000:]
    return d


def _binaries(model_path) -> list[str]:
    m = onnx.load(str(model_path), load_external_data=False)
    return sorted({a.s.decode() for n in m.graph.node for a in n.attribute if a.name == "ep_cache_context"})


def test_the_manifest_says_why_two_binaries_and_what_they_cost(pkg):
    v = json.loads((pkg / "manifest.json").read_text())["static"]["verified"]
    sizes = [(pkg / b).stat().st_size for ctx in v["contexts"].values() for b in ctx["binaries"]]
    cb = v["context_binaries"]
    assert cb["count"] == 2 and cb["bytes"] == sum(sizes) and cb["duplicate_bytes_at_most"] == min(sizes)
    assert cb["weights_shared"] is False and "segmentation fault" in cb["why"]


def test_one_shared_binary_holds_both_graphs_in_fewer_bytes(pkg, shared):
    """Both EPContext models name the same (single) binary, and it is smaller than the package's two."""
    bins = {role: _binaries(shared / f"{role}_ctx.onnx") for role in ("prefill", "decode")}
    assert bins["prefill"] == bins["decode"] == ["prefill_ctx_qnn.bin"]
    assert sorted(p.name for p in shared.glob("*.bin")) == ["prefill_ctx_qnn.bin"]
    one = (shared / "prefill_ctx_qnn.bin").stat().st_size
    two = sum((pkg / f"{role}_ctx_qnn.bin").stat().st_size for role in ("prefill", "decode"))
    print(f"\none shared binary {one:,} bytes; two binaries {two:,} bytes ({one / two:.0%})")
    assert one < two


def test_the_emulator_cannot_load_a_shared_binary(pkg, shared):
    """The same loader opens the package's two binaries and runs both graphs; on the shared binary the first
    session crashes the emulator (SIGSEGV in contextCreateFromBinary), before any logits exist."""
    ok = _python(_LOAD, pkg)
    assert ok.returncode == 0 and "LOGITS" in ok.stdout, ok.stderr[-2000:]
    res = _python(_LOAD, shared)
    assert res.returncode != 0, ("the HTP emulator loaded the weight-shared binary: compare both graphs' logits "
                                 f"with the two-binary package's and ship one binary\n{res.stdout[-500:]}")
    assert res.returncode == -signal.SIGSEGV and "LOADED" not in res.stdout, (res.returncode, res.stderr[-2000:])

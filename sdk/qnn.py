"""The Qualcomm HTP (Hexagon NPU) through onnxruntime-qnn: SoC table, sessions with no CPU fallback, placement.

Both the exporter (which verifies and compiles static graphs on the HTP) and the runtime (which runs them)
open QNN sessions, so the one way to do it lives here, at the base of the data path:

    register_qnn()            onnxruntime-qnn's plugin EP library, registered once per process
    htp_session_options(soc)  SessionOptions: HTP backend, fp16 precision for `soc`, CPU fallback disabled
    open_htp_session(path)    an InferenceSession that fails unless QNN takes every node
    placement(session)        nodes per execution provider, from one profiled run

onnxruntime-qnn 2.7.0 is a plugin EP for onnxruntime 1.31 (`register_execution_provider_library` +
`add_provider_for_devices`); its Linux x86_64 wheel carries libQnnHtp.so, an x86 emulator of the HTP. The
emulator runs what a device runs, at emulator speed: times measured on it are not NPU times.

`SOCS` maps Snapdragon part numbers to QNN's `soc_model` and `htp_arch` values. Source: the Qualcomm AI
Engine Direct chipset table as ExecuTorch's Qualcomm backend carries it (pytorch/executorch,
backends/qualcomm/serialization/qc_schema.py: SM8550 = 43 v73, SM8650 = 57 v75, SM8750 = 69 v79,
SM8850 = 87 v81, ...) and, for the Snapdragon X Elite (SC8380XP = 60, Hexagon v73), the ggml-qnn backend's
table. fp16 precision on the HTP needs `soc_model` (without it QNN refuses: "FP16 precision mode is enabled
but soc_model is not specified").
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Mapping, Optional

from edge_recover.errors import EdgeRecoverError

__all__ = ["Soc", "SOCS", "DEFAULT_SOC", "resolve_soc", "register_qnn", "htp_provider_options",
           "htp_session_options", "open_htp_session", "placement", "captured_stderr", "QNN_EP"]

QNN_EP = "QNNExecutionProvider"


@dataclass(frozen=True)
class Soc:
    """One Snapdragon SoC as QNN names it."""

    name: str          # part number, e.g. SM8650
    marketing: str     # e.g. Snapdragon 8 Gen 3
    soc_model: int     # QNN soc_model
    htp_arch: int      # Hexagon architecture (v75 -> 75)


SOCS: dict[str, Soc] = {s.name: s for s in (
    Soc("SM8350", "Snapdragon 888", 30, 68),
    Soc("SM8450", "Snapdragon 8 Gen 1", 36, 69),
    Soc("SM8475", "Snapdragon 8+ Gen 1", 42, 69),
    Soc("SM8550", "Snapdragon 8 Gen 2", 43, 73),
    Soc("SM8650", "Snapdragon 8 Gen 3", 57, 75),
    Soc("SM8750", "Snapdragon 8 Elite", 69, 79),
    Soc("SM8850", "Snapdragon 8 Elite Gen 5", 87, 81),
    Soc("SA8295", "Snapdragon Cockpit SA8295P", 39, 68),
    Soc("SC8380XP", "Snapdragon X Elite", 60, 73),
)}
DEFAULT_SOC = "SM8650"


def resolve_soc(name: Optional[str]) -> Soc:
    """The `Soc` for a part number (case-insensitive; None: `DEFAULT_SOC`).

    Example:
        >>> resolve_soc("sm8750").htp_arch
        79
    """
    key = (name or DEFAULT_SOC).strip().upper()
    if key not in SOCS:
        raise EdgeRecoverError(f"unknown `--soc` {name!r}; choose one of {', '.join(SOCS)} "
                               f"(Snapdragon part numbers, e.g. SM8650 = Snapdragon 8 Gen 3)")
    return SOCS[key]


def _qnn_module():
    try:
        import onnxruntime_qnn
    except ImportError:
        raise EdgeRecoverError("the QNN HTP needs `onnxruntime-qnn` (pip install onnxruntime-qnn==2.7.0, or "
                               "`bash scripts/setup.sh`); it is not installed") from None
    return onnxruntime_qnn


_REGISTERED: list = []


def register_qnn() -> list:
    """Register onnxruntime-qnn's plugin EP with onnxruntime (once) and return its OrtEpDevices."""
    import onnxruntime as ort

    q = _qnn_module()
    if not _REGISTERED:
        try:
            ort.register_execution_provider_library(q.EP_NAME, q.get_library_path())
        except Exception as exc:  # registered already by someone else in this process
            if "already" not in str(exc).lower():
                raise EdgeRecoverError(f"onnxruntime-qnn's EP library failed to register ({str(exc)[:200]}); "
                                       f"check that it matches onnxruntime {ort.__version__}") from None
        _REGISTERED.extend(d for d in ort.get_ep_devices() if d.ep_name == q.EP_NAME)
    if not _REGISTERED:
        raise EdgeRecoverError("onnxruntime-qnn is installed but offers no QNN device; reinstall onnxruntime-qnn")
    return list(_REGISTERED)


def htp_provider_options(soc: Soc, extra: Optional[Mapping[str, str]] = None) -> dict[str, str]:
    """QNN provider options for the HTP backend at fp16 precision on `soc`."""
    q = _qnn_module()
    opts = {"backend_path": q.get_qnn_htp_path(), "enable_htp_fp16_precision": "1",
            "soc_model": str(soc.soc_model), "htp_arch": str(soc.htp_arch)}
    opts.update({k: str(v) for k, v in (extra or {}).items()})
    return opts


def htp_session_options(soc: Soc, provider_options: Optional[Mapping[str, str]] = None,
                        session_config: Optional[Mapping[str, str]] = None, profile_prefix: str = ""):
    """SessionOptions that place the graph on the HTP or fail (`session.disable_cpu_ep_fallback=1`)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.add_provider_for_devices(register_qnn(), htp_provider_options(soc, provider_options))
    so.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
    for k, v in (session_config or {}).items():
        so.add_session_config_entry(str(k), str(v))
    so.log_severity_level = 3
    if profile_prefix:
        so.enable_profiling = True
        so.profile_file_prefix = profile_prefix
    return so


@contextlib.contextmanager
def captured_stderr() -> Iterator[list]:
    """Capture file descriptor 2 (where ONNX Runtime's and QNN's C++ loggers write); yields [text] on exit."""
    out: list = []
    saved = os.dup(2)
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield out
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            out.append(tmp.read().decode(errors="replace"))


def open_htp_session(model, soc: Soc, provider_options: Optional[Mapping[str, str]] = None,
                     session_config: Optional[Mapping[str, str]] = None, profile_prefix: str = ""):
    """An InferenceSession of `model` (path or bytes) with every node on the HTP, or one clear error.

    When QNN refuses nodes, the error names them (from QNN's own "Unsupported nodes" log line)."""
    import onnxruntime as ort

    source = model if isinstance(model, bytes) else str(model)
    try:
        return ort.InferenceSession(source, htp_session_options(soc, provider_options, session_config,
                                                                profile_prefix))
    except Exception as exc:
        error = str(exc).splitlines()[0][:300]
    so = htp_session_options(soc, provider_options)
    so.log_severity_level = 0  # again, verbose: QNN logs which nodes it refuses and why
    with captured_stderr() as log:
        try:
            ort.InferenceSession(source, so)
        except Exception:
            pass
    why = next((ln.split("GetCapabilityImpl]")[-1].strip() for ln in log[0].splitlines()
                if "Unsupported nodes" in ln), "")
    reasons = sorted({ln.split("REASON :")[-1].strip() for ln in log[0].splitlines() if "REASON :" in ln})
    # the graph by its file name: an export's working folder is gone by the time the user reads the line
    label = "(in memory)" if isinstance(model, bytes) else repr(Path(model).name)
    raise EdgeRecoverError(f"the QNN HTP does not take the whole graph {label} "
                           f"({(why or error)[:400]}{'; ' + '; '.join(reasons)[:300] if reasons else ''})")


def placement(session, feeds: Mapping) -> tuple[dict, list]:
    """Run `session` (opened with a profile prefix) once on `feeds`; count profiled kernels per EP.

    Returns ({"kernels": {ep: n}, "npu_share": share of kernels on QNN}, the run's outputs). With the CPU
    fallback disabled a session exists only when QNN took every node; this is the measured confirmation."""
    outputs = session.run(None, dict(feeds))
    path = Path(session.end_profiling())
    try:
        events = json.loads(path.read_text())
    finally:
        path.unlink(missing_ok=True)
    kernels = Counter(e["args"].get("provider", "?") for e in events
                      if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time"))
    total = sum(kernels.values())
    return {"kernels": dict(kernels), "npu_share": (kernels.get(QNN_EP, 0) / total) if total else 0.0}, outputs

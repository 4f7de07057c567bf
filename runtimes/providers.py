"""Execution providers as data: which ONNX Runtime EP, with which options, from which pip package.

An adapter is a frozen `ProviderSpec`; `PROVIDERS` maps the short names the CLI takes (`cpu`, `dml`, `qnn`,
`openvino`, `vitisai`, `cuda`) to them. `resolve_provider` turns a name into the `providers=` list for
`onnxruntime.InferenceSession`, or raises one clear line that names the installed providers and the pip
package to install. Falling back to the CPU provider happens only when the caller asks for it
(`fallback=True`), and the returned `ProviderChoice` says that it happened and why.

Trade-off: the EP-specific knowledge stays in this one table (options, pip packages); the MatMulNBits bit
widths each EP runs natively come from the package contract's `PROVIDER_KERNELS`, the table the exporter's
targets read too. The session and generation code never branch on the provider.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Optional

from edge_recover.contract import PROVIDER_KERNELS
from edge_recover.errors import EdgeRecoverError

__all__ = ["ProviderSpec", "ProviderChoice", "PROVIDERS", "installed_providers", "resolve_provider",
           "check_package_bits"]


@dataclass(frozen=True)
class ProviderSpec:
    """One execution-provider adapter.

    Example:
        >>> PROVIDERS["openvino"].ep
        'OpenVINOExecutionProvider'
    """

    key: str                               # short name the CLI takes
    ep: str                                # ONNX Runtime execution provider name
    pip: str                               # the pip package that provides it
    options: Mapping[str, str] = field(default_factory=dict)           # provider options (defaults)
    session_config: Mapping[str, str] = field(default_factory=dict)    # SessionOptions config entries
    sequential: bool = False               # needs ORT_SEQUENTIAL execution and no memory pattern (DirectML)
    note: str = ""

    @property
    def native_bits(self) -> tuple[int, ...]:
        """MatMulNBits bit widths this EP runs natively (the package contract's one provider table)."""
        return PROVIDER_KERNELS[self.ep].bits


PROVIDERS: dict[str, ProviderSpec] = {
    "cpu": ProviderSpec("cpu", "CPUExecutionProvider", "onnxruntime",
                        note="MatMulNBits 2/4/8-bit (2-bit since ORT 1.24); accuracy_level 4 = int8 activations"),
    "cuda": ProviderSpec("cuda", "CUDAExecutionProvider", "onnxruntime-gpu", {"device_id": "0"},
                         note="MatMulNBits 4/8-bit only: export with a target that stores "
                              "2-bit codes in a 4-bit container"),
    "dml": ProviderSpec("dml", "DmlExecutionProvider", "onnxruntime-directml (Windows only)", {"device_id": "0"},
                        sequential=True,
                        note="runs MatMulNBits as dequantize + GEMM, 4/8-bit only; needs sequential execution"),
    "qnn": ProviderSpec("qnn", "QNNExecutionProvider", "onnxruntime-qnn",
                        note="Qualcomm HTP (NPU), a plugin EP opened by edge_recover.qnn "
                                                 "(HTP backend, fp16, CPU fallback disabled): static packages "
                                                 "of `export --target qnn` only; 2/4-bit MatMulNBits, blocks "
                                                 "32/64/128, K a whole number of blocks"),
    "openvino": ProviderSpec("openvino", "OpenVINOExecutionProvider",
                             "onnxruntime-openvino (replaces the onnxruntime module: use its own venv, "
                             "see runtimes/openvino_venv.sh)",
                             {"device_type": "CPU", "precision": "ACCURACY"},
                             note="maps 2-bit to u2 and 4-bit to u4; device_type CPU/GPU/NPU"),
    "vitisai": ProviderSpec("vitisai", "VitisAIExecutionProvider", "onnxruntime-vitisai (AMD Ryzen AI Software)",
                            {"config_file": "vaip_config.json"},
                            note="AMD Ryzen AI NPU: 4-bit MatMulNBits (no evidence of 2- or 8-bit)"),
}


@dataclass(frozen=True)
class ProviderChoice:
    """What a session will actually be created with, and whether that is what was asked for."""

    requested: str
    spec: ProviderSpec
    options: dict[str, str]
    fell_back: bool = False
    reason: str = ""

    def providers_arg(self) -> list:
        """The `providers=` argument for `onnxruntime.InferenceSession`."""
        if self.spec.key == "cpu":
            return ["CPUExecutionProvider"]
        return [(self.spec.ep, dict(self.options)), "CPUExecutionProvider"]

    def describe(self) -> str:
        """One line for logs and reports."""
        opts = ", ".join(f"{k}={v}" for k, v in self.options.items())
        text = f"{self.spec.key} ({self.spec.ep}{'; ' + opts if opts else ''})"
        if self.fell_back:
            text += f" [fell back from {self.requested}: {self.reason}]"
        return text


def installed_providers() -> list[str]:
    """The execution providers the installed onnxruntime build offers, plugin EPs included.

    onnxruntime-qnn is a plugin EP: it shows in `get_available_providers()` only once registered, so it is
    registered here when installed (otherwise the answer would depend on what ran before in the process)."""
    import importlib.util

    import onnxruntime as ort

    have = list(ort.get_available_providers())
    if "QNNExecutionProvider" not in have and importlib.util.find_spec("onnxruntime_qnn") is not None:
        from edge_recover.errors import EdgeRecoverError
        from edge_recover.qnn import register_qnn

        try:
            register_qnn()
        except EdgeRecoverError:  # installed but unusable: reported as not installed, with the pip hint
            return have
        have = list(ort.get_available_providers())
    return have


def _spec(name: str) -> ProviderSpec:
    key = name.lower().strip()
    aliases = {s.ep.lower(): s.key for s in PROVIDERS.values()}
    key = aliases.get(key, key)
    if key not in PROVIDERS:
        raise EdgeRecoverError(f"`--provider` {name!r} is unknown; choose one of {', '.join(PROVIDERS)}")
    return PROVIDERS[key]


def resolve_provider(name: str = "cpu", options: Optional[Mapping[str, str]] = None,
                     fallback: bool = False) -> ProviderChoice:
    """Check that provider `name` is installed and return how to open a session on it.

    `options` override the adapter's default provider options. With `fallback=True` a missing provider
    gives the CPU provider instead (reported in `ProviderChoice.fell_back` / `.reason`); without it a
    missing provider is an `EdgeRecoverError` naming the installed providers and the pip package.

    Example:
        >>> resolve_provider("cpu").providers_arg()
        ['CPUExecutionProvider']
    """
    spec = _spec(name)
    opts = {**spec.options, **{k: str(v) for k, v in (options or {}).items()}}
    have = installed_providers()
    if spec.ep in have:
        return ProviderChoice(spec.key, spec, opts)
    reason = (f"provider `{spec.key}` ({spec.ep}) is not in this onnxruntime build (installed: {', '.join(have)}); "
              f"install `{spec.pip}`")
    if fallback:
        return ProviderChoice(spec.key, PROVIDERS["cpu"], {}, fell_back=True, reason=reason)
    raise EdgeRecoverError(reason + ", or pass --fallback-cpu to run on the CPU provider")


def check_package_bits(choice: ProviderChoice, layer_bits: set[int]) -> None:
    """Refuse a package whose MatMulNBits bit widths the chosen EP cannot run natively.

    A 2-bit package on CUDA/DirectML/VitisAI would otherwise be silently partitioned back to the CPU.
    """
    missing = sorted(b for b in layer_bits if b not in choice.spec.native_bits and b < 16)
    if missing:
        raise EdgeRecoverError(
            f"provider `{choice.spec.key}` runs MatMulNBits with {'/'.join(map(str, choice.spec.native_bits))}-bit "
            f"weights only, but the package has {'/'.join(map(str, missing))}-bit layers; export it with "
            f"`--target {choice.spec.key}` (2-bit codes in a 4-bit container) or pick another provider")

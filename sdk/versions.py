"""Versions of the tool and the libraries that shape its output, for manifests and reports."""

from __future__ import annotations

from importlib import metadata

TOOL_NAME = "edge-recover"
PACKAGE_FORMAT_VERSION = 1  # bump when a package written now cannot be read by an older runtime
_LIBS = ("edge-recover", "torch", "transformers", "optimum-onnx", "onnx", "onnxruntime", "peft", "numpy")


def library_versions() -> dict[str, str]:
    """Installed versions of the libraries that decide what edge-recover writes (missing ones omitted)."""
    out = {}
    for name in _LIBS:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return out


def tool_version() -> str:
    try:
        return metadata.version("edge-recover")
    except metadata.PackageNotFoundError:
        return "0+unknown"

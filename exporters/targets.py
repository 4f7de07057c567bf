"""Target profiles: what each ONNX Runtime provider's MatMulNBits kernels take, as data.

A `TargetProfile` says, for one deployment target, which bit widths and block sizes its kernels run
natively, the accuracy level and activation dtype it wants, the block size to quantize with when we start
from a full-precision model, which contrib ops the graph may hold, and what happens to a layer whose bit
width it cannot run:

    layer bits ∈ native_bits            ──► emitted as is
    layer bits = 2, 4 ∈ native_bits     ──► 2-bit codes stored in a 4-bit container (same scale, same
                                            zero point: identical numerics, 2x the bytes), reported
    otherwise                           ──► refused with a message that names the layer and the fix

Sources (see /work/shared/FACTS.md): ORT's ContribOperators.md and the kernels of ORT 1.31 (CPU 2/4/8-bit,
2-bit fast from block 64 up with accuracy_level 4); DirectML and CUDA run 4/8-bit only; OpenVINO maps
2 -> u2 and 4 -> u4; QNN HTP takes 2/4-bit in blocks of 32/64 (onnxruntime-qnn); VitisAI (Ryzen AI NPU):
4-bit, no evidence of 2-bit. `npu` is an alias that picks one of the NPU targets by `vendor`.

Example:
    >>> resolve_target("npu", vendor="qualcomm").name
    'qnn'
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from edge_recover.contract import PROVIDER_KERNELS
from edge_recover.errors import EdgeRecoverError, require
from edge_recover.scheme import CPU_HEAD, NPU_HEAD, QuantConfig

# Fused contrib ops the cpu exporter may emit (exporters/fusions.py, embedding.py); other targets get plain
# ONNX + MatMulNBits.
CPU_FUSED_OPS = ("SimplifiedLayerNormalization", "SkipSimplifiedLayerNormalization", "RotaryEmbedding",
                 "GroupQueryAttention", "MultiHeadAttention", "GatherBlockQuantized")
ALL_BLOCKS = (16, 32, 64, 128, 256)


@dataclass(frozen=True)
class TargetProfile:
    """What one target's kernels take. Frozen data; `edge-recover targets` prints these."""

    name: str
    provider: str  # ONNX Runtime execution provider name
    description: str
    native_bits: tuple[int, ...]  # bit widths MatMulNBits runs natively on this provider
    block_sizes: tuple[int, ...]  # block sizes it takes
    preferred_block_size: int  # used when quantizing a full-precision model for this target
    accuracy_level: int  # MatMulNBits accuracy_level attribute (4: int8 activations on CPU)
    activation_dtype: str  # the dtype the provider computes activations in
    contrib_ops: tuple[str, ...] = ("MatMulNBits",)  # com.microsoft ops a graph for this target may hold
    fuse: bool = False  # apply the ORT-fused-op rewrites (cpu only)
    static_graphs: bool = False  # also write fixed-shape prefill/decode graphs, verified on the NPU (qnn.py)
    source: str = ""
    # Side-car LoRA (exporters/lora.py): the dtype the LoRA MatMuls run in, or "" when the target cannot take
    # adapter weights as run-time graph inputs; `sidecar_note` then says why and what to do instead.
    sidecar_dtype: str = ""
    sidecar_note: str = ""
    # what a named scheme's float head becomes for this target (`Scheme.with_target_head`; None: it stays float)
    head: Any = None  # QuantConfig | None

    def check_sidecar(self) -> str:
        """The LoRA dtype of this target; refuses targets without run-time adapter inputs."""
        require(bool(self.sidecar_dtype),
                f"target {self.name!r} cannot run side-car LoRA adapters ({self.sidecar_note}); "
                f"pass `--adapter-mode merge` or export for `--target cpu`")
        return self.sidecar_dtype

    def storage_bits(self, bits: int) -> int:
        """The bit width a layer of `bits` is stored with on this target (a container when not native)."""
        if bits in self.native_bits:
            return bits
        if bits == 2 and 4 in self.native_bits:
            return 4
        raise EdgeRecoverError(
            f"target {self.name!r} cannot run {bits}-bit MatMulNBits (it takes {self._bits()}); "
            f"use a scheme with those bit widths (e.g. --scheme w4) or another `--target`"
        )

    def check_config(self, layer: str, config: QuantConfig) -> None:
        """Refuse a layer whose block size this target cannot take (pre-quantized checkpoints keep theirs)."""
        require(
            self._takes(config),
            f"layer {layer!r} is quantized with block_size {config.block_size}, which target {self.name!r} does not "
            f"take (it takes {', '.join(map(str, self.block_sizes))}); re-quantize with "
            f"`--block-size {self.preferred_block_size}` or export for another `--target`",
        )

    def check_scheme(self, scheme) -> None:
        """Refuse a scheme with a bit width or block size this target cannot take, before quantizing with it."""
        for config in {r.config for r in scheme.rules} | {scheme.default}:
            if isinstance(config, QuantConfig):
                require(self._takes(config),
                        f"{config.bits}-bit blocks of {config.block_size} are not taken by target {self.name!r} (it "
                        f"takes {', '.join(map(str, self.block_sizes))}); pass another `--block-size` or another `--target`")

    def _takes(self, config: QuantConfig) -> bool:
        """Whether this target runs `config`'s block size; a bit width it cannot store raises (storage_bits)."""
        self.storage_bits(config.bits)
        return config.block_size in self.block_sizes

    def _bits(self) -> str:
        return "/".join(map(str, self.native_bits)) + "-bit"

    def to_json(self) -> dict:
        return {**asdict(self), "head": None if self.head is None else {"bits": self.head.bits}}

    def describe(self) -> str:
        container = " (2-bit stored in 4-bit containers)" if 2 not in self.native_bits and 4 in self.native_bits else ""
        return (f"{self.name:9s} {self.provider:30s} {self._bits()}{container}; blocks "
                f"{','.join(map(str, self.block_sizes))} (default {self.preferred_block_size}); "
                f"accuracy_level {self.accuracy_level}; activations {self.activation_dtype}"
                + ("; fused ops" if self.fuse else "")
                + (f"; named schemes' head {self.head.bits}-bit" if self.head is not None else "")
                + (f"; side-car LoRA {self.sidecar_dtype}" if self.sidecar_dtype else "; no side-car LoRA"))


def _kernels(ep: str) -> dict:
    """native_bits and block_sizes of `ep` from the package contract's one provider table."""
    k = PROVIDER_KERNELS[ep]
    return {"native_bits": k.bits, "block_sizes": k.block_sizes}


TARGETS: dict[str, TargetProfile] = {
    "cpu": TargetProfile(
        "cpu", "CPUExecutionProvider", "x86/ARM CPU: 2/4/8-bit native (ORT >= 1.24)",
        **_kernels("CPUExecutionProvider"), preferred_block_size=64, accuracy_level=4,
        activation_dtype="float32", contrib_ops=("MatMulNBits",) + CPU_FUSED_OPS, fuse=True,
        source="FACTS.md: 2-bit bs32 is slower than 4-bit; bs64/bs128 2-bit beat 4-bit; accuracy_level 0 is a slow path",
        sidecar_dtype="float32", sidecar_note="measured here: ORT CPU EP, LoraAdapter + add_active_adapter",
        head=CPU_HEAD,
    ),
    "dml": TargetProfile(
        "dml", "DmlExecutionProvider", "DirectML (Windows GPUs/NPUs): 4/8-bit only, dequantize + GEMM",
        **_kernels("DmlExecutionProvider"), preferred_block_size=32, accuracy_level=0,
        activation_dtype="float16", source="FACTS.md: DirectML EP MatMulNBits is 4/8-bit",
        sidecar_dtype="float16", sidecar_note="fp16 LoRA MatMuls; graph inputs work on any EP (not run here: Windows only)",
    ),
    "qnn": TargetProfile(
        "qnn", "QNNExecutionProvider", "Qualcomm Hexagon NPU (QNN HTP)",
        **_kernels("QNNExecutionProvider"), preferred_block_size=64, accuracy_level=0,
        activation_dtype="float16", static_graphs=True,
        source="measured on the HTP emulator (onnxruntime-qnn 2.7.0): 2/4-bit MatMulNBits, blocks 32/64/128, "
               "K a whole number of blocks; static shapes only (exporters/static_graph.py)",
        sidecar_note="QNN HTP compiles weights into its context binary; run-time LoRA there is Qualcomm's "
                     "QAIRT LoRA v2 binary sections, not ONNX graph inputs",
        head=NPU_HEAD,
    ),
    "openvino": TargetProfile(
        "openvino", "OpenVINOExecutionProvider", "Intel CPU/GPU/NPU through OpenVINO (2 -> u2, 4 -> u4, 8 -> u8)",
        **_kernels("OpenVINOExecutionProvider"), preferred_block_size=64, accuracy_level=0,
        activation_dtype="float16", source="FACTS.md: the OpenVINO EP maps 2-bit to u2 and 4-bit to u4",
        sidecar_dtype="float16", sidecar_note="fp16 LoRA MatMuls as plain ONNX ops (not run on the OpenVINO EP here)",
    ),
    "vitisai": TargetProfile(
        "vitisai", "VitisAIExecutionProvider", "AMD Ryzen AI NPU: 4-bit, 2-bit codes in 4-bit containers",
        **_kernels("VitisAIExecutionProvider"), preferred_block_size=128, accuracy_level=0,
        activation_dtype="bfloat16", source="FACTS.md: no evidence of 2-bit on VitisAI; Ryzen AI LLM flow uses int4 g128",
        sidecar_note="the Ryzen AI NPU flow compiles a static graph; no evidence that it takes weights as "
                     "run-time inputs",
    ),
}

# `--target npu --vendor V` picks the NPU target of vendor V; without a vendor, the documented default.
NPU_VENDORS = {"amd": "vitisai", "qualcomm": "qnn", "intel": "openvino"}
DEFAULT_NPU_VENDOR = "amd"  # Ryzen AI: the platform of the W4/W2-GateUp paper


def resolve_target(target: str, vendor: str | None = None) -> TargetProfile:
    """The profile for `target` (`cpu`, `dml`, `npu`, `qnn`, `openvino`, `vitisai`); `vendor` only with `npu`.

    Example:
        >>> resolve_target("npu").name  # the default NPU vendor is AMD
        'vitisai'
    """
    names = ", ".join([*TARGETS, "npu"])
    if target == "npu":
        vendor = vendor or DEFAULT_NPU_VENDOR
        require(vendor in NPU_VENDORS,
                f"unknown `vendor` {vendor!r} for target npu; choose one of {', '.join(NPU_VENDORS)}")
        return TARGETS[NPU_VENDORS[vendor]]
    require(target in TARGETS, f"unknown `target` {target!r}; choose one of {names} (see `edge-recover targets`)")
    if vendor is not None:
        expected = {v: k for k, v in NPU_VENDORS.items()}.get(target)
        require(vendor == expected,
                f"`vendor` {vendor!r} does not go with target {target!r}; use `--target npu --vendor {vendor}` "
                f"or drop --vendor")
    return TARGETS[target]

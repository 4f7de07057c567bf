"""Export as a list of passes over one graph, configured by one frozen `ExportOptions`.

A target's export is two tuples of passes, each `(state, options) -> state` (`PassList`):

    build (in memory; anything that can refuse the export refuses here, before a byte is written)
      quantize        the model's own integers, or quantized now (the adapter's way, or the target's blocks)
      adapter base    refuse an adapter for another base; merge mode folds it in and re-quantizes
      optimum graph   torch -> ONNX, text-generation-with-past (float MatMuls; tied transposes untied)
      matmulnbits     MatMul -> MatMulNBits with the QuantLinear integers, checked (rewrite.py)
      lora sidecar    LoRA nodes beside the MatMulNBits (sidecar mode; lora.py)
      fusions         GroupQueryAttention, skip norms; float16 KV inside the attention (cpu; fusions.py)
      embedding       a tied embedding reads the quantized head's integers (embedding.py)
      packed qkv      q/k/v in one MatMulNBits, read packed by GroupQueryAttention (cpu; packed_qkv.py)
      attention scale GroupQueryAttention at scale 1, its 1/sqrt(d) in the query (cpu; attention_scale.py)
      [static preflight]  qnn only: blocks, shapes, SoC, onnxruntime-qnn (qnn.py)
      check graph     the target's validator (validate.py)
    write (inside `atomic_dir`: the package folder appears complete or not at all)
      write graph     model.onnx + model.onnx.data; torch gets back what verification needs
      hf files        config, tokenizer, genai_config.json
      kv dtype        int8: per-channel scales calibrated on the float32-KV graph (kv_cache.py)
      adapters        adapters/NAME.onnx_adapter and the manifest's adapter records
      verify          ORT CPU logits vs torch; the exact graph gates (verify.py)
      [static graphs] qnn only: prefill/decode static graphs (static_graph.STATIC_PASSES), verified on the HTP;
                      HTP vs CPU EP logits on real text gate the export (qnn.py)
      package         manifest.json, last: it records the size and sha256 of every file above

`pass_list(target)` picks the list: every target shares the dynamic passes; a target with `static_graphs`
(qnn) adds its two. The passes share one mutable `ExportState` (the model, the graph being rewritten, what
the manifest will say); the options never change during an export.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

from edge_recover.contract import DATA_FILE, MANIFEST, MODEL_FILE, PACKAGE_FORMAT_VERSION, PACKAGE_KIND, write_manifest  # noqa: F401
from edge_recover.errors import require
from edge_recover.layouts import layout_for
from edge_recover.models import LoadedModel
from edge_recover.options import DEFAULT_SCHEME, build_scheme, defaults
from edge_recover.versions import library_versions, tool_version

from . import adapter_export
from .targets import TargetProfile, resolve_target

__all__ = ["ExportOptions", "ExportState", "PassList", "pass_list", "LOW_MEMORY_BYTES"]

EXPORT_QUANTIZER = defaults("export")
# Above this many bytes of float weights in quantized layers, export through placeholders (rewrite.py).
LOW_MEMORY_BYTES = 2 << 30


@dataclass(frozen=True)
class ExportOptions:
    """Everything an export is told, in one frozen object (the CLI builds it once from its flags).

    `scheme` (+ `rules`, `--rule` strings) / `method` / `calibration` / `block_size` (one size, or per bit width as {2: 128} / "4:64,2:128")
    quantize a full-precision model (a quantized one keeps its integers); `fuse` None: as the target says;
    `low_memory` None: when the quantized layers' float weights exceed `LOW_MEMORY_BYTES`; `kv_dtype`
    float32 / float16 / int8 (fused graphs); `share_embedding`: a tied embedding reads the quantized head's
    integers, an untied one (with a quantized head) its own 8-bit table's;
    `pack_qkv`: q/k/v as one MatMulNBits (fused graphs); `unit_attention_scale`: GroupQueryAttention at
    scale 1 with the scale in the query (fused graphs; False keeps it in the node, for A/B runs); `adapter` (+ `adapter_mode` sidecar /
    merge, `adapter_name`, and for merge `merge_method`, `merge_calibration`, `eval_text`); `verify`: ORT vs torch parity gates the export; `static`
    (`static_options.StaticOptions`, qnn) the static graphs' shapes; `base`: the source model of a slim
    checkpoint whose recorded path is not on this machine.

    Example:
        >>> ExportOptions(target="cpu", scheme="w4", kv_dtype="float16").fused(resolve_target("cpu"))
        True
    """

    target: str = "cpu"
    vendor: str | None = None
    scheme: Any = DEFAULT_SCHEME  # a scheme name, JSON file or `Scheme`
    rules: tuple = ()  # extra `--rule PATTERN=BITS[:BLOCK][:sym]` strings on top of the scheme
    method: str = EXPORT_QUANTIZER.method  # the one definition's export defaults (sdk/options.py: mse, 16, and why)
    calibration: int = EXPORT_QUANTIZER.calibration
    block_size: "int | dict | str | None" = None
    fuse: bool | None = None
    low_memory: bool | None = None
    kv_dtype: str = "float32"
    share_embedding: bool = True
    pack_qkv: bool = True  # fused graphs: q/k/v in one MatMulNBits (packed_qkv.py)
    unit_attention_scale: bool = True  # fused graphs: the attention scale in the query (attention_scale.py)
    adapter: "str | Path | None" = None
    adapter_mode: str = "sidecar"
    adapter_name: str | None = None
    merge_method: str | None = None
    merge_calibration: int | None = None
    eval_text: str | None = None
    verify: bool = True
    static: Any = None  # static_options.StaticOptions | None
    base: Any = None  # str | Path | LoadedModel | None
    overwrite: bool = False

    def profile(self) -> TargetProfile:
        """The target profile these options name (`--target`, `--vendor`), checked against the options."""
        from edge_recover.quantizer import METHODS

        from .fusions import KV_DTYPES

        prof = resolve_target(self.target, self.vendor)
        require(self.method in METHODS, f"unknown `method` {self.method!r}; choose one of {', '.join(METHODS)}")
        require(self.kv_dtype in KV_DTYPES,
                f"unknown `kv_dtype` {self.kv_dtype!r}; choose one of {', '.join(KV_DTYPES)}")
        require(self.kv_dtype == "float32" or self.fused(prof),
                f"a {self.kv_dtype} KV cache needs the fused attention, which target {prof.name!r} does not use; "
                f"pass `--fuse` or `--kv-dtype float32`")
        from edge_recover.errors import EdgeRecoverError
        from edge_recover.scheme import parse_rule

        for r in self.rules:  # a bad `--rule` is refused before the model loads
            try:
                parse_rule(r)
            except EdgeRecoverError as exc:
                raise EdgeRecoverError(f"`--rule {r}`: {exc}") from None
        return prof

    def fused(self, prof: TargetProfile) -> bool:
        """Whether the graph gets the ORT fused ops: `fuse`, or the target's default."""
        return prof.fuse if self.fuse is None else bool(self.fuse)


@dataclass
class ExportState:
    """What the passes share: the model, the graph as it is rewritten, and what the manifest will record."""

    lm: LoadedModel
    target: TargetProfile
    plan: Any = None  # adapter_export.AdapterPlan | None
    caller_model: bool = False  # the caller passed a LoadedModel: it gets its float weights back
    started: float = field(default_factory=time.time)
    scheme: dict | None = None
    method: str = ""
    low_memory: bool = False
    graph: Any = None  # onnx.ModelProto while in memory
    placeholders: Any = None
    rewritten: dict = field(default_factory=dict)  # layer -> rewrite.RewrittenLayer
    fusions: list[str] = field(default_factory=list)
    share_embedding: bool = False  # the embedding reads integers: the head's (tied) or its own table's (untied)
    tied: bool = False
    why_float: str | None = None
    static: Any = None  # the resolved StaticOptions (qnn)
    folder: Path | None = None  # the package folder being written (inside atomic_dir)
    share_kv: bool = False
    exact: dict | None = None
    parity: dict | None = None
    reference: Any = None
    sections: dict = field(default_factory=dict)  # manifest fields later passes add


Pass = Callable[[ExportState, ExportOptions], ExportState]


# ─── build passes ─────────────────────────────────────────────────────────────────────────────────────

def quantize(state: ExportState, options: ExportOptions) -> ExportState:
    """Quantize the model unless it already is (an adapter's scheme first); decide the low-memory path."""
    from edge_recover.apply import quantized_layers
    from edge_recover.shared_head import unshare_quantized_head

    lm = state.lm
    quantized_as = adapter_export.quantize_for(lm, state.plan) if state.plan is not None else None
    state.scheme, state.method = quantized_as or _ensure_quantized(lm, state.target, options)
    unshare_quantized_head(lm.model)  # graph capture reads a float table of the head's values; `embedding` shares
    low = options.low_memory
    if low is None:
        low = sum(4 * q.in_features * q.out_features for q in quantized_layers(lm.model).values()) > LOW_MEMORY_BYTES
    state.low_memory = bool(low)
    if state.low_memory and state.plan is None:  # never all linears in fp32: rebuilt from the integers later
        from .rewrite import release_float_weights

        release_float_weights(lm.model)
    lm.model.float().eval()
    return state


def _ensure_quantized(lm: LoadedModel, target: TargetProfile, options: ExportOptions) -> tuple[dict, str]:
    """(scheme JSON, method) of `lm`, quantized in place under `options.scheme` unless it already has
    QuantLinear layers.

    Blocks: the scheme's stand-ins get the target's preferred block size (`Scheme.with_target_block_size`),
    then `options.block_size` overrides every block it names. So a scheme name is quantized at the target's
    block, a rule without BLOCK too; a JSON file keeps its blocks, and so does a `Scheme` object for the
    blocks someone chose (`load_scheme("w4w2gateup", ["lm_head=4:32"])`: lm_head at 32, the rest at 64 on
    the cpu target); only `options.block_size` changes those. `options.rules` come last: a rule's own BLOCK
    stays (`--block-size 4:64,2:128 --rule lm_head=4:32`: the head at 32)."""
    from edge_recover.apply import quantized_layers
    from edge_recover.pipeline import quantize_loaded

    if quantized_layers(lm.model):
        require(not options.rules, "`--rule` cannot change a quantized checkpoint's scheme; quantize it with that "
                                   "rule (`edge-recover quantize --rule ...`), or leave `--rule` out")
        qm = lm.quantized_manifest or {}
        return qm.get("scheme", {"name": "pre-quantized"}), qm.get("method", "unknown")
    # the one order of every command (sdk/options.py): a named scheme's float head becomes the target's (cpu:
    # 8-bit), --block-size, then the rules (a rule's own BLOCK stays), then the target's block for the rest
    sch = build_scheme(options.scheme, options.rules, options.block_size, head=target.head,
                       target_block_size=target.preferred_block_size)
    target.check_scheme(sch)  # refused before minutes of quantizing, not after
    report = quantize_loaded(lm, sch, method=options.method, calibration=options.calibration, progress=False)
    return report.scheme, options.method  # the scheme as applied: a fused family's gate/up rule spelled its way


def adapter_base(state: ExportState, options: ExportOptions) -> ExportState:
    """Bind the adapter to this base (refusing another one's); merge mode folds it in and re-quantizes."""
    if state.plan is not None:
        adapter_export.bind_base(state.lm, state.plan, state.scheme)
        if state.plan.mode == "merge":
            adapter_export.merge(state.lm, state.plan, options.merge_method, options.merge_calibration,
                                 options.eval_text)
    return state


def optimum_graph(state: ExportState, options: ExportOptions) -> ExportState:
    """torch -> ONNX through Optimum (text-generation-with-past), tied-weight transposes untied."""
    import onnx

    from .rewrite import low_memory_weights, untie_transposes

    # low memory: the float weights of quantized layers are shared placeholders while torch exports, and
    # stay freed (restore=False) until `write_graph` has written the graph
    swap = low_memory_weights(state.lm.model, False) if state.low_memory else contextlib.nullcontext()
    with tempfile.TemporaryDirectory(prefix="edge-recover-optimum-") as tmp, swap as placeholders:
        _optimum_export(state.lm.model, Path(tmp), post_process=not state.low_memory)
        state.graph = onnx.load(str(Path(tmp) / MODEL_FILE))  # external data (if any) is read in
    state.placeholders = placeholders
    untie_transposes(state.graph)
    return state


def _optimum_export(torch_model, out_dir: Path, post_process: bool = True) -> None:
    """torch -> ONNX through Optimum (task text-generation-with-past: a graph with a KV cache).

    `post_process=False` skips Optimum's tied-weight deduplication, which loads the whole ONNX model into one
    protobuf (2 GB limit) and would take the low-memory placeholders for tied weights; torch's exporter has
    already stored each shared tensor once (Identity nodes, which rewrite.py follows)."""
    import logging
    import warnings

    from optimum.exporters.onnx import onnx_export_from_model

    logging.getLogger("optimum").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        onnx_export_from_model(torch_model, out_dir, task="text-generation-with-past", do_validation=False,
                               no_post_process=not post_process)


#   X ─► MatMul(W float [K, N])   ─►   X ─► MatMulNBits(codes, scales, zero points; the QuantLinear's own)
def matmulnbits(state: ExportState, options: ExportOptions) -> ExportState:
    """Each quantized layer's MatMul -> MatMulNBits with its QuantLinear integers (weights checked equal)."""
    from edge_recover.apply import quantized_layers

    from .matmulnbits import IR_VERSION
    from .rewrite import replace_matmuls

    layers = {name: q.quantized() for name, q in quantized_layers(state.lm.model).items()}
    rewritten = replace_matmuls(state.graph, layers, state.target, state.placeholders)
    state.rewritten = {r.name: r for r in rewritten}
    state.placeholders = None
    state.graph.ir_version = IR_VERSION
    return state


#   X ─► MatMulNBits ─► Add ─► Y,  X ─► MatMul(lora_A) ─► MatMul(lora_B, scaled) ─┘   (lora.py)
def lora_sidecar(state: ExportState, options: ExportOptions) -> ExportState:
    """Side-car mode: the adapter's LoRA path beside its layers' MatMulNBits, weights as graph inputs."""
    if state.plan is not None and state.plan.sidecar is not None:
        state.plan.sidecar.apply(state.graph, state.rewritten)
    return state


def fusions(state: ExportState, options: ExportOptions) -> ExportState:
    """The ORT fused ops (GroupQueryAttention, skip norms) when the target fuses; a float16 KV lives here."""
    from .fusions import apply_fusions

    if options.fused(state.target):
        state.fusions = apply_fusions(state.graph, state.lm.model, options.kv_dtype)
    return state


def embedding(state: ExportState, options: ExportOptions) -> ExportState:
    """The embedding reads integers, not a float table, when it can: the quantized head's (tied) or its own 8-bit ones."""
    from edge_recover.shared_head import quantizes_table, shares, table_quantization

    from . import embedding as emb

    model = state.lm.model
    state.tied = bool(getattr(model.config, "tie_word_embeddings", False))
    state.why_float = ("kept with an adapter" if state.plan is not None else None) or \
        (shares(model) if state.tied else quantizes_table(model))
    state.share_embedding = options.share_embedding and state.why_float is None
    lower = "contrib" if options.fused(state.target) else "ops"  # unfused targets (NPUs) have no GatherBlockQuantized
    if state.share_embedding and state.tied:
        head = state.rewritten[emb.HEAD]
        state.fusions.append(emb.share_head_integers(state.graph, head, emb.head_zero_points(state.graph, head), lower,
                                                     embedding=layout_for(model.config).embedding))
    elif state.share_embedding:
        state.fusions.append(emb.own_table_integers(state.graph, table_quantization(model), lower,
                                                    embedding=layout_for(model.config).embedding))
    return state


#   x ─► q_proj, k_proj, v_proj ─► GQA   =>   x ─► qkv_proj (the three layers' integers, stacked) ─► GQA
def packed_qkv(state: ExportState, options: ExportOptions) -> ExportState:
    """Fused graphs: each layer's q/k/v MatMulNBits as one node read packed by GroupQueryAttention."""
    from .packed_qkv import pack_qkv

    if options.pack_qkv and options.fused(state.target) and state.plan is None:  # an adapter names its layers' nodes
        n = pack_qkv(state.graph, state.rewritten)
        if n:
            state.fusions.append(f"packed QKV MatMulNBits x{n}")
    return state


def attention_scale(state: ExportState, options: ExportOptions) -> ExportState:
    """Fused graphs: GroupQueryAttention at scale 1, the scale in the query (the copy-free decode scores)."""
    from .attention_scale import unit_attention_scale

    if options.unit_attention_scale and options.fused(state.target):
        n = unit_attention_scale(state.graph)
        if n:
            state.fusions.append(f"attention scale in the query x{n}")
    return state


def static_preflight(state: ExportState, options: ExportOptions) -> ExportState:
    """qnn: refuse blocks, shapes or a SoC the HTP cannot take; resolve the static shapes' defaults."""
    from .qnn import preflight

    state.static = preflight(state.rewritten, state.target.name, options.static, state.lm.model.config)
    return state


def check_graph(state: ExportState, options: ExportOptions) -> ExportState:
    """The target's validator: every node, MatMulNBits attribute and quantized layer as the target takes it."""
    from .validate import validate_or_raise

    validate_or_raise(state.graph, state.target, state.rewritten)
    return state


# ─── write passes (state.folder is the package folder inside atomic_dir) ──────────────────────────────

def write_graph(state: ExportState, options: ExportOptions) -> ExportState:
    """model.onnx + model.onnx.data; torch gets back the float weights and embedding verification needs."""
    from .fusions import kv_share_buffer

    save_graph(state.graph, state.folder)
    state.share_kv = kv_share_buffer(state.graph.graph)  # fused attention: onnxruntime-genai may share past/present
    state.graph = None
    if state.low_memory and (options.verify or state.caller_model):
        from .rewrite import restore_float_weights

        restore_float_weights(state.lm.model)
    if state.share_embedding:  # torch then computes what the package does: the embedding reads the integers
        from edge_recover.shared_head import share_quantized_head

        share_quantized_head(state.lm.model)
    return state


def save_graph(graph, folder: Path) -> None:
    """model.onnx (graph) + model.onnx.data (all initializers above 1 KiB)."""
    import onnx

    onnx.save_model(graph, str(folder / MODEL_FILE), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=DATA_FILE, size_threshold=1024)
    if (folder / DATA_FILE).exists():  # onnx creates it owner-only; a package is shared like its model.onnx
        shutil.copymode(folder / MODEL_FILE, folder / DATA_FILE)


def hf_files(state: ExportState, options: ExportOptions) -> ExportState:
    """config.json, generation_config.json, the tokenizer, and genai_config.json for onnxruntime-genai."""
    from .genai import genai_config

    lm, folder = state.lm, state.folder
    lm.model.config.save_pretrained(folder)
    if getattr(lm.model, "generation_config", None) is not None:
        lm.model.generation_config.save_pretrained(folder)
    if lm.tokenizer is not None:
        lm.tokenizer.save_pretrained(folder)
    config = genai_config(lm.model.config, lm.tokenizer, state.target.provider, share_buffer=state.share_kv)
    (folder / "genai_config.json").write_text(json.dumps(config, indent=2))
    return state


def kv_dtype(state: ExportState, options: ExportOptions) -> ExportState:
    """int8: the exact-graph gate on the float32-KV graph, then per-channel scales calibrated and applied."""
    if options.kv_dtype != "int8":
        return state  # float16 was written by the fused attention (`fusions`)
    from . import kv_cache

    model_file = state.folder / MODEL_FILE
    if options.verify:
        from .verify import exact_parity

        state.exact = exact_parity(model_file, _reference(state), state.lm.tokenizer, state.target.accuracy_level)
    cfg = state.lm.model.config
    scales = kv_cache.calibrate(model_file, state.lm.tokenizer, cfg.vocab_size, cfg.max_position_embeddings)
    kv_cache.convert_file(model_file, scales)
    state.fusions.append(f"int8 KV cache (per-channel scales from {scales.tokens} calibration positions)")
    return state


def adapters(state: ExportState, options: ExportOptions) -> ExportState:
    """Side-car: adapters/NAME.onnx_adapter; either mode: the manifest's adapter records."""
    if state.plan is not None:
        state.sections["adapters"] = adapter_export.write(state.plan, state.folder)
    return state


def verify(state: ExportState, options: ExportOptions) -> ExportState:
    """ORT CPU logits vs torch (with the adapter, or merged); the exact graph's top-1 gates the export."""
    if not options.verify:
        return state
    from .verify import verify_package

    parity = verify_package(state.folder / MODEL_FILE, _reference(state), state.lm.tokenizer,
                            state.target.accuracy_level, exact=state.exact)
    ex = parity["exact"]
    require(parity["ok"], f"verification failed: ONNX Runtime (exact dequantization) and torch agree on "
                          f"top-1 for only {ex['top1_agreement']:.1%} of positions (< {ex['threshold']:.0%}, "
                          f"max abs diff {ex['max_abs_diff']:.3g}); pass --no-verify to keep the package anyway")
    state.parity = parity
    return state


def _reference(state: ExportState):
    """The torch model the package must equal (PEFT on the base for a side-car adapter), made once."""
    if state.reference is None:
        state.reference = adapter_export.reference(state.lm, state.plan) if state.plan is not None else state.lm.model
    return state.reference


def static_graphs(state: ExportState, options: ExportOptions) -> ExportState:
    """qnn: static prefill/decode graphs, verified on the HTP (parity on real text gates it), EPContext."""
    from .qnn import export_static, parity_tokens

    opts = state.static if options.verify else replace(state.static, tolerance=None)
    tokens = parity_tokens(state.lm.tokenizer, opts.window)
    section = export_static(state.folder, opts, tokens)
    state.sections["static"] = {"static": section}
    _static_genai_config(state.folder, section, opts)
    return state


def _static_genai_config(folder, section: dict, opts) -> None:
    """genai_config.json as onnxruntime-genai's decoder pipeline over the EPContext models (the portable graphs
    when none were compiled), with the QNN HTP provider options of the package's SoC on each stage."""
    from edge_recover.qnn import resolve_soc

    from .genai import static_pipeline_config
    from .qnn import CONTEXT_FILES
    from .static_options import GRAPH_FILES

    soc = resolve_soc(opts.soc)
    files = CONTEXT_FILES if opts.compile_contexts else GRAPH_FILES
    qnn = {"qnn": {"backend_path": "libQnnHtp.so", "enable_htp_fp16_precision": "1", "htp_performance_mode": "burst",
                   "soc_model": str(soc.soc_model), "htp_arch": str(soc.htp_arch)}}
    path = Path(folder) / "genai_config.json"
    config = static_pipeline_config(json.loads(path.read_text()), section, files, qnn)
    path.write_text(json.dumps(config, indent=2))


def package(state: ExportState, options: ExportOptions) -> ExportState:
    """manifest.json, written last: it records the size and sha256 of every file the passes wrote."""
    manifest = _manifest(state, options)
    manifest.update(state.sections.get("static", {}))
    prof = state.target
    if not prof.static_graphs and prof.name in ("vitisai", "openvino"):  # NPU targets no check here covers
        manifest["npu_verification"] = (
            f"not verified on an NPU: target {prof.name} ({prof.provider}) cannot run on this machine and its "
            f"graph keeps dynamic shapes; only the CPU parity above was checked (`--target qnn` is verified "
            f"on the QNN HTP)")
    manifest["embedding"] = (("lm_head integers" if state.tied else "own 8-bit table") if state.share_embedding else
                             f"float32 ({state.why_float or 'share_embedding=False'})")
    manifest.update(state.sections.get("adapters", {}))
    write_manifest(state.folder, manifest)
    return state


def _manifest(state: ExportState, options: ExportOptions) -> dict:
    lm, prof, rewritten = state.lm, state.target, state.rewritten
    containers = [n for n, r in rewritten.items() if r.storage_bits != r.bits]
    return {
        "kind": PACKAGE_KIND,
        "format_version": PACKAGE_FORMAT_VERSION,
        "model_file": MODEL_FILE,
        "architecture": lm.model.config.model_type,
        "scheme": state.scheme,
        "method": state.method,
        "target": prof.to_json(),
        "layers": {n: r.to_json() for n, r in rewritten.items()},
        "containers": {
            "layers": len(containers),
            "note": (f"{len(containers)} 2-bit layers stored in 4-bit containers (same codes, scales and zero "
                     f"points: identical numerics, twice the weight bytes) because {prof.name} has no 2-bit kernel")
            if containers else "none",
        },
        "fusions": state.fusions,
        "kv_dtype": options.kv_dtype,
        "source": lm.source,
        "source_hash": lm.source_hash,
        "tool_version": tool_version(),
        "versions": library_versions(),
        "parity": state.parity,
        "adapters": [],
        "export_seconds": round(time.time() - state.started, 1),
    }


# ─── the lists ────────────────────────────────────────────────────────────────────────────────────────

@dataclass(frozen=True)
class PassList:
    """One target's export: `build` passes (in memory), then `write` passes (inside the package folder)."""

    build: tuple[Pass, ...]
    write: tuple[Pass, ...]

    def names(self) -> list[str]:
        """The pass names in order, e.g. ['quantize', ..., 'package']."""
        return [p.__name__ for p in self.build + self.write]


DYNAMIC = PassList(
    build=(quantize, adapter_base, optimum_graph, matmulnbits, lora_sidecar, fusions, embedding, packed_qkv,
           attention_scale,
           check_graph),
    write=(write_graph, hf_files, kv_dtype, adapters, verify, package),
)
# qnn: the dynamic graph is verified as above, then the static graphs of static_graph.py are built from it
STATIC = PassList(
    build=DYNAMIC.build[:-1] + (static_preflight, check_graph),
    write=DYNAMIC.write[:-1] + (static_graphs, package),
)


def pass_list(target: TargetProfile) -> PassList:
    """The passes that export for `target`: the dynamic list, or the static-NPU list (`static_graphs`).

    Example:
        >>> pass_list(resolve_target("qnn")).names()[-2:]
        ['static_graphs', 'package']
    """
    return STATIC if target.static_graphs else DYNAMIC

"""The qnn target's last passes: static graphs -> verified on the HTP -> EPContext binaries for one SoC.

    package folder with the dynamic model.onnx (+ model.onnx.data), already verified against torch
      └─ static_graph: prefill.onnx (window W) and decode.onnx (one token), weights shared in model.onnx.data
      └─ on the HTP (onnxruntime-qnn, CPU fallback disabled): each graph compiles whole, or the export fails
         naming the nodes QNN refused; one profiled run counts kernels per execution provider
      └─ parity on the HTP vs the same static graph on the CPU EP, on real text (`PARITY_TEXT`, tokenized by
         the model's tokenizer): a prefill window, then a decode step over the cache that window filled,
         compared on the real (unpadded) positions only; the gate (`HtpTolerance`: top-1 agreement and max abs
         diff relative to the logit scale, per graph) fails the export in one line, the package unwritten
      └─ EPContext (`ep.context_enable`): prefill_ctx.onnx / decode_ctx.onnx + their QNN context binaries,
         compiled for `--soc`; reloaded once to check that they load without the ONNX graph
    -> the manifest's "static" section: what was verified, on what, and how well

Two context binaries, each with every weight: QNN's weight sharing (one binary holding both graphs) compiles
here but the x86 HTP emulator cannot load it, so it cannot be verified (`SHARED_CONTEXT_NOTE`; docs/npu.md).

On x86 the HTP backend is Qualcomm's emulator: compile and step times measured here are emulator times.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from edge_recover.contract import STATIC_CACHE, static_window
from edge_recover.errors import EdgeRecoverError, require
from edge_recover.qnn import QNN_EP, open_htp_session, placement, resolve_soc

from .static_graph import static_graph, write_static_graphs
from .static_options import GRAPH_FILES, HtpTolerance, StaticOptions

__all__ = ["check_layers", "preflight", "export_static", "default_static", "parity_tokens", "check_parity",
           "PARITY_TEXT", "CONTEXT_FILES", "MAX_CONTEXT", "SHARED_CONTEXT_NOTE"]

CONTEXT_FILES = {"prefill": "prefill_ctx.onnx", "decode": "decode_ctx.onnx"}
# The longest context the export accepts for the HTP: Qualcomm's published on-device LLM contexts go to
# 4,096 tokens; longer ones are not refused by QNN itself but have not been tried here.
MAX_CONTEXT = 4096

# Why the package holds two context binaries (probed on onnxruntime-qnn 2.7.0 / QNN 2.51, docs/npu.md "One
# context binary"): with `ep.share_ep_contexts=1` on both compiling sessions (`ep.stop_share_ep_contexts=1` on
# the last, embed mode 0) QNN writes one binary with both graphs and the weights once (SmolLM2: 128.6 MB
# against 126.7 + 125.8), but creating any session from it crashes the x86 emulator inside libQnnHtp.so
# (segmentation fault in contextCreateFromBinary), whatever the order, options or SoC; onnxruntime-qnn's own
# tests load such binaries on ARM64 devices only. A binary the export cannot run is not shipped.
SHARED_CONTEXT_NOTE = ("each binary holds every weight: QNN weight sharing (one binary for both graphs, "
                       "ep.share_ep_contexts) compiles on x86, but the x86 HTP emulator of onnxruntime-qnn 2.7.0 "
                       "crashes loading it (segmentation fault in contextCreateFromBinary), so it cannot be "
                       "verified here and is not shipped (docs/npu.md, 'One context binary')")

# The text the HTP parity gate runs: plain English prose, shipped here so that the export needs no network,
# no cache and no user input (held-out corpora such as `fetch.eval_text` need one of them). Random token ids
# are no substitute: they drive a real model's residual stream far outside what text does (SmolLM2's
# prefill window of random ids was 15.8 off at logit scale 29.5 where text is 1.5 off, docs/npu.md).
# 156 words (roughly 170-190 tokens for a GPT-2-style BPE, estimated): the default window (64) and a decode
# step fit with room; a longer window is padded after the text (and only the real positions are compared).
PARITY_TEXT = (
    "The river rises in the hills to the north of the town and runs south through farmland for most of its "
    "length. In spring, when the snow melts, the water comes up quickly and the low fields along its banks are "
    "often flooded for a week or two. The farmers who work there have learned to plant late and to keep their "
    "animals on higher ground until the level falls again. A stone bridge, built more than two hundred years "
    "ago, still carries the main road across the river, although heavy lorries now have to use the newer "
    "crossing a mile downstream. On summer evenings people walk along the path beside the water, and children "
    "fish from the old wooden jetty near the mill. The mill itself stopped working long ago, but its wheel has "
    "been repaired, and on market days it turns once more for the visitors who come to see how flour was made."
)


def check_layers(rewritten: dict, target_name: str) -> None:
    """Refuse layers the HTP's MatMulNBits cannot take: measured on the emulator, K must be a whole number
    of blocks ("K must be divisible by block_size"), bits 2/4 (targets.py checks the bits)."""
    for name, r in rewritten.items():
        k, bs = int(r.shape[1]), int(r.block_size)
        require(k % bs == 0, f"layer {name!r} has K = {k} inputs, not a whole number of {bs}-blocks, which the "
                             f"QNN HTP refuses (target {target_name!r}); pass `--block-size` with a divisor of "
                             f"{k} (e.g. 32) or another `--target`")


def _feeds(session, c: int, w: int, tokens: np.ndarray, past: dict | None = None, start: int = 0) -> dict:
    """Inputs of a static step (sdk/contract.py's `static_window`): `tokens` at positions start.., padded
    at the front; `past` the cache buffers (zeros when None)."""
    ids, pos = static_window(tokens, start, w)
    feeds = {"input_ids": ids, "position_ids": pos}
    for i in session.get_inputs():
        if i.name.startswith("past_key_values."):
            feeds[i.name] = past[i.name] if past else np.zeros(i.shape, np.float32)
    return feeds


def _logits_index(session) -> int:
    return [o.name for o in session.get_outputs()].index("logits")


def _compare(cpu: np.ndarray, htp: np.ndarray) -> dict:
    """HTP vs CPU EP logits [positions, V] (real positions only): the figures the parity gate reads.

    `top1_or_fp16_tie` (what the gate reads) also counts a position whose HTP token is, on the CPU EP, within
    one fp16 step (at the logit scale) of the CPU's top logit: a tie that fp16 logits cannot order, not a
    disagreement (a random tiny Qwen3's decode step: top two 3.9e-5 apart, fp16 step 0.002, HTP off by 0.008)."""
    diff, scale = float(np.abs(cpu - htp).max()), float(np.abs(cpu).max())
    top_cpu, top_htp = cpu.argmax(-1), htp.argmax(-1)
    step = float(np.spacing(np.float16(min(scale, 65504.0))))
    tie = cpu.max(-1) - np.take_along_axis(cpu, top_htp[:, None], -1)[:, 0] <= step
    return {"positions": int(cpu.shape[0]), "max_abs_diff": diff, "logit_scale": scale,
            "rel_max_abs_diff": diff / max(scale, 1e-12),
            "top1_agreement": float((top_cpu == top_htp).mean()),
            "top1_or_fp16_tie": float(((top_cpu == top_htp) | tie).mean())}


def parity_tokens(tokenizer, window: int, text: str = PARITY_TEXT) -> np.ndarray:
    """The token ids the parity check runs: `text` as the runtime encodes a prompt (no special tokens), at
    most `window` for the prefill window and one more for the decode step.

    Example:
        >>> parity_tokens(AutoTokenizer.from_pretrained("out/hf"), 16).shape  # doctest: +SKIP
        (17,)
    """
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])[:window + 1]
    require(len(ids) >= 2, f"internal: the parity text tokenizes to {len(ids)} token(s); need 2 or more")
    return np.asarray(ids, np.int64)


def check_parity(parity: dict[str, dict], tol: HtpTolerance) -> None:
    """Fail (one line naming each graph off, its figures, the tolerance and the fix) unless every graph's HTP
    logits are within `tol` of the CPU EP's.

    Example:
        >>> check_parity({"decode": {"positions": 1, "top1_agreement": 1.0, "max_abs_diff": 0.3,
        ...               "logit_scale": 20.0, "rel_max_abs_diff": 0.015}}, HtpTolerance())
    """
    def top1(p: dict) -> float:  # ties within one fp16 step count as agreement (`_compare`)
        return p.get("top1_or_fp16_tie", p["top1_agreement"])

    off = [(role, p) for role, p in parity.items()
           if top1(p) < tol.min_top1 or p["rel_max_abs_diff"] > tol.max_rel_diff]
    if not off:
        return
    figures = "; ".join(f"{role} graph: top-1 agreement {top1(p) * 100:.1f} % over {p['positions']} "
                        f"real position(s), max abs diff {p['max_abs_diff']:.3g} = {p['rel_max_abs_diff']:.3g} x "
                        f"the logit scale {p['logit_scale']:.3g}" for role, p in off)
    raise EdgeRecoverError(
        f"the QNN HTP's logits disagree with the CPU EP's on the same static graph ({figures}); tolerance: top-1 "
        f">= {tol.min_top1 * 100:g} %, max abs diff <= {tol.max_rel_diff:g} x the logit scale "
        f"(`--htp-tolerance {tol.flag()}`); nothing was written. Unless the tolerance was set too tight, the HTP's "
        f"fp16 numerics are the problem for this model (docs/npu.md, 'The parity gate'); to keep the package "
        f"anyway, relax `--htp-tolerance TOP1,REL` or pass --no-verify")


def export_static(folder: Path, opts: StaticOptions, tokens, log=lambda s: None) -> dict:
    """Write the static graphs (and, with `opts.compile_contexts`, EPContext models) into the package
    `folder` and verify them on the QNN HTP; returns the manifest's "static" section.

    `tokens` (`parity_tokens`): real text, at most `opts.window` of it for the prefill window (padded when
    shorter) and the next token for the decode step. With `opts.tolerance` set, HTP logits outside it on
    either graph raise `EdgeRecoverError` before the EPContext models are checked."""
    import onnxruntime as ort

    import onnxruntime_qnn

    soc = resolve_soc(opts.soc)
    folder = Path(folder)
    t0 = time.time()
    windows = {"prefill": opts.window, "decode": 1}
    graphs = {role: static_graph(folder / "model.onnx", opts, w) for role, w in windows.items()}
    nodes = {role: len(g.graph.node) for role, g in graphs.items()}
    sharing = write_static_graphs(graphs, folder)
    del graphs
    build_s = time.time() - t0
    c = opts.context_length
    tokens = np.asarray(tokens, np.int64)
    n = min(opts.window, len(tokens) - 1)  # real positions of the prefill window; tokens[n] is the decode step's
    require(n >= 1, "internal: the parity check needs 2 or more tokens")
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC  # as the runtime: no fusions
    cpu = {r: ort.InferenceSession(str(folder / f), so, providers=["CPUExecutionProvider"])
           for r, f in GRAPH_FILES.items()}
    section = {"context_length": c, "window": opts.window, "mask_value": opts.mask_value, "cache": STATIC_CACHE,
               "graphs": {r: {"file": f, "window": windows[r], "nodes": nodes[r]} for r, f in GRAPH_FILES.items()},
               "data_file": "model.onnx.data", "weights_shared": sharing, "build_seconds": round(build_s, 2)}
    verified = {"provider": QNN_EP, "backend": "QNN HTP (libQnnHtp.so; on x86 Qualcomm's emulator of the NPU)",
                "onnxruntime_qnn": getattr(onnxruntime_qnn, "__version__", "?"),
                "soc": {"name": soc.name, "marketing": soc.marketing, "soc_model": soc.soc_model,
                        "htp_arch": soc.htp_arch},
                "cpu_fallback": "disabled (session.disable_cpu_ep_fallback=1)", "graphs": {}}
    with tempfile.TemporaryDirectory(prefix="edge-recover-qnn-") as tmp:
        sessions = {}
        for role, w in windows.items():
            config = ({"ep.context_enable": "1", "ep.context_file_path": str(folder / CONTEXT_FILES[role]),
                       "ep.context_embed_mode": "0"} if opts.compile_contexts else {})
            ts = time.time()
            sessions[role] = open_htp_session(folder / GRAPH_FILES[role], soc, session_config=config,
                                              profile_prefix=str(Path(tmp) / role))
            compile_s = time.time() - ts
            log(f"{role}: compiled on the HTP in {compile_s:.1f} s (emulator)")
            verified["graphs"][role] = {"compile_seconds": round(compile_s, 2)}
        pre = _feeds(cpu["prefill"], c, opts.window, tokens[:n])
        ts = time.time()
        place, htp = {}, {}
        place["prefill"], out = placement(sessions["prefill"], pre)
        htp["prefill"] = out[_logits_index(sessions["prefill"])][0]
        step_s = {"prefill": time.time() - ts}
        ref_pre = cpu["prefill"].run(None, pre)
        names = [o.name for o in cpu["prefill"].get_outputs()]
        past = {"past_key_values." + name[len("present."):]: value  # the cache the window filled (slots [0, n))
                for name, value in zip(names, ref_pre) if name.startswith("present.")}
        dec = _feeds(cpu["decode"], c, 1, tokens[n:n + 1], past, start=n)
        ts = time.time()
        place["decode"], out = placement(sessions["decode"], dec)
        htp["decode"] = out[_logits_index(sessions["decode"])][0]
        step_s["decode"] = time.time() - ts
        ref = {"prefill": ref_pre[_logits_index(cpu["prefill"])][0],
               "decode": cpu["decode"].run(["logits"], dec)[0][0]}
        real = {"prefill": slice(opts.window - n, opts.window), "decode": slice(0, 1)}  # padding not compared
        parity = {role: _compare(ref[role][real[role]], htp[role][real[role]]) for role in windows}
        for role in windows:
            share = place[role]["npu_share"]
            require(share == 1.0, f"internal: {role} graph ran {1 - share:.0%} of its kernels outside QNN "
                                  f"({place[role]['kernels']})")
            verified["graphs"][role].update(place[role], nodes_on_npu=nodes[role], graph_nodes=nodes[role],
                                            emulator_step_seconds=round(step_s[role], 3),
                                            parity_vs_cpu=parity[role])
        verified["nodes_on_npu_pct"] = 100.0
        tol = opts.tolerance
        verified["parity_gate"] = {
            "text": "PARITY_TEXT (exporters/qnn.py; English prose)", "tokens": n + 1,
            "real_positions": {"prefill": n, "decode": 1},
            **({"min_top1": tol.min_top1, "max_rel_diff": tol.max_rel_diff, "passed": True} if tol else
               {"passed": None, "note": "not applied (--no-verify): figures recorded only"})}
        if tol is not None:
            check_parity(parity, tol)
        if opts.compile_contexts:
            del sessions
            verified["contexts"] = _check_contexts(folder, soc, {"prefill": pre, "decode": dec}, htp)
            verified["context_binaries"] = _binaries_summary(verified["contexts"])
    section["verified"] = verified
    return section


def _check_contexts(folder: Path, soc, feeds: dict, expected: dict) -> dict:
    """Reload each EPContext model (no ONNX operators left to compile) and check it computes the same."""
    import onnx

    out = {}
    for role, name in CONTEXT_FILES.items():
        path = folder / name
        require(path.is_file(), f"internal: QNN wrote no EPContext model {name}")
        m = onnx.load(str(path), load_external_data=False)
        ops = sorted({n.op_type for n in m.graph.node})
        require(ops == ["EPContext"], f"internal: {name} holds {ops}, not only EPContext nodes")
        bins = sorted({a.s.decode() for n in m.graph.node for a in n.attribute if a.name == "ep_cache_context"})
        ts = time.time()
        session = open_htp_session(path, soc)
        load_s = time.time() - ts
        got = session.run(["logits"], feeds[role])[0][0]
        out[role] = {"file": name, "binaries": bins,
                     "binary_bytes": sum((folder / b).stat().st_size for b in bins if (folder / b).is_file()),
                     "load_seconds": round(load_s, 3),
                     "max_abs_diff_vs_compiled": float(np.abs(got - expected[role]).max())}
    return out


def _binaries_summary(contexts: dict) -> dict:
    """What the two context binaries cost: their bytes, and at most how many one shared binary would save (the
    smaller binary: its weights are the larger one's; measured, the saving came within 2 % of it on SmolLM2)."""
    sizes = {role: ctx["binary_bytes"] for role, ctx in contexts.items()}
    return {"count": len({b for ctx in contexts.values() for b in ctx["binaries"]}), "bytes": sum(sizes.values()),
            "weights_shared": False, "duplicate_bytes_at_most": min(sizes.values()), "why": SHARED_CONTEXT_NOTE}


def preflight(rewritten: dict, target_name: str, opts: "StaticOptions | None", config) -> StaticOptions:
    """Everything that can refuse a static export, checked before anything is written: the layers' blocks,
    the shapes against the model and `MAX_CONTEXT`, the SoC name, and that onnxruntime-qnn loads."""
    from edge_recover.qnn import register_qnn

    check_layers(rewritten, target_name)
    default = default_static(config)
    opts = opts or default
    c = opts.context_length or default.context_length
    opts = replace(opts, context_length=c, window=opts.window or min(64, c))
    opts.check(int(config.max_position_embeddings))
    require(opts.context_length <= MAX_CONTEXT,
            f"`--context-length` {opts.context_length} exceeds {MAX_CONTEXT}, the longest the qnn target accepts; "
            f"pass at most {MAX_CONTEXT}")
    resolve_soc(opts.soc)
    register_qnn()
    return opts


def default_static(config) -> StaticOptions:
    """The default static shapes for a model: its context up to 256 positions, a window of up to 64 tokens."""
    c = min(int(config.max_position_embeddings), 256)
    return StaticOptions(context_length=c, window=min(64, c))

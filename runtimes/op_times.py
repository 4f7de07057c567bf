"""Where a package's decode time goes: ONNX Runtime's own profiler, summed per kind of node, per prompt length.

`edge-recover profile` says how fast a package decodes; this says why. One session with ONNX Runtime's
profiler on (`SessionOptions.enable_profiling`) runs, per prompt length, a seeded random prompt and
`new_tokens` greedy decode steps on the runtime's fast path (shared-buffer KV cache, last-position head);
the profile's node events are matched to the `model_run` they fall in, and each decode step's kernel time is
summed per kind: the op type, with MatMulNBits split by bit width (`MatMulNBits 2-bit`), since the 2-bit
and 4-bit kernels are the ones a mixed scheme trades between. `outside kernels` is the step's wall time
under the profiler less its kernels' (executor, allocation, thread hand-off).

    package ─► OrtCausalLM(profile) ─► warm-up ─► per length: prefill, N decode steps ─► profile JSON
        ─► node events by model_run ─► ms per decode token per kind ─► ops.json / ops.md / ops.png

The profiler costs a little per node, so absolute times run slower than `edge-recover profile`'s; the
split between kinds, and how it moves with the prompt length, is what to read.
"""

from __future__ import annotations

import json
import os
import platform
import tempfile
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np

from edge_recover.atomic import atomic_dir
from edge_recover.errors import EdgeRecoverError

from .session import OrtCausalLM

__all__ = ["op_times", "kinds_per_run", "render_markdown", "write_op_times"]

OUTSIDE = "outside kernels"


def _node_kinds(model_file: Path) -> dict[str, str]:
    """Node name -> kind (op type; MatMulNBits as `MatMulNBits {bits}-bit`) from the package graph."""
    import onnx

    kinds = {}
    for node in onnx.load(str(model_file), load_external_data=False).graph.node:
        kind = node.op_type
        if kind == "MatMulNBits":
            bits = next((a.i for a in node.attribute if a.name == "bits"), 4)
            kind = f"MatMulNBits {bits}-bit"
        kinds[node.name] = kind
    return kinds


def kinds_per_run(events: list[dict], kinds: dict[str, str]) -> list[dict[str, float]]:
    """Per `model_run` of an ONNX Runtime profile (in time order): kernel microseconds per kind, and the
    run's wall time as `total`.

    Example:
        >>> ev = [{"cat": "Session", "name": "model_run", "ts": 0, "dur": 10},
        ...       {"cat": "Node", "name": "a_kernel_time", "ts": 2, "dur": 6, "args": {"op_name": "Add"}}]
        >>> kinds_per_run(ev, {})
        [{'total': 10.0, 'Add': 6.0}]
    """
    runs = sorted((e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"),
                  key=lambda e: e["ts"])
    out: list[dict[str, float]] = [{"total": float(r["dur"])} for r in runs]
    starts = np.array([r["ts"] for r in runs], dtype=np.int64)
    for e in events:
        if e.get("cat") != "Node" or not str(e.get("name", "")).endswith("_kernel_time"):
            continue
        i = int(np.searchsorted(starts, e["ts"], side="right")) - 1
        if i < 0 or e["ts"] > runs[i]["ts"] + runs[i]["dur"]:
            continue  # a node outside every run (cannot happen in a well-formed profile)
        name = e["name"][: -len("_kernel_time")]
        kind = kinds.get(name) or e.get("args", {}).get("op_name", "?")
        out[i][kind] = out[i].get(kind, 0.0) + float(e["dur"])
    return out


def op_times(package: str | os.PathLike, prompt_lengths: Sequence[int] = (128, 512), new_tokens: int = 32,
             threads: Optional[int] = None, provider: str = "cpu", session_config: Optional[dict] = None,
             seed: int = 0, log: Callable[[str], None] = lambda s: None) -> dict:
    """Profile `package`'s decode per kind of node at each prompt length; a dict for `write_op_times`.

    Example:
        >>> data = op_times("out/demo/w4w2gateup", (128, 512), new_tokens=16)  # doctest: +SKIP
        >>> data["rows"][0]["ms_per_token"]["MatMulNBits 2-bit"]  # doctest: +SKIP
        1.9
    """
    if new_tokens < 2:
        raise EdgeRecoverError(f"`new_tokens` must be >= 2 (the first decode step is not counted), got {new_tokens}")
    lengths = [int(n) for n in prompt_lengths]
    if not lengths or min(lengths) < 1:
        raise EdgeRecoverError(f"`prompt_lengths` must be positive token counts, got {list(prompt_lengths)}")
    with tempfile.TemporaryDirectory(prefix="edge-recover-ops-") as tmp:
        lm = OrtCausalLM(package, provider=provider, threads=threads, session_config=session_config,
                         profile_prefix=str(Path(tmp) / "ort"))
        if max(lengths) + new_tokens > lm.context_length:
            raise EdgeRecoverError(f"a {max(lengths)}-token prompt and {new_tokens} new tokens exceed the package's "
                                   f"context of {lm.context_length}; lower --prompt-lengths or --new-tokens")
        rng = np.random.default_rng(seed)
        vocab = lm.package.vocab_size

        def run(length: int) -> int:
            """Prefill a random prompt, then decode; returns the model_run count it took."""
            before = lm.runs
            cache = lm.empty_cache(length + new_tokens)
            logits, cache = lm.prefill(rng.integers(0, vocab, size=(1, length)), cache)
            prefill_runs = lm.runs - before
            for _ in range(new_tokens):
                logits, cache = lm.step(np.array([[int(np.argmax(logits))]]), cache)
            return prefill_runs

        run(min(16, min(lengths)))  # warm-up: first-run allocations and thread pool start, not counted
        plan = []
        for length in lengths:
            log(f"profiling {length}-token prompt, {new_tokens} decode steps")
            start = lm.runs
            plan.append((length, start + run(length) + 1))  # skip the first decode step (it follows the prompt)
        end = lm.runs
        profile = lm.end_profiling()
        events = json.loads(Path(profile).read_text())
        stats = lm.package.stats
        describe = lm.describe()
        kinds = _node_kinds(lm.package.model_file)
    per_run = kinds_per_run(events, kinds)
    if len(per_run) != end:
        raise EdgeRecoverError(f"ONNX Runtime's profile holds {len(per_run)} runs where {end} were made; "
                               f"upgrade onnxruntime or report this")
    rows = []
    for length, first in plan:
        steps = per_run[first:first + new_tokens - 1]
        ms: dict[str, float] = {}
        for step in steps:
            for kind, us in step.items():
                ms[kind] = ms.get(kind, 0.0) + us / 1e3 / len(steps)
        total = ms.pop("total")
        ms[OUTSIDE] = max(0.0, total - sum(ms.values()))
        rows.append({"prompt_length": length, "decode_steps": len(steps), "ms_per_token_total": round(total, 4),
                     "ms_per_token": {k: round(v, 4) for k, v in sorted(ms.items(), key=lambda kv: -kv[1])}})
    return {"kind": "edge-recover-op-times", "package": str(package), "session": describe,
            "graph": {"layers": stats.num_layers, "matmulnbits_nodes": {str(b): n for b, n in sorted(stats.matmulnbits_bits.items())},
                      "weight_mb_per_token": round(stats.weight_bytes_per_token / 1e6, 1),
                      "kv_kb_per_position": round(stats.kv_bytes_per_position() / 1e3, 1)},
            "settings": {"prompt_lengths": lengths, "new_tokens": new_tokens, "threads": threads,
                         "provider": provider, "session_config": dict(session_config or {}), "seed": seed},
            "device": {"machine": platform.machine(), "processor": platform.processor(), "cpus": os.cpu_count()},
            "rows": rows}


def render_markdown(data: dict) -> str:
    """ops.md: ms per decode token per kind (rows) at each prompt length (columns), and each one's share."""
    rows = data["rows"]
    kinds = list(dict.fromkeys(k for r in rows for k in r["ms_per_token"]))
    head = " | ".join(f"{r['prompt_length']} tokens: ms (share)" for r in rows)
    lines = [f"# Decode time per kind of node: {data['package']}", "",
             f"{data['session']}; {data['settings']['new_tokens']} decode steps per prompt length (the first not "
             f"counted), under ONNX Runtime's profiler (absolute times run slower than without it).", "",
             f"| kind | {head} |", "| --- |" + " ---: |" * len(rows)]
    for kind in kinds:
        cells = [f"{r['ms_per_token'].get(kind, 0.0):.3f} ({100 * r['ms_per_token'].get(kind, 0.0) / r['ms_per_token_total']:.1f} %)"
                 for r in rows]
        lines.append(f"| {kind} | " + " | ".join(cells) + " |")
    lines.append("| **step wall time** | " + " | ".join(f"**{r['ms_per_token_total']:.3f}**" for r in rows) + " |")
    if len(rows) > 1:
        first, last = rows[0], rows[-1]
        grew = sorted(((last["ms_per_token"].get(k, 0.0) - first["ms_per_token"].get(k, 0.0), k) for k in kinds),
                      reverse=True)[:3]
        lines += ["", f"From {first['prompt_length']} to {last['prompt_length']} tokens the step grows by "
                  f"{last['ms_per_token_total'] - first['ms_per_token_total']:+.3f} ms; most of it: "
                  + ", ".join(f"{k} {d:+.3f} ms" for d, k in grew) + "."]
    return "\n".join(lines) + "\n"


def _plot(data: dict, path: Path) -> None:
    """ops.png: one stacked bar per prompt length, ms per decode token by kind (kinds under 1 % as one)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = data["rows"]
    kinds = list(dict.fromkeys(k for r in rows for k in r["ms_per_token"]))
    share = {k: max(r["ms_per_token"].get(k, 0.0) / r["ms_per_token_total"] for r in rows) for k in kinds}
    small = [k for k in kinds if share[k] < 0.01]  # under 1 % everywhere: one bar segment
    series = [(k, [r["ms_per_token"].get(k, 0.0) for r in rows]) for k in kinds if k not in small]
    if small:
        series.append((f"other ({len(small)} kinds)", [sum(r["ms_per_token"].get(k, 0.0) for k in small) for r in rows]))
    colors = plt.get_cmap("tab20").colors
    fig, ax = plt.subplots(figsize=(7, 4.5))
    x = np.arange(len(rows))
    bottom = np.zeros(len(rows))
    for i, (kind, values) in enumerate(series):
        v = np.array(values)
        ax.bar(x, v, 0.6, bottom=bottom, label=kind, color=colors[(2 * i) % 20 + (i // 10) % 2])
        bottom += v
    ax.set_xticks(x, [f"{r['prompt_length']} tokens" for r in rows])
    ax.set_ylabel("ms per decode token (under the profiler)")
    ax.set_title(Path(data["package"]).name, fontsize=10)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_op_times(data: dict, output: str | os.PathLike, overwrite: bool = False) -> Path:
    """ops.json, ops.md and ops.png into a new folder `output` (all or nothing)."""
    with atomic_dir(output, overwrite) as tmp:
        (tmp / "ops.json").write_text(json.dumps(data, indent=1))
        (tmp / "ops.md").write_text(render_markdown(data))
        _plot(data, tmp / "ops.png")
    return Path(output)

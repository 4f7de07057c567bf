"""The fields device labs compare, taken from a profile: llama-bench's and MLPerf Client's, as flat rows.

A lab sets results from several tools side by side, so each row of `lab_rows` holds what those tools report
under names a reader of either recognises:

    llama-bench   n_prompt, n_gen, n_threads, model_size (bytes), model_n_params, build (version + commit),
                  avg_ts / stddev_ts over repetitions, for prompt processing and text generation separately
    MLPerf Client time to first token (ttft_s) and the 2nd+ token rate (tokens after the first / their time)
    and ours      load time, peak resident memory, perplexity on held-out text when it was measured,
                  roofline share, the paired ratio to the run's first package

One row per (package, prompt length). `second_plus_tok_s` equals `decode_tok_s` by definition (our decode
steps start after the first token); it is there so an MLPerf reader finds the name. The rows go to
report.csv and report.jsonl (same keys, same order); report.json keeps everything.
"""

from __future__ import annotations

import statistics
import subprocess
from pathlib import Path
from typing import Optional

__all__ = ["LAB_FIELDS", "lab_rows", "parameter_count", "build_info", "rate_stats"]

LAB_FIELDS = (
    "package", "scheme", "engine", "provider", "n_prompt", "n_gen", "n_threads", "repetitions",
    "prefill_avg_ts", "prefill_stddev_ts", "decode_avg_ts", "decode_stddev_ts",
    "prefill_tok_s", "decode_tok_s", "ttft_s", "second_plus_tok_s", "latency_p50_s", "latency_p95_s",
    "decode_vs_first", "prefill_vs_first", "roofline_share",
    "model_size_bytes", "weight_bytes_per_token", "model_n_params", "load_s", "peak_rss_bytes",
    "perplexity", "perplexity_tokens",
    "cpu_model", "threads_used", "bandwidth_bytes_s",
    "build_version", "build_commit", "onnxruntime", "runtime", "created",
)


def rate_stats(values: list[float]) -> tuple[float, float]:
    """(mean, sample standard deviation) of tokens/s over repetitions, as llama-bench reports them
    (stddev 0 for a single repetition).

    Example:
        >>> rate_stats([100.0, 110.0, 90.0])
        (100.0, 10.0)
    """
    mean = statistics.fmean(values)
    return mean, (statistics.stdev(values) if len(values) > 1 else 0.0)


def parameter_count(model_file: str | Path) -> int:
    """The model's parameters as llama-bench counts them: every float weight tensor's elements, a MatMulNBits
    weight counted as its K x N logical elements (not its packed bytes, scales or zero points; a quantized
    embedding that reads the head's integers is not counted twice). Identical initializers stored once
    count once. Rotary
    cos/sin caches and integer constants are not parameters. Reads the graph without its external data.

    Example:
        >>> parameter_count("out/demo/w4w2gateup/model.onnx")  # doctest: +SKIP
        134515008
    """
    import onnx

    model = onnx.load(str(model_file), load_external_data=False)
    graph = model.graph
    quant_inputs: set[str] = set()
    total = 0
    gathers = []
    for node in graph.node:
        if node.op_type == "MatMulNBits":
            attrs = {a.name: a.i for a in node.attribute}
            quant_inputs.update(node.input[1:])  # B, scales, zero points, g_idx, bias
            total += attrs.get("K", 0) * attrs.get("N", 0)
        elif node.op_type == "GatherBlockQuantized":  # a quantized embedding: data, indices, scales, zero points
            quant_inputs.update(node.input[2:])
            gathers.append(node)
    inits = {i.name: i for i in graph.initializer}
    for node in gathers:  # its own table (not the head's integers, counted above): elements = bytes x 8 / bits
        data = node.input[0]
        if data not in quant_inputs and data in inits:
            bits = next((a.i for a in node.attribute if a.name == "bits"), 4)
            n = 1
            for d in inits[data].dims:
                n *= d
            total += n * 8 // bits
            quant_inputs.add(data)
    floats = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16, onnx.TensorProto.DOUBLE}
    for init in graph.initializer:
        if init.name in quant_inputs or init.data_type not in floats:
            continue
        if "cos_cache" in init.name or "sin_cache" in init.name:
            continue
        n = 1
        for d in init.dims:
            n *= d
        if n > 1:
            total += n
    return total


def _git_commit(folder: Path) -> tuple[Optional[str], Optional[bool]]:
    """(commit, dirty) of the git checkout holding `folder`, or (None, None) when it is not one."""
    try:
        head = subprocess.run(["git", "-C", str(folder), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=10)
        if head.returncode != 0:
            return None, None
        dirty = subprocess.run(["git", "-C", str(folder), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10)
        return head.stdout.strip(), bool(dirty.stdout.strip()) if dirty.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None, None


def build_info() -> dict:
    """What built the numbers: edge-recover's version and git commit (when it runs from a checkout),
    onnxruntime's and onnxruntime-genai's versions (None when not installed).

    Example:
        >>> sorted(build_info())
        ['edge_recover', 'git_commit', 'git_dirty', 'onnxruntime', 'onnxruntime_genai']
    """
    from importlib import metadata

    import edge_recover
    from edge_recover.versions import tool_version

    def version(name: str) -> Optional[str]:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return None

    commit, dirty = _git_commit(Path(edge_recover.__file__).resolve().parent)
    return {"edge_recover": tool_version(), "git_commit": commit, "git_dirty": dirty,
            "onnxruntime": version("onnxruntime"), "onnxruntime_genai": version("onnxruntime-genai")}


def _runtime(pkg: dict) -> str:
    rt = pkg.get("runtime") or {}
    return " ".join(f"{k} {v}" for k, v in rt.items())


def lab_rows(data: dict) -> list[dict]:
    """One flat dict per (package, prompt length) of a profile report, keys in `LAB_FIELDS` order. Older
    reports lack some fields; those cells are None.

    Example:
        >>> rows = lab_rows(json.load(open("out/profile/report.json")))  # doctest: +SKIP
        >>> rows[0]["decode_avg_ts"], rows[0]["decode_stddev_ts"]  # doctest: +SKIP
        (151.2, 4.1)
    """
    packages = {p["label"]: p for p in data["packages"]}
    build = data.get("build") or {}
    dev, st = data["device"], data["settings"]
    rows = []
    for r in data["results"]:
        p = packages[r["package"]]
        runs = r.get("runs") or []
        pre = rate_stats([r["prompt_length"] / x["prefill_s"] for x in runs]) if runs else (None, None)
        dec = rate_stats([x["decode_tok_s"] for x in runs]) if runs else (None, None)
        ppl = p.get("perplexity") or {}
        commit = build.get("git_commit")
        row = {
            "package": r["package"], "scheme": p.get("scheme"), "engine": p.get("engine", "ort"),
            "provider": p.get("provider", st.get("provider")), "n_prompt": r["prompt_length"],
            "n_gen": r.get("new_tokens", st.get("new_tokens")),
            "n_threads": p.get("threads") or st.get("threads") or dev.get("threads_used"),
            "repetitions": len(runs),
            "prefill_avg_ts": pre[0], "prefill_stddev_ts": pre[1], "decode_avg_ts": dec[0], "decode_stddev_ts": dec[1],
            "prefill_tok_s": r["prefill_tok_s"], "decode_tok_s": r["decode_tok_s"], "ttft_s": r.get("ttft_s"),
            "second_plus_tok_s": r["decode_tok_s"], "latency_p50_s": r.get("latency_p50_s"),
            "latency_p95_s": r.get("latency_p95_s"), "decode_vs_first": r.get("decode_vs_first"),
            "prefill_vs_first": r.get("prefill_vs_first"), "roofline_share": r.get("roofline_share"),
            "model_size_bytes": p.get("size_bytes"), "weight_bytes_per_token": p.get("weight_bytes_per_token"),
            "model_n_params": p.get("parameters"), "load_s": p.get("load_s"), "peak_rss_bytes": p.get("peak_rss_bytes"),
            "perplexity": ppl.get("perplexity"), "perplexity_tokens": ppl.get("tokens"),
            "cpu_model": dev.get("cpu_model"), "threads_used": dev.get("threads_used"),
            "bandwidth_bytes_s": data.get("bandwidth_bytes_s"),
            "build_version": build.get("edge_recover", data.get("tool_version")),
            "build_commit": (commit[:12] + ("-dirty" if build.get("git_dirty") else "")) if commit else None,
            "onnxruntime": dev.get("onnxruntime"), "runtime": _runtime(p), "created": data.get("created"),
        }
        rows.append({k: row[k] for k in LAB_FIELDS})
    return rows

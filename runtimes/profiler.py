"""Throughput profiler: several packages, several prompt lengths, interleaved, with the roofline beside them.

Fair ratios on a noisy shared machine come from the schedule, not from long runs:

    measure read bandwidth  ->  start one worker process per package (load)
      -> warm-up: every prompt length x every package (short decode, not recorded)
      -> repeat r = 0..R-1: for each prompt length: for each package, in an order rotated by r: one run
      -> medians per (package, prompt length); latency percentiles over all decode steps of all repeats

A run is a random prompt of exactly `prompt_length` ids, a prefill, then `new_tokens` greedy steps with
stop tokens ignored. The bandwidth is the median of probes taken before the runs and after every repeat
round. The roofline for a run is `bandwidth / (weight bytes per token + KV bytes read at
the mean decode context)`; `roofline_share` is measured decode tok/s over it.

With `eval_text` (a held-out UTF-8 file), each worker also scores `eval_windows` windows of `eval_seq_len`
tokens of it after the timed runs (and after its peak memory is read, so scoring does not count in it):
perplexity through the package's own engine, one token per step through its KV cache, as decoding reads
it. Each package tokenizes the text with its own tokenizer.json. The fields device labs compare
(report_fields.py) are kept in report.json and written as report.csv / report.jsonl beside it.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np

from edge_recover.errors import EdgeRecoverError

from .package import folder_size, graph_stats, open_package
from .report_fields import rate_stats

__all__ = ["ProfileSettings", "PackageEntry", "Report", "Worker", "profile_packages"]

REPORT_KIND = "edge-recover-profile"
REPORT_FORMAT_VERSION = 1


@dataclass(frozen=True)
class ProfileSettings:
    """What to measure and how often.

    Example:
        >>> ProfileSettings(prompt_lengths=[128, 512], new_tokens=64).repeats
        3
    """

    provider: str = "cpu"
    provider_options: dict = field(default_factory=dict)
    fallback: bool = False
    prompt_lengths: Sequence[int] = (128, 512, 1024)
    new_tokens: int = 128
    repeats: int = 3
    warmup: int = 1
    warmup_tokens: int = 8
    threads: Optional[int] = None
    thread_sweep: Sequence[int] = ()  # several intra-op thread counts: every package once per count, one run
    seed: int = 0
    bandwidth_mb: int = 512
    huge_pages: bool = False  # workers' malloc asks for transparent huge pages; the probe uses them too
    session_config: dict = field(default_factory=dict)  # ORT session config entries for every `ort` package
    eval_text: Optional[str] = None  # held-out UTF-8 text: perplexity per package through its own runtime
    eval_windows: int = 4
    eval_seq_len: int = 256

    def __post_init__(self) -> None:
        if self.repeats < 1:
            raise EdgeRecoverError(f"`repeats` must be >= 1, got {self.repeats}")
        if self.new_tokens < 2:
            raise EdgeRecoverError(f"`new_tokens` must be >= 2 (decode speed needs a step after the first), "
                                   f"got {self.new_tokens}")
        if self.warmup < 0:
            raise EdgeRecoverError(f"`warmup` must be >= 0, got {self.warmup}")
        if self.eval_windows < 1 or self.eval_seq_len < 2:
            raise EdgeRecoverError(f"`eval_windows` must be >= 1 and `eval_seq_len` >= 2, got {self.eval_windows} "
                                   f"and {self.eval_seq_len}")
        if any(int(t) < 1 for t in self.thread_sweep) or (self.thread_sweep and self.threads is not None):
            raise EdgeRecoverError(f"`thread_sweep` must hold positive thread counts and leaves `threads` unset, got "
                                   f"{list(self.thread_sweep)} and threads={self.threads}")
        if self.eval_text is not None and not Path(self.eval_text).is_file():
            raise EdgeRecoverError(f"`--eval-text` {str(self.eval_text)!r} is not a file; pass a UTF-8 text file")


@dataclass
class PackageEntry:
    """One thing to profile: an edge-recover package (engine `ort`), a genai folder (engine `genai`: our
    packages or the onnxruntime-genai builder's), or a GGUF file (engine `llama`: llama.cpp through
    llama-cpp-python, which `python` must import)."""

    path: str
    label: str = ""
    engine: str = "ort"
    python: str = sys.executable   # interpreter for the worker (genai peers may live in another venv)
    session_config: dict = field(default_factory=dict)  # this entry's ORT session config entries (over the settings')
    tokenizer: Optional[str] = None  # tokenizer.json for `eval_text` (default: the package's; a GGUF has none beside it)
    threads: Optional[int] = None  # this entry's intra-op threads (over the settings'): a thread sweep's entries


@dataclass
class Report:
    """The collected profile; `data` is what report.json holds."""

    data: dict

    def summary(self) -> str:
        """A short plain-text table: decode tok/s per package and prompt length."""
        rows = [f"{'package':24s} {'prompt':>7s} {'prefill/s':>10s} {'decode/s':>9s} {'vs first':>9s} {'roofline':>9s}"]
        for r in self.data["results"]:
            rows.append(f"{r['package'][:24]:24s} {r['prompt_length']:7d} {r['prefill_tok_s']:10.1f} "
                        f"{r['decode_tok_s']:9.1f} {r.get('decode_vs_first', float('nan')):8.2f}x "
                        f"{100 * r['roofline_share']:8.0f}%")
        return "\n".join(rows)


class Worker:
    """A package in its own process (runtimes/worker.py); `ask(op=..., ...)` sends one request."""

    def __init__(self, entry: PackageEntry, huge_pages: bool = False) -> None:
        from .device import HUGE_PAGES_ENV

        script = str(Path(__file__).with_name("worker.py"))
        self.entry = entry
        env = {**os.environ, **HUGE_PAGES_ENV} if huge_pages else None  # glibc reads it at process start
        # -I: isolated, so the script's folder does not shadow modules and only the interpreter's site counts
        self.proc = subprocess.Popen([entry.python, "-I", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True, bufsize=1, env=env)

    def ask(self, **req) -> dict:
        assert self.proc.stdin and self.proc.stdout
        self.proc.stdin.write(json.dumps(req) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"profiler worker for {self.entry.path} died (exit {self.proc.wait()}); see stderr")
        reply = json.loads(line)
        if not reply.get("ok"):
            if reply.get("user"):
                raise EdgeRecoverError(f"{self.entry.label}: {reply['error']}")
            raise RuntimeError(f"profiler worker for {self.entry.path}: {reply['error']}")
        return reply

    def close(self) -> None:
        try:
            if self.proc.poll() is None:
                self.ask(op="quit")
        except Exception:
            pass
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
            self.proc.wait()


def _entries(packages: Sequence[str | PackageEntry], thread_sweep: Sequence[int] = ()) -> list[PackageEntry]:
    """One entry per package, labels made unique; with a thread sweep one per package and thread count,
    labelled `LABEL@Nt`, the first package's counts first (ratios are against the first entry)."""
    entries = [p if isinstance(p, PackageEntry) else PackageEntry(str(p)) for p in packages]
    if not entries:
        raise EdgeRecoverError("give at least one package folder to profile")
    seen: dict[str, int] = {}
    for e in entries:
        base = e.label or Path(e.path).name
        seen[base] = seen.get(base, 0) + 1
        e.label = base if seen[base] == 1 else f"{base}-{seen[base]}"
    if thread_sweep:
        entries = [replace(e, label=f"{e.label}@{t}t", threads=int(t)) for e in entries for t in thread_sweep]
    return entries


def _gguf_int(reader, key: str) -> int:
    field = reader.get_field(key)
    if field is None:
        raise EdgeRecoverError(f"GGUF file lacks `{key}`; pass a llama-architecture GGUF")
    return int(field.parts[field.data[0]][0])


def _describe_gguf(entry: PackageEntry) -> dict:
    """A GGUF file's facts from its header (PyPI `gguf`): the token embedding counts one row per token unless
    it is also the output matrix (no `output.weight`); llama.cpp's KV cache is float16 by default."""
    try:
        import gguf
    except ImportError:
        raise EdgeRecoverError("reading a GGUF file's header needs PyPI `gguf`; `pip install gguf`") from None
    path = Path(entry.path)
    if not path.is_file():
        raise EdgeRecoverError(f"GGUF file {str(path)!r} does not exist")
    reader = gguf.GGUFReader(str(path))
    arch = bytes(reader.get_field("general.architecture").parts[-1]).decode()
    tensors = {t.name: t for t in reader.tensors}
    weight = sum(int(t.n_bytes) for t in tensors.values())
    per_token = weight
    emb = tensors.get("token_embd.weight")
    if emb is not None and "output.weight" in tensors:
        per_token -= int(emb.n_bytes) - int(emb.n_bytes) // int(emb.shape[-1])  # one row of n_vocab rows
    layers, heads = _gguf_int(reader, f"{arch}.block_count"), _gguf_int(reader, f"{arch}.attention.head_count")
    kv_heads = _gguf_int(reader, f"{arch}.attention.head_count_kv")
    head_dim = _gguf_int(reader, f"{arch}.embedding_length") // heads
    ftype = reader.get_field("general.file_type")
    kind = gguf.LlamaFileType(int(ftype.parts[ftype.data[0]][0])).name if ftype is not None else "unknown"
    return {"label": entry.label, "path": str(path), "engine": entry.engine,
            "scheme": f"llama.cpp {kind.removeprefix('MOSTLY_')}", "size_bytes": path.stat().st_size,
            "parameters": int(sum(int(t.n_elements) for t in tensors.values())), "weight_bytes": weight,
            "weight_bytes_per_token": per_token,
            "kv_bytes_per_position": 2 * layers * kv_heads * head_dim * 2, "matmulnbits_bits": {},
            "context_length": _gguf_int(reader, f"{arch}.context_length")}


def _describe_package(entry: PackageEntry) -> dict:
    """Static facts: size, parameters, weight bytes per token, KV bytes per position, context length."""
    from .report_fields import parameter_count

    if entry.engine == "llama":
        return _describe_gguf(entry)
    if entry.engine == "genai":
        cfg = json.loads((Path(entry.path) / "genai_config.json").read_text())["model"]
        dec = cfg["decoder"]
        model_file = Path(entry.path) / dec["filename"]
        stats = graph_stats(model_file, (int(dec.get("num_key_value_heads", 0)), int(dec.get("head_size", 0))))
        context = int(cfg.get("context_length", 4096))
        ours = (Path(entry.path) / "manifest.json").is_file()  # one of our packages, run by onnxruntime-genai
        scheme = open_package(entry.path).scheme_name if ours else "onnxruntime-genai builder"
    else:
        pkg = open_package(entry.path)
        model_file, stats, context, scheme = pkg.model_file, pkg.stats, pkg.context_length, pkg.scheme_name
    return {"label": entry.label, "path": str(entry.path), "engine": entry.engine, "scheme": scheme,
            "size_bytes": folder_size(entry.path), "parameters": parameter_count(model_file),
            "weight_bytes": stats.weight_bytes, "weight_bytes_per_token": stats.weight_bytes_per_token,
            "kv_bytes_per_position": stats.kv_bytes_per_position(),
            "matmulnbits_bits": {str(k): v for k, v in stats.matmulnbits_bits.items()},
            "context_length": context}


def _eval_windows(entry: PackageEntry, settings: ProfileSettings, context: int) -> list[list[int]]:
    """`settings.eval_windows` windows of `eval_seq_len` ids of the held-out text, by the package's tokenizer."""
    from tokenizers import Tokenizer

    path = Path(entry.tokenizer or Path(entry.path) / "tokenizer.json")
    if not path.is_file():
        raise EdgeRecoverError(f"{entry.label} has no tokenizer.json to read `--eval-text` with; re-export it")
    if settings.eval_seq_len > context:
        raise EdgeRecoverError(f"`--eval-seq-len` {settings.eval_seq_len} exceeds {entry.label}'s context of "
                               f"{context}; lower it")
    text = Path(str(settings.eval_text)).read_text(encoding="utf-8", errors="replace")
    ids = Tokenizer.from_file(str(path)).encode(text, add_special_tokens=False).ids
    n, length = settings.eval_windows, settings.eval_seq_len
    if len(ids) < n * length:
        raise EdgeRecoverError(f"`--eval-text` has {len(ids)} tokens for {entry.label}, fewer than "
                               f"{n} x {length}; pass a longer text or lower `--eval-windows` / `--eval-seq-len`")
    return [ids[i * length:(i + 1) * length] for i in range(n)]


def _pct(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q)) if values else float("nan")


def profile_packages(packages: Sequence[str | PackageEntry], settings: ProfileSettings = ProfileSettings(),
                     output: Optional[str | Path] = None, overwrite: bool = False,
                     log: Callable[[str], None] = lambda s: None) -> Report:
    """Profile `packages` interleaved and (if `output` is given) write report.json, report.md and plots there.

    Example:
        >>> rep = profile_packages(["out/w4", "out/w4w2gateup"], ProfileSettings(prompt_lengths=[128]),
        ...                        "out/profile")  # doctest: +SKIP
        >>> print(rep.summary())  # doctest: +SKIP
    """
    from .device import device_info, read_bandwidth

    entries = _entries(packages, settings.thread_sweep)
    if output is not None:  # the plots come last: a missing plotting library must not cost a whole run
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise EdgeRecoverError("the report's plots need matplotlib, which is not installed; "
                                   "`pip install matplotlib` and run again") from None
    described = [_describe_package(e) for e in entries]
    longest = max(settings.prompt_lengths) + settings.new_tokens
    for d in described:
        if longest > d["context_length"]:
            raise EdgeRecoverError(f"prompt length {max(settings.prompt_lengths)} + {settings.new_tokens} new tokens "
                                   f"exceeds {d['label']}'s context of {d['context_length']}; lower "
                                   f"`--prompt-lengths` or `--new-tokens`")
    windows = ([_eval_windows(e, settings, d["context_length"]) for e, d in zip(entries, described)]
               if settings.eval_text else None)  # refused before anything is measured
    device = device_info(max(settings.thread_sweep) if settings.thread_sweep else settings.threads)
    log(f"measuring memory read bandwidth ({device['threads_used']} threads)...")
    # A shared machine's bandwidth drifts (neighbours): probe it before the runs and after every repeat
    # round, between the packages' runs, and take the median as the roofline's bandwidth.
    def probe() -> float:
        return read_bandwidth(device["threads_used"], settings.bandwidth_mb, huge_pages=settings.huge_pages)

    probes = [probe()]
    log(f"read bandwidth {probes[0] / 1e9:.1f} GB/s")
    workers: list[Worker] = []
    runs: dict[tuple[int, int], list[dict]] = {}
    try:
        for e, d in zip(entries, described):
            w = Worker(e, settings.huge_pages)
            workers.append(w)
            config = {**settings.session_config, **e.session_config} if e.engine == "ort" else {}
            context = max(longest, settings.eval_seq_len if settings.eval_text else 0)
            info = w.ask(op="load", package=e.path, engine=e.engine, provider=settings.provider,
                         options=settings.provider_options, fallback=settings.fallback, threads=e.threads or settings.threads,
                         session_config=config, context=min(d["context_length"], -(-context // 256) * 256))
            d.update(provider=info["provider"], fell_back=info["fell_back"], fallback_reason=info["reason"],
                     load_s=info["load_s"], session_config=config, threads=info.get("threads"),
                     runtime=info.get("runtime") or {})
            log(f"loaded {e.label} on {info['provider']} in {info['load_s']:.1f} s")
        n_warm = min(settings.warmup_tokens, settings.new_tokens)
        for _ in range(settings.warmup):
            for length in settings.prompt_lengths:
                for w in workers:
                    w.ask(op="run", prompt_len=length, new_tokens=n_warm, seed=settings.seed + 999)
        for r in range(settings.repeats):
            for li, length in enumerate(settings.prompt_lengths):
                order = list(range(len(workers)))
                order = order[r % len(order):] + order[: r % len(order)]
                for pi in order:
                    t = time.perf_counter()
                    res = workers[pi].ask(op="run", prompt_len=length, new_tokens=settings.new_tokens,
                                          seed=settings.seed + li)
                    runs.setdefault((pi, length), []).append(res)
                    log(f"  repeat {r + 1}/{settings.repeats} prompt {length} {entries[pi].label}: "
                        f"{time.perf_counter() - t:.1f} s")
            probes.append(probe())
        for w, d in zip(workers, described):
            d["peak_rss_bytes"] = w.ask(op="stats")["peak_rss_bytes"]
        for i, (w, d) in enumerate(zip(workers, described)):  # after the peak memory: scoring is not counted in it
            if windows is not None:
                s = w.ask(op="perplexity", windows=windows[i])
                d["perplexity"] = {"perplexity": float(np.exp(s["nll"] / s["tokens"])), "tokens": s["tokens"],
                                   "windows": settings.eval_windows, "seq_len": settings.eval_seq_len,
                                   "text": str(settings.eval_text), "seconds": s["seconds"],
                                   "method": "one token per step through the engine's KV cache"}
                log(f"perplexity of {d['label']}: {d['perplexity']['perplexity']:.2f} ({s['tokens']} tokens)")
    finally:
        for w in workers:
            w.close()
    bandwidth = statistics.median(probes)
    log(f"read bandwidth, median of {len(probes)} probes: {bandwidth / 1e9:.1f} GB/s "
        f"({min(probes) / 1e9:.1f}-{max(probes) / 1e9:.1f})")
    results = []
    for pi, d in enumerate(described):
        for length in settings.prompt_lengths:
            rs = runs[(pi, length)]
            decode = [len(x["steps_s"]) / sum(x["steps_s"]) for x in rs]
            steps = [s for x in rs for s in x["steps_s"]]
            bytes_per_token = d["weight_bytes_per_token"] + d["kv_bytes_per_position"] * (length + settings.new_tokens / 2)
            roofline = bandwidth / bytes_per_token
            med_decode = statistics.median(decode)
            prefill = [length / x["prefill_s"] for x in rs]
            (pre_mean, pre_sd), (dec_mean, dec_sd) = rate_stats(prefill), rate_stats(decode)
            results.append({
                "package": d["label"], "prompt_length": length, "new_tokens": settings.new_tokens,
                "prefill_tok_s": statistics.median(prefill),
                "decode_tok_s": med_decode,
                "prefill_tok_s_mean": pre_mean, "prefill_tok_s_stddev": pre_sd,
                "decode_tok_s_mean": dec_mean, "decode_tok_s_stddev": dec_sd,
                "second_plus_tok_s": med_decode,  # MLPerf Client's 2nd+ token rate: decode steps start after the first
                "ttft_s": statistics.median(x["ttft_s"] for x in rs),
                "latency_p50_s": _pct(steps, 50), "latency_p95_s": _pct(steps, 95),
                "bytes_per_token": int(bytes_per_token), "roofline_tok_s": roofline,
                "roofline_share": med_decode / roofline,
                "runs": [{"prefill_s": x["prefill_s"], "ttft_s": x["ttft_s"], "decode_tok_s": dt}
                         for x, dt in zip(rs, decode)],
            })
    from edge_recover.versions import tool_version

    from .report_fields import build_info

    data = {"kind": REPORT_KIND, "format_version": REPORT_FORMAT_VERSION, "tool_version": tool_version(),
            "build": build_info(), "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "device": device,
            "bandwidth_bytes_s": bandwidth, "bandwidth_probes_bytes_s": probes,
            "settings": {**asdict(settings), "prompt_lengths": list(settings.prompt_lengths)},
            "packages": described, "results": results}
    from .report import paired_ratio

    for r in results:  # for labs that read report.json: the noise-robust ratio the markdown shows
        r["decode_vs_first"] = paired_ratio(data, r["package"], r["prompt_length"])
        r["prefill_vs_first"] = paired_ratio(data, r["package"], r["prompt_length"], "prefill")
    report = Report(data)
    if output is not None:
        from .report import write_report

        write_report(report.data, output, overwrite=overwrite)
    return report

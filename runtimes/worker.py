"""One package in its own process, driven over stdin/stdout by the profiler (JSON lines).

Why a process per package: peak resident memory is then the package's own, and packages loaded side by
side cannot share allocator arenas or caches. The parent sends one request at a time, so runs never overlap.

Requests: {"op": "load", "package", "engine": "ort"|"genai"|"llama", "provider", "options", "fallback", "threads",
"session_config"} (engine `llama`: `package` is a GGUF file, run by llama-cpp-python),
{"op": "run", "prompt_len", "new_tokens", "seed"} or {"op": "run", "ids", "new_tokens"} (greedy; the reply's
"ids" are the generated tokens), {"op": "perplexity", "windows": [[ids], ...]} (each window scored one token
per step through the engine's own KV cache, as decoding reads it; the reply holds "nll" summed in nats and
"tokens" scored), {"op": "stats"}, {"op": "quit"}. Replies: {"ok": true, ...}
or {"ok": false, "error": message, "user": bool}. The load reply names the runtime's build ("runtime").

The genai engine needs only onnxruntime-genai and numpy, the llama engine only llama-cpp-python and numpy,
so this file also runs as a plain script under another interpreter (a venv with onnxruntime-genai or
llama-cpp-python but without edge-recover). Every engine runs the same greedy loop: prefill the prompt,
then one token per step, the next token the argmax of the last logits.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time

import numpy as np


def _peak_rss() -> int:
    """Peak resident bytes of this process image. VmHWM, not ru_maxrss: Linux carries ru_maxrss across exec,
    so it would include the parent's size at fork time."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _ort_build() -> dict:
    """The onnxruntime this process runs (its version; the build's providers)."""
    import onnxruntime as ort

    return {"onnxruntime": ort.__version__}


def _perplexity(engine, windows: list[list[int]]) -> dict:
    """Summed next-token NLL (nats) of every window, each from an empty cache, one token per step."""
    nll, count = 0.0, 0
    for row in windows:
        feed = engine.logits()
        for pos in range(len(row) - 1):
            lg = feed(int(row[pos])).astype(np.float64)
            lg -= lg.max()
            nll -= float(lg[int(row[pos + 1])] - np.log(np.exp(lg).sum()))
            count += 1
    return {"nll": nll, "tokens": count}


class _OrtEngine:
    def __init__(self, req: dict) -> None:
        from edge_recover.runtimes.static_session import open_causal_lm

        self.lm = open_causal_lm(req["package"], req.get("provider", "cpu"), req.get("threads"),
                                 req.get("options") or {}, bool(req.get("fallback")),
                                 session_config=req.get("session_config") or {})
        self.vocab = self.lm.package.vocab_size
        session = getattr(self.lm, "session", None) or self.lm.sessions["decode"]  # static packages: two graphs
        self.info = {"provider": self.lm.choice.describe(), "fell_back": self.lm.choice.fell_back,
                     "reason": self.lm.choice.reason, "threads": self.lm.threads,
                     "session_providers": session.get_providers(), "runtime": _ort_build()}

    def logits(self):
        """A scorer: feed one token, get the next token's logits (a fresh cache per window)."""
        cache = self.lm.empty_cache()

        def feed(token: int) -> np.ndarray:
            nonlocal cache
            out, cache = self.lm.step(np.asarray([[token]], dtype=np.int64), cache)
            return out
        return feed

    def run(self, ids: list[int], new_tokens: int) -> dict:
        from edge_recover.runtimes.generate import generate_ids

        res = generate_ids(self.lm, ids, new_tokens, stop_token_ids=())
        return {"prefill_s": res.prefill_s, "ttft_s": res.ttft_s, "steps_s": res.step_latencies_s,
                "tokens": len(res.tokens), "ids": res.tokens}


class _GenaiEngine:
    def __init__(self, req: dict) -> None:
        import onnxruntime_genai as og

        self.og = og
        config = og.Config(req["package"])
        if req.get("provider", "cpu") != "cpu":
            config.clear_providers()
            config.append_provider(req["provider"])
        if req.get("threads"):  # the same intra-op threads as the other engines (default: onnxruntime's)
            config.overlay(json.dumps({"model": {"decoder": {"session_options": {
                "intra_op_num_threads": int(req["threads"]), "inter_op_num_threads": 1}}}}))
        self.model = og.Model(config)
        with open(os.path.join(req["package"], "genai_config.json")) as f:
            cfg = json.load(f)["model"]
        self.vocab, self.context = int(cfg["vocab_size"]), int(cfg.get("context_length", 4096))
        self.info = {"provider": f"{req.get('provider', 'cpu')} (onnxruntime-genai {og.__version__})",
                     "fell_back": False, "reason": "", "threads": req.get("threads"), "session_providers": [],
                     "runtime": {"onnxruntime-genai": og.__version__, **_ort_build()}}

    def logits(self):
        params = self.og.GeneratorParams(self.model)
        params.set_search_options(max_length=self.context, do_sample=False)
        gen = self.og.Generator(self.model, params)

        def feed(token: int) -> np.ndarray:
            gen.append_tokens(np.asarray([token], dtype=np.int32))
            return np.asarray(gen.get_logits()).reshape(-1)
        return feed

    def run(self, ids: list[int], new_tokens: int) -> dict:
        og = self.og
        params = og.GeneratorParams(self.model)
        total = len(ids) + new_tokens
        params.set_search_options(max_length=total, min_length=total, do_sample=False)
        gen = og.Generator(self.model, params)
        t0 = time.perf_counter()
        gen.append_tokens(np.asarray(ids, dtype=np.int32))  # runs the prompt
        t1 = time.perf_counter()
        steps, ttft, n = [], 0.0, 0
        while not gen.is_done():
            ts = time.perf_counter()
            gen.generate_next_token()
            gen.get_next_tokens()
            now = time.perf_counter()
            if n:
                steps.append(now - ts)
            else:
                ttft = now - t0
            n += 1
        return {"prefill_s": t1 - t0, "ttft_s": ttft, "steps_s": steps, "tokens": n}


class _LlamaEngine:
    """A GGUF file through llama-cpp-python (llama.cpp's CPU backend), logits of the last position only."""

    def __init__(self, req: dict) -> None:
        import llama_cpp

        if req.get("provider", "cpu") != "cpu":
            raise ValueError(f"the llama engine runs on the CPU here, not {req['provider']!r}")
        threads = int(req.get("threads") or os.cpu_count() or 1)
        self.llama_cpp = llama_cpp
        self.llm = llama_cpp.Llama(model_path=req["package"], n_ctx=int(req.get("context") or 2048), n_batch=512,
                                   n_threads=threads, n_threads_batch=threads, logits_all=False, verbose=False)
        self.vocab = self.llm.n_vocab()
        self.info = {"provider": f"cpu (llama.cpp via llama-cpp-python {llama_cpp.__version__})", "fell_back": False,
                     "reason": "", "threads": threads, "session_providers": [],
                     "runtime": {"llama-cpp-python": llama_cpp.__version__}}

    def _last(self) -> np.ndarray:
        ptr = self.llama_cpp.llama_get_logits_ith(self.llm._ctx.ctx, -1)
        return np.ctypeslib.as_array(ptr, shape=(self.vocab,))

    def logits(self):
        self.llm.reset()

        def feed(token: int) -> np.ndarray:
            self.llm.eval([int(token)])
            return self._last().copy()
        return feed

    def run(self, ids: list[int], new_tokens: int) -> dict:
        self.llm.reset()
        t0 = time.perf_counter()
        self.llm.eval(ids)
        t1 = time.perf_counter()
        token = int(np.argmax(self._last()))
        ttft, out, steps = time.perf_counter() - t0, [token], []
        for _ in range(new_tokens - 1):
            ts = time.perf_counter()
            self.llm.eval([token])
            token = int(np.argmax(self._last()))
            steps.append(time.perf_counter() - ts)
            out.append(token)
        return {"prefill_s": t1 - t0, "ttft_s": ttft, "steps_s": steps, "tokens": len(out), "ids": out}


_ENGINES = {"ort": _OrtEngine, "genai": _GenaiEngine, "llama": _LlamaEngine}


def main() -> None:
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # anything else printed goes to stderr, never into the protocol
    engine = None
    for line in sys.stdin:
        req = json.loads(line)
        op = req.get("op")
        try:
            if op == "load":
                t = time.perf_counter()
                engine = _ENGINES[req.get("engine") or "ort"](req)
                reply = {"ok": True, "load_s": time.perf_counter() - t, **engine.info}
            elif op == "run":  # timings of a random prompt of prompt_len ids (or of the given ids)
                ids = req.get("ids")
                if ids is None:
                    rng = np.random.default_rng(int(req.get("seed", 0)))
                    ids = rng.integers(0, engine.vocab, size=int(req["prompt_len"])).tolist()
                reply = {"ok": True, **engine.run(list(ids), int(req["new_tokens"]))}
            elif op == "perplexity":
                t = time.perf_counter()
                reply = {"ok": True, **_perplexity(engine, req["windows"]), "seconds": time.perf_counter() - t}
            elif op == "stats":
                reply = {"ok": True, "peak_rss_bytes": _peak_rss()}
            elif op == "quit":
                proto.write(json.dumps({"ok": True}) + "\n")
                return
            else:
                reply = {"ok": False, "error": f"unknown op {op!r}", "user": False}
        except Exception as exc:  # reported to the parent, which decides
            user = type(exc).__name__ == "EdgeRecoverError"
            reply = {"ok": False, "error": str(exc).splitlines()[0] if str(exc) else repr(exc), "user": user}
        proto.write(json.dumps(reply) + "\n")


if __name__ == "__main__":
    main()

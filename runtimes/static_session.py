"""Static-shape packages (the qnn target): a windowed prefill and a one-token decode over fixed cache slots.

A package with a "static" manifest section holds two fixed-shape graphs (exporters/static_graph.py):
prefill.onnx takes W tokens, decode.onnx one, both over a KV cache of C slots:

    input_ids [1, W]  position_ids [1, W]  past.{i} [1, kv, C, d]
    -> logits [1, W, V], present.{i} [1, kv, C, d]  (past with the real new entries at slot = position)

The contract is sdk/contract.py's (`static_window`, `static_chunks`), the one onnxruntime-genai's decoder
pipeline follows too (exporters/genai.py). `StaticCausalLM` keeps the cache as C-slot numpy buffers per layer;
a step feeds them as past and keeps present as the new buffers. A prompt goes through the prefill graph in
windows of W tokens, the first window padded at its front (padding at position 0, never written, masked);
generated tokens go through the decode graph. When the C slots are full, generation stops ("context"); a
prompt longer than C - 1 tokens is refused before any step.

Providers: `qnn` opens the package's EPContext models (compiled for the SoC in the manifest; no compile at
load) or, without them, compiles the portable graphs; in both cases with the CPU fallback disabled, so
every node is on the HTP (on x86, Qualcomm's emulator). `cpu` runs the same static graphs on the CPU EP:
the reference a test compares the HTP with; `openvino` runs them on the OpenVINO EP (its own venv).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Mapping, Optional

import numpy as np

from edge_recover.contract import STATIC_CACHE, static_chunks, static_window
from edge_recover.errors import EdgeRecoverError

from .package import Package, open_package
from .providers import ProviderChoice, resolve_provider

__all__ = ["StaticCausalLM", "StaticCache", "is_static", "open_causal_lm"]


def is_static(package: Package) -> bool:
    """Whether `package` holds static-shape graphs (a "static" manifest section)."""
    return isinstance(package.manifest.get("static"), dict)


@dataclass
class StaticCache:
    """C cache slots per layer tensor ([1, kv_heads, C, head_dim]), `mask` [C] marks the filled ones."""

    values: dict          # past_key_values.* name -> buffer
    mask: np.ndarray      # int64 [C]
    length: int           # filled slots (tokens seen)

    @property
    def capacity(self) -> int:
        return int(self.mask.shape[0])


class StaticCausalLM:
    """A static package on `cpu` or `qnn`; the interface of `OrtCausalLM` that generation uses.

    Example:
        >>> lm = StaticCausalLM("out/npu", provider="qnn")  # doctest: +SKIP
        >>> logits, cache = lm.prefill(np.array([[1, 2, 3]]), lm.empty_cache())  # doctest: +SKIP
    """

    def __init__(self, package: Package | str | os.PathLike, provider: str = "cpu", threads: Optional[int] = None,
                 provider_options: Optional[Mapping[str, str]] = None, use_contexts: bool = True,
                 session_config: Optional[Mapping[str, str]] = None) -> None:
        """`use_contexts` (qnn): load the EPContext models when the package has them (else compile)."""
        self.package = package if isinstance(package, Package) else open_package(package)
        if not is_static(self.package):
            raise EdgeRecoverError(f"package {str(self.package.path)!r} has no static graphs; export it with "
                                   f"`--target qnn` (or `--target npu --vendor qualcomm`)")
        st = self.package.manifest["static"]
        if st.get("cache") != STATIC_CACHE:
            raise EdgeRecoverError(f"package {str(self.package.path)!r} holds static graphs of an older cache layout "
                                   f"(present = concat(past, new)); re-export it with this edge-recover")
        self.static = st
        self.threads = int(threads or os.cpu_count() or 1)
        key = provider.lower().strip()
        if key in ("qnn", "qnnexecutionprovider"):
            self.sessions, self.loaded_from = self._open_qnn(provider_options, use_contexts, session_config)
            backend = "HTP emulator (x86)" if "emulator" in self.loaded_from else "HTP"
            self.choice = ProviderChoice("qnn", resolve_provider_spec("qnn"),
                                         {**dict(provider_options or {}), "backend": backend})
        elif key in ("cpu", "cpuexecutionprovider", "openvino", "openvinoexecutionprovider"):
            self.choice = resolve_provider(key, provider_options)  # openvino: its own venv (openvino_venv.sh)
            self.sessions = self._open_ort(self.choice.providers_arg(), session_config)
            self.loaded_from = "portable static graphs"
        else:
            raise EdgeRecoverError(f"static packages run on `--provider qnn`, `cpu` or `openvino`, not {provider!r}")
        self._c = int(st["context_length"])
        self._w = {role: int(g["window"]) for role, g in st["graphs"].items()}
        dec = self.sessions["decode"]
        self._kv = {i.name: tuple(i.shape) for i in dec.get_inputs() if i.name.startswith("past_key_values.")}
        self._present = {n: "present." + n[len("past_key_values."):] for n in self._kv}
        self.adapter = None

    def _open_ort(self, providers: list, session_config):
        import onnxruntime as ort

        from .session import session_options

        # the graphs are folded already; ORT's extended fusions would take the scale-safe RMS norm for a
        # plain one (SimplifiedLayerNormalization with the fixed epsilon: 2e-4 off on a tiny model)
        so = session_options(self.threads, session_config, optimization="basic")
        sessions = {role: ort.InferenceSession(str(self.package.path / g["file"]), so, providers=providers)
                    for role, g in self.static["graphs"].items()}
        for s in sessions.values():
            if s.get_providers()[0] != self.choice.spec.ep:
                raise EdgeRecoverError(f"onnxruntime did not enable {self.choice.spec.ep} (got "
                                       f"{', '.join(s.get_providers())})")
        return sessions

    def _open_qnn(self, provider_options, use_contexts: bool, session_config):
        from edge_recover.qnn import open_htp_session, resolve_soc

        verified = self.static.get("verified") or {}
        opts = dict(provider_options or {})
        soc = resolve_soc(opts.pop("soc", None) or (verified.get("soc") or {}).get("name"))
        contexts = verified.get("contexts") or {}
        sessions, source = {}, []
        for role, g in self.static["graphs"].items():
            ctx = contexts.get(role, {}).get("file")
            path = self.package.path / (ctx if (use_contexts and ctx) else g["file"])
            if not path.is_file():
                raise EdgeRecoverError(f"package {str(self.package.path)!r} lacks {path.name}; re-export it")
            sessions[role] = open_htp_session(path, soc, opts, session_config)
            source.append(path.name)
        import platform

        where = " (x86: Qualcomm's HTP emulator, times are not NPU speed)" if platform.machine() in ("x86_64", "AMD64") else ""
        return sessions, f"{', '.join(source)} on the HTP for {soc.name}{where} (CPU fallback disabled)"

    @property
    def context_length(self) -> int:
        """Cache slots: prompt + generated tokens must fit (the last generated token needs no slot)."""
        return self._c

    def set_adapter(self, name: Optional[str]) -> None:
        """Static packages carry merged adapters only; a side-car name is refused."""
        if name is not None:
            raise EdgeRecoverError("a static (NPU) package has no side-car adapters; merge the adapter at export "
                                   "(`--adapter-mode merge`)")

    def empty_cache(self, capacity: Optional[int] = None) -> StaticCache:
        """Zeroed cache buffers of `context_length` slots (`capacity` is ignored: the graphs fix it)."""
        return StaticCache({n: np.zeros(s, np.float32) for n, s in self._kv.items()},
                           np.zeros(self._c, np.int64), 0)

    def _run(self, role: str, tokens: np.ndarray, cache: StaticCache) -> np.ndarray:
        """One graph run over `tokens` (at most the role's window) after `cache` (the contract of
        `edge_recover.contract.static_window`: front padding at position 0); the graph returns the cache with
        the new entries at slot = position, which becomes `cache`; returns logits [n, vocab] of the real tokens."""
        w, c, n = self._w[role], self._c, int(tokens.shape[0])
        if cache.length + n > c:
            raise EdgeRecoverError(f"{cache.length + n} tokens exceed the package's static context of {c}; "
                                   f"shorten the prompt or lower `max_new_tokens`, or re-export with a larger "
                                   f"`--context-length`")
        ids, pos = static_window(tokens, cache.length, w)
        names = ["logits", *self._present.values()]
        out = self.sessions[role].run(names, {"input_ids": ids, "position_ids": pos, **cache.values})
        for past, present in zip(list(cache.values), out[1:]):
            cache.values[past] = present  # the whole buffer, this step's entries written at their positions
        cache.mask[cache.length:cache.length + n] = 1
        cache.length += n
        return out[0][0, w - n:]

    def step(self, input_ids: np.ndarray, cache: StaticCache) -> tuple[np.ndarray, StaticCache]:
        """One token ([1, 1]) through the decode graph; the last logits and the (same, updated) cache."""
        ids = np.asarray(input_ids).reshape(-1)
        if ids.shape[0] != 1:
            return self.prefill(np.asarray(input_ids), cache)
        return self._run("decode", ids, cache)[-1].copy(), cache

    def prefill(self, input_ids: np.ndarray, cache: StaticCache, all_logits: bool = False):
        """A prompt ([1, n]) through the prefill graph in windows of W, the first one padded at its front
        (`static_chunks`: as onnxruntime-genai feeds it). Returns the last position's logits (or, with
        `all_logits`, [n, vocab]) and the cache."""
        ids = np.asarray(input_ids).reshape(-1)
        if cache.length + ids.shape[0] > self._c:
            raise EdgeRecoverError(f"a prompt of {ids.shape[0]} tokens after {cache.length} does not fit the "
                                   f"package's static context of {self._c} tokens; shorten the prompt or "
                                   f"re-export with a larger `--context-length`")
        parts, start = [], 0
        for size in static_chunks(int(ids.shape[0]), self._w["prefill"]):
            parts.append(self._run("prefill", ids[start:start + size], cache))
            start += size
        logits = np.concatenate(parts, axis=0)
        return (logits if all_logits else logits[-1].copy()), cache

    def describe(self) -> str:
        """One line: package, provider, what was loaded."""
        return (f"{self.package.path} on {self.choice.spec.key} ({self.loaded_from}; static context "
                f"{self._c}, prefill window {self._w['prefill']})")


def resolve_provider_spec(key: str):
    """The provider table's entry for `key` (qnn is a plugin EP: it is not in get_available_providers)."""
    from .providers import PROVIDERS

    return PROVIDERS[key]


def open_causal_lm(package, provider: str = "cpu", threads: Optional[int] = None,
                   provider_options: Optional[Mapping[str, str]] = None, fallback: bool = False,
                   io_binding: bool = True, session_config: Optional[Mapping[str, str]] = None):
    """`StaticCausalLM` for a static package, else `OrtCausalLM`: what `run` and `profile` open."""
    pkg = package if isinstance(package, Package) else open_package(package)
    if is_static(pkg):
        return StaticCausalLM(pkg, provider, threads, provider_options, session_config=session_config)
    from .session import OrtCausalLM

    if provider.lower().strip() in ("qnn", "qnnexecutionprovider") and not fallback:
        raise EdgeRecoverError(f"package {str(pkg.path)!r} has dynamic shapes, which the QNN HTP (onnxruntime-qnn) "
                               f"refuses; export it with `--target qnn` for `--provider qnn`, or pass --fallback-cpu")
    return OrtCausalLM(pkg, provider, threads, provider_options, fallback, io_binding, session_config=session_config)

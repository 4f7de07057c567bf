"""An ONNX Runtime session over a package graph, stepped with a KV cache.

The graph (Optimum `text-generation-with-past`) takes `input_ids`, `attention_mask`, `position_ids` and
`past_key_values.{i}.key/value` ([batch, kv_heads, past, head_dim]) and returns `logits`
([batch, seq, vocab]) and `present.{i}.key/value` ([batch, kv_heads, past + seq, head_dim]).

Two paths compute the same step:
- the fast path (`io_binding=True`) binds outputs to ORT-allocated buffers and feeds each step's
  `present.*` OrtValues straight back as the next step's `past_key_values.*`, so the cache never
  round-trips through numpy; only the last row of logits is copied out (with the shared-buffer cache and the
  last-position head, from a logits buffer bound once with the cache: Python's share of a SmolLM2 step on the
  VM 0.46 -> 0.26 ms, decode 1.05-1.06x, bench/binding_decode.py; on a 16-core CPU that decodes in 3.5 ms such
  fixed costs are what separates runtimes);
- the reference path (`io_binding=False`) is plain `session.run` with numpy in and out.
A test checks that both give the same logits and tokens.

Shared-buffer KV (fast path, fused graphs): when every `present.*` output is written by com.microsoft
GroupQueryAttention (the cpu target's fused attention), the cache is one preallocated buffer per layer and
tensor, [1, kv_heads, capacity, head_dim], bound as both `past_key_values.*` and `present.*`. GQA then
sees the same pointer in and out and writes only the new positions, where the growing cache makes it
memset a fresh present buffer and copy the whole past into it every step (per layer, K and V: at a
1024-token context on the Qwen3-1.7B shape that is 235 MB copied per token, as much as the attention reads).
The kernel's contract (onnxruntime 1.31 CPU): present length = max(total_sequence_length, past buffer
length), the valid length comes from `seqlens_k` = sum(attention_mask) - 1, so the runtime keeps feeding an
all-ones mask of the valid length (not the buffer length) and the graph is unchanged. The buffers are numpy
arrays wrapped as OrtValues without a copy; `empty_cache(capacity)` sizes them (generate_ids asks for
prompt + max_new_tokens), and a step past the capacity moves the cache into buffers rounded up to the next
`GROW_CHUNK` positions (one copy per chunk). Stepping from a cache writes its buffers after its `length`:
an older cache stays valid, a cache derived from it no longer does (rewind semantics, no branching).

Prefill (`prefill`): on a shared-buffer cache the prompt goes in steps of `prefill_chunk` tokens (default
`PREFILL_CHUNK`), which gives one step's logits and halves the prompt attention over an int8 cache.

Side-car adapters (runtimes/adapters.py): `adapter=NAME` or `set_adapter(NAME)` activates one of the
package's `.onnx_adapter` files for every later step (bound on the IO binding in the fast path, through
`RunOptions.add_active_adapter` in the reference path); `None` runs the graph's default adapter.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional

import numpy as np

from edge_recover.errors import EdgeRecoverError

from .package import Package, open_package
from .providers import ProviderChoice, check_package_bits, resolve_provider

__all__ = ["OrtCausalLM", "KVCache", "GROW_CHUNK", "session_options"]

CACHE_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int8)": np.int8}  # KV inputs
# Prompt tokens per prefill step (shared-buffer caches): GroupQueryAttention's prompt path over an int8 cache
# dequantizes per query row; its 28 layers (Qwen3-1.7B shape, 2 threads) took 4.7 s for a 1,024-token prompt
# in one step, 2.7 s in steps of 256. Whole model, paired: int8-cache prefill 1.18x faster, float32 1.04x
# (docs/runtime.md, "An int8 KV cache").
PREFILL_CHUNK = 256
GROW_CHUNK = 256  # positions a shared-buffer cache grows by when a step does not fit its capacity


@dataclass
class KVCache:
    """The cache after some positions: per layer key and value (numpy arrays or OrtValues).

    A shared-buffer cache (`shared`) holds numpy buffers [1, kv_heads, capacity, head_dim] of which
    positions [:length] are valid, and `ort` the OrtValues that wrap them (same memory).
    """

    values: list          # [key0, value0, key1, value1, ...]
    length: int           # cached positions
    ort: list = field(default_factory=list, repr=False)  # shared-buffer mode: OrtValues over `values`

    @property
    def shared(self) -> bool:
        return bool(self.ort)

    @property
    def capacity(self) -> int:
        """Positions the buffers hold (shared-buffer mode), else `length`."""
        return int(self.values[0].shape[2]) if self.shared else self.length


def session_options(threads: int, config: Optional[Mapping[str, str]] = None, optimization: str = "all",
                    sequential: bool = False):
    """The `onnxruntime.SessionOptions` every package session starts from: `threads` intra-op threads and one
    inter-op, warnings off, graph `optimization` "all" (dynamic graphs) or "basic" (static graphs, folded
    already), `config` entries added; `sequential` (providers that need it, e.g. DirectML): no memory
    pattern, sequential execution.

    Example:
        >>> session_options(2, {"mlas.use_lut_gemm": "1"}).intra_op_num_threads  # doctest: +SKIP
        2
    """
    import onnxruntime as ort

    levels = {"all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL, "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC}
    so = ort.SessionOptions()
    so.intra_op_num_threads = int(threads)
    so.inter_op_num_threads = 1
    so.graph_optimization_level = levels[optimization]
    so.log_severity_level = 3
    if sequential:
        so.enable_mem_pattern = False
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    for key, value in (config or {}).items():
        so.add_session_config_entry(str(key), str(value))
    return so


def _last_position_graph(model_file) -> Optional[bytes]:
    """The package graph with the lm_head reading only the last position, serialized without its weights
    (None when no MatMul / MatMulNBits writes `logits`). A step reads only the last row of logits, but the
    graph computes all of them: at a 1,024-token prompt on the Qwen3-1.7B shape that is 318 GMAC and a
    622 MB tensor. The package file keeps every position (verification, perplexity, onnxruntime-genai):

        h [b, s, K] ─► Slice(starts [-1], ends [2^62], axes [1]) ─► lm_head (and a side-car LoRA on it) ─► [b, 1, V]
    """
    import onnx
    from onnx import helper, numpy_helper

    m = onnx.load(str(model_file), load_external_data=False)
    g = m.graph
    head = next((n for n in g.node if "logits" in n.output and n.op_type in ("MatMul", "MatMulNBits")), None)
    if head is None:
        return None
    hidden, p = head.input[0], "/lm_head/last"
    for node in g.node:
        for j, name in enumerate(node.input):
            if name == hidden:
                node.input[j] = f"{p}/hidden"
    g.initializer.extend([numpy_helper.from_array(np.array([v], np.int64), f"{p}/{k}")
                          for k, v in (("starts", -1), ("ends", 1 << 62), ("axes", 1))])
    at = list(g.node).index(head)
    nodes = list(g.node)
    del g.node[:]
    g.node.extend(nodes[:at] + [helper.make_node("Slice", [hidden, f"{p}/starts", f"{p}/ends", f"{p}/axes"],
                                                 [f"{p}/hidden"], name=f"{p}/Slice")] + nodes[at:])
    for out in g.output:
        if out.name == "logits" and len(out.type.tensor_type.shape.dim) == 3:
            out.type.tensor_type.shape.dim[1].dim_value = 1
    return m.SerializeToString()


class OrtCausalLM:
    """A package opened on one execution provider; `step` runs the graph once.

    Example:
        >>> lm = OrtCausalLM("out/demo/w4w2gateup", provider="cpu")  # doctest: +SKIP
        >>> logits, cache = lm.step(np.array([[1, 2, 3]]), lm.empty_cache())  # doctest: +SKIP
    """

    def __init__(self, package: Package | str | os.PathLike, provider: str = "cpu", threads: Optional[int] = None,
                 provider_options: Optional[Mapping[str, str]] = None, fallback: bool = False,
                 io_binding: bool = True, adapter: Optional[str] = None,
                 share_buffer: Optional[bool] = None, session_config: Optional[Mapping[str, str]] = None,
                 prefill_chunk: Optional[int] = PREFILL_CHUNK, last_logits_only: bool = True,
                 profile_prefix: Optional[str] = None) -> None:
        """`share_buffer`: the shared-buffer KV cache (see the module docstring); None turns it on for the fast
        path on the CPU EP when the graph allows it, False keeps the growing cache, True insists.
        `prefill_chunk`: prompt tokens per step in `prefill` on a shared-buffer cache (None: the whole prompt).
        `last_logits_only` (CPU EP): run the lm_head on each step's last position only (`_last_position_graph`);
        False computes the logits of every position, as the package file does.
        `session_config`: ONNX Runtime session config entries over the provider's own, e.g.
        {"mlas.use_lut_gemm": "1"} (the table-lookup 2-bit kernel; docs/runtime.md says where it pays).
        `profile_prefix`: ONNX Runtime's profiler on, its JSON written at `end_profiling()` (runtimes/op_times.py)."""
        import onnxruntime as ort

        self.package = package if isinstance(package, Package) else open_package(package)
        self.choice: ProviderChoice = resolve_provider(provider, provider_options, fallback)
        check_package_bits(self.choice, set(self.package.stats.matmulnbits_bits))
        self.threads = int(threads or os.cpu_count() or 1)
        self.session_config = {**self.choice.spec.session_config, **(session_config or {})}
        so = session_options(self.threads, self.session_config, sequential=self.choice.spec.sequential)
        if profile_prefix:
            so.enable_profiling = True
            so.profile_file_prefix = str(profile_prefix)
        self.runs = 0  # session runs so far (op_times matches them to the profiler's model_run events)
        model: str | bytes = str(self.package.model_file)
        self.last_logits_only = bool(last_logits_only and self.choice.spec.key == "cpu")
        if self.last_logits_only:
            graph = _last_position_graph(self.package.model_file)
            self.last_logits_only = graph is not None
            if graph is not None:  # the edited graph from memory, its weights from the package's data file
                model = graph
                so.add_session_config_entry("session.model_external_initializers_file_folder_path",
                                            str(self.package.model_file.parent))
        try:
            self.session = ort.InferenceSession(model, so, providers=self.choice.providers_arg())
        except Exception as exc:  # an EP that is installed but cannot start (no device, bad options)
            if self.choice.spec.key != "cpu" and fallback:
                self.choice = ProviderChoice(self.choice.requested, resolve_provider("cpu").spec, {}, True,
                                             f"{self.choice.spec.ep} failed to start: {str(exc).splitlines()[0]}")
                self.session = ort.InferenceSession(str(self.package.model_file), so,
                                                    providers=["CPUExecutionProvider"])
            elif self.choice.spec.key != "cpu":
                raise EdgeRecoverError(f"provider `{self.choice.spec.key}` is installed but failed to start "
                                       f"({str(exc).splitlines()[0][:200]}); check its options or pass "
                                       f"--fallback-cpu") from None
            else:
                raise
        if self.choice.spec.ep not in self.session.get_providers() and fallback:
            # e.g. a plugin EP (QNN) that takes sessions through add_provider_for_devices, or refused every node
            self.choice = ProviderChoice(self.choice.requested, resolve_provider("cpu").spec, {}, True,
                                         f"onnxruntime did not enable {self.choice.spec.ep} for this graph")
        if self.choice.spec.ep not in self.session.get_providers():
            raise EdgeRecoverError(f"onnxruntime did not enable {self.choice.spec.ep} (got "
                                   f"{', '.join(self.session.get_providers())}); pass --fallback-cpu to accept that")
        self.io_binding = io_binding
        inputs = {i.name: i for i in self.session.get_inputs()}
        self._kv_in = [n for n in inputs if n.startswith("past_key_values.")]
        self._kv_out = [o.name for o in self.session.get_outputs() if o.name.startswith("present.")]
        if len(self._kv_in) != len(self._kv_out) or not self._kv_in:
            raise EdgeRecoverError(f"{str(self.package.model_file)!r} has {len(self._kv_in)} past inputs and "
                                   f"{len(self._kv_out)} present outputs; re-export the package")
        self._has_position_ids = "position_ids" in inputs
        kv_type = inputs[self._kv_in[0]].type
        if kv_type not in CACHE_DTYPES:
            raise EdgeRecoverError(f"{str(self.package.model_file)!r} keeps its KV cache as {kv_type}, which this "
                                   f"runtime does not know; upgrade edge-recover or re-export the package")
        self._kv_dtype = CACHE_DTYPES[kv_type]
        st = self.package.stats
        self._kv_shape = (st.kv_heads, st.head_dim)
        pairs = {"present." + n[len("past_key_values."):] for n in self._kv_in} == set(self._kv_out)
        can_share = io_binding and st.kv_share_buffer and pairs
        if share_buffer and not can_share:
            why = ("io_binding=False (the reference path)" if not io_binding else
                   "its present.* outputs are not all written by GroupQueryAttention (export for the cpu target)")
            raise EdgeRecoverError(f"`share_buffer=True` cannot apply to {str(self.package.model_file)!r}: {why}; "
                                   f"pass share_buffer=None or False")
        self.share_buffer = bool(can_share and (share_buffer or (share_buffer is None and self.choice.spec.key == "cpu")))
        if prefill_chunk is not None and prefill_chunk < 1:
            raise EdgeRecoverError(f"`prefill_chunk` must be >= 1 or None, got {prefill_chunk}")
        self.prefill_chunk = prefill_chunk
        self._shared_binding: Optional[tuple] = None  # (buffers + adapter ids, IOBinding, OrtValues, adapter): _step_shared
        self._logits_buf: Optional[np.ndarray] = None  # shared path + last-position head: logits written in place
        logits_type = next((o for o in self.session.get_outputs() if o.name == "logits"), None)
        if self.share_buffer and self.last_logits_only and logits_type is not None and \
                logits_type.type == "tensor(float)" and isinstance(logits_type.shape[-1], int):
            self._logits_buf = np.zeros((1, 1, logits_type.shape[-1]), np.float32)
            self._logits_ort = ort.OrtValue.ortvalue_from_numpy(self._logits_buf)  # shares the buffer's memory
        self.adapter = None
        self.set_adapter(adapter)

    def set_adapter(self, name: Optional[str]) -> None:
        """Activate the package's side-car adapter `name` for later steps (None: the graph's default)."""
        from .adapters import load_adapter

        self.adapter = None if name is None else load_adapter(self.package, name, self.session)

    @property
    def context_length(self) -> int:
        return self.package.context_length

    def empty_cache(self, capacity: Optional[int] = None) -> KVCache:
        """A cache with no positions: [1, kv_heads, 0, head_dim] per tensor, or in the shared-buffer mode
        buffers of `capacity` positions (default `GROW_CHUNK`, at most the context length)."""
        heads, dim = self._kv_shape
        if self.share_buffer:
            return self._grow(KVCache([], 0), min(int(capacity or GROW_CHUNK), self.context_length))
        empty = np.zeros((1, heads, 0, dim), dtype=self._kv_dtype)
        return KVCache([empty] * len(self._kv_in), 0)

    def _grow(self, cache: KVCache, capacity: int) -> KVCache:
        """`cache` moved into new shared buffers of `capacity` positions (its valid positions copied)."""
        import onnxruntime as ort

        heads, dim = self._kv_shape
        values, wrapped = [], []
        for i in range(len(self._kv_in)):
            buf = np.zeros((1, heads, capacity, dim), dtype=self._kv_dtype)  # pages untouched until written
            if cache.length:
                buf[:, :, :cache.length] = cache.values[i][:, :, :cache.length]
            values.append(buf)
            wrapped.append(ort.OrtValue.ortvalue_from_numpy(buf))  # shares buf's memory
        return KVCache(values, cache.length, wrapped)

    def _feeds(self, input_ids: np.ndarray, cache: KVCache) -> dict[str, np.ndarray]:
        t = input_ids.shape[1]
        total = cache.length + t
        feeds = {"input_ids": input_ids.astype(np.int64, copy=False),
                 "attention_mask": np.ones((1, total), dtype=np.int64)}
        if self._has_position_ids:
            feeds["position_ids"] = np.arange(cache.length, total, dtype=np.int64)[None, :]
        return feeds

    def step(self, input_ids: np.ndarray, cache: KVCache) -> tuple[np.ndarray, KVCache]:
        """Run `input_ids` ([1, seq]) after `cache`; return the last position's logits ([vocab]) and the new cache."""
        t = int(input_ids.shape[1])
        if cache.length + t > self.context_length:
            raise EdgeRecoverError(f"sequence of {cache.length + t} tokens exceeds the model's context of "
                                   f"{self.context_length}; shorten the prompt or lower `max_new_tokens`")
        feeds = self._feeds(input_ids, cache)
        if cache.shared and self.io_binding:
            return self._step_shared(feeds, cache, t)
        if cache.shared:  # a shared-buffer cache on the reference path: its valid positions
            cache = KVCache([v[:, :, :cache.length] for v in cache.values], cache.length)
        if not self.io_binding:
            for name, value in zip(self._kv_in, cache.values):
                feeds[name] = value if isinstance(value, np.ndarray) else value.numpy()
            out = self.session.run(None, feeds, self.adapter.run_options if self.adapter else None)
            self.runs += 1
            return out[0][0, -1].copy(), KVCache(out[1:], cache.length + t)
        binding = self.session.io_binding()
        for name, value in feeds.items():
            binding.bind_cpu_input(name, value)
        for name, value in (self.adapter.params.items() if self.adapter else ()):
            binding.bind_ortvalue_input(name, value)
        for name, value in zip(self._kv_in, cache.values):
            if isinstance(value, np.ndarray):
                binding.bind_cpu_input(name, value)
            else:
                binding.bind_ortvalue_input(name, value)
        binding.bind_output("logits", "cpu")
        for name in self._kv_out:
            binding.bind_output(name, "cpu")
        self.session.run_with_iobinding(binding)
        self.runs += 1
        outs: list[Any] = binding.get_outputs()
        logits = outs[0].numpy()[0, -1].copy()
        return logits, KVCache(list(outs[1:]), cache.length + t)

    def prefill(self, input_ids: np.ndarray, cache: KVCache) -> tuple[np.ndarray, KVCache]:
        """`step` over a prompt ([1, seq]), `prefill_chunk` tokens at a time on a shared-buffer cache (the same
        logits as one step: tests/runtimes/test_shared_kv.py); the last position's logits and the cache."""
        t = int(input_ids.shape[1])
        chunk = self.prefill_chunk if (self.prefill_chunk and cache.shared and self.io_binding) else t
        for start in range(0, t, chunk):
            logits, cache = self.step(input_ids[:, start:start + chunk], cache)
        return logits, cache

    def _step_shared(self, feeds: dict[str, np.ndarray], cache: KVCache, t: int) -> tuple[np.ndarray, KVCache]:
        """The fast path with past and present bound to the same buffers (GroupQueryAttention writes in place)."""
        if cache.length + t > cache.capacity:
            chunks = -(-(cache.length + t) // GROW_CHUNK)
            cache = self._grow(cache, min(chunks * GROW_CHUNK, self.context_length))
        key = (id(cache.ort[0]), id(self.adapter))
        if self._shared_binding is None or self._shared_binding[0] != key:
            # the cache's buffers and the adapter are bound once, until the buffers grow or the adapter changes
            # (a new binding of SmolLM2's 60 past/present pairs took 0.1 ms per step on the 2-core VM)
            binding = self.session.io_binding()
            for name, value in (self.adapter.params.items() if self.adapter else ()):
                binding.bind_ortvalue_input(name, value)
            if self._logits_buf is not None:  # the last-position head: logits [1, 1, vocab] every step, bound once
                binding.bind_ortvalue_output("logits", self._logits_ort)
            else:
                binding.bind_output("logits", "cpu")  # output 0, rebound each step below
            for name, value in zip(self._kv_in, cache.ort):
                binding.bind_ortvalue_input(name, value)
                binding.bind_ortvalue_output("present." + name[len("past_key_values."):], value)
            self._shared_binding = (key, binding, cache.ort, self.adapter)  # kept alive with their binding (ids stay unique)
        binding = self._shared_binding[1]
        for name, value in feeds.items():  # the step's own inputs (their shapes change every step)
            binding.bind_cpu_input(name, value)
        if self._logits_buf is None:
            binding.bind_output("logits", "cpu")  # again: a bound output keeps its first run's shape (stays output 0)
        self.session.run_with_iobinding(binding)
        self.runs += 1
        # the bound buffer is read in place: no wrapper per output (61 on SmolLM2) per step
        out = self._logits_buf if self._logits_buf is not None else binding.get_outputs()[0].numpy()
        return out[0, -1].copy(), KVCache(cache.values, cache.length + t, cache.ort)

    def end_profiling(self) -> str:
        """Stop ONNX Runtime's profiler (a session made with `profile_prefix`); the path of its JSON."""
        path = self.session.end_profiling()
        if not path:
            raise EdgeRecoverError("this session was made without `profile_prefix`; its profiler is off")
        return path

    def describe(self) -> str:
        """One line: package, provider, options, threads."""
        adapter = f", adapter {self.adapter.name}" if self.adapter else ""
        kv = ", shared-buffer KV" if self.share_buffer else ""
        return f"{self.package.path}{adapter} on {self.choice.describe()}, {self.threads} threads{kv}"

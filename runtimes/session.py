"""An ONNX Runtime session over a package graph, stepped with a KV cache.

The graph (Optimum `text-generation-with-past`) takes `input_ids`, `attention_mask`, `position_ids` and
`past_key_values.{i}.key/value` ([batch, kv_heads, past, head_dim]) and returns `logits`
([batch, seq, vocab]) and `present.{i}.key/value` ([batch, kv_heads, past + seq, head_dim]).

Two paths compute the same step:
- the fast path (`io_binding=True`) binds outputs to ORT-allocated buffers and feeds each step's
  `present.*` OrtValues straight back as the next step's `past_key_values.*`, so the cache never
  round-trips through numpy; only the last row of logits is copied out;
- the reference path (`io_binding=False`) is plain `session.run` with numpy in and out.
A test checks that both give the same logits and tokens.

Side-car adapters (runtimes/adapters.py): `adapter=NAME` or `set_adapter(NAME)` activates one of the
package's `.onnx_adapter` files for every later step (bound on the IO binding in the fast path, through
`RunOptions.add_active_adapter` in the reference path); `None` runs the graph's default adapter.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Mapping, Optional

import numpy as np

from edge_recover.errors import EdgeRecoverError

from .package import Package, open_package
from .providers import ProviderChoice, check_package_bits, resolve_provider

__all__ = ["OrtCausalLM", "KVCache"]


@dataclass
class KVCache:
    """The cache after some positions: per layer key and value (numpy arrays or OrtValues)."""

    values: list          # [key0, value0, key1, value1, ...]
    length: int           # cached positions


class OrtCausalLM:
    """A package opened on one execution provider; `step` runs the graph once.

    Example:
        >>> lm = OrtCausalLM("out/demo/w4w2gateup", provider="cpu")  # doctest: +SKIP
        >>> logits, cache = lm.step(np.array([[1, 2, 3]]), lm.empty_cache())  # doctest: +SKIP
    """

    def __init__(self, package: Package | str | os.PathLike, provider: str = "cpu", threads: Optional[int] = None,
                 provider_options: Optional[Mapping[str, str]] = None, fallback: bool = False,
                 io_binding: bool = True, adapter: Optional[str] = None) -> None:
        import onnxruntime as ort

        self.package = package if isinstance(package, Package) else open_package(package)
        self.choice: ProviderChoice = resolve_provider(provider, provider_options, fallback)
        check_package_bits(self.choice, set(self.package.stats.matmulnbits_bits))
        so = ort.SessionOptions()
        self.threads = int(threads or os.cpu_count() or 1)
        so.intra_op_num_threads = self.threads
        so.inter_op_num_threads = 1
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.log_severity_level = 3
        if self.choice.spec.sequential:
            so.enable_mem_pattern = False
            so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        for key, value in self.choice.spec.session_config.items():
            so.add_session_config_entry(key, value)
        try:
            self.session = ort.InferenceSession(str(self.package.model_file), so,
                                                providers=self.choice.providers_arg())
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
        self._kv_dtype = np.float16 if "float16" in kv_type else np.float32
        st = self.package.stats
        self._kv_shape = (st.kv_heads, st.head_dim)
        self.adapter = None
        self.set_adapter(adapter)

    def set_adapter(self, name: Optional[str]) -> None:
        """Activate the package's side-car adapter `name` for later steps (None: the graph's default)."""
        from .adapters import load_adapter

        self.adapter = None if name is None else load_adapter(self.package, name, self.session)

    @property
    def context_length(self) -> int:
        return self.package.context_length

    def empty_cache(self) -> KVCache:
        """A cache with no positions (shape [1, kv_heads, 0, head_dim] per tensor)."""
        heads, dim = self._kv_shape
        empty = np.zeros((1, heads, 0, dim), dtype=self._kv_dtype)
        return KVCache([empty] * len(self._kv_in), 0)

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
        if not self.io_binding:
            for name, value in zip(self._kv_in, cache.values):
                feeds[name] = value if isinstance(value, np.ndarray) else value.numpy()
            out = self.session.run(None, feeds, self.adapter.run_options if self.adapter else None)
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
        outs: list[Any] = binding.get_outputs()
        logits = outs[0].numpy()[0, -1].copy()
        return logits, KVCache(list(outs[1:]), cache.length + t)

    def describe(self) -> str:
        """One line: package, provider, options, threads."""
        adapter = f", adapter {self.adapter.name}" if self.adapter else ""
        return f"{self.package.path}{adapter} on {self.choice.describe()}, {self.threads} threads"

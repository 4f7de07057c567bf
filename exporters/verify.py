"""Parity of an exported graph with the torch quantized model it came from.

Runs the package's model.onnx on ONNX Runtime's CPU provider and the torch model on the same token ids,
in two steps that together exercise the whole KV-cache contract:

    prefill  ids[:-1] with an empty past       ──► logits[:, :-1]  and present.*
    decode   ids[-1:] with past = present.*    ──► logits[:, -1]

and compares the logits at every position: top-1 agreement (the fraction of positions whose argmax is the
same) and max abs difference.

Two graphs are compared, because CPU targets run MatMulNBits at accuracy_level 4 (int8 activations), an
approximation whose noise a badly quantized model (2-bit SmolLM2 before recovery) amplifies into flipped
near-ties:
- the exact graph (every MatMulNBits at accuracy_level 0: fp32 dequantization) must agree with torch on
  top-1 for at least `MIN_TOP1` of the positions; this proves the integers and the mapping are right, and
  it is the pass criterion;
- the shipped graph's figures are recorded next to it (what the target actually computes).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

DEFAULT_PROMPTS = (
    "The capital of France is",
    "Once upon a time, in a small village by the sea, there lived",
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return",
    "Water boils at a temperature of one hundred degrees",
)
CACHE_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int8)": np.int8}  # KV inputs
MIN_TOP1 = 0.95  # exact-graph agreement below this fails the export unless verification is turned off


@dataclass
class Parity:
    """Agreement between ONNX Runtime (CPU) and torch over all compared positions."""

    prompts: int
    positions: int
    top1_agreement: float
    max_abs_diff: float
    mean_abs_diff: float
    logit_scale: float  # max |logit| in torch, to read max_abs_diff against
    threshold: float = MIN_TOP1

    @property
    def ok(self) -> bool:
        return self.top1_agreement >= self.threshold

    def to_json(self) -> dict:
        return {**asdict(self), "ok": self.ok}


def session(model_path: str | Path, threads: int = 2, optimize: bool = True):
    """An ORT CPU session for a package's model.onnx."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.log_severity_level = 3
    if not optimize:
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(str(model_path), so, providers=["CPUExecutionProvider"])


def empty_past(sess, batch: int = 1) -> dict[str, np.ndarray]:
    """Zero-length past_key_values.* inputs shaped from the session's input metadata."""
    feeds = {}
    for inp in sess.get_inputs():
        if inp.name.startswith("past_key_values"):
            _, heads, _, head_dim = inp.shape
            feeds[inp.name] = np.zeros((batch, heads, 0, head_dim), CACHE_DTYPES[inp.type])
    return feeds


def run_step(sess, ids: np.ndarray, past: dict[str, np.ndarray], past_len: int) -> tuple[np.ndarray, dict]:
    """One forward of ids [1, T] after `past_len` cached tokens; returns logits and the new past."""
    t = ids.shape[1]
    feeds = {"input_ids": ids.astype(np.int64),
             "attention_mask": np.ones((1, past_len + t), np.int64),
             "position_ids": np.arange(past_len, past_len + t, dtype=np.int64)[None], **past}
    names = {i.name for i in sess.get_inputs()}
    outs = sess.run(None, {k: v for k, v in feeds.items() if k in names})
    out_names = [o.name for o in sess.get_outputs()]
    result = dict(zip(out_names, outs))
    new_past = {n.replace("present", "past_key_values"): v for n, v in result.items() if n.startswith("present")}
    return result["logits"], new_past


def prompt_ids(tokenizer, vocab_size: int, prompts=DEFAULT_PROMPTS, seed: int = 0) -> list[np.ndarray]:
    """Token ids [1, T] per prompt (random ids when there is no tokenizer)."""
    if tokenizer is None:
        rng = np.random.default_rng(seed)
        return [rng.integers(0, vocab_size, (1, 12)) for _ in prompts]
    out = []
    for p in prompts:
        ids = np.asarray(tokenizer(p)["input_ids"], np.int64)[None]
        out.append(np.clip(ids, 0, vocab_size - 1))
    return out


def compare(model_path: str | Path, torch_model, tokenizer, prompts=DEFAULT_PROMPTS,
            threshold: float = MIN_TOP1) -> Parity:
    """Compare ORT CPU logits of `model_path` with `torch_model` on `prompts` (prefill + one decode step)."""
    import torch

    sess = session(model_path)
    vocab = torch_model.config.vocab_size
    agree = total = 0
    max_diff = scale = 0.0
    diffs = []
    for ids in prompt_ids(tokenizer, vocab, prompts):
        with torch.no_grad():
            ref = torch_model(torch.from_numpy(ids)).logits.float().numpy()[0]
        pre, past = run_step(sess, ids[:, :-1], empty_past(sess), 0)
        dec, _ = run_step(sess, ids[:, -1:], past, ids.shape[1] - 1)
        got = np.concatenate([pre[0], dec[0]], axis=0)
        d = np.abs(got - ref)
        diffs.append(d.mean())
        max_diff = max(max_diff, float(d.max()))
        scale = max(scale, float(np.abs(ref).max()))
        agree += int((got.argmax(-1) == ref.argmax(-1)).sum())
        total += ref.shape[0]
    return Parity(len(prompts), total, agree / max(total, 1), max_diff, float(np.mean(diffs)), scale, threshold)


def ort_perplexity(model_path: str | Path, windows, threads: int = 2, chunk: int | None = None) -> tuple[float, int]:
    """(perplexity, scored tokens) of a package graph on `windows` [n, T] ids, each scored from an empty past,
    exactly as `edge_recover.evaluate.evaluate` scores the torch model: in one forward (`chunk` None), or
    `chunk` tokens per step through the KV cache (1: as decoding reads it; what a quantized cache changes)."""
    sess = session(model_path, threads=threads)
    nll, count = 0.0, 0
    for row in np.asarray(windows):
        step = chunk or len(row)
        past, parts = empty_past(sess), []
        for start in range(0, len(row), step):
            logits, past = run_step(sess, row[None, start:start + step], past, start)
            parts.append(logits[0])
        lg = np.concatenate(parts)[:-1].astype(np.float64)
        lg -= lg.max(-1, keepdims=True)
        logp = lg - np.log(np.exp(lg).sum(-1, keepdims=True))
        nll -= float(logp[np.arange(len(row) - 1), row[1:]].sum())
        count += len(row) - 1
    return float(np.exp(nll / count)), count


def with_accuracy_level(model_path: str | Path, level: int, folder: str | Path) -> Path:
    """A copy of the graph at `model_path` with every MatMulNBits at `level`, written into `folder`."""
    import onnx

    m = onnx.load(str(model_path))
    for n in m.graph.node:
        for a in n.attribute:
            if n.op_type == "MatMulNBits" and a.name == "accuracy_level":
                a.i = level
    out = Path(folder) / "model.onnx"
    onnx.save_model(m, str(out), save_as_external_data=True, location="model.onnx.data", size_threshold=1024)
    return out


def exact_parity(model_path: str | Path, torch_model, tokenizer, accuracy_level: int,
                 threshold: float = MIN_TOP1) -> Parity:
    """Parity of `model_path` at accuracy_level 0 (fp32 dequantization) with torch: the export's gate."""
    import tempfile

    if accuracy_level == 0:
        return compare(model_path, torch_model, tokenizer, threshold=threshold)
    with tempfile.TemporaryDirectory(prefix="edge-recover-verify-") as tmp:
        return compare(with_accuracy_level(model_path, 0, tmp), torch_model, tokenizer, threshold=threshold)


def verify_package(model_path: str | Path, torch_model, tokenizer, accuracy_level: int,
                   threshold: float = MIN_TOP1, exact: Parity | None = None) -> dict:
    """Parity of the exact graph (the gate) and of the shipped graph; `ok` says whether the export passes.

    `exact`: the gate measured already, on the graph before a change that is not torch's (an int8 KV cache
    replaces the float32 one after calibration: its rounding is the shipped graph's, not the integers').
    """
    shipped = compare(model_path, torch_model, tokenizer, threshold=0.0)
    if exact is None:
        exact = exact_parity(model_path, torch_model, tokenizer, accuracy_level, threshold)
    return {**shipped.to_json(), "accuracy_level": accuracy_level, "exact": exact.to_json(), "ok": exact.ok}

"""Synthetic distillation data: the full-precision teacher writes its own text, no corpus and no labels.

Generation is a plain KV-cache sampling loop over a batch (no `generate()`): one forward per new token for
the whole batch, top-p sampling on the GPU, and no stopping at EOS, so every row is exactly `seq_len`
tokens and the batch never shrinks. On a GPU this makes data generation a small part of a recovery run
(`generate()` was the bottleneck of the plain recipe in FACTS.md).
Each batch samples from its own seeded generator, so a batch is the same whichever process runs it: on
several processes (recovery/distributed.py) process r samples the batches r, r + n, ... and the shards put
together are the file one process writes, bit for bit (tests/recovery/test_distributed.py checks it).

Diversity strategy (what keeps 10k samples from collapsing onto a few favourite continuations):
- every row starts from its own first token, drawn uniformly from the ordinary vocabulary (special tokens
  excluded), so the samples cover topics, languages and code roughly as the vocabulary does;
- every row gets its own sampling temperature, drawn uniformly from `temperatures` (default 0.8-1.2):
  cooler rows are fluent, likely text (what the model is used for), warmer rows visit the tail of the
  distribution, where the 2-bit student is most wrong;
- top-p 0.95 cuts the garbage tail that pure sampling at temperature > 1 would otherwise drift into;
- `chat_share` of the rows (0 by default) start instead from the chat template's opening of a user turn
  (self-instruct, as Magpie does): an instruct model then writes a request of the kind it was tuned on and,
  since a row does not stop at the end of a turn, its own answer to it. No prompt list, still no labels.
An EOS does not end a row: the teacher simply starts a new piece of text after it, as it would in use.

The result is saved as one safetensors file (`input_ids` int32 [N, T], `temperature` f32 [N]) whose header
metadata holds the settings as JSON (seed included) and the teacher's source hash, so it can be reused by
later runs and is refused for another teacher. No pickle.
"""

from __future__ import annotations

import contextlib
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from edge_recover.calibration import ordinary_token_pool, sample_rows, sample_top_p  # noqa: F401 (the one teacher sampler; re-exported)
from edge_recover.errors import EdgeRecoverError, require

DATASET_KIND = "edge-recover-synthetic-dataset"
DATASET_FORMAT_VERSION = 1


@dataclass(frozen=True)
class SampleSettings:
    """How the teacher samples the synthetic data set.

    Example:
        >>> SampleSettings(samples=8, seq_len=32).tokens
        256
    """

    samples: int = 10_000
    seq_len: int = 256
    seed: int = 0
    top_p: float = 0.95
    temperature_min: float = 0.8
    temperature_max: float = 1.2
    batch_size: int = 512
    chat_share: float = 0.0  # rows that start from the chat template's user-turn opening (chat_prefix)

    def __post_init__(self) -> None:
        require(0.0 <= self.chat_share <= 1.0, f"`chat_share` must be in [0, 1], got {self.chat_share!r}; try 0.5")
        require(isinstance(self.samples, int) and self.samples > 0,
                f"`samples` must be a positive integer, got {self.samples!r}; try 10000 (GPU) or 64 (a quick CPU run)")
        require(isinstance(self.seq_len, int) and self.seq_len >= 8,
                f"`seq_len` must be an integer >= 8, got {self.seq_len!r}; try 256")
        require(0.0 < self.top_p <= 1.0, f"`top_p` must be in (0, 1], got {self.top_p!r}")
        require(0.0 < self.temperature_min <= self.temperature_max,
                f"temperatures must satisfy 0 < min <= max, got {self.temperature_min!r}..{self.temperature_max!r}")
        require(self.batch_size > 0, f"`batch_size` must be positive, got {self.batch_size!r}")

    @property
    def tokens(self) -> int:
        return self.samples * self.seq_len

    def to_json(self) -> dict:
        return asdict(self)


@dataclass
class SyntheticDataset:
    """Teacher samples: `input_ids` int64 [N, T], per-row `temperature` [N], and where they came from."""

    input_ids: torch.Tensor
    temperature: torch.Tensor
    settings: SampleSettings
    teacher_hash: str
    seconds: float = 0.0

    def save(self, path: str | Path) -> Path:
        """Write one safetensors file (tensors + settings JSON in the header), atomically."""
        from safetensors.torch import save_file

        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        meta = {"kind": DATASET_KIND, "format_version": DATASET_FORMAT_VERSION, "settings": self.settings.to_json(),
                "teacher_hash": self.teacher_hash, "seconds": self.seconds}
        tmp = p.with_name(f".{p.name}.partial")
        save_file({"input_ids": self.input_ids.to(torch.int32).contiguous(),
                   "temperature": self.temperature.float().contiguous()},
                  str(tmp), metadata={"edge_recover": json.dumps(meta)})
        tmp.replace(p)
        return p


def load_dataset(path: str | Path, teacher_hash: str | None = None) -> SyntheticDataset:
    """Read a data set written by `SyntheticDataset.save`; refuse a corrupt file or one from another teacher.

    Example:
        >>> ds = load_dataset("out/run.work/dataset.safetensors")  # doctest: +SKIP
    """
    from safetensors import safe_open

    p = Path(path)
    require(p.is_file(), f"dataset {str(p)!r} does not exist; run `edge-recover recover` to generate one")
    try:
        with safe_open(str(p), framework="pt") as f:
            meta = json.loads((f.metadata() or {})["edge_recover"])
            ids = f.get_tensor("input_ids").long()
            temps = f.get_tensor("temperature").float()
    except Exception as exc:  # safetensors raises several types for a damaged header or body
        raise EdgeRecoverError(f"dataset {str(p)!r} is corrupt or not an edge-recover dataset "
                               f"({type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else '?'}); "
                               "delete it and run again to regenerate") from None
    require(meta.get("kind") == DATASET_KIND, f"{str(p)!r} is not an edge-recover dataset; delete it and run again")
    require(meta.get("format_version", 0) <= DATASET_FORMAT_VERSION,
            f"dataset {str(p)!r} was written by a newer edge-recover; upgrade or regenerate it")
    settings = SampleSettings(**meta["settings"])
    require(ids.ndim == 2 and ids.shape == (settings.samples, settings.seq_len) and temps.shape == (settings.samples,),
            f"dataset {str(p)!r} holds {tuple(ids.shape)} tokens but its settings say "
            f"({settings.samples}, {settings.seq_len}); it is corrupt: delete it and run again")
    if teacher_hash is not None:
        require(meta.get("teacher_hash") == teacher_hash,
                f"dataset {str(p)!r} was sampled from another teacher ({meta.get('teacher_hash')}, this one is "
                f"{teacher_hash}); pass another `--dataset` or delete it to regenerate")
    return SyntheticDataset(ids, temps, settings, meta.get("teacher_hash", ""), meta.get("seconds", 0.0))


@torch.no_grad()
def generate_dataset(model, tokenizer, settings: SampleSettings, teacher_hash: str, device: str | torch.device | None = None,
                     progress: bool = True, shard: tuple[int, int] = (0, 1)) -> SyntheticDataset:
    """Let `model` (the teacher) write `settings.samples` rows of `settings.seq_len` tokens.

    Rows are sampled in batches of `settings.batch_size`; batch b draws from its own generator (seeded by
    `batch_seed(seed, b)`), so a batch's rows do not depend on which batches ran before it. `shard=(r, n)`
    samples only the batches b with b % n == r (the rows of the other batches stay 0): process r of n does
    its share, and the n shards put together (`merge_shards`) are bit for bit the file one process writes,
    every batch having run with the same rows, the same shapes and the same generator.

    Example:
        >>> ds = generate_dataset(lm.model, lm.tokenizer, SampleSettings(samples=64), lm.source_hash)  # doctest: +SKIP
    """
    import time

    t0 = time.perf_counter()
    rank, world = shard
    require(0 <= rank < world, f"`shard` must be (rank, world) with 0 <= rank < world, got {shard!r}")
    device = torch.device(device or next(model.parameters()).device)
    cpu_gen = torch.Generator().manual_seed(settings.seed)
    pool = ordinary_token_pool(tokenizer, model.config.vocab_size)
    first = pool[torch.randint(len(pool), (settings.samples,), generator=cpu_gen)]
    temps = settings.temperature_min + (settings.temperature_max - settings.temperature_min) * torch.rand(
        settings.samples, generator=cpu_gen)
    prefix, forced = first.view(-1, 1), None
    if settings.chat_share > 0:  # drawn after the first tokens and temperatures: chat_share 0 keeps old data sets
        opening = torch.tensor(chat_prefix(tokenizer), dtype=torch.long)
        require(len(opening) < settings.seq_len, f"the chat template's opening is {len(opening)} tokens, not shorter "
                                                 f"than `seq_len` {settings.seq_len}; raise `--seq-len`")
        chat = torch.rand(settings.samples, generator=cpu_gen) < settings.chat_share
        prefix = torch.where(chat[:, None], opening[None, :], first[:, None].expand(-1, len(opening)))
        forced = chat[:, None].expand(-1, len(opening)).clone()
        forced[:, 0] = True
    out = torch.zeros(settings.samples, settings.seq_len, dtype=torch.long)
    mine = [b for b in range(math.ceil(settings.samples / settings.batch_size)) if b % world == rank]
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(mine), desc="teacher samples", unit="batch", leave=False)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
    for b in mine:
        start, end = b * settings.batch_size, min((b + 1) * settings.batch_size, settings.samples)
        gen = torch.Generator(device=device).manual_seed(batch_seed(settings.seed, b))
        with autocast:
            out[start:end] = sample_rows(model, prefix[start:end], settings.seq_len, temps[start:end], settings.top_p, gen,
                                         forced=None if forced is None else forced[start:end])
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    return SyntheticDataset(out, temps, settings, teacher_hash, seconds=time.perf_counter() - t0)


def chat_prefix(tokenizer) -> list[int]:
    """Token ids of the chat template up to where a user's message begins (system turn included, if any).

    Example:
        >>> chat_prefix(qwen_tokenizer)  # doctest: +SKIP
        [151644, 8948, 198, ..., 151644, 872, 198]   # <|im_start|>system ... <|im_start|>user\n
    """
    marker = "\u2063EDGE-RECOVER\u2063"
    require(getattr(tokenizer, "chat_template", None), "the model's tokenizer has no chat template, so `--chat-share` "
                                                       "has nothing to start from; leave it at 0")
    text = tokenizer.apply_chat_template([{"role": "user", "content": marker}], tokenize=False)
    require(marker in text, "the chat template drops the user's message; leave `--chat-share` at 0")
    return tokenizer(text[:text.index(marker)], add_special_tokens=False)["input_ids"]


def batch_seed(seed: int, batch: int) -> int:
    """Seed of the sampling generator of batch `batch` (batch 0: seed + 1, what a one-batch data set always used)."""
    return seed + 1 + (batch << 32)


def shard_rows(settings: SampleSettings, shard: tuple[int, int]) -> torch.Tensor:
    """Indices of the rows that `generate_dataset(..., shard=shard)` samples."""
    rank, world = shard
    rows = torch.arange(settings.samples)
    return rows[(rows // settings.batch_size) % world == rank]


def merge_shards(parts: list[SyntheticDataset]) -> SyntheticDataset:
    """The data set of one process from the shards of `world = len(parts)` (part r from `shard=(r, world)`)."""
    world = len(parts)
    out = parts[0].input_ids.clone()
    for rank, part in enumerate(parts):
        rows = shard_rows(part.settings, (rank, world))
        out[rows] = part.input_ids[rows]
    return SyntheticDataset(out, parts[0].temperature, parts[0].settings, parts[0].teacher_hash,
                            seconds=max(p.seconds for p in parts))


def split_holdout(n: int, share: float = 0.02, minimum: int = 4, maximum: int = 256) -> int:
    """How many rows (taken from the end) a run keeps aside to measure KL before and after training."""
    return max(min(minimum, n // 2), min(maximum, math.ceil(n * share)))

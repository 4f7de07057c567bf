"""A tied model's input embedding that reads its quantized head, as the exported package does.

A tied model shares one [V, K] matrix between the embedding and the lm_head. Once a scheme quantizes the
head (`--rule lm_head=4:32`), the package's embedding reads the head's integers (exporters/embedding.py,
the export default), so a token's input vector is the head's dequantized row, not the float row. A torch
model that keeps the float table for its embedding is then another model than the one that ships: the
recovery would train (and report figures) against an embedding the package does not have.

`share_quantized_head(model)` swaps the embedding module for `SharedHeadEmbedding`, which keeps the float
table as its own `weight` (same parameter, same state-dict key: checkpoints store and load as before) but
looks tokens up in the head's current weight: a `QuantLinear`'s dequantized weight, or a `FakeQuantLinear`'s
W_hat = (q - z) * s of the step (the batch's rows only), so gradients reach the head's latents and scales
through both of its uses.
The head is found on every call, so a head swapped later (fake-quantized for training, frozen after) is
read as it is then.

An untied model (its own embedding table, e.g. after `edge-recover rotate`, or Llama-3-style models) whose head
is quantized gets `QuantizedTableEmbedding` instead: its table quantized once, 8-bit RTN at the head's block
size (`table_quantization`, on the CPU, so the student and the exporter compute the same integers from the same
float table), looked up dequantized. The package stores those integers for com.microsoft GatherBlockQuantized
(a quarter of the float table) instead of the float table.

    >>> share_quantized_head(model)  # doctest: +SKIP
    True
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .fakequant import FakeQuantLinear
from .qlinear import QuantLinear
from .quantizer import QuantizedWeight, quantize_weight
from .scheme import QuantConfig

TABLE_BITS = 8  # an untied embedding's own table: near-lossless (the cpu head's 8 bits), a quarter of float32


class SharedHeadEmbedding(nn.Module):
    """`nn.Embedding`'s lookup in the quantized head's weight; `weight` is the float table, kept, not read."""

    def __init__(self, embedding: nn.Embedding, owner: nn.Module):
        super().__init__()
        self.weight = embedding.weight
        self.num_embeddings, self.embedding_dim = embedding.num_embeddings, embedding.embedding_dim
        self.padding_idx = embedding.padding_idx
        object.__setattr__(self, "_owner", owner)  # not a submodule: the model is not its own child

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        head = self._owner.get_output_embeddings()
        if isinstance(head, FakeQuantLinear):  # the batch's rows of W_hat only (the head's forward makes all)
            uniq, inverse = torch.unique(ids.reshape(-1), return_inverse=True)
            rows = head.dequantized_rows(uniq).to(self.weight.dtype)
            return rows[inverse].reshape(*ids.shape, rows.shape[-1])
        return F.embedding(ids, head.weight.to(self.weight.dtype), self.padding_idx)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, reads the quantized lm_head"


class QuantizedTableEmbedding(nn.Module):
    """`nn.Embedding`'s lookup in its own table's 8-bit integers, dequantized; `weight` is the float table, kept."""

    def __init__(self, embedding: nn.Embedding, quantized: QuantizedWeight):
        super().__init__()
        self.weight = embedding.weight
        self.num_embeddings, self.embedding_dim = embedding.num_embeddings, embedding.embedding_dim
        self.padding_idx = embedding.padding_idx
        self.quantized = quantized  # the integers the package stores (not a buffer: the checkpoint keeps `weight`)
        self.register_buffer("table", quantized.dequantize().to(embedding.weight.device, embedding.weight.dtype),
                             persistent=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.table, self.padding_idx)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, reads its own {self.quantized.config.describe()} table"


def table_quantization(model: nn.Module) -> QuantizedWeight:
    """The integers of `model`'s untied embedding table: 8-bit RTN at the quantized head's block size, on the CPU.

    Example:
        >>> qw = table_quantization(untied_model)  # doctest: +SKIP
    """
    head = model.get_output_embeddings()
    emb = model.get_input_embeddings()
    config = QuantConfig(TABLE_BITS, head.config.block_size)
    return quantize_weight(emb.weight.detach().float().cpu(), config, "rtn")


def quantizes_table(model: nn.Module) -> str | None:
    """None when `model`'s untied embedding gets its own quantized table (the head quantized, K a whole number
    of the head's blocks: what exporters/embedding.py needs), else why not."""
    return _head_reads(model, tied=False)


def shares(model: nn.Module) -> str | None:
    """None when `model`'s embedding can read its quantized head (tied, head quantized, K a whole number of
    the head's blocks: what exporters/embedding.py needs), else why not."""
    return _head_reads(model, tied=True)


def _head_reads(model: nn.Module, tied: bool) -> str | None:
    """Why the embedding cannot read quantized integers laid out like the head's (None: it can), given whether it
    must be tied to the head (`shares`) or untied (`quantizes_table`)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if not isinstance(head, (QuantLinear, FakeQuantLinear)):
        return "the lm_head is not quantized"
    if bool(getattr(model.config, "tie_word_embeddings", False)) != tied:
        return "the embedding is not tied to the lm_head" if tied else "the embedding is tied to the lm_head"
    if head.in_features % head.config.block_size:
        return f"hidden size {head.in_features} is not a multiple of the head's block size {head.config.block_size}"
    return None


def share_quantized_head(model: nn.Module) -> bool:
    """Make `model`'s embedding read its quantized head (in place) when `shares(model)` allows, or, untied, its own
    8-bit table when `quantizes_table(model)` allows; idempotent. Returns whether the embedding is now quantized."""
    emb = model.get_input_embeddings()
    if isinstance(emb, (SharedHeadEmbedding, QuantizedTableEmbedding)):
        return True
    if not isinstance(emb, nn.Embedding):
        return False
    if shares(model) is None:
        model.set_input_embeddings(SharedHeadEmbedding(emb, model))
        return True
    if quantizes_table(model) is None:
        model.set_input_embeddings(QuantizedTableEmbedding(emb, table_quantization(model)))
        return True
    return False


def unshare_quantized_head(model: nn.Module) -> None:
    """A plain `nn.Embedding` again (in place), for graph capture. A tied model with a quantized head gets the
    head's dequantized weight as its table (a copy): the values the shared embedding reads, so a graph that
    keeps a float table (an unfused target; `--float-embedding`) embeds as the training did, and one that
    shares the head's integers (exporters/embedding.py) replaces this table by them. Any other model keeps
    its own float table (an untied one's 8-bit integers are made again from it: `table_quantization`)."""
    emb = model.get_input_embeddings()
    if shares(model) is None:
        head = model.get_output_embeddings()
        w = (head.dequantized() if isinstance(head, FakeQuantLinear) else head.weight).detach()
        table = nn.Parameter(w.to(emb.weight.dtype).clone(), requires_grad=False)
    elif isinstance(emb, (SharedHeadEmbedding, QuantizedTableEmbedding)):  # an own table: the exporter quantizes
        table = emb.weight
    else:
        return
    plain = nn.Embedding(table.shape[0], table.shape[1], emb.padding_idx, _weight=table.data)  # no new table
    plain.weight = table
    model.set_input_embeddings(plain)

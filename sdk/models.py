"""Loading causal LMs: a Hugging Face folder, a `.gguf` file, or an edge-recover quantized checkpoint.

`load_model` takes any of the three: a checkpoint through `checkpoint.load_quantized`, the others through
`source.load_source` (the source model, the first stage; `LoadedModel`, `weights_hash`, `check_architecture`
and `fix_tokenizer` live there and are importable from here too). Model names (`smollm2`, ...) are
`pipeline.resolve_model`'s.
"""

from __future__ import annotations

from pathlib import Path

from .checkpoint import load_quantized
from .errors import require
from .source import (QUANTIZED_MARKER, LoadedModel, _gguf_token_id, check_architecture, fix_tokenizer,  # noqa: F401
                     load_source, weights_hash)


def load_model(path: str | Path, dtype=None, base=None) -> LoadedModel:
    """Load a causal LM from a HF folder, a `.gguf` file or an edge-recover quantized checkpoint.

    `base` is the source model of a slim checkpoint (see `checkpoint.load_quantized`).

    Example:
        >>> lm = load_model("~/.cache/edge-recover/smollm2-135m")  # doctest: +SKIP
        >>> lm.model.config.model_type
        'llama'
    """
    p = Path(path).expanduser()
    require(p.exists(), f"model path {str(p)!r} does not exist; run `edge-recover fetch smollm2` or pass a HF folder / .gguf file")
    require(base is None or (p / QUANTIZED_MARKER).is_file(),
            f"`--base` is the source model of a slim quantized checkpoint, but {str(p)!r} is not a quantized "
            f"checkpoint; drop --base")
    if (p / QUANTIZED_MARKER).is_file():
        return load_quantized(p, dtype=dtype, base=base)
    return load_source(p, dtype=dtype)

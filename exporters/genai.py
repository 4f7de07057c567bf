"""`genai_config.json`: what onnxruntime-genai needs to load a package folder and generate from it.

The Optimum graph takes `input_ids`, `attention_mask`, `position_ids` and `past_key_values.{i}.key/value`
and returns `logits` and `present.{i}.key/value`, with a KV cache that grows by concatenation (so
`past_present_share_buffer` is false: the cache is not a fixed-size buffer shared between steps). The fused
graph of the cpu target writes every `present.*` with GroupQueryAttention, which also runs on one buffer of
`max_length` positions bound as past and present (`share_buffer=True`: no per-step copy of the cache;
onnxruntime-genai 0.18 gives bit-equal logits either way, and allocates that buffer for the search's
`max_length`, the context length unless the caller sets it). The names are written out here so that
onnxruntime-genai binds them without a builder of its own.
"""

from __future__ import annotations

from edge_recover.layouts import layout_for


def _token_id(value, fallback: int) -> int:
    if isinstance(value, (list, tuple)):
        value = value[0] if value else None
    return fallback if value is None else int(value)


def genai_config(config, tokenizer=None, provider: str | None = None, context_length: int | None = None,
                 filename: str = "model.onnx", threads: int | None = None, share_buffer: bool = False) -> dict:
    """The genai_config.json dict for a Hugging Face `config` exported by Optimum.

    `share_buffer`: the graph writes every `present.*` with GroupQueryAttention (fusions.kv_share_buffer).
    The `type` onnxruntime-genai reads is the family's layout's `genai_type` (sdk/layouts.py); a config of no
    registered family is refused as loading refuses it.

    Example:
        >>> genai_config(model.config)["model"]["decoder"]["inputs"]["past_key_names"]  # doctest: +SKIP
        'past_key_values.%d.key'
    """
    heads = config.num_attention_heads
    head_size = getattr(config, "head_dim", None) or config.hidden_size // heads
    eos = _token_id(getattr(tokenizer, "eos_token_id", None), _token_id(config.eos_token_id, 0))
    bos = _token_id(getattr(config, "bos_token_id", None), eos)
    pad = _token_id(getattr(tokenizer, "pad_token_id", None), eos)
    ctx = int(context_length or min(getattr(config, "max_position_embeddings", 2048), 4096))
    session_options: dict = {"log_id": "onnxruntime-genai", "provider_options": []}
    if provider and provider != "CPUExecutionProvider":
        short = {"DmlExecutionProvider": "dml", "QNNExecutionProvider": "qnn",
                 "OpenVINOExecutionProvider": "OpenVINO", "VitisAIExecutionProvider": "VitisAI"}.get(provider)
        if short:
            session_options["provider_options"] = [{short: {}}]
    if threads:
        session_options["intra_op_num_threads"] = threads
    return {
        "model": {
            "bos_token_id": bos,
            "context_length": ctx,
            "decoder": {
                "session_options": session_options,
                "filename": filename,
                "head_size": int(head_size),
                "hidden_size": int(config.hidden_size),
                "inputs": {
                    "input_ids": "input_ids",
                    "attention_mask": "attention_mask",
                    "position_ids": "position_ids",
                    "past_key_names": "past_key_values.%d.key",
                    "past_value_names": "past_key_values.%d.value",
                },
                "outputs": {
                    "logits": "logits",
                    "present_key_names": "present.%d.key",
                    "present_value_names": "present.%d.value",
                },
                "num_attention_heads": int(heads),
                "num_hidden_layers": int(config.num_hidden_layers),
                "num_key_value_heads": int(getattr(config, "num_key_value_heads", heads)),
            },
            "eos_token_id": eos,
            "pad_token_id": pad,
            "type": layout_for(config).genai_type,
            "vocab_size": int(config.vocab_size),
        },
        "search": {
            "diversity_penalty": 0.0, "do_sample": False, "early_stopping": True, "length_penalty": 1.0,
            "max_length": ctx, "min_length": 0, "no_repeat_ngram_size": 0, "num_beams": 1,
            "num_return_sequences": 1, "past_present_share_buffer": bool(share_buffer), "repetition_penalty": 1.0,
            "temperature": 1.0, "top_k": 1, "top_p": 1.0,
        },
    }


# The qnn package's static graphs as onnxruntime-genai's decoder pipeline (0.18):
#
#   prompt ─► windows of W (the first padded at its front, `sliding_window.alignment` "right") ─► prefill stage
#   each generated token ───────────────────────────────────────────────────────────────────────► decode stage
#   both stages: input_ids, position_ids, past_key_values.* [1, kv, C, d] ─► logits, present.* [1, kv, C, d]
#
# `slide_key_value_cache` is off: 0.18's sliding cache takes uint8 caches only ("Expected input data type to be
# uint8_t for WindowedKeyValueCache"); the graphs keep the cache in place (slot = position, sdk/contract.py),
# and `past_present_share_buffer` binds one C-slot buffer per tensor as past and present.
def static_pipeline_config(config: dict, static: dict, files: dict[str, str],
                           provider_options: dict | None = None) -> dict:
    """`config` (from `genai_config`) as a decoder pipeline over the static graphs `files` ({"prefill": ...,
    "decode": ...}); `provider_options` ({"qnn": {...}}) go into each stage's session options.

    Example:
        >>> static_pipeline_config(cfg, manifest["static"], {"prefill": "prefill_ctx.onnx",  # doctest: +SKIP
        ...                        "decode": "decode_ctx.onnx"})["model"]["type"]
        'decoder-pipeline'
    """
    import copy

    out = copy.deepcopy(config)
    model, dec = out["model"], out["model"]["decoder"]
    c, w = int(static["context_length"]), int(static["window"])
    layers = int(dec["num_hidden_layers"])
    past = [f"past_key_values.{i}.{kv}" for i in range(layers) for kv in ("key", "value")]
    present = [f"present.{i}.{kv}" for i in range(layers) for kv in ("key", "value")]
    session = {"log_id": "onnxruntime-genai",
               "provider_options": [dict(provider_options)] if provider_options else []}
    stages = []
    for role, on_prompt in (("prefill", True), ("decode", False)):
        stages.append({role: {"filename": files[role], "inputs": ["input_ids", "position_ids", *past],
                              "outputs": ["logits", *present], "session_options": copy.deepcopy(session),
                              "run_on_prompt": on_prompt, "run_on_token_gen": not on_prompt}})
    dec.pop("filename", None)
    dec["session_options"] = copy.deepcopy(session)
    dec["inputs"].pop("attention_mask", None)
    dec["sliding_window"] = {"window_size": w, "pad_value": 0, "alignment": "right",
                             "slide_key_value_cache": False, "slide_inputs": True}
    dec["pipeline"] = stages
    model["type"] = "decoder-pipeline"
    model["context_length"] = c
    out["search"].update(max_length=c, past_present_share_buffer=True)
    return out


def portable_pipeline_config(config: dict) -> dict:
    """A qnn package's decoder-pipeline `config` run on the CPU provider: each stage reads the portable static graph
    (prefill.onnx, decode.onnx) instead of its EPContext model, and no stage or decoder names provider options.
    (og.Config's `clear_providers` clears only the decoder's own session options, and `overlay` does not empty the
    stages' provider lists, so the config is rewritten.)

    Example:
        >>> portable_pipeline_config(cfg)["model"]["decoder"]["pipeline"][0]["prefill"]["filename"]  # doctest: +SKIP
        'prefill.onnx'
    """
    import copy

    out = copy.deepcopy(config)
    dec = out["model"]["decoder"]
    dec["session_options"]["provider_options"] = []
    for stage in dec["pipeline"]:
        for spec in stage.values():
            spec["filename"] = spec["filename"].replace("_ctx.onnx", ".onnx")
            spec["session_options"]["provider_options"] = []
    return out

"""The qnn package under onnxruntime-genai 0.18: its genai_config.json is a decoder pipeline over the static
prefill and decode graphs, and og.Model / og.Generator generate the greedy tokens `edge-recover run --provider
cpu` does (through the CLI), for prompts shorter than, equal to and longer than the prefill window.

The shipped config puts the QNN HTP's provider options on every stage (the device's EPContext models); these
tests run a copy of the package whose config names the portable graphs and no provider (`cpu_pipeline`): the
same graphs and the same contract on the CPU EP. The shipped config itself runs on the HTP emulator once
onnxruntime-qnn's plugin EP library is registered with og (test_qnn_genai_htp.py).
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from tests.exporters.test_qnn_npu import cli
from tests.fixtures.tiny_models import save_tiny_model

import onnxruntime_genai as og  # noqa: E402  (a test dependency: CI must fail, not skip, without it)

C, W, NEW = 64, 16, 16
TEXT = ("the quick brown fox jumps over the lazy dog. to be or not to be, that is the question. all the world's a "
        "stage, and all the men and women merely players. ")


@pytest.fixture(scope="module", params=["llama", "qwen3"])
def pkg(request, tmp_path_factory):
    d = tmp_path_factory.mktemp(f"qnn-genai-{request.param}")
    hf = save_tiny_model(d / "hf", request.param, intermediate=128)
    res = cli("export", hf, "-o", d / "pkg", "--target", "npu", "--vendor", "qualcomm", "--method", "rtn",
              "--calibration", "0", "--context-length", C, "--prefill-window", W, "--soc", "SM8650")
    assert res.exit_code == 0, res.output
    return d / "pkg"


def cpu_pipeline(pkg, dest):
    """A copy of the qnn package whose genai_config.json runs the portable graphs (prefill.onnx, decode.onnx)
    with no provider options (the CPU EP): exporters/genai.py `portable_pipeline_config`."""
    from edge_recover.exporters.genai import portable_pipeline_config

    shutil.copytree(pkg, dest)
    cfg = json.loads((dest / "genai_config.json").read_text())
    (dest / "genai_config.json").write_text(json.dumps(portable_pipeline_config(cfg), indent=2))
    return dest


def genai_greedy(folder, ids: list[int], new: int = NEW) -> tuple[list[int], np.ndarray]:
    """og.Model + og.Generator, greedy: up to `new` tokens after `ids`, and the logits of the prompt's last
    position."""
    model = og.Model(str(folder))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=C, do_sample=False)
    gen = og.Generator(model, params)
    gen.append_tokens(ids)
    first = np.asarray(gen.get_output("logits")).reshape(-1, np.asarray(gen.get_output("logits")).shape[-1])[-1]
    out = []
    while not gen.is_done() and len(out) < new:
        gen.generate_next_token()
        out.append(int(gen.get_next_tokens()[0]))
    return out, first


def _text_of(pkg, n: int) -> tuple[str, list[int]]:
    """A prompt of exactly `n` tokens (as the runtime encodes it: no special tokens)."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(pkg / "tokenizer.json"))
    words = (TEXT * 4).split(" ")
    for k in range(1, len(words)):
        text = " ".join(words[:k])
        ids = tok.encode(text, add_special_tokens=False).ids
        if len(ids) == n:
            return text, ids
        if len(ids) > n:
            break
    ids = tok.encode(TEXT * 4, add_special_tokens=False).ids[:n]  # no word boundary hits n: cut the ids
    text = tok.decode(ids)
    assert tok.encode(text, add_special_tokens=False).ids == ids
    return text, ids


def test_genai_config_is_the_decoder_pipeline(pkg):
    cfg = json.loads((pkg / "genai_config.json").read_text())
    model, dec = cfg["model"], cfg["model"]["decoder"]
    assert model["type"] == "decoder-pipeline" and model["context_length"] == C
    assert dec["sliding_window"] == {"window_size": W, "pad_value": 0, "alignment": "right",
                                     "slide_key_value_cache": False, "slide_inputs": True}
    assert cfg["search"]["max_length"] == C and cfg["search"]["past_present_share_buffer"] is True
    stages = [next(iter(s.items())) for s in dec["pipeline"]]
    assert [(r, s["filename"], s["run_on_prompt"], s["run_on_token_gen"]) for r, s in stages] == [
        ("prefill", "prefill_ctx.onnx", True, False), ("decode", "decode_ctx.onnx", False, True)]
    qnn = {"backend_path": "libQnnHtp.so", "enable_htp_fp16_precision": "1", "htp_performance_mode": "burst",
           "soc_model": "57", "htp_arch": "75"}
    for _, s in stages:
        assert s["session_options"]["provider_options"] == [{"qnn": qnn}]
        assert s["inputs"][:2] == ["input_ids", "position_ids"] and "attention_mask" not in s["inputs"]
        assert s["outputs"][0] == "logits" and len(s["outputs"]) == 1 + 2 * model["decoder"]["num_hidden_layers"]
    m = json.loads((pkg / "manifest.json").read_text())
    assert m["static"]["cache"] == "positional"


@pytest.mark.parametrize("n", [5, W, W + 5], ids=["shorter", "equal", "longer"])
def test_genai_greedy_tokens_equal_edge_recover_run(pkg, tmp_path, n):
    """16 greedy tokens from og.Generator equal `edge-recover run PKG --provider cpu` (the CLI's text and the
    runtime's ids), and the prompt's last logits agree."""
    from edge_recover.runtimes.generate import generate_ids
    from edge_recover.runtimes.static_session import StaticCausalLM

    text, ids = _text_of(pkg, n)
    theirs, first = genai_greedy(cpu_pipeline(pkg, tmp_path / "cpu"), ids)
    lm = StaticCausalLM(pkg, "cpu")
    ours = generate_ids(lm, ids, max_new_tokens=NEW).tokens
    logits, _ = lm.prefill(np.asarray([ids]), lm.empty_cache())
    print(f"\n{pkg.parent.name} n={n}: genai {theirs}\n  ours {ours}; last prompt logits max diff "
          f"{np.abs(first - logits).max():.2e}")
    assert len(theirs) == NEW and theirs == ours
    np.testing.assert_allclose(first, logits, atol=1e-5, rtol=0)
    res = cli("run", pkg, "--provider", "cpu", "-p", text, "--max-new-tokens", NEW)
    assert res.exit_code == 0, res.output
    assert f"{n} prompt tokens, {NEW} new" in res.output, res.output
    from tokenizers import Tokenizer

    said = Tokenizer.from_file(str(pkg / "tokenizer.json")).decode(theirs)
    assert said in res.output


def test_a_prompt_past_the_context(pkg, tmp_path):
    """Our runtime: one line, exit 2. onnxruntime-genai: append_tokens raises for a prompt over C tokens, and a
    prompt whose padded windows reach C leaves it no room (GenerateNextToken at max_length)."""
    text, ids = _text_of(pkg, C + 6)
    res = cli("run", pkg, "--provider", "cpu", "-p", text)
    lines = [ln for ln in res.output.strip().splitlines() if ln.strip()]
    assert res.exit_code == 2 and len(lines) == 1, res.output
    assert lines[0].startswith(f"error: prompt of {C + 6} tokens does not fit the model's context of {C} tokens")
    folder = cpu_pipeline(pkg, tmp_path / "cpu")
    with pytest.raises(RuntimeError, match=rf"input_ids size \({C + 6}\) \+ current sequence length \(0\) exceeds "
                                           rf"max length \({C}\)"):
        genai_greedy(folder, ids)
    # 50 tokens: our runtime has 14 slots left; genai pads the first window (50 -> 64 = C) and stops
    with pytest.raises(RuntimeError, match=rf"sequence length already at max_length \({C}\)"):
        genai_greedy(folder, _text_of(pkg, C - W + 2)[1])


def test_a_padded_window_after_a_filled_cache(pkg):
    """The contract's padding takes the window's first position, so a second prompt after a filled cache (a
    chat turn) gives the logits of one prompt of both: the padding is neither written nor attended."""
    from edge_recover.runtimes.static_session import StaticCausalLM

    ids = np.asarray([_text_of(pkg, 2 * W + 3)[1]])
    lm = StaticCausalLM(pkg, "cpu")
    whole, _ = lm.prefill(ids, lm.empty_cache(), all_logits=True)
    cache = lm.empty_cache()
    first, cache = lm.prefill(ids[:, :W + 2], cache, all_logits=True)
    second, cache = lm.prefill(ids[:, W + 2:], cache, all_logits=True)  # W + 1 tokens: [pad x 15, 1] [16]
    np.testing.assert_allclose(np.concatenate([first, second]), whole, atol=1e-5, rtol=0)

"""onnxruntime-genai 0.18 on the QNN HTP emulator: the qnn package's shipped genai_config.json, unchanged, runs
through og once onnxruntime-qnn's plugin EP library is registered with it.

    og.register_execution_provider_library("QNNExecutionProvider", onnxruntime_qnn.get_library_path())
    og.Model(pkg)   # the decoder pipeline over prefill_ctx.onnx / decode_ctx.onnx, provider "qnn" per stage

(C API: `OgaRegisterExecutionProviderLibrary(name, path)`.) Without that call og refuses the provider ("QNN
execution provider is not supported in this build"): the wheel has no built-in QNN EP. The stages are the
EPContext models, which hold only EPContext nodes: no other provider can run them, so tokens from og here come
from the HTP (on x86, Qualcomm's emulator). They must equal `edge-recover run PKG --provider qnn`.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from tests.exporters.test_qnn_genai import _text_of
from tests.exporters.test_qnn_npu import cli
from tests.fixtures.tiny_models import save_tiny_model
from edge_recover.runtimes.genai import register_qnn

import onnxruntime_genai as og  # noqa: E402  (test dependencies: CI must fail, not skip, without them)
import onnxruntime_qnn  # noqa: E402

C, W, NEW = 64, 16, 8
NOT_SUPPORTED = "QNN execution provider is not supported in this build"


@pytest.fixture(scope="module")
def pkg(tmp_path_factory):
    d = tmp_path_factory.mktemp("qnn-genai-htp")
    hf = save_tiny_model(d / "hf", "llama", intermediate=128)
    res = cli("export", hf, "-o", d / "pkg", "--target", "npu", "--vendor", "qualcomm", "--method", "rtn",
              "--calibration", "0", "--context-length", C, "--prefill-window", W, "--soc", "SM8650")
    assert res.exit_code == 0, res.output
    return d / "pkg"


def test_without_the_plugin_library_og_refuses_the_qnn_provider(pkg):
    """A fresh process that does not register the library: og.Model fails on the shipped config's "qnn"."""
    code = f"import onnxruntime_genai as og; og.Model({str(pkg)!r})"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode != 0
    assert f"RuntimeError: {NOT_SUPPORTED}" in res.stderr, res.stderr[-2000:]


@pytest.mark.parametrize("n", [5, W + 5], ids=["shorter", "longer"])
def test_og_on_the_htp_emulator_generates_what_edge_recover_run_does(pkg, n):
    """8 greedy tokens from og.Generator on the QNN HTP emulator equal our runtime's on the same provider (and
    the text `edge-recover run --provider qnn` prints), and so do the logits of every step: the prompt's last
    position, then each decode step (the tiny random model repeats its tokens; its logits do not)."""
    from edge_recover.runtimes.generate import generate_ids
    from edge_recover.runtimes.static_session import StaticCausalLM

    cfg = json.loads((pkg / "genai_config.json").read_text())
    stages = [next(iter(s.values())) for s in cfg["model"]["decoder"]["pipeline"]]
    assert [s["filename"] for s in stages] == ["prefill_ctx.onnx", "decode_ctx.onnx"]
    assert all(list(s["session_options"]["provider_options"][0]) == ["qnn"] for s in stages)

    register_qnn(og)  # what `run --engine genai` and examples/chat_genai.py call
    text, ids = _text_of(pkg, n)
    model = og.Model(str(pkg))  # the shipped config, unchanged (backend_path "libQnnHtp.so")
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=C, do_sample=False)
    gen = og.Generator(model, params)
    gen.append_tokens(ids)
    theirs, their_logits = [], []
    while not gen.is_done() and len(theirs) < NEW:
        gen.generate_next_token()  # og runs the step lazily: the logits it shows are those this token came from
        theirs.append(int(gen.get_next_tokens()[0]))
        last = np.asarray(gen.get_output("logits"))
        their_logits.append(last.reshape(-1, last.shape[-1])[-1])

    lm = StaticCausalLM(pkg, "qnn")
    ours = generate_ids(lm, ids, max_new_tokens=NEW).tokens
    logits, cache = lm.prefill(np.asarray([ids]), lm.empty_cache())
    our_logits = [logits]
    for token in theirs[:-1]:
        logits, cache = lm.step(np.asarray([[token]]), cache)
        our_logits.append(logits)
    diffs = [float(np.abs(a - b).max()) for a, b in zip(their_logits, our_logits)]
    print(f"\nn={n}: genai on QNN {theirs}\n  ours on QNN {ours}; logits max diff per step {diffs}")
    assert len(theirs) == NEW and theirs == ours
    assert max(diffs) <= 1e-6 and len(diffs) == NEW
    assert float(np.abs(our_logits[1] - our_logits[0]).max()) > 1e-3  # the steps are not one repeated run
    res = cli("run", pkg, "--provider", "qnn", "-p", text, "--max-new-tokens", NEW)
    assert res.exit_code == 0, res.output
    assert f"{n} prompt tokens, {NEW} new" in res.output and "on the HTP" in res.output, res.output
    from tokenizers import Tokenizer

    assert Tokenizer.from_file(str(pkg / "tokenizer.json")).decode(theirs) in res.output
    # the user's path: `run --engine genai` registers the plugin library itself (the tiny model's tokens are
    # partial UTF-8, so the streamed text may be empty: the tokens are compared through the function it calls)
    res = cli("run", pkg, "--engine", "genai", "-p", text, "--max-new-tokens", NEW)
    assert res.exit_code == 0, res.output
    assert f"{len(ids)} prompt tokens, {NEW} new" in res.output, res.output
    from edge_recover.runtimes.genai import genai_generate

    assert genai_generate(pkg, text, NEW).tokens == theirs


def test_the_app_example_chats_with_the_qnn_package_on_the_htp(pkg):
    """examples/chat_genai.py, an app's loop over onnxruntime-genai, on the qnn package: it registers the plugin
    library, answers greedily within the static context, and says how many tokens it made."""
    from pathlib import Path

    example = Path(__file__).resolve().parents[2] / "examples" / "chat_genai.py"
    proc = subprocess.run([sys.executable, str(example), str(pkg), "--once", "hi", "--max-new-tokens", str(NEW),
                           "--temperature", "0"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "bot> " in proc.stdout and f"[{NEW} tokens," in proc.stderr, proc.stderr[-2000:]  # (QNN logs a line first)

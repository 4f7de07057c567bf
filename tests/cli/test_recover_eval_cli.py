"""`edge-recover recover` and `edge-recover eval` as the README and docs/recovery.md show them (CPU smoke
sizes: a few steps, so what is checked is the plumbing, not the recovery)."""

from __future__ import annotations

import json

from tests.cli.conftest import ADAPTER_HF_ARGS, cli, ok, one_line_error, recover_mode_args


def test_recover_writes_an_adapter_for_the_checkpoint(adapter, q_gptq):
    meta = json.loads((adapter / "edge_recover_adapter.json").read_text())
    report = json.loads((adapter / "recovery_report.json").read_text())
    assert (adapter / "adapter_config.json").is_file() and (adapter / "adapter_model.safetensors").is_file()
    assert meta["method"] == "gptq" and meta["scheme"]["name"] == "w4w2gateup+custom"
    assert report["step"] >= 1 and report["kl_after"] > 0


def test_recover_resume(hf, work, adapter_hf):
    """`recover ... --resume`: refused without a checkpoint (one line); continues a run from its work folder
    (here a finished one, so it ends where that run ended)."""
    args = (*ADAPTER_HF_ARGS, *recover_mode_args())
    one_line_error(cli("recover", hf, "-o", work / "a-none", "--resume", *args), "--resume")
    first = json.loads((adapter_hf / "recovery_report.json").read_text())
    again = ok("recover", hf, "-o", adapter_hf, "--resume", "--overwrite", *args)
    report = json.loads((adapter_hf / "recovery_report.json").read_text())
    assert report["step"] == first["step"] and f"{report['kl_after']:.4f}" in again.stdout


def test_eval_quantized_with_adapter(hf, q_gptq, adapter, text_file, work):
    """`eval MODEL --quantized Q --adapter A --json OUT` (docs/recovery.md)."""
    out = work / "eval.json"
    r = ok("eval", hf, "--quantized", q_gptq, "--adapter", adapter, "--text", text_file, "--seq-len", "32",
           "--max-windows", "2", "--device", "cpu", "--json", out)
    figs = json.loads(out.read_text())
    assert "recovered" in r.stdout and "recovery:" in r.stdout
    assert figs["ppl_quant"] > 0 and figs["ppl_recovered"] > 0 and "recovery_pct" in figs


def test_eval_scheme_with_adapter(hf, adapter_hf, text_file, work):
    """`eval MODEL --scheme SCHEME --adapter A --text FILE` (README): MODEL quantized as A's run did. The
    scheme is A's, as a JSON file: `recover` quantizes with its own block sizes, which a scheme name alone
    does not say."""
    scheme = work / "adapter-scheme.json"
    scheme.write_text(json.dumps(json.loads((adapter_hf / "edge_recover_adapter.json").read_text())["scheme"]))
    r = ok("eval", hf, "--scheme", scheme, "--adapter", adapter_hf, "--text", text_file, "--seq-len", "32",
           "--max-windows", "1", "--device", "cpu")
    assert "recovered" in r.stdout and "quantized" in r.stdout


def test_recover_chat_share_and_latent_start(hf, work):
    """`recover --chat-share 0.5 --latent-start teacher` (docs/recovery.md): half the teacher's rows open with the
    chat template's user turn; GPTQ integers the teacher does not round to start at their codes' centres, the
    others at the teacher weight (the default `centre` runs in every other recover test); a bad value is one line."""
    from edge_recover.recovery.data import load_dataset

    out = work / "rec-chat"
    ok("recover", hf, "-o", out, "--chat-share", "0.5", "--latent-start", "teacher", "--method", "gptq",
       "--calibration", "4", "--samples", "16", "--seq-len", "32", "--epochs", "1", "--batch-size", "8",
       "--device", "cpu")
    report = json.loads((out / "recovery_report.json").read_text())
    assert report["start"]["latent_nearest_to_teacher"] == 0 and report["start"]["latent_from_dequantized"] == 0
    assert report["start"]["latent_mixed"] > 0 and 0.2 < report["start"]["latent_teacher_share"] < 1
    ds = load_dataset(work / "rec-chat.work" / "dataset.safetensors")
    assert ds.settings.chat_share == 0.5
    one_line_error(cli("recover", hf, "-o", work / "rec-bad", "--latent-start", "middle", "--device", "cpu"),
                   "--latent-start")
    one_line_error(cli("recover", hf, "-o", work / "rec-bad", "--latent-update", "sgd", "--device", "cpu"),
                   "--latent-update")


def test_recover_latent_update_layer_sgd(hf, work):
    """`recover --latent-update layer-sgd` (docs/recovery.md): the latents move by layer-normalised momentum; the
    run trains (held-out KL falls) and records the setting."""
    out = work / "rec-sgd"
    ok("recover", hf, "-o", out, "--latent-update", "layer-sgd", "--method", "rtn", "--samples", "16",
       "--seq-len", "32", "--epochs", "1", "--batch-size", "8", "--device", "cpu")
    report = json.loads((out / "recovery_report.json").read_text())
    assert report["config"]["latent_update"] == "layer-sgd" and report["kl_after"] < report["kl_before"]
    one_line_error(cli("recover", hf, "-o", work / "rec-bad", "--chat-share", "2", "--device", "cpu"), "chat_share")


def test_recover_loss_cakld(hf, work):
    """`recover --loss cakld` (docs/recovery.md): forward and reverse KL mixed by the teacher's confidence in its
    own text; the run trains (held-out KL falls), logs the weight (a probability) and records the setting; an
    unknown loss is one line."""
    out = work / "rec-cakld"
    ok("recover", hf, "-o", out, "--loss", "cakld", "--method", "rtn", "--samples", "16", "--seq-len", "32",
       "--epochs", "1", "--batch-size", "8", "--device", "cpu")
    report = json.loads((out / "recovery_report.json").read_text())
    assert report["config"]["loss"] == "cakld" and report["kl_after"] < report["kl_before"]
    rows = [json.loads(line) for line in (work / "rec-cakld.work" / "metrics.jsonl").read_text().splitlines()]
    assert rows and all(0 < r["reverse_weight"] < 1 for r in rows)
    one_line_error(cli("recover", hf, "-o", work / "rec-bad", "--loss", "js", "--device", "cpu"), "--loss")


def test_eval_batch_size_scores_the_same_windows(hf, q_gptq, text_file, work):
    """`eval --batch-size 1` (perplexity: windows scored together; one a batch holds less memory) gives the
    figures of the default batch of 4 up to float rounding; 0 is one line, exit 2."""
    figs = {}
    for b in ("1", None):
        out = work / f"eval-b{b}.json"
        ok("eval", hf, "--quantized", q_gptq, "--text", text_file, "--seq-len", "32", "--max-windows", "3",
           "--device", "cpu", "--json", out, *(("--batch-size", b) if b else ()))
        figs[b] = json.loads(out.read_text())
    for key in ("ce_fp", "ce_quant", "kl_quant"):
        assert abs(figs["1"][key] - figs[None][key]) < 1e-4, (key, figs["1"][key], figs[None][key])
    assert figs["1"]["tokens"] == figs[None]["tokens"]
    one_line_error(cli("eval", hf, "--quantized", q_gptq, "--batch-size", "0", "--device", "cpu"), "--batch-size")

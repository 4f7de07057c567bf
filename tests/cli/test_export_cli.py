"""`edge-recover export` from each kind of input the docs show: an HF folder, a checkpoint (with a quantized
tied head), a slim checkpoint on a machine without its source (`--base`), with an adapter side-car or merged."""

from __future__ import annotations

import json
import shutil

from tests.cli.conftest import cli, ok, one_line_error


def _manifest(pkg):
    return json.loads((pkg / "manifest.json").read_text())


def test_from_hf_folder(plain_pkg):
    m = _manifest(plain_pkg)
    assert m["scheme"]["name"] == "w4w2gateup" and m["parity"]["ok"]
    assert {v["bits"] for v in m["layers"].values()} == {2, 4, 8}  # the cpu target's 8-bit head
    assert m["layers"]["lm_head"]["bits"] == 8 and m["embedding"] == "lm_head integers"
    assert set(m["files"]) >= {"model.onnx", "model.onnx.data", "config.json", "tokenizer.json", "genai_config.json"}


def test_from_checkpoint_with_quantized_tied_head(work, q_gptq):
    """Issue 17, case 2: the checkpoint's head is quantized and tied to the embedding; export failed with
    'the ONNX weight of lm_head differs from its quantized integers'."""
    pkg = work / "pkg-gptq"
    r = ok("export", q_gptq, "--target", "cpu", "-o", pkg)
    m = _manifest(pkg)
    assert m["layers"]["lm_head"]["bits"] == 4 and m["method"] == "gptq"
    assert m["parity"]["exact"]["top1_agreement"] == 1.0 and "parity vs torch" in r.stdout
    assert m["embedding"] == "lm_head integers"


def test_slim_checkpoint_on_a_machine_without_its_source(work, hf):
    """Issue 17, case 4: the source folder moved away; `--base MODEL` names where it is now."""
    src = shutil.copytree(hf, work / "src-here")
    slim = work / "q-slim-moved"
    ok("quantize", src, "--slim", "--method", "rtn", "--block-size", "32", "-o", slim)
    moved = src.rename(work / "src-elsewhere")
    one_line_error(cli("export", slim, "-o", work / "never"), "--base MODEL")
    pkg = work / "pkg-slim"
    ok("export", slim, "--base", moved, "-o", pkg, "--no-verify")
    assert _manifest(pkg)["source_hash"] == json.loads((slim / "edge_recover_quantized.json").read_text())["source_hash"]
    one_line_error(cli("export", hf, "--base", moved, "-o", work / "never"), "drop --base")
    assert not (work / "never").exists()


def test_block_size_and_int8_kv(work, hf):
    """`--scheme w4w2gateup --block-size 4:64,2:128 --kv-dtype int8` (README, smaller blocks for the tiny model)."""
    pkg = work / "pkg-b64-kv8"
    ok("export", hf, "--scheme", "w4w2gateup", "--block-size", "4:32,2:64", "--kv-dtype", "int8",
       "--method", "rtn", "-o", pkg)
    m = _manifest(pkg)
    assert m["kv_dtype"] == "int8"
    assert {(v["bits"], v["block_size"]) for v in m["layers"].values()} == {(4, 32), (2, 64), (8, 64)}  # 8-bit head


def test_sidecar_from_checkpoint(sidecar_pkg):
    m = _manifest(sidecar_pkg)
    assert m["adapter_mode"] == "sidecar" and [a["name"] for a in m["adapters"]] == ["recovery"]
    assert "adapters/recovery.onnx_adapter" in m["files"] and m["parity"]["ok"]


def test_sidecar_from_hf_folder_uses_the_adapters_scheme(work, hf, adapter_hf):
    """Issue 17, case 3: an adapter `recover` trained on HF quantizes HF as its run did; with `--scheme` given
    this failed with 'trained for scheme w4w2gateup, not pre-quantized'."""
    meta = json.loads((adapter_hf / "edge_recover_adapter.json").read_text())
    pkg = work / "pkg-hf-lora"
    ok("export", hf, "--scheme", "w4w2gateup", "--target", "cpu", "--adapter", adapter_hf, "--adapter-mode",
       "sidecar", "-o", pkg)
    m = _manifest(pkg)
    assert m["scheme"]["name"] == meta["scheme"]["name"] and m["method"] == meta["method"]
    assert m["lora"]["base"]["quant_hash"] == meta["quant_hash"]


def test_merge(work, q_gptq, adapter, text_file):
    """`--adapter-mode merge --merge-method rtn` (docs/adapters.md: `[--merge-method gptq]`)."""
    pkg = work / "pkg-merged"
    r = ok("export", q_gptq, "--target", "cpu", "--adapter", adapter, "--adapter-mode", "merge",
           "--merge-method", "rtn", "--eval-text", text_file, "-o", pkg)
    m = _manifest(pkg)
    assert m["adapter_mode"] == "merge" and m["adapters"][0]["merge"]["merge"]["method"] == "rtn"
    assert "merged" in r.stdout and not (pkg / "adapters").exists()


def test_rule_sets_one_layer_and_keeps_its_own_block(work, hf):
    """`--rule lm_head=4:32` (docs/peers.md: the 4-bit head at block 32): the rule's BLOCK survives
    `--block-size`, the other layers take `--block-size`."""
    pkg = work / "pkg-rule"
    ok("export", hf, "--scheme", "w4", "--block-size", "64", "--rule", "lm_head=4:32", "--method", "rtn",
       "--no-verify", "-o", pkg)
    m = _manifest(pkg)
    assert (m["layers"]["lm_head"]["bits"], m["layers"]["lm_head"]["block_size"]) == (4, 32)
    assert {(v["bits"], v["block_size"]) for k, v in m["layers"].items() if k != "lm_head"} == {(4, 64)}
    assert m["embedding"] == "lm_head integers"
    pkg = work / "pkg-float-head"  # README: `--rule lm_head=keep`, the float head of before
    ok("export", hf, "--scheme", "w4w2gateup", "--rule", "lm_head=keep", "--method", "rtn", "--no-verify", "-o", pkg)
    m = _manifest(pkg)
    assert "lm_head" not in m["layers"] and m["embedding"].startswith("float32")


def test_bad_rule_and_rule_on_a_checkpoint_are_refused(work, hf, q_gptq):
    one_line_error(cli("export", hf, "--rule", "lm_head=3", "-o", work / "never"), "--rule")
    one_line_error(cli("export", q_gptq, "--rule", "lm_head=8", "-o", work / "never"), "quantize it with that rule")
    assert not (work / "never").exists()


def test_export_shows_its_passes_on_a_terminal(hf, work):
    """On a terminal `export` shows which pass runs (a real model's quantize and verify passes take minutes);
    off a terminal (logs, these tests' other runs) it writes no bar."""
    import fcntl
    import os
    import pty
    import struct
    import sys
    import termios

    out = work / "pkg-tty"
    pid, fd = pty.fork()
    if pid == 0:  # the child: a 120-column terminal, then the CLI
        fcntl.ioctl(0, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
        os.execv(sys.executable, [sys.executable, "-m", "edge_recover", "export", str(hf), "--scheme", "w4",
                                  "-o", str(out), "--overwrite"])
    seen = b""
    while True:
        try:
            chunk = os.read(fd, 4096)
        except OSError:
            break
        if not chunk:
            break
        seen += chunk
    os.waitpid(pid, 0)
    text = seen.decode(errors="replace")
    assert "export:" in text and "verify" in text and f"wrote {out}" in text, text[-2000:]
    plain = ok("export", hf, "--scheme", "w4", "-o", work / "pkg-notty", "--overwrite")
    assert "export:" not in plain.stderr

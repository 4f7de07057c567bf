"""`edge-recover rotate` as docs/quantization.md shows it, and the rotated folder through quantize and export."""

from __future__ import annotations

import json

import torch

from edge_recover.models import load_model
from edge_recover.rotation import ROTATION_FILE
from tests.cli.conftest import cli, ok, one_line_error


def test_rotate_cli_then_quantize_and_export(hf, work):
    """`edge-recover rotate HF -o R` (docs/quantization.md), then R goes through quantize and export as any
    model does: the package's exact graph matches torch (export's own parity check) and the logits of the
    rotated folder equal the original's."""
    out = work / "rotated"
    r = ok("rotate", hf, "-o", out, "--seed", "2")
    assert f"wrote {out}" in r.stdout and "untied" in r.stdout
    record = json.loads((out / ROTATION_FILE).read_text())
    assert record["seed"] == 2 and record["hidden_size"] == 64 and record["source_hash"].startswith("sha256:")
    ids = torch.randint(0, 200, (1, 12))
    with torch.no_grad():
        a = load_model(hf).model.float()(input_ids=ids).logits
        b = load_model(out).model.float()(input_ids=ids).logits
    torch.testing.assert_close(b, a, atol=2e-5 * a.abs().max().item(), rtol=0)
    one_line_error(cli("rotate", hf, "-o", out), "already exists")
    ok("rotate", hf, "-o", out, "--overwrite")  # the default seed 0 replaces the seed-2 folder
    assert json.loads((out / ROTATION_FILE).read_text())["seed"] == 0
    q = work / "rotated-q"
    ok("quantize", out, "-o", q, "--method", "rtn", "--calibration", "0", "--block-size", "16")
    one_line_error(cli("rotate", q, "-o", work / "rotated-again"), "quantized checkpoint")
    assert not (work / "rotated-again").exists()
    pkg = work / "rotated-pkg"
    r = ok("export", q, "--target", "cpu", "-o", pkg)
    assert (pkg / "model.onnx").is_file()


def test_rotated_model_recovers_and_exports_with_its_own_8bit_table(hf, work):
    """rotate -> recover (qat, the default mode) -> export: the untied student embeds from its own 8-bit table as
    the package does (GatherBlockQuantized over the same integers), so the recovered package equals torch."""
    rot = work / "rotated-for-recover"
    ok("rotate", hf, "-o", rot)
    rec = work / "rotated-rec"
    ok("recover", rot, "-o", rec, "--method", "rtn", "--samples", "16", "--seq-len", "16", "--epochs", "1",
       "--batch-size", "8", "--block-size", "16", "--rule", "lm_head=8:16", "--device", "cpu")
    pkg = work / "rotated-rec-pkg"
    ok("export", rec, "--target", "cpu", "-o", pkg)
    m = json.loads((pkg / "manifest.json").read_text())
    assert m["embedding"] == "own 8-bit table"
    ex = m["parity"]["exact"]
    assert ex["top1_agreement"] == 1.0 and ex["max_abs_diff"] < 1e-4 * max(1.0, ex["logit_scale"]), ex

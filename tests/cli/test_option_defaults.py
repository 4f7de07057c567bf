"""One definition of the quantization options (sdk/options.py): `quantize`, `recover` and `export`, each run
with its defaults on the tiny model, quantize it to the same checkpoint layout (issue 30).

Same scheme, same bits and block size on every layer (the cpu layout: block 64, the 8-bit head), and the
quantizer the one definition names for each command: gptq for `quantize` and `recover`, and for `export` its one
documented override (mse: what a one-shot export of a large model affords), shown in `--help`.
"""

from __future__ import annotations

import json

from edge_recover.options import DEFAULT_SCHEME, LAYOUT, OVERRIDES, defaults

from tests.cli.conftest import ok

SMOKE = ("--samples", "16", "--seq-len", "16", "--epochs", "1", "--batch-size", "8", "--device", "cpu")


def _layout(manifest: dict) -> dict[str, tuple[int, int]]:
    return {name: (layer["bits"], layer["block_size"]) for name, layer in manifest["layers"].items()}


def test_quantize_recover_export_defaults_make_one_layout(hf, work):
    q, r, p = work / "defaults-q", work / "defaults-rec", work / "defaults-pkg"
    ok("quantize", hf, "-o", q)
    ok("recover", hf, "-o", r, *SMOKE)
    ok("export", hf, "-o", p)
    mq = json.loads((q / "edge_recover_quantized.json").read_text())
    mr = json.loads((r / "edge_recover_quantized.json").read_text())
    mp = json.loads((p / "manifest.json").read_text())

    assert _layout(mq) == _layout(mr) == _layout(mp)
    assert mq["scheme"] == mr["scheme"] == mp["scheme"] and mq["scheme"]["name"] == DEFAULT_SCHEME
    assert {block for _, block in _layout(mq).values()} == {LAYOUT.block_size}
    assert _layout(mq)["lm_head"] == (LAYOUT.head.bits, LAYOUT.block_size)
    assert {bits for bits, _ in _layout(mq).values()} == {2, 4, 8}
    assert mq["method"] == mr["method"] == defaults("quantize").method == defaults("recover").method == "gptq"
    assert mp["method"] == defaults("export").method == "mse" and set(OVERRIDES) == {"export"}


def test_the_defaults_and_why_are_in_help():
    """The five options are declared once and reach each command with its defaults; export's override says why."""
    import typer

    from edge_recover import cli

    cli._register_parts()
    group = typer.main.get_command(cli.app)
    for command in ("quantize", "recover", "export"):
        params = {p.name: p for p in group.commands[command].params}
        assert {"scheme", "method", "calibration", "block_size", "rule"} <= set(params), command
        d = defaults(command)
        assert (params["method"].default, params["calibration"].default) == (d.method, d.calibration)
        assert params["scheme"].default is None and params["block_size"].default is None
        assert "gptq" in params["method"].help and "docs/" in params["method"].help
        assert ("own default" in params["method"].help) == (command in OVERRIDES)
    assert "--calibration" in ok("recover", "--help").stdout


def test_the_cpu_target_has_the_layout_quantize_and_recover_use():
    from edge_recover.exporters.targets import TARGETS

    assert TARGETS["cpu"].preferred_block_size == LAYOUT.block_size and TARGETS["cpu"].head == LAYOUT.head

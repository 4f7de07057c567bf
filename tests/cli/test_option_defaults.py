"""One definition of the quantization options (sdk/options.py): `quantize`, `recover` and `export`, each run
with its defaults on the tiny model, quantize it to the same checkpoint layout (issue 30).

Same scheme, same bits and block size on every layer (the cpu layout: block 64, the 8-bit head), and the
quantizer the one definition names for each command: gptq for `quantize` and `recover`, and for `export` its one
documented override (mse: what a one-shot export of a large model affords), shown in `--help`. `eval` declares
the same options with `quantize`'s defaults, and its student, quantized with them, is `quantize`'s checkpoint.
"""

from __future__ import annotations

import json

from edge_recover.options import DEFAULT_SCHEME, LAYOUT, OVERRIDES, defaults

from tests.cli.conftest import cli, ok, one_line_error

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


QUANT_OPTIONS = ("scheme", "method", "calibration", "block_size", "rule")


def _declared(command: str) -> dict:
    """The quantization options' defaults as `command` declares them on the command line."""
    import typer

    from edge_recover import cli as cli_module

    cli_module._register_parts()
    params = {p.name: p for p in typer.main.get_command(cli_module.app).commands[command].params}
    return {name: params[name].default for name in QUANT_OPTIONS}


def test_eval_declares_the_options_with_the_others_defaults():
    """eval's --scheme --method --calibration --block-size --rule are the one declaration, with the defaults of
    quantize and recover (export differs only by its documented method override)."""
    assert _declared("eval") == _declared("quantize") == _declared("recover")
    assert _declared("eval") == {"scheme": None, "method": "gptq", "calibration": 32, "block_size": None, "rule": []}
    assert defaults("eval") == defaults("quantize") and "eval" not in OVERRIDES
    export = _declared("export")
    assert {k: v for k, v in export.items() if k not in ("method", "calibration")} == \
        {k: v for k, v in _declared("eval").items() if k not in ("method", "calibration")}
    help_text = ok("eval", "--help").stdout
    assert "--calibration" in help_text and "--block-size" in help_text and "adapter's own" in help_text


def test_eval_quantizes_as_quantize_does(hf, work, text_file):
    """`eval MODEL` quantizes its student with the integers `quantize MODEL` writes, both with their defaults
    (before, eval quantized at the scheme's stand-in blocks, 32, with a float head: another model). The student is
    the one eval_cmd builds (`load_teacher` + `load_student` with what eval passes when told nothing); its quant
    hash is the checkpoint's. Through the CLI the figures are equal with the default quantized head (both embed
    tokens with the head's integers, as the package does; the freshly quantized student used to keep the float
    table: 413.64 against 413.13 on this model) and with a float head (`--rule lm_head=keep`)."""
    from edge_recover.models import load_model
    from edge_recover.recovery.evaluation import load_student, load_teacher
    from edge_recover.recovery.student import quant_hash

    q = work / "eval-defaults-q"
    ok("quantize", hf, "-o", q)
    lm, recipe = load_teacher(str(hf), method=None, calibration=_declared("eval")["calibration"])
    student, scheme, _ = load_student(lm, None, recipe, progress=False)
    assert (recipe.method, recipe.calibration) == (defaults("eval").method, defaults("eval").calibration)
    assert scheme.to_json() == json.loads((q / "edge_recover_quantized.json").read_text())["scheme"]
    assert quant_hash(student) == quant_hash(load_model(q, base=lm).model)

    qk = work / "eval-keep-q"
    ok("quantize", hf, "--rule", "lm_head=keep", "-o", qk)
    keys = ("ppl_fp", "ppl_quant", "ce_quant", "kl_quant", "top1_quant")
    for rule, ckpt in (((), q), (("--rule", "lm_head=keep"), qk)):
        args = (*rule, "--text", text_file, "--seq-len", "32", "--max-windows", "2", "--device", "cpu")
        ok("eval", hf, *args, "--json", work / "eval-now.json")
        ok("eval", hf, "--quantized", ckpt, *args[len(rule):], "--json", work / "eval-q.json")
        now, from_q = (json.loads((work / f).read_text()) for f in ("eval-now.json", "eval-q.json"))
        assert [now[k] for k in keys] == [from_q[k] for k in keys] and now["kl_quant"] > 0, rule
        assert now["method"] == defaults("eval").method and now["scheme"] == from_q["scheme"]
    assert now["scheme"] == f"{DEFAULT_SCHEME}+custom"


def test_eval_refuses_quantization_options_it_cannot_use(hf, work):
    """A package carries its own integers: quantization options with `--package` are one error line, exit 2;
    `--block-size` cannot re-block a `--quantized` checkpoint (the same refusal as recover's)."""
    one_line_error(cli("eval", "--package", work / "no-pkg", "--tasks", "default", "--method", "rtn"),
                   "--method: a package carries its own integers")
    one_line_error(cli("eval", hf, "--quantized", work / "no-q", "--block-size", "32"),
                   "`--block-size` cannot re-block a `--quantized` checkpoint")

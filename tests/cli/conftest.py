"""The commands users type, on a tiny model: one session-scoped chain of real artefacts.

    tiny HF folder ─► quantize (gptq, lm_head=4) ─► checkpoint Q ─► recover (LoRA, few steps) ─► adapter A
                   └► export (HF + A, side-car) ─► package S ─► adapter add ─► run / profile / verify

`cli(...)` (tests/fixtures/cli.py) runs `edge_recover.cli.main` in this process with `sys.argv` set, so
a command goes through the same error handling as the `edge-recover` script (an `EdgeRecoverError` is one
line on stderr, exit 2) without paying a Python start-up per call. Each artefact is built once per test session.
"""

from __future__ import annotations

import inspect
import shutil
from pathlib import Path

import pytest

from tests.fixtures.cli import Result, run_cli


def cli(*args, cwd: Path | None = None) -> Result:
    """Run `edge-recover ARGS` in this process; returns exit code, stdout and stderr."""
    return run_cli(*args, cwd=cwd)


def ok(*args, cwd: Path | None = None) -> Result:
    """`cli(...)`, asserting exit code 0."""
    r = cli(*args, cwd=cwd)
    assert r.code == 0, f"edge-recover {' '.join(map(str, args))} -> {r.code}\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}"
    return r


def one_line_error(r: Result, needle: str) -> None:
    """Exit 2, no traceback, and exactly one `error:` line on stderr, holding `needle` (progress bars, which
    erase themselves with carriage returns, and warnings may come before it)."""
    lines = [ln.strip() for ln in r.stderr.replace("\r", "\n").splitlines()]
    errors = [ln for ln in lines if ln.startswith("error:")]
    assert r.code == 2, (r.code, r.stderr[-2000:])
    assert "Traceback" not in r.stderr and len(errors) == 1 and needle in errors[0], r.stderr[-2000:]


def recover_mode_args() -> list[str]:
    """`--mode lora` where `recover` has modes (the adapter path), nothing where LoRA is all it does."""
    from edge_recover.recovery.cli import recover_cmd

    return ["--mode", "lora"] if "mode" in inspect.signature(recover_cmd).parameters else []


@pytest.fixture(scope="session")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cli")


@pytest.fixture(scope="session")
def hf(tiny_llama_dir, work) -> Path:
    """The tiny Llama HF folder (tied embedding) with a ChatML chat template (for `run --chat`), copied so
    tests may move it away."""
    from transformers import AutoTokenizer

    out = Path(shutil.copytree(tiny_llama_dir, work / "tiny"))
    tok = AutoTokenizer.from_pretrained(out)
    tok.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                         "{% endfor %}<|im_start|>assistant\n")
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def text_file(work) -> Path:
    p = work / "hamlet.txt"
    p.write_text("To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer "
                 "the slings and arrows of outrageous fortune, or to take arms against a sea of troubles. " * 6)
    return p


@pytest.fixture(scope="session")
def q_gptq(hf, work) -> Path:
    """`quantize --method gptq --rule lm_head=4`: the head quantized too (issue 17, case 1)."""
    out = work / "q-gptq"
    ok("quantize", hf, "--scheme", "w4w2gateup", "--method", "gptq", "--block-size", "32", "--rule", "lm_head=4",
       "--calibration", "4", "-o", out)
    return out


@pytest.fixture(scope="session")
def adapter(hf, work, q_gptq) -> Path:
    """`recover --quantized Q`: a real (few-step) LoRA adapter on the gptq checkpoint's integers."""
    out = work / "adapter"
    ok("recover", hf, "--quantized", q_gptq, "-o", out, "--samples", "16", "--seq-len", "16", "--epochs", "1",
       "--batch-size", "8", "--rank", "4", "--device", "cpu", *recover_mode_args())
    return out


@pytest.fixture(scope="session")
def adapter_hf(hf, work) -> Path:
    """`recover HF -o A --method rtn` (the student quantized by recover itself, w4w2gateup), with a checkpoint
    every step so that `--resume` has one to continue from."""
    out = work / "adapter-hf"
    ok("recover", hf, "-o", out, *ADAPTER_HF_ARGS, *recover_mode_args())
    return out


ADAPTER_HF_ARGS = ("--method", "rtn", "--samples", "16", "--seq-len", "16", "--epochs", "1", "--batch-size", "8",
                   "--rank", "2", "--device", "cpu", "--checkpoint-every", "1")


@pytest.fixture(scope="session")
def sidecar_pkg(work, q_gptq, adapter) -> Path:
    """`export Q --adapter A --adapter-mode sidecar --adapter-name recovery`."""
    out = work / "pkg-lora"
    ok("export", q_gptq, "--target", "cpu", "--adapter", adapter, "--adapter-mode", "sidecar",
       "--adapter-name", "recovery", "-o", out)
    return out


@pytest.fixture(scope="session")
def plain_pkg(work, hf) -> Path:
    """`export HF --scheme w4w2gateup --target cpu` (rtn: quick), the package the run/profile tests use."""
    out = work / "pkg"
    ok("export", hf, "--scheme", "w4w2gateup", "--target", "cpu", "--method", "rtn", "-o", out)
    return out

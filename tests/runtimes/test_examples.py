"""The app-integration examples run on a tiny package."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def test_chat_once(tiny_package):
    proc = subprocess.run([sys.executable, str(EXAMPLES / "chat.py"), str(tiny_package), "--once", "hello",
                           "--max-new-tokens", "6"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("bot> ") and "tok/s" in proc.stderr


def test_chat_genai_once(tiny_w4w2, tiny_package):
    """The onnxruntime-genai chat program on a cpu package (the qnn package: tests/exporters/test_qnn_genai_htp.py);
    a folder without genai_config.json is one line, exit 2."""
    proc = subprocess.run([sys.executable, str(EXAMPLES / "chat_genai.py"), str(tiny_package), "--once", "hello"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "genai_config.json" in proc.stderr, proc.stderr
    proc = subprocess.run([sys.executable, str(EXAMPLES / "chat_genai.py"), str(tiny_w4w2[0]), "--once", "hello",
                           "--max-new-tokens", "6", "--temperature", "0"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("bot> ") and "[6 tokens," in proc.stderr, proc.stderr


def test_chat_bad_package(tmp_path):
    proc = subprocess.run([sys.executable, str(EXAMPLES / "chat.py"), str(tmp_path), "--once", "hi"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "not an edge-recover package" in proc.stderr


def test_device_lab_collects(tiny_package, tmp_path):
    lab = tmp_path / "lab"
    text = tmp_path / "held-out.txt"
    text.write_text("A held-out line of plain English text for the lab's perplexity. " * 4)
    proc = subprocess.run([sys.executable, str(EXAMPLES / "device_lab.py"), str(tiny_package), "-o", str(lab),
                           "--providers", "cpu,qnn,dml", "--prompt-lengths", "8", "--new-tokens", "4", "--repeats", "1",
                           "--eval-text", str(text)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "skipped dml" in proc.stderr and "onnxruntime-directml" in proc.stderr  # not installed: skipped
    # qnn is installed (a test dependency), but a dynamic package cannot run on the HTP: the lab says why
    assert "error on qnn" in proc.stderr and "--target qnn" in proc.stderr
    reports = list(lab.glob("*-cpu/report.json"))
    assert len(reports) == 1 and json.loads(reports[0].read_text())["results"][0]["prompt_length"] == 8
    assert (reports[0].parent / "report.csv").is_file() and (reports[0].parent / "report.jsonl").is_file()
    ppl = json.loads(reports[0].read_text())["packages"][0]["perplexity"]["perplexity"]
    index = (lab / "index.md").read_text()
    assert index.count("| fp32 | 8 |") == 1 and "| 1.00x |" in index  # the first package against itself
    assert f"| {ppl:.2f} |" in index

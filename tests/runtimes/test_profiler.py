"""The profiler on tiny packages: report structure, the device-lab fields (CSV/JSONL, perplexity, parameters,
build), markdown tables, plots, and bad settings."""

from __future__ import annotations

import json
import shutil

import pytest

from edge_recover.errors import EdgeRecoverError
from edge_recover.runtimes.profiler import PackageEntry, ProfileSettings, profile_packages
from edge_recover.runtimes.report import PLOTS, TABLES, write_report
from edge_recover.runtimes.report_fields import LAB_FIELDS

EVAL = dict(eval_windows=2, eval_seq_len=24)


def _eval_text(folder) -> str:
    path = folder / "held-out.txt"
    path.write_text("It was the best of times, it was the worst of times, it was the age of wisdom. " * 6)
    return str(path)


@pytest.fixture(scope="module")
def report_dir(tiny_package, tmp_path_factory):
    root = tmp_path_factory.mktemp("prof")
    second = shutil.copytree(tiny_package, root / "copy")
    settings = ProfileSettings(prompt_lengths=[8, 24], new_tokens=6, repeats=2, threads=1, bandwidth_mb=64,
                               eval_text=_eval_text(root), **EVAL)
    out = root / "report"
    profile_packages([str(tiny_package), PackageEntry(str(second), label="second")], settings, out)
    return out


def test_report_json_structure(report_dir, tiny_package):
    data = json.loads((report_dir / "report.json").read_text())
    assert data["kind"] == "edge-recover-profile" and data["format_version"] == 1
    assert data["bandwidth_bytes_s"] > 1e8
    probes = data["bandwidth_probes_bytes_s"]  # before the runs and after each repeat round; the median is used
    assert len(probes) == 1 + data["settings"]["repeats"] == 3 and min(probes) <= data["bandwidth_bytes_s"] <= max(probes)
    dev = data["device"]
    assert dev["threads_used"] == 1 and dev["onnxruntime"] and dev["cpu_model"]
    assert dev["transparent_huge_pages"] in ("always", "madvise", "never", "unknown")
    assert data["settings"]["huge_pages"] is False
    assert [p["label"] for p in data["packages"]] == ["fp32", "second"]
    for p in data["packages"]:
        assert p["size_bytes"] > p["weight_bytes"] > p["weight_bytes_per_token"] > 0
        assert 10e6 < p["peak_rss_bytes"] < 300e6 and "CPUExecutionProvider" in p["provider"]
        assert p["fell_back"] is False
    assert len(data["results"]) == 4
    for r in data["results"]:
        assert r["prefill_tok_s"] > 0 and r["decode_tok_s"] > 0 and r["ttft_s"] > 0
        assert r["latency_p95_s"] >= r["latency_p50_s"] > 0
        assert len(r["runs"]) == 2
        assert r["roofline_share"] == pytest.approx(r["decode_tok_s"] / r["roofline_tok_s"])
    # ratios against the first package are paired per repeat round: median of the within-round ratios
    for length in (8, 24):
        first, second = [next(r for r in data["results"] if r["package"] == p and r["prompt_length"] == length)
                                  for p in ("fp32", "second")]
        assert first["decode_vs_first"] == 1.0 == first["prefill_vs_first"]
        within = sorted(s["decode_tok_s"] / f["decode_tok_s"] for f, s in zip(first["runs"], second["runs"]))
        assert second["decode_vs_first"] == pytest.approx(sum(within) / 2)  # the median of two rounds
        prefill = sorted(f["prefill_s"] / s["prefill_s"] for f, s in zip(first["runs"], second["runs"]))
        assert second["prefill_vs_first"] == pytest.approx(sum(prefill) / 2)
    # identical packages: same bytes per token, and KV traffic grows with the prompt
    by = {(r["package"], r["prompt_length"]): r for r in data["results"]}
    assert by[("fp32", 8)]["bytes_per_token"] == by[("second", 8)]["bytes_per_token"]
    assert by[("fp32", 24)]["bytes_per_token"] - by[("fp32", 8)]["bytes_per_token"] == 16 * 2 * 2 * 2 * 16 * 4


def test_lab_fields(report_dir, tiny_hf):
    """llama-bench / MLPerf Client fields: mean and stddev over repetitions, size, parameters, threads, build,
    TTFT and 2nd+ token rate, load time, peak memory, perplexity (equal to torch's on the same windows)."""
    import csv
    import statistics

    import numpy as np
    import torch
    from tokenizers import Tokenizer
    from transformers import AutoModelForCausalLM

    data = json.loads((report_dir / "report.json").read_text())
    build = data["build"]
    assert build["edge_recover"] == data["tool_version"] and build["onnxruntime"] == data["device"]["onnxruntime"]
    assert build["git_commit"] is None or len(build["git_commit"]) == 40
    model = AutoModelForCausalLM.from_pretrained(tiny_hf).eval()
    n_params = sum(p.numel() for p in model.parameters())
    text = (report_dir.parent / "held-out.txt").read_text()
    ids = Tokenizer.from_file(str(tiny_hf / "tokenizer.json")).encode(text, add_special_tokens=False).ids
    windows = torch.tensor(ids[:2 * 24]).view(2, 24)
    with torch.no_grad():
        logits = model(windows).logits[:, :-1]
    nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), windows[:, 1:].reshape(-1))
    for p in data["packages"]:
        # Optimum stores identical initializers once (the 5 freshly initialised norms of ones): at most 4 x 64 fewer
        assert n_params - 4 * 64 <= p["parameters"] <= n_params
        assert p["threads"] == 1 and p["load_s"] > 0 and p["runtime"]["onnxruntime"] == build["onnxruntime"]
        ppl = p["perplexity"]
        assert ppl["tokens"] == 2 * 23 and ppl["windows"] == 2 and ppl["seq_len"] == 24
        assert ppl["perplexity"] == pytest.approx(float(torch.exp(nll)), rel=1e-4)
    for r in data["results"]:
        decode = [x["decode_tok_s"] for x in r["runs"]]
        prefill = [r["prompt_length"] / x["prefill_s"] for x in r["runs"]]
        assert r["decode_tok_s_mean"] == pytest.approx(statistics.fmean(decode))
        assert r["decode_tok_s_stddev"] == pytest.approx(statistics.stdev(decode))
        assert r["prefill_tok_s_stddev"] == pytest.approx(statistics.stdev(prefill))
        assert r["second_plus_tok_s"] == r["decode_tok_s"] and 0 < r["ttft_s"]
    rows = list(csv.DictReader(open(report_dir / "report.csv")))
    lines = [json.loads(x) for x in (report_dir / "report.jsonl").read_text().splitlines()]
    assert len(rows) == len(lines) == len(data["results"]) == 4
    assert list(rows[0]) == list(lines[0]) == list(LAB_FIELDS)
    by = {(p["label"]): p for p in data["packages"]}
    for row, line, r in zip(rows, lines, data["results"]):
        assert (line["package"], line["n_prompt"], line["n_gen"], line["n_threads"]) == (r["package"], r["prompt_length"], 6, 1)
        assert float(row["decode_avg_ts"]) == pytest.approx(line["decode_avg_ts"]) == pytest.approx(r["decode_tok_s_mean"])
        assert line["model_size_bytes"] == by[r["package"]]["size_bytes"] and line["repetitions"] == 2
        assert line["model_n_params"] == by[r["package"]]["parameters"]
        assert line["peak_rss_bytes"] == by[r["package"]]["peak_rss_bytes"] and line["load_s"] > 0
        assert line["perplexity"] == by[r["package"]]["perplexity"]["perplexity"] and np.isfinite(line["perplexity"])
        assert line["build_version"] == build["edge_recover"] and line["provider"].startswith("cpu")
    md = (report_dir / "report.md").read_text()
    assert f"| {by['fp32']['perplexity']['perplexity']:.2f} |" in md and "2 windows x 24 tokens" in md


def test_eval_text_refused_before_measuring(tiny_package, tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("too short")
    with pytest.raises(EdgeRecoverError, match="fewer than 2 x 24"):
        profile_packages([str(tiny_package)], ProfileSettings(prompt_lengths=[8], new_tokens=4, eval_text=str(short),
                                                              **EVAL), tmp_path / "r")
    with pytest.raises(EdgeRecoverError, match="is not a file"):
        ProfileSettings(eval_text=str(tmp_path / "missing.txt"))
    assert not (tmp_path / "r").exists()


def test_huge_pages_reach_the_worker_process(tiny_package, monkeypatch):
    from edge_recover.runtimes.device import HUGE_PAGES_ENV
    from edge_recover.runtimes.profiler import Worker

    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    for huge in (False, True):
        w = Worker(PackageEntry(str(tiny_package)), huge_pages=huge)
        try:
            environ = open(f"/proc/{w.proc.pid}/environ", "rb").read().split(b"\0")
        finally:
            w.close()
        tunable = f"GLIBC_TUNABLES={HUGE_PAGES_ENV['GLIBC_TUNABLES']}".encode()
        assert (tunable in environ) == huge


def test_report_markdown_and_plots(report_dir):
    md = (report_dir / "report.md").read_text()
    assert "## Prompt 8 tokens" in md and "## Prompt 24 tokens" in md
    assert md.count("| 1.00x |") >= 4  # the first package against itself, prefill and decode, both lengths
    assert "read bandwidth" in md
    data = json.loads((report_dir / "report.json").read_text())
    kv = data["packages"][0]["kv_bytes_per_position"]
    assert kv > 0 and f"| {kv / 1024:.1f} |" in md  # the KV cache column tells a float32 cache from an int8 one
    import matplotlib.image as mpimg

    for name in PLOTS:
        img = mpimg.imread(report_dir / name)
        assert img.shape[0] >= 300 and img.shape[1] >= 500
        assert img[..., :3].std() > 0.01  # not a blank canvas


def test_report_rerenders_from_json(report_dir, tmp_path):
    data = json.loads((report_dir / "report.json").read_text())
    out = write_report(data, tmp_path / "again")
    assert (out / "report.md").read_text() == (report_dir / "report.md").read_text()
    for name in TABLES:
        assert (out / name).read_text() == (report_dir / name).read_text()
    with pytest.raises(EdgeRecoverError, match="already exists"):
        write_report(data, out)


def test_too_long_for_context(tiny_package, tmp_path):
    with pytest.raises(EdgeRecoverError, match="exceeds fp32's context of 96"):
        profile_packages([str(tiny_package)], ProfileSettings(prompt_lengths=[90], new_tokens=16), tmp_path / "r")
    assert not (tmp_path / "r").exists()


def test_missing_plot_library_refused_before_measuring(tiny_package, tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    with pytest.raises(EdgeRecoverError, match="pip install matplotlib"):
        profile_packages([str(tiny_package)], ProfileSettings(prompt_lengths=[8], new_tokens=4), tmp_path / "r")
    assert not (tmp_path / "r").exists()


def test_bad_settings(tmp_path):
    with pytest.raises(EdgeRecoverError, match="new_tokens"):
        ProfileSettings(new_tokens=1)
    with pytest.raises(EdgeRecoverError, match="not an edge-recover package"):
        profile_packages([str(tmp_path)], ProfileSettings(prompt_lengths=[8], new_tokens=4))


def test_cli_profile(tiny_package, tmp_path):
    import subprocess
    import sys

    out = tmp_path / "cli-report"
    proc = subprocess.run([sys.executable, "-c", "from edge_recover.cli import main; main()", "profile",
                           str(tiny_package), "--prompt-lengths", "8", "--new-tokens", "4", "--repeats", "1",
                           "--threads", "1", "--eval-text", _eval_text(tmp_path), "--eval-windows", "1",
                           "--eval-seq-len", "16", "-o", str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert (out / "report.json").is_file() and "wrote" in proc.stdout and (out / "report.csv").is_file()
    ppl = json.loads((out / "report.json").read_text())["packages"][0]["perplexity"]
    assert ppl["tokens"] == 15 and ppl["perplexity"] > 1
    proc = subprocess.run([sys.executable, "-c", "from edge_recover.cli import main; main()", "profile",
                           str(tiny_package), "--prompt-lengths", "8,x", "-o", str(tmp_path / "x")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "comma-separated integers" in proc.stderr


def test_cli_profile_thread_sweep(tiny_package, tmp_path):
    """`--threads 1,2`: every package once per thread count in one interleaved run, labelled and recorded per row."""
    import csv
    import subprocess
    import sys

    out = tmp_path / "sweep"
    proc = subprocess.run([sys.executable, "-c", "from edge_recover.cli import main; main()", "profile",
                           str(tiny_package), "--prompt-lengths", "8", "--new-tokens", "4", "--repeats", "1",
                           "--threads", "1,2", "-o", str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    data = json.loads((out / "report.json").read_text())
    name = tiny_package.name
    assert [(p["label"], p["threads"]) for p in data["packages"]] == [(f"{name}@1t", 1), (f"{name}@2t", 2)]
    assert data["settings"]["thread_sweep"] == [1, 2] and data["device"]["threads_used"] == 2
    rows = list(csv.DictReader((out / "report.csv").open()))
    assert sorted((r["package"], r["n_threads"]) for r in rows) == [(f"{name}@1t", "1"), (f"{name}@2t", "2")]
    assert "thread sweep 1, 2" in (out / "report.md").read_text()
    proc = subprocess.run([sys.executable, "-c", "from edge_recover.cli import main; main()", "profile",
                           str(tiny_package), "--threads", "0,2", "-o", str(tmp_path / "bad")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "positive integers" in proc.stderr and not (tmp_path / "bad").exists()

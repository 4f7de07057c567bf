"""`edge-recover report compare` through the CLI, on reports profiled from tiny packages in this test."""

from __future__ import annotations

import json
import shutil

import pytest

from edge_recover.runtimes.profiler import PackageEntry, ProfileSettings, profile_packages
from tests.fixtures.cli import run_cli


@pytest.fixture(scope="module")
def runs(tiny_package, tmp_path_factory):
    """Two real profiles of the same two packages (runs `a` and `b`), and a third at other prompt lengths."""
    root = tmp_path_factory.mktemp("cmp")
    second = shutil.copytree(tiny_package, root / "copy")
    out = {}
    for name, lengths in (("a", [8, 16]), ("b", [8, 16]), ("other", [12])):
        settings = ProfileSettings(prompt_lengths=lengths, new_tokens=4, repeats=2, threads=1, bandwidth_mb=64)
        profile_packages([str(tiny_package), PackageEntry(str(second), label="second")], settings, root / name)
        out[name] = root / name
    return out


def test_compare_folders_and_files(runs, tmp_path):
    out = tmp_path / "cmp"
    # a folder, and the other run as its JSONL file: the same rows either way
    r = run_cli("report", "compare", runs["a"], runs["b"] / "report.jsonl", "-o", out)
    assert r.code == 0, r.stderr
    cmp = json.loads((out / "compare.json").read_text())
    assert cmp["kind"] == "edge-recover-compare" and cmp["baseline"] == "a"
    assert [x["name"] for x in cmp["runs"]] == ["a", "b"] and cmp["not_in_every_run"] == []
    a, b = (json.loads((runs[n] / "report.json").read_text()) for n in ("a", "b"))
    assert len(cmp["rows"]) == len(a["results"]) == 4
    for row in cmp["rows"]:
        ra = next(x for x in a["results"] if x["package"] == row["package"] and x["prompt_length"] == row["n_prompt"])
        rb = next(x for x in b["results"] if x["package"] == row["package"] and x["prompt_length"] == row["n_prompt"])
        assert (row["n_gen"], row["n_threads"]) == (4, 1) and row["provider"].startswith("cpu")
        assert row["runs"]["a"]["decode_vs_baseline"] == 1.0
        assert row["runs"]["b"]["decode_vs_baseline"] == pytest.approx(rb["decode_tok_s"] / ra["decode_tok_s"])
        assert row["runs"]["b"]["prefill_vs_baseline"] == pytest.approx(rb["prefill_tok_s"] / ra["prefill_tok_s"])
        assert row["runs"]["b"]["decode_vs_first"] == rb["decode_vs_first"]
    md = (out / "compare.md").read_text()
    assert md.strip() in r.stdout  # the table goes to stdout too
    assert md.count("| 1.00x |") >= 4 and "| second | cpu" in md
    import matplotlib.image as mpimg

    img = mpimg.imread(out / "compare_decode.png")
    assert img.shape[0] >= 300 and img[..., :3].std() > 0.01


def test_baseline_and_partial_rows(runs, tmp_path):
    out = tmp_path / "cmp"
    r = run_cli("report", "compare", runs["a"] / "report.json", runs["b"], runs["other"], "--baseline", "b", "-o", out)
    # `other` shares no (package, provider, n_prompt, n_gen, threads) with the baseline: refused, nothing written
    assert r.code == 2 and r.stderr.count("\n") == 1 and "shares no row" in r.stderr and not out.exists()
    r = run_cli("report", "compare", runs["a"] / "report.json", runs["b"], "--baseline", "b", "-o", out)
    assert r.code == 0, r.stderr
    cmp = json.loads((out / "compare.json").read_text())
    assert cmp["baseline"] == "b" and all(row["runs"]["b"]["decode_vs_baseline"] == 1.0 for row in cmp["rows"])
    # rows only some runs have are listed, not compared: drop one row from a copy of run b's JSONL
    lines = (runs["b"] / "report.jsonl").read_text().splitlines()
    part = tmp_path / "part.jsonl"
    part.write_text("\n".join(lines[1:]) + "\n")
    r = run_cli("report", "compare", runs["a"], part, "-o", tmp_path / "cmp2")
    assert r.code == 0, r.stderr
    cmp = json.loads((tmp_path / "cmp2" / "compare.json").read_text())
    dropped = json.loads(lines[0])
    assert len(cmp["rows"]) == 3 and [(x["package"], x["n_prompt"], x["runs"]) for x in cmp["not_in_every_run"]] == \
        [(dropped["package"], dropped["n_prompt"], ["a"])]
    assert "Not in every run" in (tmp_path / "cmp2" / "compare.md").read_text()


def test_ignore_threads(runs, tmp_path):
    """Another machine's run at 2 threads shares no row with a 1-thread run, unless --ignore-threads."""
    lines = [json.loads(x) for x in (runs["b"] / "report.jsonl").read_text().splitlines()]
    other = tmp_path / "host-b.jsonl"
    other.write_text("".join(json.dumps({**r, "n_threads": 2}) + "\n" for r in lines))
    r = run_cli("report", "compare", runs["a"], other, "-o", tmp_path / "no")
    assert r.code == 2 and "--ignore-threads" in r.stderr and not (tmp_path / "no").exists()
    r = run_cli("report", "compare", runs["a"], other, "--ignore-threads", "-o", tmp_path / "yes")
    assert r.code == 0, r.stderr
    cmp = json.loads((tmp_path / "yes" / "compare.json").read_text())
    assert cmp["key"] == ["package", "provider", "n_prompt", "n_gen"] and len(cmp["rows"]) == 4
    assert {(row["runs"]["a"]["n_threads"], row["runs"]["host-b"]["n_threads"]) for row in cmp["rows"]} == {(1, 2)}


def test_bad_input(runs, tmp_path):
    cases = {"not_json": ("report.json", "this is not json"),
             "other_kind": ("report.json", json.dumps({"kind": "edge-recover-tasks", "results": []})),
             "no_fields": ("rows.jsonl", json.dumps({"package": "x", "n_prompt": 8}) + "\n")}
    for name, (fname, text) in cases.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / fname).write_text(text)
    checks = [((tmp_path / "not_json",), "is not a profile report"),
              ((tmp_path / "other_kind",), "expected 'edge-recover-profile'"),
              ((tmp_path / "no_fields" / "rows.jsonl",), "rows lack decode_tok_s"),
              ((tmp_path / "nowhere",), "no report.json there")]
    for extra, message in checks:
        r = run_cli("report", "compare", runs["a"], *extra, "-o", tmp_path / "out")
        assert r.code == 2 and message in r.stderr and r.stderr.count("\n") == 1, (extra, r.stderr)
    r = run_cli("report", "compare", runs["a"], runs["b"], "--baseline", "zzz", "-o", tmp_path / "out")
    assert r.code == 2 and "`--baseline` 'zzz' is not one of the runs (a, b)" in r.stderr
    r = run_cli("report", "compare", runs["a"], "-o", tmp_path / "out")
    assert r.code == 2 and "at least two reports" in r.stderr
    assert not (tmp_path / "out").exists()

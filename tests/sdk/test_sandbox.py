"""The sandbox that runs generated code (sdk/sandbox.py): every limit hit on purpose, the caller unharmed.

An endless loop ends at the wall clock (and at the CPU limit when that is shorter); a 4 GB allocation
fails inside the child; files written to the working folder, its parent or HOME vanish with the run's
folder, and the caller's working folder stays empty; stdin is closed, the output is cut to its head and
tail, no proxy variable reaches the child, and the network is cut off where `unshare` is permitted.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from edge_recover.errors import EdgeRecoverError
from edge_recover.sandbox import SandboxLimits, network_isolation, run_python


def test_a_plain_program_runs_and_its_output_comes_back():
    res = run_python("import sys\nprint('out')\nprint('err', file=sys.stderr)\n")
    assert (res.returncode, res.timed_out, res.stdout, res.stderr) == (0, False, "out\n", "err\n")


def test_an_endless_loop_is_killed_at_the_wall_clock():
    t0 = time.monotonic()
    res = run_python("while True:\n    pass\n", SandboxLimits(timeout_s=1.0))
    assert res.timed_out and res.returncode < 0
    assert time.monotonic() - t0 < 10


def test_a_sleeping_program_is_killed_at_the_wall_clock():
    res = run_python("import time\ntime.sleep(60)\n", SandboxLimits(timeout_s=0.5))
    assert res.timed_out and res.seconds < 5


def test_the_cpu_limit_kills_a_busy_loop_before_the_wall_clock():
    res = run_python("while True:\n    pass\n", SandboxLimits(timeout_s=20.0, cpu_s=1))
    assert not res.timed_out and res.cpu_exceeded, res
    assert res.seconds < 10


def test_a_4gb_allocation_fails_in_the_child_and_the_caller_survives():
    res = run_python("data = bytearray(4 * 1024 ** 3)\nprint('allocated')\n")
    assert res.returncode == 1 and "MemoryError" in res.stderr and "allocated" not in res.stdout
    assert run_python("print(sum(range(10)))").stdout == "45\n"  # the caller goes on


def test_files_written_anywhere_relative_vanish_and_the_callers_folder_stays_clean(tmp_path, monkeypatch):
    caller = tmp_path / "caller"
    caller.mkdir()
    monkeypatch.chdir(caller)
    program = """
import os
open("leak.txt", "w").write("x")
open("../escape.txt", "w").write("x")
os.makedirs("sub/dir")
open("sub/dir/deep.txt", "w").write("x")
open(os.path.expanduser("~/.dotfile"), "w").write("x")
os.makedirs("locked")
open("locked/inside.txt", "w").write("x")
os.chmod("locked", 0)
print(os.getcwd())
"""
    res = run_python(program)
    assert res.returncode == 0, res.stderr
    work = Path(res.stdout.strip())
    assert work != caller and not work.exists() and not work.parent.exists()
    assert list(caller.iterdir()) == []
    assert not (tmp_path / "escape.txt").exists()


def test_stdin_is_closed_and_the_environment_is_rebuilt(monkeypatch):
    monkeypatch.setenv("HTTP_PROXY", "http://proxy.invalid:3128")
    monkeypatch.setenv("https_proxy", "http://proxy.invalid:3128")
    monkeypatch.setenv("PYTHONPATH", "/nowhere")
    res = run_python("import os, sys\nprint(sorted(k for k in os.environ if 'proxy' in k.lower()))\n"
                     "print('/nowhere' in sys.path)\ninput()\n")
    assert res.stdout.splitlines() == ["[]", "False"]
    assert "EOFError" in res.stderr


def test_long_output_is_cut_to_head_and_tail():
    res = run_python("print('HEAD' + 'x' * 1_000_000 + 'TAIL')\n", SandboxLimits(output_chars=400))
    assert res.returncode == 0
    assert len(res.stdout) < 600 and res.stdout.startswith("HEAD") and res.stdout.rstrip().endswith("TAIL")
    assert "cut" in res.stdout


def test_the_file_size_limit_stops_a_runaway_writer():
    res = run_python("while True:\n    print('y' * 10000)\n", SandboxLimits(file_bytes=1 << 20))
    assert res.returncode != 0 and not res.timed_out
    assert "File too large" in res.stderr or res.signal_name == "SIGXFSZ"


@pytest.mark.skipif(not network_isolation(), reason="unshare is not permitted here: the network stays reachable "
                                                    "(docs/eval.md)")
def test_the_network_is_cut_off_where_unshare_is_permitted():
    program = """
import socket
try:
    socket.create_connection(("1.1.1.1", 53), timeout=5)
    print("connected")
except OSError as exc:
    print("refused", exc.errno)
"""
    res = run_python(program)
    assert res.stdout.startswith("refused"), res
    assert res.network.startswith("unshare")


@pytest.mark.skipif(os.geteuid() == 0 if hasattr(os, "geteuid") else True,
                    reason="RLIMIT_NPROC is not enforced for root")
def test_fork_is_refused():
    res = run_python("import os\ntry:\n    os.fork()\n    print('forked')\nexcept OSError as exc:\n    print('refused')\n")
    assert res.stdout.strip() == "refused", res


def test_bad_limits_name_the_parameter():
    with pytest.raises(EdgeRecoverError, match="timeout_s"):
        SandboxLimits(timeout_s=0)
    with pytest.raises(EdgeRecoverError, match="memory_bytes"):
        SandboxLimits(memory_bytes=1 << 20)

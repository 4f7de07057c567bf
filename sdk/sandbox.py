"""Running a model's Python code in a child process with limits: the sandbox of the code tasks (HumanEval).

Generated code never runs in the caller's process. `run_python(program, limits)` writes the program into a
fresh temporary folder and runs it as `sys.executable -I -B program.py` (isolated mode: no PYTHON*
variables, no user site, no script folder on `sys.path`) with

- a wall-clock limit (`timeout_s`, default 10 s): the child is killed with its whole process group;
- `resource.setrlimit` limits set in the child before exec (`preexec_fn`): address space (`memory_bytes`,
  1 GiB: a 4 GB allocation raises MemoryError), CPU seconds, size of any file it writes (`file_bytes`,
  its output included: past it a write fails with EFBIG, as Python ignores SIGXFSZ), processes
  (RLIMIT_NPROC 1: no fork, no thread), no core dumps;
- its working folder, HOME and TMPDIR inside the temporary folder, deleted afterwards with whatever the
  program left there (files written to `../x` land in that temporary folder too);
- no network where Linux permits it: the program runs under `unshare -n` (as root) or `unshare -rn` (an
  unprivileged user namespace), whichever this machine allows (`network_isolation()`, probed once);
  otherwise the network is reachable and the result says so. The environment is rebuilt from scratch, so
  no proxy variables reach the program either way;
- stdin closed (/dev/null), stdout and stderr written to files and truncated to their head and tail
  (`output_chars`; the tail holds the traceback).

This is a guard against accidents (an endless loop, a runaway allocation, a stray file), not a security
boundary: the program can still read and write any file the user can reach by an absolute path, and as root
RLIMIT_NPROC is not enforced (docs/eval.md, "The sandbox"). Run untrusted models in a container or VM.

`preexec_fn` runs Python in the forked child of a possibly threaded parent (torch's threads): the
function here only calls `resource.setrlimit` with values computed before the fork, which takes no lock.
"""

from __future__ import annotations

import functools
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

from .errors import EdgeRecoverError

__all__ = ["SandboxLimits", "SandboxResult", "run_python", "network_isolation"]


@dataclass(frozen=True)
class SandboxLimits:
    """The limits of one run: wall clock, address space, CPU time, written file size, processes, output kept.

    Example:
        >>> SandboxLimits(timeout_s=5.0, memory_bytes=512 << 20)  # doctest: +SKIP
    """

    timeout_s: float = 10.0
    memory_bytes: int = 1 << 30      # RLIMIT_AS
    cpu_s: int | None = None         # RLIMIT_CPU; default: the wall-clock limit rounded up, plus 1 s
    file_bytes: int = 16 << 20       # RLIMIT_FSIZE: any one file, stdout and stderr included
    processes: int = 1               # RLIMIT_NPROC counts every process of the user: 1 forbids fork
    output_chars: int = 4000         # of stdout and of stderr, kept as head + tail
    isolate_network: bool = True     # run under `unshare` when this machine permits it

    def __post_init__(self) -> None:
        if not self.timeout_s > 0:
            raise EdgeRecoverError(f"`timeout_s` (`--timeout`) must be > 0 seconds, got {self.timeout_s}")
        if self.memory_bytes < (64 << 20):
            raise EdgeRecoverError(f"`memory_bytes` of {self.memory_bytes} is too small for Python to start; give at "
                                   "least 64 MiB")

    def to_json(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class SandboxResult:
    """How a run ended: exit code (negative: killed by that signal), whether the wall clock ran out, the output."""

    returncode: int
    timed_out: bool
    stdout: str
    stderr: str
    seconds: float
    network: str  # how the network was cut off ("unshare -n", ...), or "reachable"

    @property
    def cpu_exceeded(self) -> bool:
        """Killed by the CPU limit (SIGXCPU at the soft limit, SIGKILL at the hard one just after)."""
        return self.returncode in (-signal.SIGXCPU, -signal.SIGKILL) and not self.timed_out

    @property
    def signal_name(self) -> str | None:
        if self.returncode >= 0:
            return None
        try:
            return signal.Signals(-self.returncode).name
        except ValueError:
            return f"signal {-self.returncode}"


@functools.lru_cache(maxsize=1)
def network_isolation() -> tuple[str, ...]:
    """The command prefix that runs a program without network here: ("unshare", "-n") when permitted (root),
    else ("unshare", "-rn") (an unprivileged user namespace), else () (Linux without either, or another OS).

    Example:
        >>> network_isolation()  # doctest: +SKIP
        ('/usr/bin/unshare', '-n')
    """
    exe = shutil.which("unshare")
    if not sys.platform.startswith("linux") or exe is None:
        return ()
    for flags in (("-n",), ("-rn",)):
        cmd = (exe, *flags)
        try:
            proc = subprocess.run([*cmd, "--", sys.executable, "-I", "-c", "pass"], stdin=subprocess.DEVNULL,
                                  capture_output=True, timeout=20)
        except (OSError, subprocess.SubprocessError):
            continue
        if proc.returncode == 0:
            return cmd
    return ()


def _rlimits(limits: SandboxLimits) -> Callable[[], None]:
    """The child's `preexec_fn`: set each limit to (soft, hard), never above the parent's hard limit."""
    import resource

    cpu = limits.cpu_s if limits.cpu_s is not None else math.ceil(limits.timeout_s) + 1
    wanted = [(resource.RLIMIT_AS, limits.memory_bytes, limits.memory_bytes),
              (resource.RLIMIT_CPU, cpu, cpu + 1),  # SIGXCPU at the soft limit, SIGKILL a second later
              (resource.RLIMIT_FSIZE, limits.file_bytes, limits.file_bytes),
              (resource.RLIMIT_NPROC, limits.processes, limits.processes),
              (resource.RLIMIT_CORE, 0, 0)]
    pairs = []
    for what, soft, hard in wanted:
        cap = resource.getrlimit(what)[1]
        if cap != resource.RLIM_INFINITY:
            soft, hard = min(soft, cap), min(hard, cap)
        pairs.append((what, (int(soft), int(hard))))

    def apply() -> None:
        for what, value in pairs:
            resource.setrlimit(what, value)

    return apply


def _clip(data: bytes, chars: int) -> str:
    text = data.decode("utf-8", errors="replace")
    if len(text) <= chars:
        return text
    half = chars // 2
    return f"{text[:half]}\n[... {len(text) - 2 * half} characters cut ...]\n{text[-half:]}"


def _read_ends(path: Path, chars: int) -> str:
    """Head and tail of a file that may be large, without reading it all."""
    size = path.stat().st_size
    limit = 4 * chars  # bytes: UTF-8 takes up to 4 per character
    with open(path, "rb") as f:
        if size <= 2 * limit:
            return _clip(f.read(), chars)
        head = f.read(limit)
        f.seek(size - limit)
        tail = f.read()
    return _clip(head, chars // 2) + f"\n[... about {size - 2 * limit} bytes cut ...]\n" + _clip(tail, chars // 2)


def _exited(proc: subprocess.Popen, deadline: float) -> bool:
    """Wait until `proc` exits or `deadline` (time.monotonic) passes, without reaping it: while it is an
    unreaped zombie its id (its process group's id) cannot be reused, so killing the group stays safe."""
    waitid = getattr(os, "waitid", None)
    pause = 0.001
    while True:
        if waitid is not None:
            if waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None:
                return True
        elif proc.poll() is not None:  # no waitid (macOS): reaped, the small race is accepted
            return True
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        time.sleep(min(pause, left))
        pause = min(2 * pause, 0.02)


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _remove(root: Path) -> None:
    """Delete the run's folder even where the program took away permissions."""
    for dirpath, dirnames, _ in os.walk(root):
        for d in dirnames:
            try:
                os.chmod(os.path.join(dirpath, d), 0o700)
            except OSError:
                pass
    shutil.rmtree(root, ignore_errors=True)


def run_python(program: str, limits: SandboxLimits = SandboxLimits()) -> SandboxResult:
    """Run the Python source `program` in a child process under `limits`, in a temporary folder removed after.

    Example:
        >>> res = run_python("print(1 + 1)")
        >>> res.returncode, res.stdout
        (0, '2\\n')
    """
    if os.name != "posix":
        raise EdgeRecoverError("the code sandbox needs a POSIX system (resource limits in the child); run code "
                               "tasks on Linux (or macOS), e.g. in WSL")
    prefix = network_isolation() if limits.isolate_network else ()
    root = Path(tempfile.mkdtemp(prefix="edge-recover-sandbox-"))
    try:
        work = root / "work"
        work.mkdir()
        script = root / "program.py"
        script.write_text(program, encoding="utf-8")
        env = {"PATH": os.defpath, "HOME": str(work), "TMPDIR": str(work), "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8",
               "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        out_path, err_path = root / "stdout", root / "stderr"
        t0 = time.monotonic()
        with open(out_path, "wb") as out, open(err_path, "wb") as err:
            proc = subprocess.Popen([*prefix, sys.executable, "-I", "-B", str(script)], cwd=work, env=env,
                                    stdin=subprocess.DEVNULL, stdout=out, stderr=err, close_fds=True,
                                    start_new_session=True, preexec_fn=_rlimits(limits))
            try:
                timed_out = not _exited(proc, t0 + limits.timeout_s)
            finally:
                _kill_group(proc.pid)  # on time-out, or whatever it left running in its session
                returncode = proc.wait()
        seconds = time.monotonic() - t0
        return SandboxResult(returncode, timed_out, _read_ends(out_path, limits.output_chars),
                             _read_ends(err_path, limits.output_chars), seconds,
                             " ".join([Path(prefix[0]).name, *prefix[1:]]) if prefix else "reachable")
    finally:
        _remove(root)

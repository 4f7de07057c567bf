"""What machine a profile ran on, and how fast it reads memory (the roofline's denominator).

Decode is memory-bound: each new token reads every weight once (plus the KV cache), so the best possible
decode rate is `read bandwidth / bytes read per token`. `read_bandwidth` measures the read bandwidth the
way a decode step uses it: `threads` threads each streaming through its own slice of a buffer much larger
than the last-level cache, best of several passes, best of two reduction kernels (numpy releases the GIL).
"""

from __future__ import annotations

import os
import platform
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Optional

import numpy as np

__all__ = ["device_info", "read_bandwidth"]


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_info(threads: Optional[int] = None) -> dict:
    """CPU model, cores, memory, OS, Python and ONNX Runtime version and providers.

    Example:
        >>> sorted(device_info())[:3]
        ['cpu_model', 'logical_cores', 'machine']
    """
    import onnxruntime as ort
    import psutil

    return {
        "cpu_model": _cpu_model(),
        "physical_cores": psutil.cpu_count(logical=False),
        "logical_cores": psutil.cpu_count(logical=True),
        "threads_used": int(threads or os.cpu_count() or 1),
        "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "machine": platform.machine(),
        "os": platform.platform(),
        "python": platform.python_version(),
        "onnxruntime": ort.__version__,
        "available_providers": list(ort.get_available_providers()),
    }


def read_bandwidth(threads: Optional[int] = None, size_mb: int = 512, passes: int = 6) -> float:
    """Measured memory read bandwidth in bytes/s with `threads` reader threads (best pass).

    Example:
        >>> read_bandwidth(1, size_mb=64, passes=2) > 1e9  # doctest: +SKIP
        True
    """
    n = int(threads or os.cpu_count() or 1)
    buf = np.ones(size_mb * 2**20 // 8, dtype=np.int64)
    chunks = np.array_split(buf, n)
    kernels = (lambda c: np.bitwise_or.reduce(c), lambda c: c.view(np.float64).max())
    best = 0.0
    with ThreadPoolExecutor(n) as pool:
        for kernel in kernels:
            list(pool.map(kernel, chunks))  # touch pages, warm up
            for _ in range(passes):
                t = time.perf_counter()
                list(pool.map(kernel, chunks))
                best = max(best, buf.nbytes / (time.perf_counter() - t))
    return best

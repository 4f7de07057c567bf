"""What machine a profile ran on, and how fast it reads memory (the roofline's denominator).

Decode is memory-bound: each new token reads every weight once (plus the KV cache), so the best possible
decode rate is `read bandwidth / bytes read per token`. `read_bandwidth` measures the read bandwidth the
way a decode step uses it: `threads` threads each streaming through its own slice of a buffer much larger
than the last-level cache, best of several passes, best of two reduction kernels (numpy releases the GIL).

Pages matter too. Hardware prefetchers stop at 4 KiB page edges and every 4 KiB page costs a TLB entry,
so a buffer on 2 MiB transparent huge pages can read faster: on our 2-core VM, in one sitting, 30-34 GB/s
on 4 KiB pages and 34-35 GB/s on huge pages, with readings of 48-63 GB/s coming and going on either (the
host's other tenants). numpy asks for huge pages for every large array; ONNX Runtime's weights live in
plain malloc memory, on 4 KiB pages unless glibc is told to ask for huge pages (`HUGE_PAGES_ENV`, read at
process start). So the probe maps its buffer itself and sets the page kind to the one the measured
sessions use.
"""

from __future__ import annotations

import mmap
import os
import platform
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Optional

import numpy as np

__all__ = ["device_info", "read_bandwidth", "HUGE_PAGES_ENV", "transparent_huge_pages"]

# glibc >= 2.35: malloc madvises its mmapped chunks for transparent huge pages (MADV_HUGEPAGE).
HUGE_PAGES_ENV = {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}


def transparent_huge_pages() -> str:
    """The kernel's transparent-huge-page mode (`always`, `madvise`, `never`), or `unknown`."""
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            text = f.read()
    except OSError:
        return "unknown"
    return text[text.find("[") + 1: text.find("]")] if "[" in text else text.strip() or "unknown"


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
        "transparent_huge_pages": transparent_huge_pages(),
    }


def read_bandwidth(threads: Optional[int] = None, size_mb: int = 512, passes: int = 6,
                   huge_pages: bool = False) -> float:
    """Measured memory read bandwidth in bytes/s with `threads` reader threads (best pass), on 4 KiB pages
    or, with `huge_pages`, on transparent huge pages where the kernel grants them.

    Example:
        >>> read_bandwidth(1, size_mb=64, passes=2) > 1e9  # doctest: +SKIP
        True
    """
    n = int(threads or os.cpu_count() or 1)
    nbytes = size_mb * 2**20
    region = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    advice = getattr(mmap, "MADV_HUGEPAGE" if huge_pages else "MADV_NOHUGEPAGE", None)
    if advice is not None:  # Linux; elsewhere the system's default pages
        region.madvise(advice)
    buf = np.frombuffer(region, dtype=np.int64)
    buf[:] = 1  # fault every page in now
    chunks = np.array_split(buf, n)
    kernels = (lambda c: np.bitwise_or.reduce(c), lambda c: c.view(np.float64).max())
    best = 0.0
    try:
        with ThreadPoolExecutor(n) as pool:
            for kernel in kernels:
                list(pool.map(kernel, chunks))  # warm up
                for _ in range(passes):
                    t = time.perf_counter()
                    list(pool.map(kernel, chunks))
                    best = max(best, buf.nbytes / (time.perf_counter() - t))
    finally:
        del buf, chunks
        region.close()
    return best

"""Peak RSS of an export, pass by pass: where a real model's export memory goes.

    python bench/export_memory.py qwen2.5-coder-0.5b out/q05-mem --scheme w4w2gateup > export-memory.txt

Runs `exporters.api.export` with each pass of the cpu target's list (and the quantize pass's two steps,
`pipeline.calibrate` and `apply.quantize_model`) wrapped so that a thread sampling /proc/self/status every
0.2 s books the RSS to the step that runs; prints one line per step (its peak, the RSS it left) and the
overall peak. The package it writes is the one `edge-recover export` writes (the wrappers only read RSS).
Used for docs/models/qwen2.5-coder-1.5b.md ("Export memory").
"""

from __future__ import annotations

import argparse
import threading
import time

from edge_recover.options import DEFAULT_SCHEME

PEAKS: dict[str, int] = {}
STEP = ["load"]
T0 = time.time()


def _rss() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS"))


def _sample() -> None:
    while True:
        PEAKS[STEP[0]] = max(PEAKS.get(STEP[0], 0), _rss())
        time.sleep(0.2)


def _enter(name: str) -> None:
    done, now = STEP[0], _rss()
    PEAKS[done] = max(PEAKS.get(done, 0), now)
    print(f"{time.time() - T0:8.1f} s  {done:<26} peak {PEAKS[done] / 1e9:6.2f} GB, left {now / 1e9:6.2f} GB",
          flush=True)
    STEP[0] = name


def _booked(fn, name: str):
    def run(*args, **kwargs):
        outer = STEP[0]
        _enter(name)
        try:
            return fn(*args, **kwargs)
        finally:
            _enter(f"{outer.split(' (after ')[0]} (after {name})")
    run.__name__ = getattr(fn, "__name__", name)
    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("output")
    ap.add_argument("--scheme", default=DEFAULT_SCHEME)
    args = ap.parse_args()

    import edge_recover.pipeline as pipeline
    from edge_recover.exporters import api, passes

    pipeline.calibrate = _booked(pipeline.calibrate, "calibrate")
    pipeline.quantize_model = _booked(pipeline.quantize_model, "quantize_model")
    steps = passes.pass_list(passes.resolve_target("cpu"))

    def step(p):
        def run(state, options):
            _enter(p.__name__)
            return p(state, options)
        run.__name__ = p.__name__
        return run

    booked = passes.PassList(tuple(map(step, steps.build)), tuple(map(step, steps.write)))
    api.pass_list = lambda target: booked
    threading.Thread(target=_sample, daemon=True).start()
    api.export(args.model, args.output, api.ExportOptions(scheme=args.scheme, target="cpu"))
    _enter("done")
    print(f"overall peak {max(PEAKS.values()) / 1e9:.2f} GB")


if __name__ == "__main__":
    main()

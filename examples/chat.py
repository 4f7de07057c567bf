"""A small chat program on the edge-recover SDK: a package, its chat template, streamed answers.

    .venv/bin/python examples/chat.py out/demo/w4w2gateup            # interactive
    .venv/bin/python examples/chat.py out/demo/w4w2gateup --once "What is the capital of France?"
    .venv/bin/python examples/chat.py PKG --provider openvino --fallback-cpu

The whole conversation is re-rendered with the package's chat template each turn and run from an empty KV
cache (simple and always correct; a long chat pays a longer prefill each turn).
"""

from __future__ import annotations

import argparse
import sys

from edge_recover.errors import EdgeRecoverError
from edge_recover.runtimes.chat import render_chat
from edge_recover.runtimes.generate import Generator
from edge_recover.runtimes.sampling import Sampling


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("package")
    ap.add_argument("--provider", default="cpu")
    ap.add_argument("--fallback-cpu", action="store_true")
    ap.add_argument("--max-new-tokens", type=int, default=200)
    ap.add_argument("--temperature", type=float, default=0.7)
    ap.add_argument("--top-p", type=float, default=0.9)
    ap.add_argument("--once", help="ask one question and exit")
    args = ap.parse_args(argv)
    try:
        gen = Generator(args.package, args.provider, fallback=args.fallback_cpu)
    except EdgeRecoverError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if gen.lm.choice.fell_back:
        print(f"[{gen.lm.choice.reason}; running on the CPU provider]", file=sys.stderr)
    sampling = Sampling(temperature=args.temperature, top_p=args.top_p)
    history: list[dict] = []
    while True:
        question = args.once if args.once else input("you> ").strip()
        if not question or question in ("/exit", "/quit"):
            return 0
        history.append({"role": "user", "content": question})
        print("bot> ", end="", flush=True)
        try:
            res = gen.generate(render_chat(gen.lm.package.path, history), args.max_new_tokens, sampling,
                               on_text=lambda s: print(s, end="", flush=True))
        except EdgeRecoverError as exc:  # e.g. the conversation outgrew the context: start over
            print(f"\nerror: {exc}", file=sys.stderr)
            history.clear()
            continue
        print(f"\n[{len(res.tokens)} tokens, {res.decode_tok_s:.1f} tok/s]", file=sys.stderr)
        history.append({"role": "assistant", "content": res.text})
        if args.once:
            return 0


if __name__ == "__main__":
    sys.exit(main())

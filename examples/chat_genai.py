"""The same chat program on onnxruntime-genai: the package folder loads unchanged (genai_config.json).

    pip install onnxruntime-genai      # 0.18 works with onnxruntime 1.31
    .venv/bin/python examples/chat_genai.py out/demo/w4w2gateup --once "What is the capital of France?"

    .venv/bin/python examples/chat_genai.py out/npu --once "Hi" --temperature 0   # a qnn package, on the HTP

Only onnxruntime-genai is needed at run time (the chat template is rendered with jinja2 from the package's
tokenizer_config.json / chat_template.jinja, as edge-recover does), and onnxruntime-qnn for a qnn package
(its plugin EP library is registered with og first). A static NPU package's context is short: the whole
conversation must fit it (og stops at the context's end).
"""

from __future__ import annotations

import argparse
import sys
import time

import onnxruntime_genai as og

from edge_recover.errors import EdgeRecoverError
from edge_recover.runtimes.chat import render_chat
from edge_recover.runtimes.genai import genai_max_length, names_qnn, read_genai_config, register_qnn


def prompt_of(package: str, history: list[dict]) -> str:
    """The conversation under the package's chat template; a base model without one continues the last message."""
    try:
        return render_chat(package, history)
    except EdgeRecoverError:
        return history[-1]["content"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("package")
    ap.add_argument("--max-new-tokens", type=int, default=200)
    ap.add_argument("--temperature", type=float, default=0.7)
    ap.add_argument("--top-p", type=float, default=0.9)
    ap.add_argument("--once", help="ask one question and exit")
    args = ap.parse_args(argv)
    try:
        config = read_genai_config(args.package)
    except EdgeRecoverError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if names_qnn(config):
        register_qnn(og)  # a qnn package: og's wheels have no QNN EP built in, onnxruntime-qnn's plugin library is it
    model = og.Model(args.package)
    tokenizer = og.Tokenizer(model)
    history: list[dict] = []
    while True:
        question = args.once if args.once else input("you> ").strip()
        if not question or question in ("/exit", "/quit"):
            return 0
        history.append({"role": "user", "content": question})
        ids = tokenizer.encode(prompt_of(args.package, history))
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=genai_max_length(config, len(ids), args.max_new_tokens),
                                  do_sample=args.temperature > 0,
                                  temperature=max(args.temperature, 1e-5), top_p=args.top_p)
        generator = og.Generator(model, params)
        t0 = time.perf_counter()
        generator.append_tokens(ids)
        stream = tokenizer.create_stream()
        answer = []
        print("bot> ", end="", flush=True)
        while not generator.is_done() and len(answer) < args.max_new_tokens:
            generator.generate_next_token()
            token = generator.get_next_tokens()[0]
            answer.append(token)
            print(stream.decode(token), end="", flush=True)
        print()
        seconds = time.perf_counter() - t0
        print(f"[{len(answer)} tokens, {len(answer) / seconds:.1f} tok/s with the prompt]", file=sys.stderr)
        history.append({"role": "assistant", "content": tokenizer.decode(answer)})
        if args.once:
            return 0


if __name__ == "__main__":
    sys.exit(main())

"""The same chat program on onnxruntime-genai: the package folder loads unchanged (genai_config.json).

    pip install onnxruntime-genai      # 0.18 works with onnxruntime 1.31
    .venv/bin/python examples/chat_genai.py out/demo/w4w2gateup --once "What is the capital of France?"

Only onnxruntime-genai is needed at run time (the chat template is rendered with jinja2 from the package's
tokenizer_config.json / chat_template.jinja, as edge-recover does).
"""

from __future__ import annotations

import argparse
import sys

import onnxruntime_genai as og

from edge_recover.runtimes.chat import render_chat


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("package")
    ap.add_argument("--max-new-tokens", type=int, default=200)
    ap.add_argument("--temperature", type=float, default=0.7)
    ap.add_argument("--top-p", type=float, default=0.9)
    ap.add_argument("--once", help="ask one question and exit")
    args = ap.parse_args(argv)
    model = og.Model(args.package)
    tokenizer = og.Tokenizer(model)
    history: list[dict] = []
    while True:
        question = args.once if args.once else input("you> ").strip()
        if not question or question in ("/exit", "/quit"):
            return 0
        history.append({"role": "user", "content": question})
        ids = tokenizer.encode(render_chat(args.package, history))
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=len(ids) + args.max_new_tokens, do_sample=args.temperature > 0,
                                  temperature=max(args.temperature, 1e-5), top_p=args.top_p)
        generator = og.Generator(model, params)
        generator.append_tokens(ids)
        stream = tokenizer.create_stream()
        answer = []
        print("bot> ", end="", flush=True)
        while not generator.is_done():
            generator.generate_next_token()
            token = generator.get_next_tokens()[0]
            answer.append(token)
            print(stream.decode(token), end="", flush=True)
        print()
        history.append({"role": "assistant", "content": tokenizer.decode(answer)})
        if args.once:
            return 0


if __name__ == "__main__":
    sys.exit(main())

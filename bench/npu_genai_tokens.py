"""Greedy tokens of a qnn package through onnxruntime-genai on the CPU provider against edge-recover's own runtime.

    .venv/bin/python bench/npu_genai_tokens.py PKG WORK_COPY > docs/results/<name>/og-cpu.json

The package's genai_config.json names the QNN EPContext models; a copy of it with the portable static graphs and no
provider options (exporters/genai.py `portable_pipeline_config`) runs on the CPU EP. Prints
one JSON line: both token lists for 8 new tokens after a fixed 19-token prompt, and whether they are equal.
"""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

PROMPT = "The capital of France is Paris. The capital of Italy is Rome. The capital of Spain is"
NEW = 8


def main(pkg: Path, work: Path) -> dict:
    import onnxruntime_genai as og
    from tokenizers import Tokenizer

    from edge_recover.exporters.genai import portable_pipeline_config
    from edge_recover.runtimes.generate import generate_ids
    from edge_recover.runtimes.static_session import StaticCausalLM

    if work.exists():
        shutil.rmtree(work)
    shutil.copytree(pkg, work)
    config = json.loads((work / "genai_config.json").read_text())
    (work / "genai_config.json").write_text(json.dumps(portable_pipeline_config(config), indent=2))

    context = json.loads((pkg / "manifest.json").read_text())["static"]["context_length"]
    tok = Tokenizer.from_file(str(pkg / "tokenizer.json"))
    ids = tok.encode(PROMPT).ids
    model = og.Model(str(work))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=context, do_sample=False)
    gen = og.Generator(model, params)
    gen.append_tokens(ids)
    theirs: list[int] = []
    while not gen.is_done() and len(theirs) < NEW:
        gen.generate_next_token()
        theirs.append(int(gen.get_next_tokens()[0]))
    ours = [int(t) for t in generate_ids(StaticCausalLM(pkg, "cpu"), ids, max_new_tokens=NEW).tokens]
    return {"package": str(pkg), "prompt_tokens": len(ids), "genai": theirs, "ours": ours, "equal": theirs == ours,
            "text": tok.decode(theirs), "onnxruntime_genai": getattr(og, "__version__", "?")}


if __name__ == "__main__":
    print(json.dumps(main(Path(sys.argv[1]), Path(sys.argv[2]))))

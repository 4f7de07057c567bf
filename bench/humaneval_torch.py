"""HumanEval pass@1 of a full-precision torch model alone (the fp row of the code tables), on the CPU or a GPU.

`edge-recover eval MODEL --tasks humaneval` scores the fp model *and* a quantized student; this scores the fp model
only, through the same generator (recovery/code_eval.py: chat template, greedy, batched when asked), sandbox,
journal (a stopped run resumes) and report (report.json / report.md / accuracy.png):

    python bench/humaneval_torch.py qwen2.5-coder-0.5b --report docs/results/qwen05-cpu/humaneval164-fp \\
        --batch-size 8 --device cpu
"""

from __future__ import annotations

import argparse
from pathlib import Path


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", help="HF folder, .gguf or a fetched name")
    ap.add_argument("--report", type=Path, required=True, help="new folder for report.json / report.md / accuracy.png")
    ap.add_argument("--batch-size", type=int, default=1, help="problems answered together (left-padded)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--limit", type=int, default=None, help="the first N problems")
    ap.add_argument("--max-new-tokens", type=int, default=384)
    args = ap.parse_args(argv)

    import torch

    from edge_recover.atomic import check_new_dir
    from edge_recover.code_report import code_model_row, code_report, format_code_table, write_code_report
    from edge_recover.humaneval import CodeEvalOptions, Journal, resolve_code_task, score_code_tasks
    from edge_recover.recovery.code_eval import TorchCodeGenerator
    from edge_recover.recovery.evaluation import load_teacher

    check_new_dir(args.report)
    task = resolve_code_task("humaneval").head(args.limit)
    lm, _ = load_teacher(args.model)
    device = torch.device(args.device)
    gen = TorchCodeGenerator(lm.model.to(device), lm.tokenizer, device)
    options = CodeEvalOptions(args.max_new_tokens, batch_size=args.batch_size)
    journal = Journal(args.report.with_name(args.report.name + ".progress.jsonl"), f"torch fp | {lm.source}")
    rows = [code_model_row("fp", f"{lm.source} (full precision)", score_code_tasks([task], gen, options, label="fp",
                                                                                  journal=journal))]
    data = code_report([task], rows, options, settings={"limit": args.limit, "backend": "torch", "device": args.device,
                                                         "prompt": "chat template" if gen.chat else "raw completion"})
    for line in format_code_table(data):
        print(line)
    write_code_report(data, args.report)
    journal.remove()
    print(f"wrote {args.report}")
    return data


if __name__ == "__main__":
    main()

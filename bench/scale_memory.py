"""Per-layer memory figures of a recovery step, measured on the CPU, and the per-GPU memory and time they give
for 4B, 8B and 20B models (docs/scale.md).

What is measured (dtype sizes, not device-dependent, so a CPU measures them as well as a GPU): the bytes of
the tensors autograd saves for the backward during the student's forward under bf16 autocast (the
activation memory of a training step), counted with `torch.autograd.graph.saved_tensors_hooks`, parameters
excluded, each storage once. One decoder layer = the difference between a 2-layer and a 1-layer model; its
bytes are fitted as `per_weight * weights + tokens * (a*h + b*i + c*kv)` from small Llama shapes (4 shapes x
2 token counts), in both modes (qat: every linear a FakeQuantLinear; lora: rank 32 on gate/up over frozen
QuantLinear). The loss's own saved bytes per token and vocabulary entry are measured on `kd_loss`.

Everything else is arithmetic on the model shapes (parameters, AdamW state, the teacher's copy) and is
printed with its formula. Time is FLOPs / an assumed sustained rate, not a measurement.

    .venv/bin/python bench/scale_memory.py [--json docs/results/scale-memory.json] [--fits earlier.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

# target shapes: Qwen3-4B and Qwen3-8B (config.json on the Hub), a dense 20B (InternLM2-20B's shape)
TARGETS = {
    "4B (Qwen3-4B)": dict(layers=36, h=2560, i=9728, heads=32, kv_heads=8, head_dim=128, vocab=151936, tied=True),
    "8B (Qwen3-8B)": dict(layers=36, h=4096, i=12288, heads=32, kv_heads=8, head_dim=128, vocab=151936, tied=False),
    "20B (InternLM2-20B shape)": dict(layers=48, h=6144, i=16384, heads=48, kv_heads=8, head_dim=128, vocab=92544,
                                      tied=False),
}
H200_GB = 141  # GB of HBM (139 GiB usable per the device tool)
RECIPE_TOKENS = 10_000 * 256
ASSUMED_TFLOPS = 300  # sustained bf16 TFLOP/s per GPU in training (about 30 % of an H200's dense peak): an assumption


def _saved_bytes(fn) -> int:
    """Bytes of the non-parameter tensors autograd saves while `fn()` runs (each storage counted once)."""
    seen: dict[int, int] = {}

    def pack(t):
        if not isinstance(t, torch.nn.Parameter):
            st = t.untyped_storage()
            seen[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


def _student(h: int, i: int, kv: int, layers: int, mode: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    from edge_recover.apply import quantize_model
    from edge_recover.recovery.qat import make_qat_student
    from edge_recover.recovery.student import add_lora
    from edge_recover.scheme import named_scheme

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=256, hidden_size=h, intermediate_size=i, num_hidden_layers=layers,
                      num_attention_heads=h // 128, num_key_value_heads=kv // 128, head_dim=128,
                      tie_word_embeddings=True)
    teacher = LlamaForCausalLM(cfg).eval()
    student = LlamaForCausalLM(cfg)
    student.load_state_dict(teacher.state_dict())
    quantize_model(student, named_scheme("w4w2gateup").with_block_size({4: 64, 2: 128}), method="rtn", progress=False)
    if mode == "qat":
        make_qat_student(student, teacher, units="step")
        return student
    return add_lora(student, ["gate_proj", "up_proj"], 32, 64.0)


def _layer_bytes(h: int, i: int, kv: int, tokens: int, mode: str) -> int:
    out = []
    for layers in (1, 2):
        model = _student(h, i, kv, layers, mode).train()
        ids = torch.randint(0, 256, (1, tokens))

        def fwd():
            with torch.autocast("cpu", dtype=torch.bfloat16):
                model(input_ids=ids).logits.float().sum()

        out.append(_saved_bytes(fwd))
    return out[1] - out[0]


def measure() -> dict:
    """The fitted per-weight and per-token coefficients of one decoder layer, both modes, and the loss's bytes."""
    shapes = [(1024, 3072, 256), (1024, 6144, 256), (2048, 3072, 256), (1024, 3072, 512)]
    tokens = (128, 256)
    fits = {}
    for mode in ("qat", "lora"):
        rows, ys = [], []
        for h, i, kv in shapes:
            weights = h * (h + 2 * kv + h) + 3 * h * i  # q, k, v, o + gate, up, down
            for n in tokens:
                rows.append([weights, n * h, n * i, n * kv])
                ys.append(_layer_bytes(h, i, kv, n, mode))
        sol = torch.linalg.lstsq(torch.tensor(rows, dtype=torch.float64), torch.tensor(ys, dtype=torch.float64)[:, None])
        coef = sol.solution.flatten().tolist()
        pred = (torch.tensor(rows, dtype=torch.float64) @ torch.tensor(coef, dtype=torch.float64)).tolist()
        fits[mode] = {"bytes_per_weight": coef[0], "bytes_per_token_per_h": coef[1], "bytes_per_token_per_i": coef[2],
                      "bytes_per_token_per_kv": coef[3],
                      "max_fit_error": max(abs(p - y) / y for p, y in zip(pred, ys)), "points": len(ys)}
        print(mode, json.dumps(fits[mode]), file=sys.stderr)
    from edge_recover.recovery.kl import kd_loss

    v, n = 4096, 256
    s = torch.randn(n, v, dtype=torch.bfloat16, requires_grad=True)
    t = torch.randn(n, v, dtype=torch.bfloat16)
    loss_bytes = _saved_bytes(lambda: kd_loss(s[None], t[None]))
    fits["loss_bytes_per_token_per_vocab"] = loss_bytes / (n * v)
    return fits


def per_gpu(shape: dict, fits: dict, mode: str, micro_tokens: int, world: int, fsdp: bool, ckpt: bool = False) -> dict:
    """GB per GPU of one configuration (see docs/scale.md for every term).

    `ckpt`: activation checkpointing per decoder layer (not in the code yet): only each layer's input (fp32
    residual, 4 B x h per token) stays for the backward, plus one layer's saved tensors while it recomputes;
    it costs one more student forward (2P FLOPs per token)."""
    L, h, i, kv, V = shape["layers"], shape["h"], shape["i"], shape["kv_heads"] * shape["head_dim"], shape["vocab"]
    q_dim = shape["heads"] * shape["head_dim"]
    linear = L * (h * (q_dim + 2 * kv) + q_dim * h + 3 * h * i)  # quantized weights
    embed = V * h * (1 if shape["tied"] else 2)
    total = linear + embed
    gb = 1e9
    shard = world if fsdp else 1
    out = {"params_B": total / 1e9}
    out["teacher_bf16"] = 2 * total / gb / shard
    # student: frozen parts in bf16 (embeddings, lm_head); qat: latent fp32 + grad fp32 + AdamW m, v fp32
    # (16 B/weight), block log-scales with their grad and state + uint8 zero points (about 1/16 of that at
    # block 64); lora: QuantLinear's uint8 codes (1 B/weight) + its dequantized weight in bf16 (2 B/weight),
    # LoRA r32 on gate/up in fp32 with grad + AdamW (16 B/parameter). DDP adds its gradient buckets, one more
    # copy of the trainable gradients (4 B per trainable parameter) unless `gradient_as_bucket_view`.
    lora = L * 2 * 32 * (h + i)
    trainable = 1.07 * linear if mode == "qat" else lora
    frozen = 2 * embed + (0 if mode == "qat" else 3 * linear)
    buckets = 4 * trainable if (world > 1 and not fsdp) else 0
    out["student"] = ((16 * trainable + frozen) / shard + buckets) / gb
    f = fits[mode]
    act_layer = micro_tokens * (f["bytes_per_token_per_h"] * h + f["bytes_per_token_per_i"] * i
                                + f["bytes_per_token_per_kv"] * kv)
    per_weight = f["bytes_per_weight"] * linear / L  # the fake-quantized weight copies kept for the backward
    one_layer = act_layer + (per_weight if mode == "qat" else 0)
    out["activations"] = ((L * 4 * h * micro_tokens + one_layer) if ckpt else L * one_layer) / gb
    out["logits_and_loss"] = micro_tokens * V * (fits["loss_bytes_per_token_per_vocab"] + 2 * 2) / gb
    out["total"] = sum(out[k] for k in ("teacher_bf16", "student", "activations", "logits_and_loss"))
    # time: teacher forward 2P, student forward 2P + backward 4P (qat: weight grads too) or 2P (lora: frozen base)
    flops_per_token = (2 + 2 + (4 if mode == "qat" else 2) + (2 if ckpt else 0)) * total
    # the default recipe: 10,000 samples x 256 tokens sampled once, 2 epochs of training (5.12M tokens)
    rate = ASSUMED_TFLOPS * 1e12 * world
    out["sample_minutes"] = RECIPE_TOKENS * 2 * total / rate / 60
    out["train_minutes"] = 2 * RECIPE_TOKENS * flops_per_token / rate / 60
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", type=Path, help="write fits and table here")
    ap.add_argument("--fits", type=Path, help="reuse the fits of an earlier --json instead of measuring again")
    args = ap.parse_args()
    fits = json.loads(args.fits.read_text())["fits"] if args.fits else measure()
    table = {}
    for name, shape in TARGETS.items():
        for mode in ("qat", "lora"):
            for world, fsdp in ((1, False), (2, False), (2, True), (4, True), (8, True)):
                for ckpt in (False, True):
                    row = per_gpu(shape, fits, mode, micro_tokens=4 * 256, world=world, fsdp=fsdp, ckpt=ckpt)
                    table[f"{name} | {mode}{' +ckpt' if ckpt else ''} | {world} GPU{'s' if world > 1 else ''}"
                          f"{' FSDP' if fsdp else ' DDP' if world > 1 else ''}"] = row
    for k, r in table.items():
        print(f"{k:<48} total {r['total']:7.1f} GB (teacher {r['teacher_bf16']:.1f}, student {r['student']:.1f}, "
              f"act {r['activations']:.1f}, logits {r['logits_and_loss']:.1f}); sample {r['sample_minutes']:.1f} min, "
              f"train {r['train_minutes']:.0f} min")
    if args.json:
        args.json.write_text(json.dumps({"fits": fits, "micro_tokens_per_gpu": 1024, "assumed_tflops": ASSUMED_TFLOPS,
                                         "table": table}, indent=2))


if __name__ == "__main__":
    main()

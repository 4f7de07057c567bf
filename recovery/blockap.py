"""Block-wise reconstruction (EfficientQAT's Block-AP): fit each decoder layer of the QAT student to the
teacher's, one layer at a time, before the end-to-end KL distillation.

    ids ─► embed ─┬─► teacher layer 0 ─► y_0 ─► teacher layer 1 ─► y_1 ─► ...        (fp targets)
                  │                      ▲ MSE                   ▲ MSE
                  └─► student layer 0 ───┘─► student layer 1 ────┘─► ...             (quantized inputs)
                      (trained, then run once more without gradients to make layer 1's inputs)

Why this shape: layer i is trained on the inputs that the already-reconstructed quantized layers 0..i-1
actually give it (so it learns to correct the error its predecessors leave), against the output the fp
teacher layer gives on the fp inputs (so errors do not pile up as they would if each layer only matched
the teacher on its own quantized inputs). The loss is the MSE of the layer's output hidden states; a layer
is small, so a few hundred steps of mini-batches fit it, and the gradient has to flow through one layer
only, not through the whole model and the vocabulary-sized KL.

What trains: EfficientQAT's Block-AP trains all parameters of the block (weights and quantization
parameters); here those are, per layer, the `FakeQuantLinear` latents and log-scales (sdk/fakequant.py)
and the layer's RMSNorm weights (when `make_qat_student` left them trainable), and its zero points with
`--train-zero-points` (rounded and clamped latents). Zero points are integers in range either way, so after
this stage the student is still exactly a MatMulNBits function of its codes: `freeze_qat_student` gives the same logits, bit for bit, and the end-to-end stage
(recovery/distill.py) continues from these latents and scales with the requires_grad flags it set up.

Memory: the layer inputs of all `ids` live on `device` in float32, two buffers of N x T x hidden floats
(the fp stream, which becomes the targets in place, and the quantized stream, advanced in place): about
1.2 GB each for N=2048, T=256, hidden 576. The keyword arguments the model passes to its decoder layers
(causal mask, rotary position embeddings, position ids) are captured per layer on a one-row forward, so
they broadcast over any mini-batch and follow per-layer masks (e.g. sliding-window layers).

A non-finite loss or gradient stops the run with one line naming the layer and the fix; that layer's
parameters go back to where they were, earlier layers keep their reconstruction.
"""

from __future__ import annotations

import contextlib
import math
import time

import torch
import torch.nn.functional as F
from torch import nn

from edge_recover.errors import EdgeRecoverError, require
from edge_recover.layouts import layout_for

from .qat import fake_quant_layers, param_groups

# The cosine schedule decays every group to this share of its peak (EfficientQAT: eta_min = lr / 20).
_MIN_LR = 0.05
# Rows of `ids` on which each layer's MSE is measured before and after its training (the first rows).
_EVAL_ROWS = 64


class _Stop(Exception):
    """Raised by the capture hook to end a forward once layer 0's inputs are recorded."""


def _decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layers, where the family's layout (sdk/layouts.py) says they are."""
    path = layout_for(model.config).layers
    try:
        layers = model.get_submodule(path)
    except AttributeError:
        layers = None
    require(isinstance(layers, nn.ModuleList),
            f"block reconstruction needs the decoder layers at `{path}` (the model's layout), got {type(model).__name__}")
    return layers


@torch.no_grad()
def _capture(model: nn.Module, ids: torch.Tensor, batch_size: int, device, autocast) -> tuple[torch.Tensor, list, torch.dtype]:
    """Layer 0's hidden-state inputs on all rows (float32 [N, T, H] on `device`), the keyword arguments of
    every decoder layer (on a one-row forward, so they broadcast over batches) and the hidden states' dtype."""
    layers = _decoder_layers(model)
    chunks: list[torch.Tensor] = []
    dtype: list[torch.dtype] = []

    def grab_input(_module, args, kwargs):
        x = args[0] if args else kwargs["hidden_states"]
        dtype[:] = [x.dtype]
        chunks.append(x.detach().float())
        raise _Stop

    handle = layers[0].register_forward_pre_hook(grab_input, with_kwargs=True)
    try:
        with autocast():
            for batch in ids.split(batch_size):
                try:
                    model(input_ids=batch.to(device), use_cache=False)
                except _Stop:
                    pass
    finally:
        handle.remove()
    require(len(chunks) == -(-ids.shape[0] // batch_size), "the model's forward never reached its first decoder layer")

    layer_kwargs: list[dict] = [{} for _ in layers]
    handles = []
    for i, layer in enumerate(layers):
        def grab_kwargs(_module, args, kwargs, i=i):
            layer_kwargs[i] = {k: v for k, v in kwargs.items() if k != "hidden_states"}
        handles.append(layer.register_forward_pre_hook(grab_kwargs, with_kwargs=True))
    try:
        with autocast():
            model(input_ids=ids[:1].to(device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return torch.cat(chunks), layer_kwargs, dtype[0]


def _forward(layer: nn.Module, x: torch.Tensor, kwargs: dict, dtype: torch.dtype) -> torch.Tensor:
    """One decoder layer on float32 inputs [B, T, H]; its output hidden states in float32."""
    out = layer(x.to(dtype), **kwargs)
    return (out[0] if isinstance(out, tuple) else out).float()


@torch.no_grad()
def _advance(layer, buf: torch.Tensor, kwargs, dtype, batch_size: int, autocast, target: torch.Tensor | None = None,
             eval_rows: int = 0) -> float:
    """Replace `buf` (in place, chunk by chunk) by the layer's outputs on it; with `target`, the MSE against it
    over the first `eval_rows` rows (measured before they are overwritten)."""
    sq, count = 0.0, 0
    for start in range(0, buf.shape[0], batch_size):
        rows = slice(start, start + batch_size)
        with autocast():
            out = _forward(layer, buf[rows], kwargs, dtype)
        if target is not None and start < eval_rows:
            n = min(eval_rows - start, out.shape[0])
            sq += float((out[:n] - target[rows][:n]).square().sum())
            count += out[:n].numel()
        buf[rows] = out
    return sq / max(count, 1)


@torch.no_grad()
def _mse(layer, x: torch.Tensor, y: torch.Tensor, kwargs, dtype, batch_size: int, autocast) -> tuple[float, float]:
    """MSE of the layer's outputs on `x` against `y`, and the mean square of `y` (the scale to read it against)."""
    sq, power, count = 0.0, 0.0, 0
    for xb, yb in zip(x.split(batch_size), y.split(batch_size)):
        with autocast():
            out = _forward(layer, xb, kwargs, dtype)
        sq += float((out - yb).square().sum())
        power += float(yb.square().sum())
        count += out.numel()
    return sq / max(count, 1), power / max(count, 1)


def _row_batches(n: int, batch_size: int, steps: int, gen: torch.Generator):
    """`steps` mini-batches of row indices: successive seeded permutations of the n rows, cut into batches."""
    size = min(batch_size, n)
    order, at = torch.randperm(n, generator=gen), 0
    for _ in range(steps):
        if at + size > n:
            order, at = torch.randperm(n, generator=gen), 0
        yield order[at:at + size]
        at += size


def _train_layer(i: int, s_layer, x_all, y_all, kwargs, dtype, groups, steps, batch_size, gen, autocast,
                 lr: float, lr_scale: float) -> list[float]:
    """AdamW on MSE(s_layer(x[b]), y[b]) for `steps` cosine-scheduled steps; returns the losses."""
    params = [p for g in groups for p in g["params"]]
    opt = torch.optim.AdamW(groups, betas=(0.9, 0.95), weight_decay=0.0)
    losses = []
    for step, rows in enumerate(_row_batches(x_all.shape[0], batch_size, steps, gen)):
        factor = _MIN_LR + (1 - _MIN_LR) * 0.5 * (1 + math.cos(math.pi * step / steps))
        for g in opt.param_groups:
            g["lr"] = g["peak_lr"] * factor
        rows = rows.to(x_all.device)
        with autocast():
            out = _forward(s_layer, x_all[rows], kwargs, dtype)
        loss = F.mse_loss(out, y_all[rows])
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(params, 1.0)
        value = loss.item()
        if not (math.isfinite(value) and math.isfinite(float(norm))):
            raise EdgeRecoverError(
                f"block reconstruction diverged at layer {i} (step {step + 1}, loss {value:.4g}"
                f"{'' if math.isfinite(float(norm)) else ', gradient not finite'}); lower `--block-ap-lr` "
                f"(now {lr:g}; log-scales {lr_scale:g}) and start over")
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(value)
    return losses


def block_reconstruct(student: nn.Module, teacher: nn.Module, ids: torch.Tensor, *, steps: int = 200,
                      batch_size: int = 8, lr: float = 1e-2, lr_scale: float = 1e-2, lr_norm: float = 1e-3,
                      lr_zero: float = 1e-2,
                      device=None, autocast: bool = False, progress: bool = True, seed: int = 0) -> dict:
    """Fit the QAT `student`'s decoder layers to the fp `teacher`'s, one layer at a time (Block-AP), in place.

    `student` has `FakeQuantLinear` layers (`qat.make_qat_student`) and the architecture of `teacher`;
    `ids` [N, T] are teacher samples. Layer i trains its latents (`lr`), log-scales (`lr_scale`) and, where
    trainable, norm weights (`lr_norm`) with AdamW (betas 0.9 / 0.95, no weight decay, cosine decay to 5%,
    gradients clipped at 1.0) for `steps` mini-batches of `batch_size` rows, on the MSE between its output
    on the quantized stream and the teacher layer's on the fp stream. Both models must be on `device`
    (default: the student's); `autocast` runs bf16 autocast there when it is a CUDA device. The
    requires_grad flags and train/eval mode of the student are as they were afterwards.

    Returns a JSON-able report: per layer the MSE on the first min(N, 64) rows before and after its
    training (and the targets' mean square there, to read it against), the mean loss of its last tenth of
    steps and its seconds; the total seconds; the settings.
    Raises `EdgeRecoverError` when a loss or gradient is not finite.

    Example:
        >>> make_qat_student(student, teacher, units="step")  # doctest: +SKIP
        >>> report = block_reconstruct(student, teacher, train_ids[:512], steps=200)  # doctest: +SKIP
        >>> [(l["mse_before"], l["mse_after"]) for l in report["layers"]]  # doctest: +SKIP
    """
    t0 = time.perf_counter()
    require(isinstance(steps, int) and steps > 0, f"`--block-ap-steps` must be a positive integer, got {steps!r}; try 200")
    require(isinstance(batch_size, int) and batch_size > 0,
            f"`--block-ap-batch-size` must be a positive integer, got {batch_size!r}; try 8")
    require(lr > 0 and lr_scale > 0 and lr_norm > 0,
            f"block reconstruction learning rates must be positive, got {lr!r}, {lr_scale!r}, {lr_norm!r}; try 1e-2, 1e-2, 1e-3")
    require(ids.ndim == 2 and ids.shape[0] > 0 and not ids.is_floating_point(),
            f"`ids` must be integer token ids [N, T], got a {tuple(ids.shape)} {ids.dtype} tensor")
    require(bool(fake_quant_layers(student)), "the student has no FakeQuantLinear layers; run `make_qat_student` first")
    s_layers, t_layers = _decoder_layers(student), _decoder_layers(teacher)
    require(len(s_layers) == len(t_layers),
            f"the student has {len(s_layers)} decoder layers and the teacher {len(t_layers)}; pass the student's teacher")
    device = torch.device(device) if device is not None else next(student.parameters()).device
    if device.type == "cuda" and device.index is None:  # `cuda` is the current GPU, where `.to("cuda")` puts tensors
        device = torch.device("cuda", torch.cuda.current_device())
    for who, model in (("student", student), ("teacher", teacher)):
        where = {p.device for p in model.parameters()}
        require(where == {device}, f"the {who} is on {', '.join(sorted(map(str, where)))}, not on `device` {device}; "
                                   f"move it there first (`.to({str(device)!r})`)")
    use_autocast = autocast and device.type == "cuda"

    def amp():
        return torch.autocast("cuda", dtype=torch.bfloat16) if use_autocast else contextlib.nullcontext()

    flags = {id(p): p.requires_grad for p in student.parameters()}
    was_training, teacher_training = student.training, teacher.training
    student.eval()
    teacher.eval()
    gen = torch.Generator().manual_seed(seed)
    report = {"settings": {"steps": steps, "batch_size": batch_size, "lr": lr, "lr_scale": lr_scale, "lr_norm": lr_norm,
                           "rows": int(ids.shape[0]), "seq_len": int(ids.shape[1]), "autocast": use_autocast,
                           "seed": seed, "device": str(device)}, "layers": []}
    bar = None
    try:  # only layer i's forward runs with gradients, so only its trainable tensors get any
        fp, t_kwargs, t_dtype = _capture(teacher, ids, batch_size, device, amp)  # [N, T, H] float32
        qs, s_kwargs, s_dtype = _capture(student, ids, batch_size, device, amp)
        eval_rows = min(ids.shape[0], _EVAL_ROWS)
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=len(s_layers), desc="block reconstruction", unit="layer")
        for i, (s_layer, t_layer) in enumerate(zip(s_layers, t_layers)):
            t_layer_start = time.perf_counter()
            _advance(t_layer, fp, t_kwargs[i], t_dtype, batch_size, amp)  # fp now holds the targets y_i
            before, power = _mse(s_layer, qs[:eval_rows], fp[:eval_rows], s_kwargs[i], s_dtype, batch_size, amp)
            # the layer's trainable tensors as make_qat_student left them: latents, log-scales, trained norms
            groups = [g for g in param_groups(s_layer, lr, lr_scale, lr_norm, lr_zero=lr_zero) if g["params"]]
            params = [p for g in groups for p in g["params"]]
            saved = [p.detach().clone() for p in params]
            try:
                losses = _train_layer(i, s_layer, qs, fp, s_kwargs[i], s_dtype, groups, steps, batch_size, gen, amp,
                                      lr, lr_scale) if params else []
            except EdgeRecoverError:
                with torch.no_grad():
                    for p, v in zip(params, saved):
                        p.copy_(v)
                raise
            after = _advance(s_layer, qs, s_kwargs[i], s_dtype, batch_size, amp, target=fp, eval_rows=eval_rows)
            tail = losses[-max(1, len(losses) // 10):]
            report["layers"].append({"layer": i, "mse_before": before, "mse_after": after,
                                     "target_mean_square": power,
                                     "train_loss_last": sum(tail) / len(tail) if tail else None,
                                     "trained_parameters": sum(p.numel() for p in params),
                                     "seconds": time.perf_counter() - t_layer_start})
            if bar is not None:
                bar.update(1)
                bar.set_postfix(mse=f"{before:.3g}->{after:.3g}")
    finally:
        if bar is not None:
            bar.close()
        for p in student.parameters():
            p.requires_grad_(flags[id(p)])
        student.train(was_training)
        teacher.train(teacher_training)
    report["seconds"] = time.perf_counter() - t0
    return report

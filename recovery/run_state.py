"""The resumable state of a recovery run in its work folder: the trainable tensors, the optimizer and
state.json (step, settings, the integers' hash), written all-or-nothing, and the metrics log trimmed back to
the step a resumed run continues from. Untrusted files load without pickle (safetensors, `weights_only=True`)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from edge_recover.errors import EdgeRecoverError, require


def write_checkpoint(path: Path, model, optimizer, state: dict, tensor_file: str) -> None:
    """The trainable tensors (into `tensor_file`, the mode's), the optimizer state and state.json, all-or-nothing."""
    from safetensors.torch import save_file

    from edge_recover.atomic import atomic_dir

    with atomic_dir(path, overwrite=True) as tmp:
        save_file({n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad},
                  str(tmp / tensor_file))
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        (tmp / "state.json").write_text(json.dumps(state, indent=2))


def read_checkpoint(path: Path, model, optimizer, cfg, qhash: str, tensor_file: str) -> dict:
    """Load a checkpoint into `model` and `optimizer` after checking it continues this run (`cfg`, a
    `distill.RecoverConfig`, and the integers' hash `qhash`); returns its state.json."""
    from safetensors.torch import load_file

    try:
        state = json.loads((path / "state.json").read_text())
        tensors = load_file(str(path / tensor_file))
        opt_state = torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True)
    except Exception as exc:
        raise EdgeRecoverError(f"checkpoint {str(path)!r} is unreadable ({type(exc).__name__}); delete it to start "
                               "over, or rerun without `--resume` into a new output") from None
    saved = state.get("config", {})
    diff = sorted(k for k, v in cfg.trajectory().items() if saved.get(k) != v)
    require(not diff, f"`--resume`: the checkpoint in {str(path)!r} was made with other settings ({', '.join(diff)}: "
                      f"{', '.join(f'{saved.get(k)!r}' for k in diff)}); pass the same options to continue")
    require(state.get("quant_hash") == qhash,
            f"`--resume`: the checkpoint in {str(path)!r} was trained on other quantized integers; "
            "use the same MODEL, `--scheme` and `--method`")
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    require(set(params) == set(tensors), f"`--resume`: checkpoint {str(path)!r} does not match the student's layout")
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(tensors[n].to(p.device, p.dtype))
    optimizer.load_state_dict(opt_state)
    return state


def trim_metrics(path: Path, step: int) -> None:
    """Drop log lines written after the checkpoint a run resumes from, so the log reads as one run."""
    if not path.is_file():
        return
    lines = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln).get("step", 0) <= step]
    path.write_text("".join(ln + "\n" for ln in lines))

"""Recovery modes as registered handlers: one module per mode in this folder, found by its name.

`recover` (distill.py) runs one loop for every mode: the teacher's data, KL distillation, the schedule,
checkpoints and resume. What differs is the student and what the run writes, and that is a mode:

    plan(base, cfg)                       before the teacher's data: check the request against the start
                                          integers, keep what the output needs (LoRA targets, start codes)
    student(plan, base, teacher, cfg, train_ids, device, resume)
                                          the model that trains and its optimizer groups (`Student`)
    finish(plan, model, report)           after training: the model that ships (qat: frozen integers)
    write(plan, out)                      the output folder, all-or-nothing (output.py)

plus its data: `name` (`--mode`), `output` (the report key naming the folder: `quantized`, `adapter`),
`tensor_file` (its trainable tensors in WORK/checkpoint), and its default `lr` and `beta2`. A module here that
defines `MODE` is a mode (`names()` lists them without importing torch, `mode_for(name)` loads one): a new mode
is one new module, nothing else to edit.

Example:
    >>> names()
    ('lora', 'qat')
    >>> mode_for("qat").output  # doctest: +SKIP
    'quantized'
"""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass, field
from typing import Any, Protocol

# a named scheme's head is quantized for the cpu target; `--train-head` trains a float one (qat, and refused for both)
TRAIN_HEAD_QUANTIZED = ("`--train-head` trains a float head, and this student's head is quantized (a named scheme's "
                        "head is 8-bit for the CPU); add `--rule lm_head=keep` to keep it float, or leave "
                        "`--train-head` out")


@dataclass
class Plan:
    """What a mode keeps between `plan` and `write`: the layers it trains (`layers`) and its own data."""

    layers: list[str]
    data: Any = None


@dataclass
class Student:
    """The model that trains, its optimizer groups (each with `peak_lr`), and what the mode reports of its start."""

    model: Any
    groups: list[dict]
    start: dict = field(default_factory=dict)


class Mode(Protocol):
    """A recovery mode (see the module docstring); `cfg` is a `distill.RecoverConfig`."""

    name: str
    output: str
    tensor_file: str
    lr: float
    beta2: float

    def check(self, cfg) -> None: ...

    def plan(self, base, cfg) -> Plan: ...

    def student(self, plan: Plan, base, teacher, cfg, train_ids, device, resume: bool) -> Student: ...

    def finish(self, plan: Plan, model, report: dict): ...

    def write(self, plan: Plan, out) -> None: ...


def names() -> tuple[str, ...]:
    """The registered modes: the public modules of this folder (no import, so no torch)."""
    return tuple(sorted(m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_")))


def mode_for(name: str) -> Mode:
    """The mode called `name` (`--mode`); an unknown one is refused naming the registered ones.

    Example:
        >>> mode_for("lora").tensor_file  # doctest: +SKIP
        'lora.safetensors'
    """
    from edge_recover.errors import require

    known = names()
    require(name in known, f"`--mode` must be one of {', '.join(sorted(known, key=lambda n: (_ORDER.get(n, len(_ORDER)), n)))}, got {name!r}")
    return importlib.import_module(f"{__name__}.{name}").MODE


_ORDER = {"qat": 0, "lora": 1}  # the order messages name the built-in modes in (the default first)

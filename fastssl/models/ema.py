"""The EMA teacher: EMA backbone and projector, prototypes copied from the student.

As in the authors' code: the teacher's backbone and projector follow the student by an
exponential moving average whose momentum is cosine-scheduled 0.99 -> 1, the teacher's
prototypes are COPIED each step (not averaged), and the teacher runs in train mode so
that its BN layers use batch statistics. It never receives gradients.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from fastssl.models.network import MiraNetwork


def make_teacher(student: MiraNetwork) -> MiraNetwork:
    """A gradient-free copy of the student, starting from the same weights."""
    teacher = copy.deepcopy(student)
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


@torch.no_grad()
def ema_update(teacher: MiraNetwork, student: MiraNetwork, momentum: float) -> None:
    """teacher <- m * teacher + (1 - m) * student on backbone + projector; copy the head."""
    for part in ("backbone", "projector"):
        t_params = [p for p in getattr(teacher, part).parameters()]
        s_params = [p.detach() for p in getattr(student, part).parameters()]
        torch._foreach_lerp_(t_params, s_params, 1.0 - momentum)
    teacher.prototypes.weight.copy_(student.prototypes.weight)


def unwrap(module: nn.Module) -> nn.Module:
    """The bare module inside DDP / torch.compile wrappers."""
    while True:
        if hasattr(module, "module"):
            module = module.module
        elif hasattr(module, "_orig_mod"):
            module = module._orig_mod
        else:
            return module

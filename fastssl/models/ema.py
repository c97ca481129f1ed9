"""The EMA teacher: EMA backbone and projector, prototypes copied from the student.

As in the authors' code: the teacher's backbone and projector follow the student by an
exponential moving average whose momentum is cosine-scheduled 0.99 -> 1, the teacher's
prototypes are COPIED each step (not averaged), and the teacher runs in train mode so
that its BN layers use batch statistics. It never receives gradients.
"""

from __future__ import annotations

import copy
import weakref

import torch
from torch import nn

from fastssl.models.network import MiraNetwork

# teacher -> (its student, the teacher's EMA parameters, the student's): listing ~160 parameters
# walks every module, ~0.4 ms of host time per step on a ResNet-50, as much as a few dozen kernel
# launches. Parameters keep their identity when moved, wrapped (DDP, torch.compile) or loaded into;
# a load that replaces them (`load_state_dict(assign=True)`) is caught by the first ones' identity.
_EMA_PAIRS: "weakref.WeakKeyDictionary[nn.Module, tuple]" = weakref.WeakKeyDictionary()


def make_teacher(student: MiraNetwork) -> MiraNetwork:
    """A gradient-free copy of the student, starting from the same weights."""
    teacher = copy.deepcopy(student)
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


def ema_pairs(teacher: MiraNetwork, student: MiraNetwork) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The teacher's backbone and projector parameters and the student's, in the same order (listed once per pair)."""
    cached = _EMA_PAIRS.get(teacher)
    if (cached is None or cached[0]() is not student or cached[1][0] is not next(teacher.backbone.parameters())
            or cached[2][0] is not next(student.backbone.parameters())):
        parts = ("backbone", "projector")
        cached = (weakref.ref(student), [p for part in parts for p in getattr(teacher, part).parameters()],
                  [p for part in parts for p in getattr(student, part).parameters()])
        _EMA_PAIRS[teacher] = cached
    return cached[1], cached[2]


@torch.no_grad()
def ema_update(teacher: MiraNetwork, student: MiraNetwork, momentum: float) -> None:
    """teacher <- m * teacher + (1 - m) * student on backbone + projector; copy the head."""
    torch._foreach_lerp_(*ema_pairs(teacher, student), 1.0 - momentum)
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

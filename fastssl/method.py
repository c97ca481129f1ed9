"""One MIRA training step: teacher targets, student swapped-prediction loss, updates.

Kept apart from the loop so the loop stays short and the step can be tested alone.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch

from fastssl.config import MiraConfig
from fastssl.losses import swapped_prediction_loss
from fastssl.models import ema_update, unwrap
from fastssl.ops import mira_assign, sinkhorn_assign
from fastssl.schedules import StepSchedule


def assign_targets(teacher_logits: list[torch.Tensor], method: MiraConfig, beta: float) -> list[torch.Tensor]:
    """Pseudo-labels of each global view, solved independently per view (Sec. 3.3)."""
    if method.assignment == "mira":
        return [mira_assign(t, tau=method.tau_teacher, beta=beta, num_iters=method.num_iters) for t in teacher_logits]
    return [sinkhorn_assign(t, eps=method.sinkhorn_eps, num_iters=method.sinkhorn_iters) for t in teacher_logits]


def micro_batches(batch_size: int, micro_batch_size: int) -> list[slice]:
    """Row slices for gradient accumulation (one slice when no split is asked for)."""
    step = micro_batch_size or batch_size
    return [slice(lo, lo + step) for lo in range(0, batch_size, step)]


def train_step(student, teacher, optimizer, accelerator, views: list[torch.Tensor], sched: StepSchedule,
               method: MiraConfig, micro_batch_size: int = 0) -> torch.Tensor:
    """Targets from the teacher on the 2 global views, loss on all student views, one update.

    Targets are solved on the WHOLE batch before the student's micro-batches, so
    gradient accumulation changes memory use but not the pseudo-labels (their marginal
    is always over the global batch). Returns the detached mean loss of this process.
    """
    for group in optimizer.param_groups:
        group["lr"] = sched.lr
    with torch.no_grad(), accelerator.autocast():
        teacher_logits = teacher(views[:2])
    targets = assign_targets(teacher_logits, method, sched.beta)

    chunks = micro_batches(views[0].shape[0], micro_batch_size)
    total = torch.zeros((), device=views[0].device)
    for c, rows in enumerate(chunks):
        sync = nullcontext() if c == len(chunks) - 1 else accelerator.no_sync(student)
        with sync:
            with accelerator.autocast():
                student_logits = student([v[rows] for v in views])
            loss = swapped_prediction_loss(student_logits, [t[rows] for t in targets], method.tau_student)
            accelerator.backward(loss / len(chunks))
        total += loss.detach() / len(chunks)

    if sched.freeze_prototypes:  # prototypes do not move during the first epoch(s)
        unwrap(student).prototypes.weight.grad = None
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    ema_update(teacher, unwrap(student), sched.ema_momentum)
    return total

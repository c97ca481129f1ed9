"""One training step: teacher, objective, student, updates; the objective is an object
(`fastssl.objectives`) that the step runs without knowing which one it is.

Kept apart from the loop so the loop stays short and the step can be tested alone.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from fastssl.models import ema_update, unwrap
from fastssl.objectives import Metrics, Objective
from fastssl.profiling import NO_PHASES, PhaseTimer
from fastssl.schedules import StepSchedule

if TYPE_CHECKING:
    from accelerate import Accelerator


@dataclass
class StepParts:
    """What every step uses, built once by the loop (the networks, the optimiser, the objective)."""

    student: nn.Module  # prepared by Accelerate (DDP), maybe compiled
    teacher: nn.Module
    optimizer: torch.optim.Optimizer
    accelerator: Accelerator
    objective: Objective
    micro_batch_size: int = 0  # rows per gradient-accumulation micro-batch; 0 = the whole batch at once


def micro_batches(batch_size: int, micro_batch_size: int) -> list[slice]:
    """Row slices for gradient accumulation (one slice when no split is asked for)."""
    step = micro_batch_size or batch_size
    return [slice(lo, lo + step) for lo in range(0, batch_size, step)]


def student_backward(parts: StepParts, views: list[torch.Tensor], targets: Any,
                     sched: StepSchedule) -> tuple[torch.Tensor, Metrics]:
    """Student forward and backward on all views, in micro-batches; (mean loss, metrics).

    Gradients of all micro-batches accumulate; DDP's all-reduce runs on the last one only.
    A tensor metric is averaged over the micro-batches, a number is kept as it is.
    """
    accelerator, chunks = parts.accelerator, micro_batches(views[0].shape[0], parts.micro_batch_size)
    total = torch.zeros((), device=views[0].device)
    metrics: Metrics = {}
    for c, rows in enumerate(chunks):
        sync = nullcontext() if c == len(chunks) - 1 else accelerator.no_sync(parts.student)
        with sync:
            with accelerator.autocast():
                student_logits, student_z = parts.student([v[rows] for v in views], with_embeddings=True)
            loss, chunk_metrics = parts.objective.loss(student_logits, student_z, targets, rows, sched)
            accelerator.backward(loss / len(chunks))
        total += loss.detach() / len(chunks)
        for name, value in chunk_metrics.items():
            metrics[name] = metrics.get(name, 0) + value / len(chunks) if torch.is_tensor(value) else value
    return total, metrics


def train_step(parts: StepParts, views: list[torch.Tensor], sched: StepSchedule,
               phases: PhaseTimer = NO_PHASES) -> tuple[torch.Tensor, Metrics]:
    """The teacher on the 2 global views, the objective's loss on all student views, one update.

    The objective's targets are made from the WHOLE batch before the student's
    micro-batches, so gradient accumulation changes memory use but not the targets (MIRA's
    marginal is always over the global batch). The objective finishes the step (ML-CPC
    enqueues this step's keys) after every micro-batch has been scored, so no key is its
    own negative. Returns the detached mean loss of this process and the objective's
    metrics (`fastssl.objectives`). `phases` times the step's parts for profiling
    (teacher, assignment, student, update); the default records nothing.
    """
    p, objective = parts, parts.objective
    for group in p.optimizer.param_groups:
        group["lr"] = sched.lr
    with phases.phase("teacher_forward"), torch.no_grad(), p.accelerator.autocast():
        teacher = objective.teacher_forward(p.teacher, views)
    with phases.phase("assignment"):
        targets = objective.targets(teacher, sched)
    with phases.phase("student_forward_backward"):
        loss, metrics = student_backward(p, views, targets, sched)
    with phases.phase("update"):  # the objective's end of step, optimiser step, EMA teacher
        objective.finish_step(targets)
        if sched.freeze_prototypes:  # prototypes do not move during the first epoch(s)
            unwrap(p.student).prototypes.weight.grad = None
        p.optimizer.step()
        p.optimizer.zero_grad(set_to_none=True)
        ema_update(p.teacher, unwrap(p.student), sched.ema_momentum)
    return loss, metrics

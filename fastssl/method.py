"""One MIRA training step: teacher targets, student swapped-prediction loss, updates.

Kept apart from the loop so the loop stays short and the step can be tested alone.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch

from fastssl.config import MiraConfig
from fastssl.critic import CriticOutput, MlCpcCritic, shuffled_forward
from fastssl.losses import swapped_prediction_loss
from fastssl.models import ema_update, unwrap
from fastssl.ops import mira_assign_views, sinkhorn_assign
from fastssl.profiling import NO_PHASES, PhaseTimer
from fastssl.schedules import StepSchedule


def assign_targets(teacher_logits: list[torch.Tensor], method: MiraConfig, beta: float) -> list[torch.Tensor]:
    """Pseudo-labels of each global view, solved independently per view (Sec. 3.3).

    MIRA goes through `mira_assign_views`: one all-gather of both views' logits per step,
    then the global problem solved locally (the reference all-reduces at every iteration).
    """
    if method.assignment == "mira":
        return mira_assign_views(teacher_logits, tau=method.tau_teacher, beta=beta, num_iters=method.num_iters)
    return [sinkhorn_assign(t, eps=method.sinkhorn_eps, num_iters=method.sinkhorn_iters) for t in teacher_logits]


def micro_batches(batch_size: int, micro_batch_size: int) -> list[slice]:
    """Row slices for gradient accumulation (one slice when no split is asked for)."""
    step = micro_batch_size or batch_size
    return [slice(lo, lo + step) for lo in range(0, batch_size, step)]


def critic_loss(critic: MlCpcCritic, student_z: list[torch.Tensor], teacher_z: list[torch.Tensor],
                alpha: float) -> CriticOutput:
    """ML-CPC between the two global views in ONE denominator, in the critic's direction
    (`MlCpcCritic.pairs`: one_way = the authors', symmetric = ours). Nothing is enqueued
    here (see train_step)."""
    queries, keys = critic.pairs(student_z, teacher_z)
    return critic(queries, keys, alpha, enqueue=False)


def student_backward(student, accelerator, views: list[torch.Tensor], targets: list[torch.Tensor] | None,
                     teacher_z: list[torch.Tensor], sched: StepSchedule, method: MiraConfig, micro_batch_size: int,
                     critic: MlCpcCritic | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Student forward and backward on all views, in micro-batches; (mean loss, mean MI estimate).

    Gradients of all micro-batches accumulate; DDP's all-reduce runs on the last one only.
    """
    use_mira = targets is not None
    weight = method.mlcpc_weight if use_mira else 1.0
    chunks = micro_batches(views[0].shape[0], micro_batch_size)
    total = torch.zeros((), device=views[0].device)
    mi = torch.zeros((), device=views[0].device)
    for c, rows in enumerate(chunks):
        sync = nullcontext() if c == len(chunks) - 1 else accelerator.no_sync(student)
        with sync:
            with accelerator.autocast():
                student_logits, student_z = student([v[rows] for v in views], with_embeddings=True)
            loss = torch.zeros((), device=views[0].device)
            if use_mira:
                loss = swapped_prediction_loss(student_logits, [t[rows] for t in targets], method.tau_student)
            if critic is not None:
                out = critic_loss(critic, student_z, [z[rows] for z in teacher_z], sched.alpha)
                loss = loss + weight * out.loss
                mi += out.mi_nats / len(chunks)
            accelerator.backward(loss / len(chunks))
        total += loss.detach() / len(chunks)
    return total, mi


def train_step(student, teacher, optimizer, accelerator, views: list[torch.Tensor], sched: StepSchedule,
               method: MiraConfig, micro_batch_size: int = 0, critic: MlCpcCritic | None = None,
               phases: PhaseTimer = NO_PHASES) -> torch.Tensor:
    """Targets from the teacher on the 2 global views, loss on all student views, one update.

    Targets are solved on the WHOLE batch before the student's micro-batches, so
    gradient accumulation changes memory use but not the pseudo-labels (their marginal
    is always over the global batch). With a critic, the teacher's keys of this step are
    enqueued after every micro-batch has been scored, so no key is its own negative.
    Returns the detached mean loss of this process (the critic's MI estimate of the step
    is left in `critic.last_mi_nats`). `phases` times the step's parts for profiling
    (teacher, assignment, student, update); the default records nothing.
    """
    for group in optimizer.param_groups:
        group["lr"] = sched.lr
    use_mira = method.objective in ("mira", "mira+mlcpc")
    with phases.phase("teacher_forward"), torch.no_grad(), accelerator.autocast():
        if critic is not None and critic.shuffle_bn:  # MoCo's shuffle-BN in the key encoder
            teacher_logits, teacher_z, _ = shuffled_forward(teacher, views[:2], critic.shuffle_bn_splits)
        else:
            teacher_logits, teacher_z = teacher(views[:2], with_embeddings=True)
    with phases.phase("assignment"):
        targets = assign_targets(teacher_logits, method, sched.beta) if use_mira else None
    with phases.phase("student_forward_backward"):
        total, mi = student_backward(student, accelerator, views, targets, teacher_z, sched, method,
                                     micro_batch_size, critic)
    with phases.phase("update"):  # optimiser step, EMA teacher, critic queue
        if critic is not None:
            critic.queue.push(critic.keys_to_enqueue(teacher_z))
            critic.last_mi_nats = mi
        if sched.freeze_prototypes:  # prototypes do not move during the first epoch(s)
            unwrap(student).prototypes.weight.grad = None
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        ema_update(teacher, unwrap(student), sched.ema_momentum)
    return total

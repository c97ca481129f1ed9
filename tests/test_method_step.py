"""One real `train_step` (fastssl/method.py) against float64 hand references: the ML-CPC loss scores
the key queue as it was BEFORE the step (a key is never its own negative), the EMA teacher is
m * teacher + (1 - m) * student, and the optimiser steps at the schedule's lr."""

from __future__ import annotations

import math

import pytest
import torch
from accelerate import Accelerator

from fastssl.critic import MlCpcCritic
from fastssl.method import StepParts, train_step
from fastssl.models import MiraNetwork, make_teacher
from fastssl.objectives import MlCpc
from fastssl.schedules import StepSchedule

B, DIM, QUEUE, T = 8, 16, 24, 0.07
SCHED = StepSchedule(lr=0.05, beta=0.7, ema_momentum=0.9, freeze_prototypes=False, alpha=0.5)


@pytest.fixture(scope="module")
def one_step():
    """A tiny float64 MiraNetwork, an ML-CPC objective (one_way) and plain SGD, through one train_step;
    the snapshots the references need (queue, teacher, student and gradients around the step)."""
    torch.manual_seed(0)
    student = MiraNetwork("resnet18", 32, DIM, 12).double()
    student.prototypes.requires_grad_(False)  # as build_networks does for ML-CPC
    teacher = make_teacher(student)
    with torch.no_grad():  # a teacher that differs from the student, or any EMA momentum would pass
        for p in teacher.parameters():
            p.add_(0.05 * torch.randn_like(p))
    objective = MlCpc(MlCpcCritic(QUEUE, DIM, T, direction="one_way"))
    # lr 123: a step that did not take the schedule's lr would move the weights by far too much
    opt = torch.optim.SGD([p for p in student.parameters() if p.requires_grad], lr=123.0)
    grads = {}
    real_step = opt.step

    def recording_step(*args, **kwargs):
        grads.update({n: p.grad.detach().clone() for n, p in student.named_parameters() if p.grad is not None})
        return real_step(*args, **kwargs)

    opt.step = recording_step
    views = [torch.randn(B, 3, 16, 16, dtype=torch.float64) for _ in range(2)]
    with torch.no_grad():  # train-mode forwards: batch statistics, so these are what the step computes
        _, student_z = student(views, with_embeddings=True)
        _, teacher_z = teacher(views, with_embeddings=True)
    before = {"queue": objective.critic.queue.keys.detach().double().clone(),
              "student": {n: p.detach().clone() for n, p in student.named_parameters()},
              "teacher": {n: p.detach().clone() for n, p in teacher.named_parameters()}}
    parts = StepParts(student, teacher, opt, Accelerator(cpu=True), objective)
    loss, _ = train_step(parts, views, SCHED)
    return {"loss": loss, "q": student_z[0], "k": teacher_z[1], "before": before, "grads": grads, "opt": opt,
            "student": dict(student.named_parameters()), "teacher": dict(teacher.named_parameters())}


def test_train_step_scores_the_queue_from_before_the_step(one_step):
    """Loss = -ML-CPC(pos, q . queue_before / T) / alpha by hand in float64 (Song & Ermon Eq. 6: one
    logsumexp over n m scores, weights alpha and (m - alpha)/(m - 1)); rel 1e-5: the critic scores in float32."""
    q = torch.nn.functional.normalize(one_step["q"].double(), dim=1)
    k = torch.nn.functional.normalize(one_step["k"].double(), dim=1)
    pos = (q * k).sum(1) / T
    neg = q @ one_step["before"]["queue"].t() / T
    n, m, alpha = B, QUEUE + 1, SCHED.alpha
    scores = torch.cat([pos + math.log(alpha), (neg + math.log((m - alpha) / (m - 1))).reshape(-1)])
    top = scores.max()
    bound = pos.mean() + math.log(n * m) - (top + (scores - top).exp().sum().log())
    assert float(one_step["loss"]) == pytest.approx(float(-bound / alpha), rel=1e-5)


def test_train_step_moves_the_ema_teacher_by_the_scheduled_momentum(one_step):
    """Backbone and projector: teacher = m t_before + (1 - m) s_after (float64, 1e-12); the head is copied."""
    m, before = SCHED.ema_momentum, one_step["before"]["teacher"]
    student, teacher = one_step["student"], one_step["teacher"]
    for name, t in teacher.items():
        s = student[name].detach()
        expected = s if name.startswith("prototypes.") else m * before[name] + (1 - m) * s
        torch.testing.assert_close(t.detach(), expected, rtol=0, atol=1e-12, msg=name)


def test_train_step_runs_the_optimiser_at_the_scheduled_lr(one_step):
    """Plain SGD by hand: s_after = s_before - lr * grad at the schedule's lr (float64, 1e-12)."""
    assert [g["lr"] for g in one_step["opt"].param_groups] == [SCHED.lr]
    assert one_step["grads"]  # the step computed gradients
    for name, g in one_step["grads"].items():
        expected = one_step["before"]["student"][name] - SCHED.lr * g
        torch.testing.assert_close(one_step["student"][name].detach(), expected, rtol=0, atol=1e-12, msg=name)

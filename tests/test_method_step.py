"""One real `train_step` (fastssl/method.py) against float64 hand references: the ML-CPC loss scores
the key queue as it was BEFORE the step (a key is never its own negative), the EMA teacher is
m * teacher + (1 - m) * student, and the optimiser steps at the schedule's lr. And no step makes the
host wait for the device."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import traceback
import warnings
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from fastssl.config import Config
from fastssl.critic import MlCpcCritic
from fastssl.method import StepParts, train_step
from fastssl.models import MiraNetwork, make_teacher
from fastssl.objectives import MlCpc, build_objective
from fastssl.schedules import StepSchedule, step_schedule

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


# What makes the host wait for the device: a tensor read on the host, called from Python (torch functions)
# or inside an op and in the backward (aten ops: a value read as a number, a comparison answered with a
# bool, an output sized by the values).
HOST_READS = frozenset({"item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "__index__", "nonzero"})
HOST_WAITS = frozenset({"_local_scalar_dense", "equal", "is_nonzero", "nonzero", "nonzero_static", "masked_select",
                        "unique", "_unique", "_unique2", "unique_dim", "unique_consecutive"})
# (objective, optimiser, critic.shuffle_bn): the Table 8 recipe, ML-CPC beside MIRA with the batch-4096
# recipe's LARS, and the MoCo setting's key encoder on shuffled sub-batches
STEP_CASES = [("mira", "sgd", False), ("mira+mlcpc", "lars", False), ("mlcpc", "sgd", True)]


def _called_from() -> str:
    ours = [f for f in traceback.extract_stack() if f"{os.sep}fastssl{os.sep}" in f.filename]
    return f" from {ours[-1].filename}:{ours[-1].lineno}" if ours else ""


class _HostReads(TorchFunctionMode):
    def __init__(self, seen: list[str]) -> None:
        super().__init__()
        self.seen = seen

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in HOST_READS:
            self.seen.append(f"{func.__name__}{_called_from()}")
        return func(*args, **(kwargs or {}))


class _HostWaits(TorchDispatchMode):
    def __init__(self, seen: list[str]) -> None:
        super().__init__()
        self.seen = seen

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func._schema.name.split("::")[-1] in HOST_WAITS:
            self.seen.append(f"{func._schema.name}{_called_from()}")
        return func(*args, **(kwargs or {}))


@contextmanager
def host_waits():
    """The list of every host wait called while inside, each named with the fastssl line that called it. On
    a CPU nothing waits, but the calls are those a GPU would see, where each one drains the launch queue."""
    seen: list[str] = []
    with _HostReads(seen), _HostWaits(seen):
        yield seen


def waits_in_a_step(objective: str, optimizer: str, shuffle_bn: bool, accelerator) -> list[str]:
    """The host waits in one training step after two (the first builds the fused kernel, tunes cuDNN and
    makes the optimiser's buffers), at a step past the first epoch's frozen prototypes. The loop's own
    reads (a log row every `train.log_every` steps) are outside the step. On CUDA, also every wait that
    CUDA's sync debug mode reports (copies from pageable memory and waits inside kernels' C++ too)."""
    from fastssl.engine import build_parts

    cfg = Config()
    m = cfg.model
    m.arch, m.num_prototypes, m.proj_hidden_dim, m.proj_dim = "resnet18", 64, 64, 32
    cfg.method.objective, cfg.optim.name, cfg.train.global_batch_size = objective, optimizer, 8
    cfg.critic.queue_size, cfg.critic.shuffle_bn, cfg.critic.shuffle_bn_splits = 32, shuffle_bn, 2
    parts = build_parts(cfg, accelerator, build_objective(cfg, 1000, accelerator.device))
    g = torch.Generator().manual_seed(0)
    views = [torch.randn(8, 3, size, size, generator=g).to(accelerator.device, memory_format=torch.channels_last)
             for size in (32, 32, 16, 16, 16)]
    steps_per_epoch, cuda = 10, accelerator.device.type == "cuda"
    for step in (10, 11):
        train_step(parts, views, step_schedule(cfg, step, steps_per_epoch))
    with warnings.catch_warnings(record=True) as reported, host_waits() as seen:
        warnings.simplefilter("always")
        if cuda:
            torch.cuda.set_sync_debug_mode("warn")
        try:
            train_step(parts, views, step_schedule(cfg, 12, steps_per_epoch))
        finally:
            if cuda:
                torch.cuda.set_sync_debug_mode("default")
    return seen + [str(w.message) for w in reported if "synchroniz" in str(w.message)]


@pytest.mark.parametrize("objective,optimizer,shuffle_bn", STEP_CASES)
def test_a_training_step_never_makes_the_host_wait(objective, optimizer, shuffle_bn):
    """A step queues its work and returns: a .item() or a value-sized op in it would, on a GPU, stall the
    host until the device drains, and the next launches would wait (the small-batch step is launch-bound)."""
    assert waits_in_a_step(objective, optimizer, shuffle_bn, Accelerator(cpu=True)) == []
    with host_waits() as seen:  # the watch itself sees such calls, from Python and inside an op
        bool(torch.ones(2).sum() > 1)
        torch.ones(2).tolist()
    assert seen == ["__bool__", "aten::_local_scalar_dense", "tolist"]


CUDA_STEPS = """
import json, sys
sys.path.insert(0, sys.argv[1])
from fastssl.config import TrainConfig
from fastssl.runtime import build_accelerator
from test_method_step import STEP_CASES, waits_in_a_step
accelerator = build_accelerator(TrainConfig(precision="bf16"))  # the Table 8 recipe's precision on an H100
print(json.dumps({" ".join(map(str, case)): waits_in_a_step(*case, accelerator) for case in STEP_CASES}))
"""


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none is visible)")
def test_a_training_step_on_cuda_never_makes_the_host_wait():
    """The same steps on the GPU, bf16, channels_last, the fused assignment and per-view BatchNorm's CUDA
    kernels: nothing in them waits for the device. In a process of its own: this one's Accelerate state
    may hold another precision. (fp16 is left out: torch's grad scaler reads its inf check on the host
    at every step of an optimiser that is not fused, SGD's and LARS's here.)"""
    tests = Path(__file__).resolve().parent
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tests.parent), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", CUDA_STEPS, str(tests)], cwd=tests.parent, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    waits = json.loads(done.stdout.strip().splitlines()[-1])
    assert waits == {" ".join(map(str, case)): [] for case in STEP_CASES}, waits

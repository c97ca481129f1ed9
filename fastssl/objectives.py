"""Training objectives as objects: what a step minimises and what it reports.

The training step (`fastssl.method.train_step`) knows no objective by name. It asks the
objective, in this order:

1. `teacher_forward`: the teacher's outputs of the 2 global views (no gradient);
2. `targets`: what the losses compare the student with, over the WHOLE batch, before the
   student's micro-batches (so gradient accumulation never changes them);
3. `loss`: per micro-batch, the loss and a dict of metrics (a tensor is a per-step
   estimate, averaged over micro-batches, steps and processes before it is logged; a
   number is a setting of the step, logged as it is);
4. `finish_step`: once every micro-batch was scored (ML-CPC enqueues the step's keys only
   then, so no key is ever scored as its own negative).

`state` is what the checkpoint keeps for the objective (the ML-CPC key queue), or None.
A new objective is one class with a `from_config` and one line in `fastssl.config.OBJECTIVES`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Union

import torch
from torch import Tensor, nn

from fastssl.config import ConfigError, objective_class
from fastssl.critic import CriticOutput, MlCpcCritic, QueueLongerThanData, shuffled_forward
from fastssl.losses import swapped_prediction_loss
from fastssl.ops import mira_assign_views, pseudo_label_mi, sinkhorn_assign

if TYPE_CHECKING:
    from fastssl.config import Config, MiraConfig
    from fastssl.schedules import StepSchedule

Metrics = dict[str, Union[Tensor, float]]


@dataclass
class TeacherOutput:
    """The teacher's view of the 2 global views."""

    logits: list[Tensor]  # prototype logits (the assignment's input)
    z: list[Tensor]  # L2-normalised projections (the ML-CPC keys)


class Objective:
    """One training loss; subclasses override `targets` (when needed), `loss` and `from_config`."""

    uses_prototypes: bool = True  # False: the prototypes get no gradient (frozen, so DDP does not wait for them)
    assignment: str | None = None  # the pseudo-label assignment the step runs (mira | sinkhorn), None: none
    state: nn.Module | None = None  # what the checkpoint keeps (under "critic"), None: nothing
    # True: every row's loss depends on every row of its process's batch (ML-CPC's one denominator), so
    # gradient accumulation over chunks would optimise another bound; the config then refuses micro-batches.
    couples_rows: bool = False

    @classmethod
    def from_config(cls, cfg: Config, dataset_size: int | None = None) -> Objective:
        """The objective a validated config asks for; `dataset_size` bounds what may be queued."""
        raise NotImplementedError

    def teacher_forward(self, teacher: nn.Module, views: list[Tensor]) -> TeacherOutput:
        logits, z = teacher(views[:2], with_embeddings=True)
        return TeacherOutput(logits, z)

    def targets(self, teacher: TeacherOutput, sched: StepSchedule) -> Any:
        return teacher

    def loss(self, student_logits: list[Tensor], student_z: list[Tensor], targets: Any, rows: slice,
             sched: StepSchedule) -> tuple[Tensor, Metrics]:
        """The loss of the student's micro-batch `rows` (of the whole batch's `targets`)."""
        raise NotImplementedError

    def finish_step(self, targets: Any) -> None:
        """After the step's last micro-batch, before the optimiser step."""

    def to(self, device: torch.device | str) -> Objective:
        if self.state is not None:
            self.state.to(device)
        return self


def assign_targets(teacher_logits: list[Tensor], method: MiraConfig, beta: float) -> list[Tensor]:
    """Pseudo-labels of each global view, solved independently per view (Sec. 3.3).

    MIRA goes through `mira_assign_views`: one all-gather of both views' logits per step,
    then the global problem solved locally (the reference all-reduces at every iteration).
    """
    if method.assignment == "mira":
        return mira_assign_views(teacher_logits, tau=method.tau_teacher, beta=beta, num_iters=method.num_iters)
    return [sinkhorn_assign(t, eps=method.sinkhorn_eps, num_iters=method.sinkhorn_iters) for t in teacher_logits]


class Mira(Objective):
    """MIRA: the teacher's pseudo-labels (Eq. 5-7, or Sinkhorn) and the swapped-prediction loss (Eq. 8)."""

    def __init__(self, method: MiraConfig):
        self.method = method
        self.assignment = method.assignment

    @classmethod
    def from_config(cls, cfg: Config, dataset_size: int | None = None) -> Mira:
        return cls(cfg.method)

    def targets(self, teacher: TeacherOutput, sched: StepSchedule) -> list[Tensor]:
        return assign_targets(teacher.logits, self.method, sched.beta)

    def loss(self, student_logits: list[Tensor], student_z: list[Tensor], targets: list[Tensor], rows: slice,
             sched: StepSchedule) -> tuple[Tensor, Metrics]:
        """The swapped-prediction loss (Eq. 8), and `label_mi_nats`: the pseudo-labels' mutual information
        with the images (Eq. 2) over this process's rows, mean of the 2 views; near 0 once the
        representation collapsed (the loss then sits at log K)."""
        label_mi = sum(pseudo_label_mi(t) for t in targets) / len(targets)
        loss = swapped_prediction_loss(student_logits, [t[rows] for t in targets], self.method.tau_student)
        return loss, {"label_mi_nats": label_mi}


def critic_loss(critic: MlCpcCritic, student_z: list[Tensor], teacher_z: list[Tensor], alpha: float) -> CriticOutput:
    """ML-CPC between the two global views in ONE denominator, in the critic's direction
    (`MlCpcCritic.pairs`: one_way = the authors', symmetric = ours). Nothing is enqueued."""
    queries, keys = critic.pairs(student_z, teacher_z)
    return critic(queries, keys, alpha)


class MlCpc(Objective):
    """alpha-ML-CPC against the key queue (`fastssl.critic`); the teacher's projections are the keys.

    `shuffle_bn_splits` (None: plain forward) runs the teacher with MoCo's shuffle-BN.
    Logs the estimate `mi_nats`, its ceiling log(m / alpha) and alpha.
    """

    uses_prototypes = False
    couples_rows = True

    def __init__(self, critic: MlCpcCritic, shuffle_bn_splits: int | None = None):
        self.critic = self.state = critic
        self.shuffle_bn_splits = shuffle_bn_splits

    @classmethod
    def from_config(cls, cfg: Config, dataset_size: int | None = None) -> MlCpc:
        c = cfg.critic
        critic = MlCpcCritic(c.queue_size, cfg.model.proj_dim, c.temperature, dataset_size=dataset_size,
                             direction=c.direction, bound=c.bound)
        return cls(critic, c.shuffle_bn_splits if c.shuffle_bn else None)

    def teacher_forward(self, teacher: nn.Module, views: list[Tensor]) -> TeacherOutput:
        if self.shuffle_bn_splits is None:
            return super().teacher_forward(teacher, views)
        logits, z, _ = shuffled_forward(teacher, views[:2], self.shuffle_bn_splits)
        return TeacherOutput(logits, z)

    def targets(self, teacher: TeacherOutput, sched: StepSchedule) -> list[Tensor]:
        return teacher.z

    def loss(self, student_logits: list[Tensor], student_z: list[Tensor], targets: list[Tensor], rows: slice,
             sched: StepSchedule) -> tuple[Tensor, Metrics]:
        out = critic_loss(self.critic, student_z, [z[rows] for z in targets], sched.alpha)
        return out.loss, {"alpha": sched.alpha, "mi_nats": out.mi_nats, "mi_ceiling_nats": out.ceiling_nats}

    def finish_step(self, targets: list[Tensor]) -> None:
        self.critic.queue.push(self.critic.keys_to_enqueue(targets))


class WeightedSum(Objective):
    """sum_i w_i L_i of several objectives on one teacher forward (the first part's).

    The metrics of all parts are logged; at most one part may have a state (the
    checkpoint keeps one).
    """

    def __init__(self, parts: list[tuple[float, Objective]]):
        states = [o.state for _, o in parts if o.state is not None]
        if not parts or len(states) > 1:
            raise ValueError(f"a weighted sum needs at least one part and at most one with a state, "
                             f"got {len(parts)} parts and {len(states)} states")
        self.parts = parts
        self.state = states[0] if states else None
        self.uses_prototypes = any(o.uses_prototypes for _, o in parts)
        self.assignment = next((o.assignment for _, o in parts if o.assignment is not None), None)

    def teacher_forward(self, teacher: nn.Module, views: list[Tensor]) -> TeacherOutput:
        return self.parts[0][1].teacher_forward(teacher, views)

    def targets(self, teacher: TeacherOutput, sched: StepSchedule) -> list[Any]:
        return [o.targets(teacher, sched) for _, o in self.parts]

    def loss(self, student_logits: list[Tensor], student_z: list[Tensor], targets: list[Any], rows: slice,
             sched: StepSchedule) -> tuple[Tensor, Metrics]:
        total: Tensor | None = None
        metrics: Metrics = {}
        for (weight, objective), t in zip(self.parts, targets):
            loss, m = objective.loss(student_logits, student_z, t, rows, sched)
            total = weight * loss if total is None else total + weight * loss
            metrics.update(m)
        return total, metrics

    def finish_step(self, targets: list[Any]) -> None:
        for (_, objective), t in zip(self.parts, targets):
            objective.finish_step(t)

    def to(self, device: torch.device | str) -> WeightedSum:
        for _, objective in self.parts:
            objective.to(device)
        return self


class MiraPlusMlCpc(WeightedSum):
    """MIRA's loss plus `method.mlcpc_weight` x ML-CPC (the critic on the projector embeddings)."""

    couples_rows = True

    @classmethod
    def from_config(cls, cfg: Config, dataset_size: int | None = None) -> MiraPlusMlCpc:
        return cls([(1.0, Mira.from_config(cfg)), (cfg.method.mlcpc_weight, MlCpc.from_config(cfg, dataset_size))])


def build_objective(cfg: Config, dataset_size: int | None = None, device: torch.device | str = "cpu") -> Objective:
    """The config's objective on `device`; a queue not smaller than `dataset_size` is refused here
    (ConfigError: only the data's size, known after the config was checked, makes it wrong)."""
    try:
        objective = objective_class(cfg.method.objective).from_config(cfg, dataset_size)
    except QueueLongerThanData as err:
        raise ConfigError(f"critic.queue_size: {err}") from None
    return objective.to(device)

"""Objectives as objects: the registry is the only list of names, a sum weighs and merges its
parts, the loop logs whatever metrics an objective reports, and a new objective trains
through the unchanged loop with one class and one registry line."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fastssl.config import OBJECTIVES, Config, config_errors, objective_class
from fastssl.engine import train, window_metrics
from fastssl.objectives import Objective, TeacherOutput, WeightedSum, build_objective
from fastssl.schedules import StepSchedule
from test_engine import read_csv, tiny_config

SCHED = StepSchedule(lr=0.1, beta=0.7, ema_momentum=0.99, freeze_prototypes=False, alpha=0.5)


class Fixed(Objective):
    """loss = scale x (sum of the student's first logits), one metric of each kind, a record of finished steps."""

    def __init__(self, scale: float, name: str, state: torch.nn.Module | None = None):
        self.scale, self.name, self.state, self.finished = scale, name, state, []

    def targets(self, teacher, sched):
        return self.name

    def loss(self, student_logits, student_z, targets, rows, sched):
        loss = self.scale * student_logits[0][rows].sum()
        return loss, {f"{self.name}_estimate": loss.detach(), f"{self.name}_setting": sched.alpha}

    def finish_step(self, targets):
        self.finished.append(targets)


def test_the_registry_is_the_list_config_validation_accepts(monkeypatch):
    cfg = Config()
    cfg.method.objective = "toy"
    assert any(e.startswith("method.objective: unknown 'toy'") for e in config_errors(cfg))
    monkeypatch.setitem(OBJECTIVES, "toy", "test_objectives:Fixed")
    assert not any(e.startswith("method.objective") for e in config_errors(cfg))
    for name in ("mira", "mlcpc", "mira+mlcpc"):  # the shipped objectives build from a default config
        cfg.method.objective = name
        objective = build_objective(cfg)
        assert isinstance(objective, objective_class(name))
        assert (objective.state is None) == (name == "mira")  # the ML-CPC queue is what a checkpoint keeps
        assert objective.uses_prototypes == (name != "mlcpc")
        assert objective.assignment == (None if name == "mlcpc" else "mira")


def test_weighted_sum_weighs_losses_merges_metrics_and_finishes_every_part():
    a, b = Fixed(1.0, "a"), Fixed(-3.0, "b", state=torch.nn.Linear(1, 1))
    both = WeightedSum([(2.0, a), (0.5, b)])
    logits = [torch.arange(6.0).reshape(3, 2)]
    targets = both.targets(TeacherOutput([], []), SCHED)
    loss, metrics = both.loss(logits, [], targets, slice(0, 2), SCHED)
    assert loss.item() == pytest.approx(2.0 * 6.0 + 0.5 * -3.0 * 6.0)  # rows 0-1 sum to 6
    assert set(metrics) == {"a_estimate", "a_setting", "b_estimate", "b_setting"}
    assert metrics["b_estimate"].item() == pytest.approx(-18.0)
    both.finish_step(targets)
    assert a.finished == ["a"] and b.finished == ["b"]
    assert both.state is b.state
    with pytest.raises(ValueError, match="at most one with a state"):
        WeightedSum([(1.0, b), (1.0, Fixed(1.0, "c", state=torch.nn.Linear(1, 1)))])


def test_mira_plus_mlcpc_weighs_the_critic_by_method_mlcpc_weight():
    """MIRA's loss at weight 1, ML-CPC's at `method.mlcpc_weight` (the sum's arithmetic: the test above)."""
    from fastssl.objectives import Mira, MlCpc

    cfg = Config()
    cfg.method.objective, cfg.method.mlcpc_weight = "mira+mlcpc", 0.25
    objective = build_objective(cfg)
    assert [(weight, type(part)) for weight, part in objective.parts] == [(1.0, Mira), (0.25, MlCpc)]


class OneProcess:
    def reduce(self, tensor, reduction):
        return tensor


def test_window_metrics_average_estimates_and_keep_the_latest_setting():
    steps = [{"mi": torch.tensor(1.0), "alpha": 4.0}, {"mi": torch.tensor(2.0), "alpha": 2.0},
             {"mi": torch.tensor(6.0), "alpha": 1.0}]
    assert window_metrics(steps, OneProcess()) == pytest.approx({"mi": 3.0, "alpha": 1.0})
    assert window_metrics([], OneProcess()) == {}


class Toy(Objective):
    """Student view 0 predicts the teacher's view-1 distribution (a made-up objective, for the test)."""

    steps = 0

    @classmethod
    def from_config(cls, cfg, dataset_size=None):
        return cls()

    def targets(self, teacher, sched):
        return torch.softmax(teacher.logits[1].float(), dim=1)

    def loss(self, student_logits, student_z, targets, rows, sched):
        loss = -(targets[rows] * torch.log_softmax(student_logits[0].float(), dim=1)).sum(1).mean()
        return loss, {"toy_cross_entropy": loss.detach(), "toy_beta": sched.beta}

    def finish_step(self, targets):
        Toy.steps += 1


def test_a_new_objective_is_one_class_and_one_registry_line(tmp_path, monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.setitem(OBJECTIVES, "toy", "test_objectives:Toy")
    cfg = tiny_config(tmp_path, epochs=1)
    cfg.method.objective, cfg.eval.knn_every, cfg.eval.knn_at_start = "toy", -1, False
    Toy.steps = 0
    train(cfg)
    run = Path(cfg.train.run_dir)
    assert Toy.steps == 3  # 24 images / 8: each step finished once
    events = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    logged = {tag: [e.value for e in events.Scalars(tag)] for tag in ("train/loss", "train/toy_cross_entropy")}
    assert logged["train/toy_cross_entropy"] == pytest.approx(logged["train/loss"], rel=1e-5)  # its only loss
    assert len(logged["train/loss"]) == 3 and [e.step for e in events.Scalars("train/toy_beta")] == [1, 2, 3]
    assert [float(r["loss"]) for r in read_csv(run / "train_log.csv")] == pytest.approx(logged["train/loss"], rel=1e-5)


def test_mira_objective_is_eq5_targets_and_eq8_loss():
    """What the objective feeds the assignment (tau_t 0.225, the scheduled beta, each teacher view on its
    own) and the loss it builds (target t on every view but t, tau_s 0.1): against the NumPy MIRA
    reference and the hand-computed multi-crop loss."""
    import numpy as np
    import torch.nn.functional as F

    from fastssl.config import MiraConfig
    from fastssl.objectives import Mira
    from test_loss import hand_loss
    from test_mira_assign import ref_mira_np

    g = torch.Generator().manual_seed(0)
    tl = [F.normalize(torch.randn(16, 8, generator=g), dim=1) @ F.normalize(torch.randn(10, 8, generator=g), dim=1).T
          for _ in range(2)]
    student = [torch.randn(16, 10, generator=g) for _ in range(4)]
    sched = StepSchedule(lr=0.1, beta=0.7, ema_momentum=0.99, freeze_prototypes=False)
    obj = Mira(MiraConfig())
    targets = obj.targets(TeacherOutput(tl, []), sched)
    refs = [ref_mira_np(t.numpy(), 0.225, 0.7, 30) for t in tl]
    for got, ref in zip(targets, refs):
        assert np.abs(got.double().numpy() - ref).max() < 1e-5
    loss, metrics = obj.loss(student, [], targets, slice(0, 16), sched)
    want = hand_loss([s.double().tolist() for s in student], [r.tolist() for r in refs], 0.1)
    assert loss.item() == pytest.approx(want, rel=1e-5)

    def eq2(w):  # Eq. 2, written as the paper writes it: -sum_j wbar_j log wbar_j + 1/B sum_ij w_ij log w_ij
        wbar = w.mean(0)
        return -sum(x * np.log(x) for x in wbar if x > 0) + sum(x * np.log(x) for x in w.ravel() if x > 0) / len(w)

    assert metrics["label_mi_nats"].item() == pytest.approx((eq2(refs[0]) + eq2(refs[1])) / 2, rel=1e-5)


def test_teacher_forward_keeps_global_view_order():
    """The teacher sees the two global views, in order (target 0 is view 0's: it must not supervise view 0)."""
    from fastssl.config import MiraConfig
    from fastssl.objectives import Mira

    class Recorder(torch.nn.Module):
        def forward(self, views, with_embeddings=False):
            return [v.mean((1, 2, 3)) for v in views], [v for v in views]

    views = [torch.full((2, 3, 4, 4), float(i)) for i in range(4)]
    out = Mira(MiraConfig()).teacher_forward(Recorder(), views)
    assert [float(lg[0]) for lg in out.logits] == [0.0, 1.0]

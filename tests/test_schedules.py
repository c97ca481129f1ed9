"""Schedule endpoints and shapes (EMA momentum 0.99 -> 1, beta 0.75 -> 2/3, warm-up + cosine lr)."""

import math

import pytest
import torch

from fastssl.config import Config
from fastssl.schedules import cosine, scaled_lr, step_schedule, warmup_cosine


def test_cosine_endpoints_and_midpoint():
    assert cosine(0, 100, 0.99, 1.0) == pytest.approx(0.99)
    assert cosine(100, 100, 0.99, 1.0) == pytest.approx(1.0)
    assert cosine(50, 100, 0.75, 2 / 3) == pytest.approx((0.75 + 2 / 3) / 2)
    assert cosine(1000, 100, 0.75, 2 / 3) == pytest.approx(2 / 3)  # clamped after the end


def test_cosine_is_monotone():
    values = [cosine(s, 37, 0.99, 1.0) for s in range(38)]
    assert all(b >= a for a, b in zip(values, values[1:]))


def authors_lrs(iters_per_epoch: int, warm_up_epochs: int, max_epochs: int, base_lr: float,
                warm_up_start_lr: float) -> list[float]:
    """The lr of every training step under the MIRA authors' scheduler (src/scheduler.py's get_lr, run by
    torch's LRScheduler as their train.py does: built once, stepped after each optimiser step)."""

    class StepLinearWarmupCosineAnnealingLR(torch.optim.lr_scheduler.LRScheduler):
        def __init__(self, optimizer):
            self.warm_up_iters = iters_per_epoch * warm_up_epochs
            super().__init__(optimizer)

        def get_lr(self):
            if self._step_count < self.warm_up_iters + 1:
                ratio = self._step_count / (warm_up_epochs * iters_per_epoch + 1)
                return [warm_up_start_lr + ratio * (b - warm_up_start_lr) for b in self.base_lrs]
            epoch = (self._step_count - 1) / iters_per_epoch
            ratio = 0.5 * (1.0 + math.cos(math.pi * (epoch - warm_up_epochs) / (max_epochs - warm_up_epochs)))
            return [b * ratio for b in self.base_lrs]

    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=base_lr)
    scheduler, lrs = StepLinearWarmupCosineAnnealingLR(opt), []
    for _ in range(iters_per_epoch * max_epochs):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        scheduler.step()
    return lrs


def test_warmup_then_cosine_is_the_authors_schedule_step_for_step():
    spe, warm_epochs, epochs, peak = 5, 2, 22, 0.06
    warm, total = spe * warm_epochs, spe * epochs
    lrs = [warmup_cosine(s, total, warm, peak, 0.0) for s in range(total + 1)]
    assert lrs[:total] == pytest.approx(authors_lrs(spe, warm_epochs, epochs, peak, 0.0), rel=1e-12, abs=1e-15)
    assert lrs[0] == pytest.approx(peak / (warm + 1))  # the first step moves, as theirs
    assert lrs[warm - 1] == pytest.approx(peak * warm / (warm + 1))
    assert lrs[warm] == pytest.approx(peak)  # cosine starts at the peak
    assert lrs[total] == pytest.approx(0.0, abs=1e-12)
    assert all(b >= a for a, b in zip(lrs[:warm], lrs[1:warm]))
    # per-step cosine: halfway through the decay the lr is half the peak
    assert lrs[warm + (total - warm) // 2] == pytest.approx(peak / 2)


def test_linear_scaling_rule():
    assert scaled_lr(0.03, 512) == pytest.approx(0.06)
    assert scaled_lr(0.3, 4096) == pytest.approx(4.8)


def test_step_schedule_endpoints():
    cfg = Config()
    cfg.train.epochs, cfg.optim.warmup_epochs = 4, 1
    spe = 25
    first, last = step_schedule(cfg, 0, spe), step_schedule(cfg, 4 * spe, spe)
    assert first.beta == pytest.approx(0.75) and last.beta == pytest.approx(2 / 3)
    assert first.ema_momentum == pytest.approx(0.99) and last.ema_momentum == pytest.approx(1.0)
    assert first.freeze_prototypes and not step_schedule(cfg, spe, spe).freeze_prototypes
    assert step_schedule(cfg, spe, spe).lr == pytest.approx(scaled_lr(cfg.optim.base_lr, 512))  # warm-up over
    cfg.method.ema = False
    assert step_schedule(cfg, 10, spe).ema_momentum == 0.0
    assert math.isclose(last.lr, cfg.optim.final_lr, abs_tol=1e-12)


def test_lars_recipe_warms_up_from_the_authors_unscaled_start():
    """The authors' LARS recipe: warm-up from warm_up_start_lr = 0.3 (not batch-scaled) to
    0.3 x 4096/256 = 4.8: their scheduler, step for step."""
    import runpy
    from pathlib import Path

    cfg = runpy.run_path(str(Path(__file__).resolve().parents[1] / "recipes" / "mira_bs4096_lars.py"))["config"]()
    spe = 312  # ImageNet at batch 4096
    warm = round(cfg.optim.warmup_epochs * spe)
    start, peak = 0.3, scaled_lr(0.3, 4096)
    authors = authors_lrs(spe, round(cfg.optim.warmup_epochs), cfg.train.epochs, peak, start)
    ours = [step_schedule(cfg, s, spe).lr for s in range(warm + 2 * spe)]  # the warm-up and the cosine's start
    assert cfg.optim.warmup_start_lr == start and step_schedule(cfg, warm, spe).lr == pytest.approx(peak)
    assert ours == pytest.approx(authors[:len(ours)], rel=1e-12)
    # the small-batch recipe keeps its warm-up from 0
    cfg.optim.warmup_start_lr = 0.0
    assert step_schedule(cfg, 0, spe).lr == pytest.approx(peak / (warm + 1))


def test_beta_and_ema_are_per_step_cosines():
    """MIRA's beta (2/3 -> 0.75) and the EMA momentum (0.99 -> 1) follow a cosine per step (NOTES), not per epoch."""
    cfg = Config()
    cfg.train.epochs, spe, total = 4, 25, 100
    for s in (1, 13, 37, 61, 99):
        c = 0.5 * (1 + math.cos(math.pi * s / total))
        sch = step_schedule(cfg, s, spe)
        assert sch.beta == pytest.approx(2 / 3 + (0.75 - 2 / 3) * c, rel=1e-12)
        assert sch.ema_momentum == pytest.approx(1.0 + (0.99 - 1.0) * c, rel=1e-12)


def test_alpha_curriculum_through_step_schedule():
    """ML-CPC's curriculum (NOTES): log alpha moves linearly from log 10 towards log 0.1, per epoch by default,
    per step with critic.alpha_per step; epoch e of E trains at the authors' (main_moco_cifar.py)
    exp((log 10 - log 0.1)(1 - e / E) + log 0.1)."""
    cfg = Config()
    cfg.train.epochs, spe = 5, 10
    for s in (0, 9, 10, 25, 49):
        e = s // spe
        authors = math.exp((math.log(10) - math.log(0.1)) * (1 - e / 5) + math.log(0.1))
        assert step_schedule(cfg, s, spe).alpha == pytest.approx(authors, rel=1e-12)
    cfg.critic.alpha_per = "step"
    assert step_schedule(cfg, 25, spe).alpha == pytest.approx(math.exp(math.log(10) + 25 / 50 * math.log(0.01)))

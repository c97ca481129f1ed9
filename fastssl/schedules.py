"""Schedules as pure functions of (step, total steps).

Everything the loop varies over training (learning rate, EMA momentum, MIRA's beta)
is a function of the global optimiser step, so a resumed run that restores the step
counter continues every schedule exactly where it stopped.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from fastssl.config import Config


def cosine(step: int, total_steps: int, start: float, end: float) -> float:
    """Half-cosine from `start` (step 0) to `end` (step `total_steps`), clamped after it.

    Used for the EMA momentum (0.99 -> 1) and for beta (0.75 -> 2/3), per step, as in
    the authors' code.
    """
    if total_steps <= 0:
        return end
    progress = min(max(step / total_steps, 0.0), 1.0)
    return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * progress))


def warmup_cosine(step: int, total_steps: int, warmup_steps: int, peak: float, final: float = 0.0,
                  start: float = 0.0) -> float:
    """Linear warm-up from `start` towards `peak` over `warmup_steps`, then per-step cosine from `peak`
    to `final`.

    The MIRA authors' schedule (`src/scheduler.py`, a torch LRScheduler stepped after every optimiser
    step, whose first value is computed at construction): warm-up step i trains at
    start + (peak - start) (i + 1) / (warmup_steps + 1), so the first step already moves and the
    cosine's first step is the first at `peak`. (DINO's and SwAV's `np.linspace(start, peak,
    warmup_steps)` starts at `start` exactly and reaches `peak` one step earlier.)
    """
    if warmup_steps > 0 and step < warmup_steps:
        return start + (peak - start) * (step + 1) / (warmup_steps + 1)
    return cosine(step - warmup_steps, total_steps - warmup_steps, peak, final)


def scaled_lr(base_lr: float, global_batch_size: int) -> float:
    """The linear scaling rule (Goyal et al.): lr = base_lr x batch / 256."""
    return base_lr * global_batch_size / 256



@dataclass(frozen=True)
class StepSchedule:
    """The scheduled values of one optimiser step."""

    lr: float
    beta: float
    ema_momentum: float
    freeze_prototypes: bool
    alpha: float = 1.0  # ML-CPC re-weighting (only used by the critic objectives)


def step_schedule(cfg: Config, step: int, steps_per_epoch: int) -> StepSchedule:
    """All scheduled values at global `step` (per-step schedules, as the authors' code)."""
    o, m, t = cfg.optim, cfg.method, cfg.train
    total = t.epochs * steps_per_epoch
    peak = scaled_lr(o.base_lr, t.global_batch_size)
    lr_step = step - step % steps_per_epoch if o.cosine_per == "epoch" else step  # MoCo: lr set at each epoch's start
    return StepSchedule(
        lr=warmup_cosine(lr_step, total, round(o.warmup_epochs * steps_per_epoch), peak, o.final_lr,
                         o.warmup_start_lr),
        beta=cosine(step, total, m.beta_start, m.beta_end),
        # Without EMA the teacher is a fresh copy of the student at every step.
        ema_momentum=cosine(step, total, m.ema_momentum_start, m.ema_momentum_end) if m.ema else 0.0,
        freeze_prototypes=step < m.freeze_prototypes_epochs * steps_per_epoch,
        alpha=alpha_schedule(critic_progress(cfg, step, steps_per_epoch), cfg.critic.alpha_start, cfg.critic.alpha_end),
    )


def alpha_schedule(progress: float, start: float, end: float) -> float:
    """Geometric curriculum: log(alpha) moves linearly from log(start) to log(end) as
    `progress` goes 0 -> 1 (10 -> 0.1 passes 1.0 halfway, as in the paper's Sec. 5.3).
    The config refuses alpha <= 0; here math.log would raise ValueError for it.

    The endpoints come back exactly and every value stays between them: exp(log 10) is
    10.000000000000002, and ML-CPC refuses an alpha past m = queue_size + 1 even by one ulp, so a
    legal `--critic.alpha_start` equal to m must not leave (0, m] by rounding."""
    p = min(max(progress, 0.0), 1.0)
    alpha = math.exp(math.log(start) + p * (math.log(end) - math.log(start)))  # ValueError for alpha <= 0
    if p in (0.0, 1.0):
        return float(start if p == 0.0 else end)
    return min(max(alpha, min(start, end)), max(start, end))


def critic_progress(cfg: Config, step: int, steps_per_epoch: int) -> float:
    """epoch / epochs (the authors' main_moco_cifar.py: log alpha moves by 1 - epoch / epochs), or
    step / steps with critic.alpha_per step: 0 at the start, 1 where training ends, so the last
    epoch trains at end x (start / end) ** (1 / epochs) (0.1023 for 10 -> 0.1 over 200 epochs)."""
    if cfg.critic.alpha_per == "epoch":
        return (step // steps_per_epoch) / max(cfg.train.epochs, 1)
    return step / max(cfg.train.epochs * steps_per_epoch, 1)

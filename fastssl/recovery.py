"""When a run cannot go on: catching divergence, and the exact command that continues it.

A fault's message must say what to do next and name the run directory (the demo's is a
new timestamp at each start, so "the same command plus --resume" is not enough). The
loop (`fastssl.engine`) raises `TrainingDiverged` from `DivergenceGuard` and builds its
advice with `rerun_command`; the command line turns it into exit code 2.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from fastssl import checkpoint as ckpt
from fastssl.config import Config, objective_class
from fastssl.relaunch import rerun_command
from fastssl.runtime import failing_together

if TYPE_CHECKING:
    from accelerate import Accelerator

# The divergence guard (checked at log steps and before every checkpoint): the weights' norm grew this
# many times past its value at the start of the run, or this many times since the previous check, or the
# loss left its running level by this many times.
DIVERGED_WEIGHT_GROWTH = 1e4
DIVERGED_WEIGHT_JUMP = 10.0
DIVERGED_LOSS_FACTOR = 10.0
LOSS_WARM_ROWS = 5
# An epoch (the second or later) whose pseudo-labels carry less mutual information with the images than
# COLLAPSED_LABEL_MI_NATS (Eq. 2) while its loss stays above COLLAPSED_LOSS_SHARE x log K is warned about
# as a collapse. On the demo's data a collapsed run's second epoch averaged 0.04 nats and a loss of
# 0.998 log K; a healthy one's 0.6 nats and 0.44 log K (its label MI falls as training goes on, so the
# MI alone could not tell). The most a process's rows can carry is log(min(rows, K)).
COLLAPSED_LABEL_MI_NATS = 0.1
COLLAPSED_LOSS_SHARE = 0.95


class TrainingDiverged(FloatingPointError):
    """The loss or the weights stopped being finite, or exploded; the message says how to continue.
    `at_first_step`: the run's very first loss, from the initial weights, was not finite (no learning
    rate had acted on them: the cause lies elsewhere)."""

    def __init__(self, message: str, at_first_step: bool = False):
        super().__init__(message)
        self.at_first_step = at_first_step


class DivergenceGuard:
    """Catches a run that diverged, at log steps (one sync) and before each checkpoint.

    Diverged means: the loss is not finite; or the weights (parameters and buffers of student
    and teacher) are not finite, or their norm grew DIVERGED_WEIGHT_JUMP times since the previous
    check (a few steps; healthy training changes it by a few percent), or DIVERGED_WEIGHT_GROWTH
    times past its value at the start of the run (kept in the checkpoint, so a resume compares
    with the same reference: a slow blow-up); or, after LOSS_WARM_ROWS logged rows, the loss
    left its running mean by more than DIVERGED_LOSS_FACTOR times max(|mean|, 1). MIRA's loss is a cross-entropy of cosine
    logits / tau, bounded near log K + 2 / tau_student whatever the weights do (the demo at
    --optim.base_lr 1e6 logged losses of 1 to 20 while its weights reached 1e29), so the weights
    are what shows MIRA's divergence; the loss rule catches objectives whose loss is unbounded.

    Every process decides together (`accelerator`, when given): the loss is the same on all of
    them, but buffers may not be (shuffle-BN's statistics, BatchNorm without sync), and a process
    that left alone would leave the others waiting for it in their next collective.
    """

    def __init__(self, student: torch.nn.Module, teacher: torch.nn.Module, state: ckpt.TrainState,
                 accelerator: Accelerator | None = None):
        self.modules, self.state, self.accelerator = (student, teacher), state, accelerator
        self.previous = self.weight_norm()
        if not state.initial_weight_norm:
            state.initial_weight_norm = self.previous
        self.loss_mean: float | None = None
        self.rows = 0

    def weight_norm(self) -> float:
        """L2 norm over every floating parameter and buffer (inf/nan when any is); one sync."""
        tensors = [t.detach() for m in self.modules for t in (*m.parameters(), *m.buffers())
                   if t.is_floating_point()]
        if not tensors:
            return 0.0
        foreach = getattr(torch, "_foreach_norm", None)  # one fused kernel per dtype (clip_grad_norm_ uses it)
        norms = foreach(tensors) if foreach is not None else [t.norm() for t in tensors]
        return torch.stack([n.float() for n in norms]).norm().item()

    def check(self, loss: float, step: int, first_loss: Callable[[], float | None] = lambda: None) -> None:
        """At a log step: the loss (the window's mean), then the weights. `first_loss`: the run's first
        loss when that step is in the window (else None); asked for only when the loss is not finite."""
        self._together(lambda: (self._check_loss(loss, step, first_loss), self._check_weights(step)))

    def check_weights(self, step: int) -> None:
        """Before a checkpoint: the weights."""
        self._together(lambda: self._check_weights(step))

    def _together(self, check: Callable[[], object]) -> None:
        """Run `check`; its TrainingDiverged, or one found on another process, is raised on every
        process (`failing_together`: a node prints it once, naming the rank that found it if another)."""
        if self.accelerator is None:
            check()
            return
        with failing_together(self.accelerator):
            check()

    def _check_weights(self, step: int) -> None:
        norm, start, previous = self.weight_norm(), self.state.initial_weight_norm, self.previous
        if not math.isfinite(norm):
            raise TrainingDiverged(f"training diverged at step {step}: the weights are no longer finite")
        if previous > 0 and norm > DIVERGED_WEIGHT_JUMP * previous:
            raise TrainingDiverged(f"training diverged at step {step}: the weights' norm jumped to {norm:.3g}, "
                                   f"{norm / previous:.3g} times its {previous:.3g} at the previous check")
        if start > 0 and norm > DIVERGED_WEIGHT_GROWTH * start:
            raise TrainingDiverged(f"training diverged at step {step}: the weights' norm is {norm:.3g}, "
                                   f"{norm / start:.3g} times its {start:.3g} at the start of the run")
        self.previous = norm

    def _check_loss(self, loss: float, step: int, first_loss: Callable[[], float | None]) -> None:
        if not math.isfinite(loss):
            first = first_loss()
            raise TrainingDiverged(f"training diverged at step {step}: the loss is {loss}",
                                   at_first_step=first is not None and not math.isfinite(first))
        mean = self.loss_mean
        if (mean is not None and self.rows >= LOSS_WARM_ROWS
                and abs(loss - mean) > DIVERGED_LOSS_FACTOR * max(abs(mean), 1.0)):
            raise TrainingDiverged(f"training diverged at step {step}: the loss jumped to {loss:.4g} from a running "
                                   f"mean of {mean:.4g}")
        self.loss_mean = loss if mean is None else 0.9 * mean + 0.1 * loss
        self.rows += 1


class OutOfDeviceMemory(RuntimeError):
    """The training device ran out of memory; the message says what to change and how to go on."""


def is_out_of_memory(err: BaseException) -> bool:
    """Whether `err` is an allocation that failed: a GPU's (torch.OutOfMemoryError), Python's MemoryError,
    or torch's CPU allocator, which raises a plain RuntimeError ("DefaultCPUAllocator: can't allocate
    memory: you tried to allocate ... bytes")."""
    return isinstance(err, (torch.OutOfMemoryError, MemoryError)) or (
        isinstance(err, RuntimeError) and "can't allocate memory" in str(err))


def out_of_memory_advice(cfg: Config, accelerator: Accelerator, step: int, command: list[str] | None, run_dir: Path,
                         saved_step: int | None, knn: bool = True) -> str:
    """What filled the device and how to go on: fewer images per process (more processes, which a
    checkpoint continues on, or gradient accumulation or a smaller batch in a new run), mixed
    precision when it is off; the k-NN's batch when the run has one (`knn`); then the command,
    from the checkpoint on disk when there is one."""
    device, world = accelerator.device, accelerator.num_processes
    t = cfg.train
    per_process = t.global_batch_size // world
    where = str(device)
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        where += f" ({props.name}, {props.total_memory / 2**30:.1f} GiB)"
    chunk = f" in chunks of {t.micro_batch_size}" if t.micro_batch_size else ""
    smaller = "a smaller --train.global_batch_size (the lr follows it: base_lr x batch / 256)"
    if not objective_class(cfg.method.objective).couples_rows:  # ML-CPC scores each row against the whole batch
        smaller = (f"gradient accumulation (--train.micro_batch_size {max(per_process // 2, 1)}: BatchNorm then sees "
                   f"one chunk) or {smaller}")
    fixes = ["more processes (the same global batch, fewer images on each)", f"in a new run, {smaller}"]
    if accelerator.mixed_precision not in ("bf16", "fp16"):
        fixes.append("mixed precision (--train.precision bf16)")
    head = (f"out of memory on {where} at step {step}, with {per_process} training images per process{chunk} "
            f"(--train.global_batch_size {t.global_batch_size} over {world} process{'es' if world > 1 else ''})"
            + (f" and {cfg.eval.batch_size} per k-NN batch (--eval.batch_size)" if knn else "")
            + "; use " + "; or ".join(fixes))
    if saved_step is None:
        return f"{head}. No checkpoint was written yet: start again with: {rerun_command(command, run_dir, resume=False)}"
    return (f"{head}. The checkpoint of step {saved_step} is kept and continues on any number of processes: "
            f"{rerun_command(command, run_dir)}")


def after_write_failure(command: list[str] | None, run_dir: Path, saved_step: int | None) -> str:
    """How to go on once the cause of a failed write (a full disk) is fixed: from the checkpoint on
    disk, which a failed save keeps, or from the start when none was written yet."""
    if saved_step is None:
        return f"then start again with: {rerun_command(command, run_dir, resume=False)}"
    return f"then continue from the checkpoint of step {saved_step} with: {rerun_command(command, run_dir)}"


def after_eval_failure(command: list[str] | None, run_dir: Path, epoch: int, alternative: str = "",
                       after_last: str | None = None) -> str:
    """How to go on when the evaluation after an epoch found its images unreadable: the epoch was
    saved first. `alternative`: how to go on without that evaluation, where a run can. After the
    last epoch a resume has nothing left to do (it would exit 0 without the evaluation), so the
    words say so and end with `after_last`: how that evaluation can still be had."""
    if after_last is not None:
        return f"every epoch ({epoch}) is trained and saved, so a resume has nothing left to do; {after_last}"
    return (f"epoch {epoch} is saved: once the folder is fixed, continue with {rerun_command(command, run_dir)}"
            f"{alternative}")


def continue_advice(cfg: Config, command: list[str] | None, run_dir: Path, saved_step: int | None,
                    accelerator: Accelerator) -> str:
    """How to go on after a divergence: from the last good checkpoint, with a lower learning rate; or,
    when the schedule's start or end lr lies above its peak (base_lr x batch / 256), that one first."""
    from fastssl.schedules import scaled_lr

    peak = scaled_lr(cfg.optim.base_lr, cfg.train.global_batch_size)
    above = [f"--optim.{name} {getattr(cfg.optim, name):g}" for name in ("warmup_start_lr", "final_lr")
             if getattr(cfg.optim, name) > peak]
    if above:  # not a field a resume may change: a new run
        return (f"{' and '.join(above)} {'lies' if len(above) == 1 else 'lie'} above the schedule's peak lr "
                f"({peak:g}, from --optim.base_lr), the "
                f"likely cause; a resume cannot change them: start a new run (another --train.run_dir) with "
                f"lower values")
    precision = (" (or --train.precision no instead of mixed precision)"
                 if accelerator.mixed_precision in ("bf16", "fp16") else "")
    return lower_lr_advice(command, run_dir, saved_step, "optim.base_lr", cfg.optim.base_lr, precision)


def lower_lr_advice(command: list[str] | None, run_dir: Path, saved_step: int | None, lr_field: str, lr: float,
                    also: str = "") -> str:
    """The command that goes on after a divergence with a tenth of the learning rate `lr` (the
    field `lr_field`, which a resume may change): from the last good checkpoint, or from the start
    when none was written yet. `also` names another fix, after the field."""
    lower = {lr_field: f"{lr / 10:g}"}
    if saved_step is None:
        return (f"no checkpoint was written, so start again with a lower --{lr_field}{also}: "
                f"{rerun_command(command, run_dir, resume=False, overrides=lower)}")
    return (f"no checkpoint was written after it, so continue from the last good one (step {saved_step}) with a "
            f"lower --{lr_field}{also}: {rerun_command(command, run_dir, overrides=lower)}")


def collapse_warning(epoch_row: dict, num_prototypes: int) -> str | None:
    """The warning for an epoch of a MIRA run whose pseudo-labels say almost nothing about the images
    while the student learns nothing to predict (see COLLAPSED_LABEL_MI_NATS), from the second epoch
    on (the first starts from a random network), or None."""
    mi, loss, epoch = epoch_row.get("label_mi_nats"), epoch_row["loss"], epoch_row["epoch"] + 1
    log_k = math.log(num_prototypes)
    if mi is None or epoch < 2 or not (mi < COLLAPSED_LABEL_MI_NATS and loss > COLLAPSED_LOSS_SHARE * log_k):
        return None
    return (f"epoch {epoch}: MIRA's pseudo-labels carry {mi:.3g} nats of information about the images (label_mi_nats "
            f"in train_log.csv) and the loss stays at {loss:.4g}, log K = {log_k:.4g}: the representation has "
            f"likely collapsed, every image mapped alike. On the demo's data --method.tau_teacher 0.225 collapsed "
            f"and 0.1 trains; a resume keeps the collapsed weights, so start again (another --train.run_dir)")


def before_any_update_advice(command: list[str] | None, run_dir: Path, causes: str) -> str:
    """After a loss that was not finite at a run's first step: the weights were still the initial ones,
    so a lower learning rate (it had not acted yet) cannot help; `causes` names what can."""
    return (f"no update had been made yet, so the learning rate is not the cause: check {causes}; then start "
            f"again with: {rerun_command(command, run_dir, resume=False)}")


def first_loss_causes(cfg: Config, accelerator: Accelerator) -> str:
    """What can make a self-supervised run's very first loss not finite: the objective's temperatures,
    half precision's range, the images."""
    temperatures = {"mira": "--method.tau_student, --method.tau_teacher", "mlcpc": "--critic.temperature",
                    "mira+mlcpc": "--method.tau_student, --method.tau_teacher, --critic.temperature"}
    causes = f"the loss's temperatures ({temperatures.get(cfg.method.objective, 'those of --method.objective')})"
    if accelerator.mixed_precision == "fp16":
        causes += ", --train.precision fp16 (its range overflows: bf16 or no)"
    return causes + " and the images"


def latest_run_hint(run_dir: Path, command: list[str] | None) -> str:
    """For a --resume that found no checkpoint: the newest sibling run that has one (the demo's
    run directory is a new timestamp each start, so its resume must name the old one)."""
    parent = run_dir.parent
    runs = [p for p in parent.iterdir() if (p / ckpt.CHECKPOINT_NAME).is_file()] if parent.is_dir() else []
    if not runs:
        return "; to continue an earlier run, pass its directory: --resume --train.run_dir <dir>"
    latest = max(runs, key=lambda p: (p / ckpt.CHECKPOINT_NAME).stat().st_mtime)
    return f"; to continue the latest run in {parent}: {rerun_command(command, latest)}"

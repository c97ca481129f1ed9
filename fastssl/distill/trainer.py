"""The distillation loop (ML-CPC Sec. 5.2 in CRD's setting), on fastssl's run conventions.

`train(cfg)` validates the config, reads the data and the frozen teacher, then runs epochs
of: student and teacher forward on the same augmented batch, gamma CE + alpha_KD KD -
beta J_alpha against CRD's memory (or queues) of both networks' embeddings
(`DistillObjective`), SGD step, then the batch's memory entries updated (or its keys enqueued).
The run directory holds config.json, train_log.csv / epochs.csv (`fastssl.run_log.CsvLog`),
checkpoint.pt + rng/ (`fastssl.checkpoint`, written atomically at epoch ends, memory or queues
included), results.json and, at the end, classifier.pt:
the student in the teacher format (`fastssl.distill.classifier_file`), so any run (a CE-only
run is the supervised teacher trainer) can teach the next one. `train(cfg, resume=True)`
continues from the checkpoint and ends with the same weights as an uninterrupted run.
SIGTERM / SIGINT / SIGUSR1 (`fastssl.runtime.GracefulStop`, as the main loop) stop it
mid-epoch after the current step with a checkpoint; the data order and each image's
augmentation are functions of (seed, epoch, image) (`pipelines.sampler`), so the resumed run
trains on the same batches.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from fastssl import checkpoint as ckpt
from fastssl.config import ConfigError
from fastssl.critic import MlCpcCritic, QueueLongerThanData
from fastssl.distill.classifier_file import CLASSIFIER_NAME, load_teacher, save_classifier
from fastssl.distill.config import DistillConfig, decay_epochs, to_dict, validate
from fastssl.distill.memory import ContrastMemory
from fastssl.distill.objective import DistillObjective
from fastssl.models.cifar_resnet import Classifier, build_classifier
from fastssl.recovery import (TrainingDiverged, after_eval_failure, after_write_failure, before_any_update_advice,
                              lower_lr_advice)
from fastssl.relaunch import one_process_refusal, rerun_command
from fastssl.run_dir import finished_run, foreign_sections, refuse_harmful_start, resume_changes
from fastssl.run_log import CsvLog, write_run_json
from fastssl.runtime import GracefulStop
from pipelines.folder import DataLayoutError
from pipelines.processes import leave_process_group, loader_workers_context, stop_signals_held
from pipelines.sampler import shard_batches

# mi_nats: J_alpha with student queries and teacher keys; mi_t_nats: the other direction
STEP_FIELDS = ["epoch", "step", "loss", "ce", "kd", "mi_nats", "mi_t_nats", "lr", "images_per_s"]
EPOCH_FIELDS = ["epoch", "step", "loss", "ce", "kd", "mi_nats", "mi_t_nats", "top1", "seconds"]
TERMS = ("ce", "kd", "mi_nats", "mi_t_nats")  # averaged over the epoch with the loss (TrainState.epoch_sums)
# What makes the loss not finite before any update: the settings it divides by, the teacher it reads, the data.
LOSS_CAUSES = ("the loss's temperatures (--loss.temperature, --loss.kd_temperature), the teacher (--model.teacher) "
               "and the images")
# Fields a resume may change: where the data, the teacher and the run itself lie (moved, restored, or
# spelled differently), how much is logged, how long it runs.
RESUMABLE_CHANGES = {"data.root", "data.train", "data.val", "data.num_workers", "model.teacher", "train.log_every",
                     "train.run_dir",
                     "train.epochs"}  # a longer train.epochs extends a finished run (the lr steps are absolute)
# Fields a resume may change with a warning: the run continues, but no longer as an uninterrupted one would.
# A lower optim.lr is how a run whose loss stopped being finite continues from its last checkpoint.
RESUMABLE_WITH_WARNING = {"optim.lr"}
# What a run saved before a field existed did, where that differs from the field's default now: such a
# run's config lacks the field, and its resume must compare with what the run computed.
PREDATED_VALUES = {("loss", "negatives"): "queue"}


class DistillStudent(nn.Module):
    """Everything that trains: the student classifier and the two linear embedding heads
    (CRD's `Embed`: a Linear layer; the L2 normalisation is in the critic's scores)."""

    def __init__(self, student: Classifier, teacher_dim: int | None, embed_dim: int):
        super().__init__()
        self.student = student
        self.embed_s = nn.Linear(student.feature_dim, embed_dim) if teacher_dim else None
        self.embed_t = nn.Linear(teacher_dim, embed_dim) if teacher_dim else None


def lr_at(cfg: DistillConfig, epoch: int) -> float:
    """CRD's step schedule: lr x rate^(number of decay epochs already reached)."""
    return cfg.optim.lr * cfg.optim.decay_rate ** sum(epoch >= e for e in decay_epochs(cfg.optim.decay_epochs))


@torch.no_grad()
def top1(model: Classifier, loader: DataLoader, device: torch.device) -> float:
    """Top-1 in percent over the readable images of `loader` (each unreadable one is named in a
    warning); DataLayoutError when there is none."""
    model.eval()
    right = total = 0
    with stop_signals_held():  # its workers leave the process group before a stop signal reaches them
        batches = iter(loader)
    for batch in batches:
        if batch is None:  # no readable image in it
            continue
        x, y = batch
        logits, _ = model(x.to(device))
        right += (logits.argmax(1).cpu() == y).sum().item()
        total += y.numel()
    model.train()
    if not total:  # 0 % would read as a model that learned nothing
        raise DataLayoutError(f"data.val: none of its {len(loader.dataset)} images could be read (each is named in "
                              f"a warning above); replace or remove them")
    return 100.0 * right / total


def check_run_dir(cfg: DistillConfig, resume: bool, command: list[str] | None) -> Path:
    """Refuse to overwrite a run, refuse a resume that changes what is computed (nothing is written:
    the directory is made once the data and the teacher were found)."""
    run_dir = Path(cfg.train.run_dir)
    saved = ckpt.saved_config(run_dir)
    # The classifier is written after the last checkpoint, never before the first: found without a
    # checkpoint, it is a finished run's, under `--resume auto` too.
    refuse_harmful_start(run_dir, saved is not None, resume, command, (CLASSIFIER_NAME,),
                         foreign=foreign_sections(saved, to_dict(DistillConfig())))
    if resume:
        new = to_dict(cfg)
        if foreign_sections(saved, new):  # a self-supervised recipe's run (method/aug sections), not a distillation
            raise ConfigError(f"--resume: {run_dir} holds a run of another recipe (its config has the sections "
                              f"{', '.join(sorted(saved))}); continue it with the recipe that started it, or give "
                              f"this one another --train.run_dir")
        before = to_dict(DistillConfig())
        for (section, name), value in PREDATED_VALUES.items():
            before[section][name] = value
        resume_changes(saved, new, before, RESUMABLE_CHANGES, RESUMABLE_WITH_WARNING, run_dir)
    return run_dir


@dataclass
class DistillRun:
    """What set-up hands the epochs: the run's parts, where it stands, and where its records go."""
    cfg: DistillConfig
    run_dir: Path
    command: list[str] | None  # the user's command line, for messages that print the command that goes on
    device: torch.device
    num_classes: int
    train_items: Dataset
    val_loader: Any
    model: DistillStudent
    teacher: Classifier | None  # None when neither KD nor ML-CPC needs one (CE alone)
    objective: DistillObjective
    optimizer: torch.optim.Optimizer
    state: ckpt.TrainState
    results: dict
    steps_log: CsvLog
    epochs_log: CsvLog
    saved_step: int | None  # the step of the checkpoint on disk (None: none yet)


def train(cfg: DistillConfig, resume: bool | str = False, command: list[str] | None = None) -> dict:
    """Run (or continue) one distillation run; returns results.json's content ("interrupted": the
    signal's name when a stop signal ended it early, with a checkpoint; `command` is for the
    message that says how to continue)."""
    run = set_up(cfg, resume, command)
    if run.saved_step is not None and run.state.epoch >= cfg.train.epochs:  # resumed after the end
        print(finished_run(run.run_dir, cfg.train.epochs, run.state.step), flush=True)
        return run.results
    stop = GracefulStop()
    try:
        for epoch in range(run.state.epoch, cfg.train.epochs):
            started = time.time()  # of this epoch (of its rest, when it resumes mid-epoch)
            if not run_epoch(run, epoch, stop):
                return stopped(run, stop)
            end_epoch(run, started)
    except TrainingDiverged as err:
        advice = (before_any_update_advice(command, run.run_dir, LOSS_CAUSES) if run.state.step == 0
                  else lower_lr_advice(command, run.run_dir, run.saved_step, "optim.lr", cfg.optim.lr))
        raise TrainingDiverged(f"{err}; {advice}") from None
    except ckpt.CheckpointError as err:  # a full disk: the checkpoint on disk is kept
        raise ckpt.CheckpointError(f"{err}; {after_write_failure(command, run.run_dir, run.saved_step)}") from err
    finally:
        stop.close()
    export_classifier(run)
    run.results["final_top1"] = run.results["top1"][-1]["top1"] if run.results["top1"] else None
    write_run_json(run.run_dir / "results.json", run.results)
    return run.results


def set_up(cfg: DistillConfig, resume: bool | str, command: list[str] | None) -> DistillRun:
    """Everything before the first step, in the order that fails soonest: the config, the run
    directory, the data, the teacher, the networks, the checkpoint."""
    from fastssl.distill.data import ReadableItems, SeededItems, build_datasets, collate_readable

    refusal = one_process_refusal("the distillation trainer", "recipes/distill_mlcpc_cifar100.py")
    if refusal:  # N copies would race on one run directory
        raise ConfigError(refusal)
    resume = ckpt.resolve_resume(resume, Path(cfg.train.run_dir))
    validate(cfg)
    run_dir = check_run_dir(cfg, resume, command)  # before the data is read
    device = torch.device("cuda" if torch.cuda.is_available() and not cfg.train.cpu else "cpu")
    torch.manual_seed(cfg.train.seed)
    train_set, val_set, num_classes = build_datasets(cfg.data)
    teacher = None
    lo = cfg.loss
    if lo.kd_weight > 0 or lo.mi_weight > 0:
        teacher, _ = load_teacher(cfg.model.teacher, num_classes)
        teacher.to(device)
    objective = build_objective(cfg, list(train_set.targets)).to(device)
    if len(train_set) < cfg.train.batch_size:
        raise ConfigError(f"train.batch_size: {cfg.train.batch_size} is more than the {len(train_set)} training "
                          f"images; lower --train.batch_size or add images")
    with ckpt.writing(run_dir):  # once the data and the teacher were found: a refused start leaves no directory
        run_dir.mkdir(parents=True, exist_ok=True)

    model = DistillStudent(build_classifier(cfg.model.student, num_classes, cfg.model.stem),
                           teacher.feature_dim if teacher is not None and lo.mi_weight > 0 else None,
                           cfg.model.embed_dim).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.optim.lr, momentum=cfg.optim.momentum,
                                weight_decay=cfg.optim.weight_decay)
    state = ckpt.TrainState()
    results: dict = {"top1": []}
    if resume:
        state, missed = ckpt.load_checkpoint(run_dir, student=model, teacher=teacher_slot(teacher),
                                             optimizer=optimizer, scaler=None, rank=0, critic=objective.state)
        if missed:
            print(f"warning: --resume: the random generators were not restored ({missed}); the run continues "
                  f"with other random draws than an uninterrupted run", file=sys.stderr)
        results = {"top1": [], **ckpt.read_results(run_dir)}
        results["top1"] = [r for r in results["top1"] if r["epoch"] <= state.epoch]
        results.pop("interrupted", None)
    if not (resume and state.epoch >= cfg.train.epochs):  # a finished run resumed keeps its record (`train`)
        check_room_for_a_save(cfg, run_dir, model, teacher, objective)  # a full disk stops the run before it writes
        write_run_json(run_dir / "config.json", to_dict(cfg))
    workers = cfg.data.num_workers
    # its own generator: evaluating must not draw from the global RNG (a resumed run would diverge)
    val_loader = DataLoader(ReadableItems(val_set), batch_size=256, shuffle=False, num_workers=workers,
                            generator=torch.Generator().manual_seed(0), collate_fn=collate_readable,
                            worker_init_fn=leave_process_group if workers else None,
                            multiprocessing_context=loader_workers_context(workers))
    model.train()
    return DistillRun(cfg, run_dir, command, device, num_classes, SeededItems(train_set, cfg.train.seed), val_loader,
                      model, teacher, objective, optimizer, state, results,
                      CsvLog(run_dir / "train_log.csv", STEP_FIELDS, state.step),
                      CsvLog(run_dir / "epochs.csv", EPOCH_FIELDS, state.step), state.step if resume else None)


def check_room_for_a_save(cfg: DistillConfig, run_dir: Path, model: DistillStudent, teacher: Classifier | None,
                          objective: DistillObjective) -> None:
    """Refuse to start on a disk without room for one save: the checkpoint (the student, SGD's momentum
    when it keeps one, the teacher, the memory or queues) and the exported classifier. Checked before
    config.json and the logs are written, so a full disk stops the run now, not at its first checkpoint."""
    student = model.state_dict()
    critic = objective.state
    checkpoint = {"student": student, "momentum": student if cfg.optim.momentum > 0 else {},
                  "teacher": teacher_slot(teacher).state_dict(),
                  "critic": critic.state_dict() if critic is not None else None}
    ckpt.check_room_at_start(run_dir, checkpoint, run_dir / CLASSIFIER_NAME, model.student.state_dict())


def build_objective(cfg: DistillConfig, labels: list[int]) -> DistillObjective:
    """The loss's terms; with ML-CPC, CRD's memories of every training image (`labels`: their classes,
    for the negatives), or queues of teacher and student embeddings (a queue not smaller than the
    data is refused: it would hold the query's own positive among its negatives)."""
    lo = cfg.loss
    critics: list[MlCpcCritic | None] = [None, None]
    if lo.mi_weight > 0 and lo.negatives == "memory":
        try:
            memory = ContrastMemory(torch.as_tensor(labels), cfg.model.embed_dim, lo.queue_size, lo.temperature,
                                    cfg.train.seed)
        except ValueError as err:  # one class only: no negatives of other classes
            raise ConfigError(f"loss.negatives memory: {err}; use --loss.negatives queue") from None
        return DistillObjective(ce_weight=lo.ce_weight, kd_weight=lo.kd_weight, mi_weight=lo.mi_weight,
                                kd_temperature=lo.kd_temperature, alpha=lo.alpha, bound=lo.bound, memory=memory)
    if lo.mi_weight > 0:
        num_images = len(labels)
        try:
            critics = [MlCpcCritic(lo.queue_size, cfg.model.embed_dim, lo.temperature, dataset_size=num_images,
                                   direction="one_way") for _ in range(2)]
        except QueueLongerThanData as err:
            raise ConfigError(f"loss.queue_size: {err}") from None
    return DistillObjective(ce_weight=lo.ce_weight, kd_weight=lo.kd_weight, mi_weight=lo.mi_weight,
                            kd_temperature=lo.kd_temperature, alpha=lo.alpha, bound=lo.bound,
                            critic=critics[0], student_critic=critics[1])


def end_epoch(run: DistillRun, started: float) -> None:
    """An epoch's row (its mean loss and terms; top-1 every `eval_every` epochs and at the last),
    results.json, then the checkpoint every `checkpoint_every` epochs and at the last."""
    cfg, state = run.cfg, run.state
    last = state.epoch == cfg.train.epochs
    steps = max(state.epoch_loss_steps, 1)
    row = {"epoch": state.epoch, "step": state.step, "seconds": time.time() - started,
           "loss": state.epoch_loss_sum / steps, **{k: state.epoch_sums.get(k, 0.0) / steps for k in TERMS}}
    state.batch_in_epoch, state.epoch_loss_sum, state.epoch_loss_steps, state.epoch_sums = 0, 0.0, 0, {}
    if last or state.epoch % cfg.train.eval_every == 0:
        try:
            row["top1"] = top1(run.model.student, run.val_loader, run.device)
        except DataLayoutError as err:  # no val image could be read: keep the epoch's training, then say so
            run.epochs_log.append(row)
            save(run)
            exported = None
            if last:  # a resume would find the run finished
                export_classifier(run)
                exported = f"the student is in {run.run_dir / CLASSIFIER_NAME}, its top-1 not measured"
            advice = after_eval_failure(run.command, run.run_dir, state.epoch, after_last=exported)
            raise DataLayoutError(f"{err}; {advice}") from err
        run.results["top1"].append({"epoch": state.epoch, "top1": row["top1"]})
    run.epochs_log.append(row)
    print(f"epoch {state.epoch}/{cfg.train.epochs}: loss {row['loss']:.4f}"
          + (f", top-1 {row['top1']:.2f}%" if "top1" in row else "") + f" ({row['seconds']:.1f} s)", flush=True)
    write_run_json(run.run_dir / "results.json", run.results)  # before the checkpoint: a kill between them loses no row
    if last or state.epoch % cfg.train.checkpoint_every == 0:
        save(run)
        run.saved_step = state.step


def stopped(run: DistillRun, stop: GracefulStop) -> dict:
    """A stop signal ended the epoch after a whole step: a checkpoint mid-epoch, and how to go on."""
    save(run)
    run.results["interrupted"] = stop.signal_name or "signal"
    write_run_json(run.run_dir / "results.json", run.results)
    print(f"stopped by {run.results['interrupted']} at epoch {run.state.epoch} step {run.state.step}: checkpoint "
          f"saved in {run.run_dir}; continue with: {rerun_command(run.command, run.run_dir)}", flush=True)
    return run.results


def export_classifier(run: DistillRun) -> None:
    """The student as RUN_DIR/classifier.pt, in the teacher format: the run's product."""
    save_classifier(run.model.student, run.cfg.model.student, run.num_classes, run.cfg.model.stem,
                    run.run_dir / CLASSIFIER_NAME)


def teacher_slot(teacher: Classifier | None) -> nn.Module:
    """The checkpoint's teacher entry: the frozen teacher, or an empty module when there is none."""
    return teacher if teacher is not None else nn.Module()


def save(run: DistillRun) -> None:
    ckpt.save_checkpoint(run.run_dir, student=run.model, teacher=teacher_slot(run.teacher), optimizer=run.optimizer,
                         scaler=None, state=run.state, config=to_dict(run.cfg), rank=0, is_main=True,
                         critic=run.objective.state)


def run_epoch(run: DistillRun, epoch: int, stop: GracefulStop) -> bool:
    """Epoch `epoch` from batch `state.batch_in_epoch` on; the running sums live in `state`, so a stop
    mid-epoch checkpoints them. False when a stop signal ended it early (after a whole step)."""
    cfg, state, workers = run.cfg, run.state, run.cfg.data.num_workers
    for group in run.optimizer.param_groups:
        group["lr"] = lr_at(cfg, epoch)
    batches = shard_batches(len(run.train_items), cfg.train.batch_size, 0, 1, cfg.train.seed, epoch)  # f(seed, epoch)
    if cfg.train.steps_per_epoch:
        batches = batches[: cfg.train.steps_per_epoch]
    keys = [[(epoch, i) for i in b] for b in batches[state.batch_in_epoch:]]  # SeededItems' (epoch, image) keys
    loader = DataLoader(run.train_items, batch_sampler=keys, num_workers=workers,
                        worker_init_fn=leave_process_group if workers else None,
                        multiprocessing_context=loader_workers_context(workers))
    window_start = time.time()
    with stop_signals_held():  # the workers leave the process group before a stop signal reaches them
        delivered = iter(loader)
    for x, y, indices in delivered:
        row = train_step(run, x.to(run.device, non_blocking=True), y.to(run.device, non_blocking=True), indices,
                         epoch)
        state.step += 1
        state.batch_in_epoch += 1
        state.epoch_loss_sum += row["loss"]
        state.epoch_loss_steps += 1
        state.epoch_sums = {k: state.epoch_sums.get(k, 0.0) + row[k] for k in TERMS}
        if state.step % cfg.train.log_every == 0:
            rate = x.shape[0] * cfg.train.log_every / max(time.time() - window_start, 1e-9)
            run.steps_log.append({"epoch": epoch, "step": state.step, "lr": lr_at(cfg, epoch), "images_per_s": rate,
                                  **row})
            window_start = time.time()
        if stop.requested:
            return False
    state.epoch = epoch + 1
    return True


def train_step(run: DistillRun, x: torch.Tensor, y: torch.Tensor, indices: torch.Tensor, epoch: int
               ) -> dict[str, float]:
    """One SGD step: student and teacher on the same batch (`indices`: its images in the dataset), the
    objective, the update, then the batch's embeddings into the memory or the queues; the step's loss
    and terms. A loss that is not finite raises TrainingDiverged before the update: the weights, the
    memory and the queues stay those of the last good step."""
    model, objective = run.model, run.objective
    logits_s, feat_s = model.student(x)
    logits_t = emb_s = emb_t = None
    if run.teacher is not None:
        with torch.no_grad():
            logits_t, feat_t = run.teacher(x)
        if model.embed_s is not None:
            emb_s, emb_t = model.embed_s(feat_s), model.embed_t(feat_t)
    terms = objective(logits_s, y, logits_t, emb_s, emb_t, indices, run.state.step)
    if not torch.isfinite(terms.loss):
        raise TrainingDiverged(f"training diverged at epoch {epoch + 1} step {run.state.step + 1}: the loss is "
                               f"{terms.loss.item()}")
    run.optimizer.zero_grad(set_to_none=True)
    terms.loss.backward()
    run.optimizer.step()
    objective.finish_step(emb_s, emb_t, indices)
    return {"loss": terms.loss.item(), **{k: getattr(terms, k).item() for k in TERMS}}

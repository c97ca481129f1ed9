"""The training loop: Accelerate owns processes and devices; everything else is called from here.

`train(cfg)` validates the whole config before any work, builds the loader, objective,
networks and optimiser, then runs epochs of `method.train_step`, with logs, checkpoints, online
k-NN and a clean stop on SIGTERM, SIGINT or SIGUSR1. `train(cfg, resume=True)` continues the run in
`cfg.train.run_dir` exactly where its last checkpoint left it.

Faults end in an exception whose message says what to do next, naming the run directory
(`fastssl.recovery`): `ckpt.CheckpointError` (full disk, unreadable checkpoint) and
`TrainingDiverged` and `OutOfDeviceMemory` (a batch too large for the GPU); the command line
turns them into exit code 2. A diverged run never writes a checkpoint.
"""

from __future__ import annotations

import shlex
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from tqdm.auto import tqdm

import pipelines
from pipelines.cores import default_num_workers
from pipelines.folder import DataLayoutError, remembered_scans
from fastssl import checkpoint as ckpt
from fastssl import runtime
from fastssl.agreement import check_processes_agree, check_same_config
from fastssl.collectives import all_gather_rows
from fastssl.config import Config, ConfigError, eval_view, synced_batchnorm, to_dict, validate
from fastssl.eval.online import OnlineKnn
from fastssl.method import StepParts, train_step
from fastssl.models import MiraNetwork, make_teacher, unwrap
from fastssl.objectives import Metrics, Objective, build_objective
from fastssl.optim import build_optimizer
from fastssl.profiling import ThroughputMeter, device_memory_in_use_mb, peak_memory_mb, reset_peak_memory
from fastssl.recovery import (DivergenceGuard, OutOfDeviceMemory, TrainingDiverged, after_eval_failure,
                              after_write_failure, before_any_update_advice, collapse_warning, continue_advice,
                              first_loss_causes, is_out_of_memory, latest_run_hint, out_of_memory_advice)
from fastssl.relaunch import rerun_command
from fastssl.run_dir import RUN_DIR_TIME, check_run_dir, create_run_dir, finished_run, run_info, stamp_run_dir
from fastssl.run_log import RunLog, write_run_json
from fastssl.runtime import GracefulStop, build_accelerator, failing_together, seed_everything
from fastssl.schedules import scaled_lr, step_schedule

if TYPE_CHECKING:
    from accelerate import Accelerator

    from pipelines.sampler import ShardedLoader

# Loaders hand over views in the autocast dtype (the first conv would cast to it anyway).
VIEW_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class Run:
    """What set-up hands the epochs: the run's parts, where it stands, and where its records go."""
    cfg: Config
    run_dir: Path
    command: list[str] | None  # the user's command line, for messages that print the command that goes on
    parts: StepParts
    loader: Any
    knn: OnlineKnn | None
    state: ckpt.TrainState
    results: dict
    log: RunLog | None  # None: a finished run resumed, which has nothing to do and rewrites no record
    saved_step: int | None  # the step of the checkpoint on disk (None: none yet)


def train(cfg: Config, resume: bool | str = False, command: list[str] | None = None) -> dict:
    """Run (or continue) one training run; returns the run's results (also in results.json).

    `resume="auto"` continues when the run directory holds a checkpoint and starts afresh when
    it does not (SLURM requeues). `command` (the user's command line, from `fastssl.cli`) lets
    messages print the exact command that continues the run.

    SLURM's time-limit warning (SIGUSR1) during set-up is kept for the loop, which checkpoints after
    its first step (several processes: at their first log row) and exits for the requeue: ending
    set-up at once would end a job that wrote no checkpoint, and `tools/slurm/requeue.sh` does not
    requeue those. SIGTERM and Ctrl-C still end set-up at once (it writes nothing to lose).
    """
    time_limit_warning = runtime.GracefulStop(("SIGUSR1",))
    try:
        run = set_up(cfg, resume, command)
        if run.log is None:  # resumed after the end (a requeue)
            run.parts.accelerator.print(finished_run(run.run_dir, cfg.train.epochs, run.state.step))
            return run.results
        return train_epochs(run, time_limit_warning)
    finally:
        time_limit_warning.close()


def set_up(cfg: Config, resume: bool | str, command: list[str] | None) -> Run:
    """Everything before the first step, checked in the order that fails soonest: the config, the run
    directory (before the data is listed: minutes for ImageNet on network storage), the data, the
    networks, the checkpoint. Set-up fails on every process or none (`failing_together`): a node whose
    copy of the data or view of the run directory is wrong would otherwise fail alone, the others
    waiting for it in a collective."""
    if resume and RUN_DIR_TIME in cfg.train.run_dir:  # every start would name a new directory: never a resume
        a_start = Path(cfg.train.run_dir.replace(RUN_DIR_TIME, "_"))  # its siblings are the earlier starts
        raise ConfigError(f"train.run_dir: {cfg.train.run_dir!r} names a new directory at every start ({RUN_DIR_TIME} "
                          f"is the start time), so --resume{' auto' if resume == 'auto' else ''} could never "
                          f"continue it; pass the run's own directory{latest_run_hint(a_start, command)}")
    auto, resume = resume == "auto", ckpt.resolve_resume(resume, Path(cfg.train.run_dir))  # before any rank saves
    validate(cfg)
    accelerator = build_accelerator(cfg.train)
    with failing_together(accelerator):  # an override that differs on one node may be invalid there only
        resolve_auto_settings(cfg, accelerator)
        validate(cfg, accelerator.num_processes, accelerator.device.type)
    check_same_config(cfg, accelerator)  # after `auto` is resolved: nodes that resolve it differently disagree
    run_dir = Path(stamp_run_dir(cfg.train, accelerator))
    with failing_together(accelerator):
        warned = check_run_dir(cfg, run_dir, resume, accelerator, command, auto)
    seed_everything(cfg.train.seed, accelerator.process_index)
    workers = default_num_workers(cfg.data.num_workers, accelerator.num_processes)
    with failing_together(accelerator), remembered_scans():  # the loader and the k-NN's bank list the folder once
        loader = build_loader(cfg, accelerator, workers)
        # A queue longer than the data fails here, before any output.
        objective = build_objective(cfg, getattr(loader, "num_images", None), accelerator.device)
        knn = build_knn(cfg, accelerator, workers)  # scans the data first: bad paths fail before any output
    create_run_dir(run_dir, accelerator)
    parts = build_parts(cfg, accelerator, objective)
    state, results = ckpt.TrainState(), {"knn": []}
    own_state_missed: str | None = None  # why this process's random generators and loader position were not restored
    with failing_together(accelerator):  # each process reads its own part (rng/rank{r}.pt); all call it
        if resume:
            state, own_state_missed = ckpt.load_checkpoint(
                run_dir, student=unwrap(parts.student), teacher=parts.teacher, optimizer=parts.optimizer,
                scaler=accelerator.scaler, rank=accelerator.process_index, critic=objective.state, loader=loader,
                world_size=accelerator.num_processes)
            results = {"knn": [], **ckpt.read_results(run_dir)}  # drop k-NN rows a hard kill left past the checkpoint:
            results["knn"] = [k for k in results["knn"] if k["epoch"] <= state.epoch]
    check_processes_agree(accelerator, loader, state, run_dir, own_state_missed)
    saved_step = state.step if resume else None
    log = None  # a finished run resumed (a requeue): nothing to do, and its records stay as they are
    if not (resume and state.epoch >= cfg.train.epochs):
        try:
            log = open_records(cfg, run_dir, parts, resume, warned, state.step, command)  # a resume sure to go on
        except ckpt.CheckpointError as err:
            raise ckpt.CheckpointError(f"{err}; {after_write_failure(command, run_dir, saved_step)}") from err
    if auto:
        accelerator.print(f"--resume auto: {f'continuing from step {state.step}' if resume else 'no checkpoint, starting'}"
                          f" the run in {run_dir}")
    return Run(cfg, run_dir, command, parts, loader, knn, state, results, log, saved_step)


def train_epochs(run: Run, before: runtime.GracefulStop | None = None) -> dict:
    """The epochs left, each with its k-NN, log row, results and checkpoint; a stop signal saves a
    checkpoint mid-epoch (one `before` caught during set-up too). A fault ends in an exception that
    says how the run goes on."""
    cfg, run_dir, command, parts, loader, knn, state, results, log = (
        run.cfg, run.run_dir, run.command, run.parts, run.loader, run.knn, run.state, run.results, run.log)
    accelerator, saved_step = parts.accelerator, run.saved_step
    guard = DivergenceGuard(parts.student, parts.teacher, state, accelerator)
    stop, said_collapsed = GracefulStop(), False
    if before is not None and before.requested:
        stop.requested, stop.signal_name = True, before.signal_name
    try:
        # not after a stop asked for in set-up: SLURM's warning leaves minutes, the k-NN may take them
        if knn and cfg.eval.knn_at_start and state.step == 0 and not stop.agreed(accelerator):
            results["knn_random_init"] = knn(exported_backbone(cfg, parts), "the randomly initialised network")
        for epoch in range(state.epoch, cfg.train.epochs):
            epoch_row = run_epoch(cfg, parts, loader, state, log, stop, guard)
            collapsed = None if epoch_row is None or said_collapsed else collapse_warning(epoch_row,
                                                                                          cfg.model.num_prototypes)
            if collapsed:
                said_collapsed = True  # once a run: a collapse lasts
                if accelerator.is_local_main_process:
                    warnings.warn(collapsed, stacklevel=1)
            if epoch_row is None:  # asked to stop: checkpoint mid-epoch, say how to resume
                save(cfg, run_dir, parts, state, guard, loader)
                saved_step = state.step
                results["interrupted"] = stop.signal_name or "signal"
                finish(run_dir, accelerator, results)
                accelerator.print(f"stopped by {results['interrupted']} at epoch {state.epoch} step {state.step}: "
                                  f"checkpoint saved in {run_dir}; continue with: "
                                  f"{rerun_command(command, run_dir)}")
                return results
            last = state.epoch == cfg.train.epochs
            if knn and should_eval(cfg.eval.knn_every, state.epoch, last):
                try:
                    scores = knn(exported_backbone(cfg, parts), f"the {cfg.model.export}")
                except DataLayoutError as err:  # unreadable val images: keep the epoch's training, then say so
                    with failing_together(accelerator):
                        log.epoch(epoch_row)
                    save(cfg, run_dir, parts, state, guard, loader)
                    measure = (f"once the folder is fixed, measure the k-NN with: python tools/eval_knn.py "
                               f"{shlex.quote(str(run_dir))} (--val DIR for another folder)")
                    advice = after_eval_failure(command, run_dir, state.epoch,
                                                " (or without the k-NN: add --data.val '')", measure if last else None)
                    raise DataLayoutError(f"{err}; {advice}") from err
                results["knn"].append({"epoch": state.epoch, **scores})
                epoch_row.update(knn_top1=scores["top1"], knn_top5=scores["top5"])
            with failing_together(accelerator):
                log.epoch(epoch_row)
            finish(run_dir, accelerator, results)  # before the checkpoint: a kill between them loses no k-NN row
            if last or state.epoch % cfg.train.checkpoint_every == 0:
                save(cfg, run_dir, parts, state, guard, loader)
                saved_step = state.step
    except TrainingDiverged as err:
        advice = (before_any_update_advice(command, run_dir, first_loss_causes(cfg, accelerator)) if err.at_first_step
                  else continue_advice(cfg, command, run_dir, saved_step, accelerator))
        raise TrainingDiverged(f"{err}; {advice}") from err
    except ckpt.CheckpointError as err:  # a full disk: the checkpoint on disk is kept
        raise ckpt.CheckpointError(f"{err}; {after_write_failure(command, run_dir, saved_step)}") from err
    except (RuntimeError, MemoryError) as err:  # a batch too large for the device: a setting to change, not a crash
        if not is_out_of_memory(err):
            raise
        raise OutOfDeviceMemory(out_of_memory_advice(cfg, accelerator, state.step, command, run_dir, saved_step,
                                                     knn=knn is not None)) from None
    finally:
        stop.close()
        log.close()
    results.pop("interrupted", None)
    finish(run_dir, accelerator, results)
    return results


def run_epoch(cfg: Config, parts: StepParts, loader: ShardedLoader, state: ckpt.TrainState, log: RunLog,
              stop: GracefulStop, guard: DivergenceGuard | None = None) -> dict | None:
    """One epoch (or its remainder after a resume); None when a stop was requested."""
    accelerator, every = parts.accelerator, cfg.train.log_every
    steps_per_epoch = min(len(loader), cfg.train.steps_per_epoch or len(loader))
    loader.set_epoch(state.epoch, start_batch=state.batch_in_epoch)
    window, whole = ThroughputMeter(cfg.train.global_batch_size), ThroughputMeter(cfg.train.global_batch_size)
    reset_peak_memory(accelerator.device)
    losses, metrics, skipped, started, stopping = [], [], 0, time.perf_counter(), False
    # A stop at a capped epoch's last step saved batch_in_epoch == steps_per_epoch: only its end is left.
    batches = loader if state.batch_in_epoch < steps_per_epoch else ()
    # The bar is closed on an error too, so that the error's message is the terminal's last line.
    with tqdm(total=steps_per_epoch, initial=state.batch_in_epoch, desc=f"epoch {state.epoch + 1}/{cfg.train.epochs}",
              disable=not (cfg.train.progress and accelerator.is_local_main_process), dynamic_ncols=True) as bar:
        for batch in window.wrap(whole.wrap(batches)):
            sched = step_schedule(cfg, state.step, steps_per_epoch)
            loss, step_metrics = train_step(parts, batch.views, sched)
            losses.append(loss)
            metrics.append(step_metrics)
            skipped += batch.num_skipped
            state.step += 1
            state.batch_in_epoch += 1
            bar.update(1)
            if state.step % every == 0 or state.batch_in_epoch == steps_per_epoch:
                row = {"epoch": state.epoch, "step": state.step, "loss": mean_loss(losses[-every:], accelerator),
                       "lr": sched.lr, "beta": sched.beta, "ema_momentum": sched.ema_momentum,
                       **loader_health(accelerator, window.summary(), skipped),
                       **window_metrics(metrics[-every:], accelerator)}
                window.reset()
                with failing_together(accelerator):  # only the main process writes: the others must hear it failed
                    log.step(row)
                if guard is not None:
                    guard.check(row["loss"], state.step, lambda: mean_loss(losses[:1], accelerator)
                                if state.step == len(losses) else None)  # the run's first step is this epoch's
                bar.set_postfix(loss=f"{row['loss']:.4f}", img_s=f"{row['images_per_s']:.1f}",
                                wait=f"{100 * row['data_wait_share']:.0f}%")
                stopping = stop.agreed(accelerator)
            else:
                stopping = accelerator.num_processes == 1 and stop.requested
            if stopping or state.batch_in_epoch >= steps_per_epoch:
                break
    if losses:
        state.epoch_loss_sum += mean_loss(losses, accelerator) * len(losses)
        state.epoch_loss_steps += len(losses)
    if stopping:
        return None
    row = {"epoch": state.epoch, "step": state.step, "loss": state.epoch_loss_sum / max(state.epoch_loss_steps, 1),
           "peak_memory_mb": peak_memory_mb(accelerator.device),
           "device_used_mb": device_memory_in_use_mb(accelerator.device),
           "seconds": time.perf_counter() - started, **loader_health(accelerator, whole.summary(), skipped),
           **window_metrics(metrics, accelerator)}
    state.epoch, state.batch_in_epoch, state.epoch_loss_sum, state.epoch_loss_steps = state.epoch + 1, 0, 0.0, 0
    return row


def loader_health(accelerator: Accelerator, timing: dict, skipped: int) -> dict:
    """The meter's figures and the images skipped, for the whole run: the data-wait share of the
    process that waited most (a node on slow storage holds every other one back in the gradient
    all-reduce, where they count it as compute) and the skipped images of all processes. One
    all-gather with several processes."""
    if accelerator.num_processes == 1:
        return {**timing, "skipped_images": skipped}
    mine = torch.tensor([[timing["data_wait_share"], float(skipped)]], dtype=torch.float64, device=accelerator.device)
    everyone = all_gather_rows(mine)
    return {**timing, "data_wait_share": everyone[:, 0].max().item(),
            "skipped_images": int(everyone[:, 1].sum().item())}


def mean_loss(losses: list[torch.Tensor], accelerator: Accelerator) -> float:
    """Mean over the given steps and all processes (one sync, only when logging)."""
    if not losses:
        return float("nan")
    local = torch.stack(losses).mean()
    return accelerator.reduce(local, reduction="mean").item()


def window_metrics(metrics: list[Metrics], accelerator: Accelerator) -> dict[str, float]:
    """The objective's metrics over the log window: estimates (tensors) averaged over its steps
    and all processes, settings (numbers, e.g. ML-CPC's alpha and ceiling) as of its last step."""
    latest = metrics[-1] if metrics else {}
    return {name: mean_loss([m[name] for m in metrics], accelerator) if torch.is_tensor(value) else value
            for name, value in latest.items()}


def should_eval(every: int, epoch: int, last: bool) -> bool:
    """knn_every: N = every N epochs and at the end; 0 = only at the end; -1 = never."""
    return every >= 0 and (last or (every > 0 and epoch % every == 0))


def build_parts(cfg: Config, accelerator: Accelerator, objective: Objective) -> StepParts:
    """What every step uses: the student (prepared by Accelerate, compiled when asked), the EMA teacher,
    the optimiser and the objective. The loop and the profile's model stage both build them here."""
    with failing_together(accelerator):  # before DDP's first broadcast
        student, teacher = build_networks(cfg, accelerator, objective)
        optimizer = build_optimizer(cfg.optim.name, student.named_parameters(),
                                    lr=scaled_lr(cfg.optim.base_lr, cfg.train.global_batch_size),
                                    momentum=cfg.optim.momentum, weight_decay=cfg.optim.weight_decay,
                                    lars_eta=cfg.optim.lars_eta, decay_bn_bias=cfg.optim.decay_bn_bias)
    student, optimizer = accelerator.prepare(student, optimizer)
    if cfg.train.compile:
        student = torch.compile(student)
    return StepParts(student, teacher, optimizer, accelerator, objective, cfg.train.micro_batch_size)


def build_networks(cfg: Config, accelerator: Accelerator, objective: Objective) -> tuple[MiraNetwork, MiraNetwork]:
    m = cfg.model
    student = MiraNetwork(m.arch, m.proj_hidden_dim, m.proj_dim, m.num_prototypes, m.bn_stats, m.sync_bn,
                          m.head, m.stem, m.zero_init_residual)
    if not objective.uses_prototypes:  # no swapped prediction: the prototypes are unused (and DDP
        student.prototypes.requires_grad_(False)  # must not wait for their gradients)
    if (m.bn_stats == "per_forward" and accelerator.num_processes > 1
            and synced_batchnorm(m, accelerator.device.type)):  # per_view BN gathers its own global statistics
        student = torch.nn.SyncBatchNorm.convert_sync_batchnorm(student)
    if cfg.train.channels_last:
        student = student.to(memory_format=torch.channels_last)
    teacher = make_teacher(student).to(accelerator.device)
    return student, teacher


def resolve_auto_settings(cfg: Config, accelerator: Accelerator) -> None:
    """`--data.backend auto` and `--train.precision auto` become what they mean on this process's
    device, so the run's config.json, logs and a resume's comparison name what ran, and processes
    that resolve them differently (nodes with other GPUs) are refused by `check_same_config`
    rather than training in different precisions. The main process says which loader."""
    cfg.data.backend, why = pipelines.resolve_backend(cfg.data.backend, accelerator.device)
    cfg.train.precision = accelerator.mixed_precision  # build_accelerator resolved "auto" on this device
    if why:
        accelerator.print(why)


def loader_spec(cfg: Config, accelerator: Accelerator, workers: int) -> pipelines.LoaderSpec:
    """The data section whole, with what only this process knows (rank, device, dtype, batch share)."""
    return pipelines.LoaderSpec(
        data=cfg.data, recipe=cfg.aug, batch_size=cfg.train.global_batch_size // accelerator.num_processes,
        rank=accelerator.process_index, world_size=accelerator.num_processes, seed=cfg.train.seed,
        num_workers=workers, device=accelerator.device, channels_last=cfg.train.channels_last,
        dtype=VIEW_DTYPES.get(accelerator.mixed_precision, torch.float32))


def build_loader(cfg: Config, accelerator: Accelerator, workers: int) -> ShardedLoader:
    """This process's training loader. The main process says what it lists before listing it (on
    network storage ImageNet's 1.28M files take a minute or more, silent otherwise), then what it found."""
    lists = cfg.data.backend in ("torchvision", "dali")  # a folder or a .txt list (ffcv: a .beton's header)
    if lists:
        accelerator.print(f"listing the training images in {cfg.data.train} ...")
    start = time.monotonic()
    loader = pipelines.build_train_loader(loader_spec(cfg, accelerator, workers))
    took = f" (listed in {time.monotonic() - start:.1f} s)" if lists else ""
    images, world = getattr(loader, "num_images", None), accelerator.num_processes
    accelerator.print(f"{cfg.data.backend}: " + (f"{images:,} training images, " if images is not None else "")
                      + f"{len(loader):,} steps per epoch of {cfg.train.global_batch_size} images "
                      f"({world} process{'es' if world > 1 else ''}){took}")
    return loader


def build_knn(cfg: Config, accelerator: Accelerator, workers: int) -> OnlineKnn | None:
    if not cfg.data.val or cfg.eval.knn_every < 0 or cfg.data.backend == "synthetic":
        return None
    return OnlineKnn(cfg.data.knn_train or cfg.data.train, cfg.data.val, eval_view(cfg), cfg.eval.batch_size,
                     accelerator, workers, cfg.eval.knn_k, cfg.eval.knn_temperature, cfg.eval.loader,
                     progress=cfg.train.progress, data=cfg.data)


def open_records(cfg: Config, run_dir: Path, parts: StepParts, resume: bool, warned: dict, step: int,
                 command: list[str] | None = None) -> RunLog:
    """Check the disk has room for a checkpoint, write config.json and run_info.json and open the
    logs (main process; a failure stops every process). Called once a resume has loaded its
    checkpoint and results: a resume refused for a damaged file leaves the run's record as it was.
    A fresh start keeps no log rows: a run directory without a checkpoint may hold the logs of an
    attempt killed before its first checkpoint, whose steps are about to be run again."""
    accelerator = parts.accelerator
    with failing_together(accelerator):
        if accelerator.is_main_process:
            check_room_for_a_save(cfg, run_dir, parts)  # a full disk stops the run now, not an epoch later
            info = run_info(cfg, run_dir, accelerator, resume, warned, command)  # a damaged record stops here
            write_run_json(run_dir / "config.json", to_dict(cfg))
            write_run_json(run_dir / "run_info.json", info)
        return RunLog(run_dir, accelerator.is_main_process, resume_step=step if resume else 0)


def backbone_path(cfg: Config, run_dir: Path) -> Path:
    """The exported backbone, beside each checkpoint (`tools/eval_*.py` read it)."""
    return run_dir / f"backbone_{cfg.model.arch}.pth"


def exported_backbone(cfg: Config, parts: StepParts) -> torch.nn.Module:
    """The backbone the run exports and its k-NN scores (`model.export`): the EMA teacher's, or the student's."""
    return parts.teacher.backbone if cfg.model.export == "teacher" else unwrap(parts.student).backbone


def check_room_for_a_save(cfg: Config, run_dir: Path, parts: StepParts) -> None:
    """Refuse to start on a disk without room for one save: the weights, the optimiser's momentum
    (as large; SGD keeps none at momentum 0, LARS always does), the teacher, the critic's key
    queue and the backbone export."""
    student, critic = unwrap(parts.student).state_dict(), parts.objective.state
    momentum = student if cfg.optim.name == "lars" or cfg.optim.momentum > 0 else {}
    checkpoint = {"student": student, "momentum": momentum, "teacher": parts.teacher.state_dict(),
                  "critic": critic.state_dict() if critic is not None else None}
    exported = exported_backbone(cfg, parts).state_dict()
    ckpt.check_room_at_start(run_dir, checkpoint, backbone_path(cfg, run_dir), exported)


def save(cfg: Config, run_dir: Path, parts: StepParts, state: ckpt.TrainState,
         guard: DivergenceGuard | None = None, loader: ShardedLoader | None = None) -> None:
    """Checkpoint and backbone, only of finite weights; a failure on any process fails all of them.

    A loader with `state_dict` (DALI) adds its mid-epoch state, so a resume draws the same augmentations."""
    accelerator, teacher = parts.accelerator, parts.teacher
    if guard is not None:  # every process decides together (buffers may differ between them)
        guard.check_weights(state.step)
    accelerator.wait_for_everyone()
    with failing_together(accelerator):  # whatever failed on one process, all of them stop together
        try:
            exports = ({backbone_path(cfg, run_dir): ckpt.backbone_state(exported_backbone(cfg, parts))}
                       if accelerator.is_main_process else None)
            ckpt.save_checkpoint(run_dir, student=unwrap(parts.student), teacher=teacher, optimizer=parts.optimizer,
                                 critic=parts.objective.state,
                                 scaler=accelerator.scaler, state=state, config=to_dict(cfg),
                                 rank=accelerator.process_index, is_main=accelerator.is_main_process,
                                 world_size=accelerator.num_processes, exports=exports,
                                 loader_state=loader.state_dict() if hasattr(loader, "state_dict") else None)
        except ckpt.CheckpointError:
            raise
        except Exception as err:  # noqa: BLE001 - a user error (full disk) or not, the command line prints one line
            raise (ckpt.write_error(run_dir, err) if isinstance(err, OSError) else ckpt.CheckpointError(
                f"writing the checkpoint in {run_dir} failed: {type(err).__name__}: {err}")) from err
    accelerator.wait_for_everyone()


def finish(run_dir: Path, accelerator: Accelerator, results: dict) -> None:
    """results.json, written by the main process; every process raises when it could not."""
    with failing_together(accelerator):
        if accelerator.is_main_process:
            write_run_json(run_dir / "results.json", results)

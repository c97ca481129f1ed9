"""The run directory: its name, the checks that keep a start or a resume from harming the run
in it, and its record of machines and recipe (run_info.json).

A fresh start never overwrites another run; a resume continues only the computation it started:
`refuse_harmful_start` and `resume_changes` are the rules both trainers (self-supervised and
distillation) apply, each with its own weight files and its own fields that a resume may change.
"""

from __future__ import annotations

import json
import shlex
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fastssl import checkpoint as ckpt
from fastssl.agreement import check_run_dir_shared
from fastssl.config import Config, ConfigError, TrainConfig, to_dict
from fastssl.recovery import latest_run_hint
from fastssl.relaunch import rerun_command
from fastssl.runtime import failing_together

if TYPE_CHECKING:
    from accelerate import Accelerator

# Fields that may differ when resuming (they do not change what is computed). train.run_dir among
# them: the run is the one found there, under whatever spelling (a trailing slash, a relative path)
# and wherever it was moved or restored to.
RESUMABLE_CHANGES = {"data.train", "data.val", "data.knn_train", "data.num_workers", "data.dali_hw_decoder_load",
                     "data.ffcv_os_cache", "train.progress", "train.log_every", "train.compile",
                     "train.cudnn_benchmark", "train.run_dir", "eval.batch_size", "eval.loader"}
# Fields a resume may change with a warning: the run continues, but no longer as an uninterrupted one
# would. They are how a diverged run continues from its last good checkpoint.
RESUMABLE_WITH_WARNING = {"optim.base_lr", "train.precision"}

RUN_DIR_TIME = "{time}"  # in train.run_dir: the run's start time, e.g. runs/demo/{time}
# The records both trainers write in a run directory; config.json first, before any other.
RUN_RECORDS = ("config.json", "run_info.json", "results.json", "train_log.csv", "epochs.csv")


def stamp_run_dir(train_cfg: TrainConfig, accelerator: Accelerator) -> str:
    """`train.run_dir` with RUN_DIR_TIME replaced by rank 0's clock, the same on every process
    (each process's own clock could straddle a second), written back into the config."""
    if RUN_DIR_TIME in train_cfg.run_dir:
        stamp = [time.strftime("%Y%m%d-%H%M%S")]
        if accelerator.num_processes > 1:
            from accelerate.utils import broadcast_object_list

            stamp = broadcast_object_list(stamp)
        train_cfg.run_dir = train_cfg.run_dir.replace(RUN_DIR_TIME, stamp[0])
    return train_cfg.run_dir


def create_run_dir(run_dir: Path, accelerator: Accelerator) -> None:
    """Create the run directory (once `check_run_dir` passed and the data was found: a refused
    start leaves no empty directory) and check that every process sees it."""
    with failing_together(accelerator):
        if accelerator.is_main_process:  # an unwritable place fails here, before the networks are built
            with ckpt.writing(run_dir):
                run_dir.mkdir(parents=True, exist_ok=True)
    check_run_dir_shared(run_dir, accelerator)


def check_run_dir(cfg: Config, run_dir: Path, resume: bool, accelerator: Accelerator, command: list[str] | None,
                  auto: bool = False) -> dict:
    """Refuse to overwrite another run, a resume without a checkpoint or one that changes what is
    computed (each process checks its own view of the directory; nothing is written).

    A fresh start is refused where an earlier run left its exported backbone without a checkpoint
    (deleted to save space): the first save would replace those weights. Not under `--resume auto`,
    whose job may have been killed between its first backbone and checkpoint writes, and starts over.

    A resume may change RESUMABLE_CHANGES freely and RESUMABLE_WITH_WARNING with a warning; those
    are returned as {field: [old, new]} for `open_records`, which writes the run's record later.
    """
    saved = ckpt.saved_config(run_dir)
    refuse_harmful_start(run_dir, saved is not None, resume, command, weights_may_predate_checkpoint=auto,
                         foreign=foreign_sections(saved, to_dict(Config())))
    if not resume:
        return {}
    return resume_changes(saved, to_dict(cfg), to_dict(Config()), RESUMABLE_CHANGES, RESUMABLE_WITH_WARNING, run_dir,
                          warn=accelerator.is_main_process)


def foreign_sections(saved: dict | None, own: dict) -> list[str]:
    """The sections of a run's saved config that this trainer's config (`own`) has not: a run of the
    other trainer (distillation vs self-supervised) when any. A section added since the run is not one."""
    return sorted(set(saved or {}) - set(own))


def refuse_harmful_start(run_dir: Path, has_checkpoint: bool, resume: bool, command: list[str] | None,
                         weight_patterns: tuple[str, ...] = ("backbone_*.pth",),
                         weights_may_predate_checkpoint: bool = False, foreign: list[str] = ()) -> None:
    """A ConfigError for a resume without a checkpoint, and for a fresh start over another run: its
    checkpoint, files named as a run's records that no trainer wrote (`records_of_no_run`), or the
    weights it exported (`weight_patterns`) without one. Those are a finished run
    whose checkpoint was deleted to save space, and the new run's first save would replace them;
    unless `weights_may_predate_checkpoint`: a trainer that exports weights before its first
    checkpoint, under `--resume auto`, may find them from its own killed start and starts over.
    Each message says how to go on (`command` is the one that was run; `foreign`: the saved config's
    sections this trainer lacks, a run this recipe cannot continue); nothing is written."""
    if resume and not has_checkpoint:
        raise ConfigError(f"--resume: {run_dir} holds no checkpoint to resume; start without --resume"
                          f"{latest_run_hint(run_dir, command)}")
    if not resume and has_checkpoint and foreign:
        raise ConfigError(f"{run_dir} already holds a run of another trainer (its saved config has the sections "
                          f"{', '.join(foreign)}): continue it with the recipe that started it (run_info.json names "
                          f"it) or choose another --train.run_dir (nothing was overwritten)")
    if not resume and has_checkpoint:
        raise ConfigError(f"{run_dir} already holds a run; continue it with: {rerun_command(command, run_dir)} "
                          f"or choose another --train.run_dir (nothing was overwritten)")
    others = [] if resume else records_of_no_run(run_dir)
    if others:
        raise ConfigError(f"{run_dir} holds {', '.join(others)}, not a fastssl run's (no trainer's config.json is "
                          f"there): a run there would replace them; move them away or choose another "
                          f"--train.run_dir (nothing was overwritten)")
    if not resume and not weights_may_predate_checkpoint:
        weights = ckpt.weights_without_checkpoint(run_dir, weight_patterns)
        if weights:
            raise ConfigError(f"{run_dir} holds {', '.join(weights)} of an earlier run (without its checkpoint): "
                              f"a new run there would replace them; move them away or choose another "
                              f"--train.run_dir (nothing was overwritten)")


def records_of_no_run(run_dir: Path) -> list[str]:
    """The files named as a run's records (RUN_RECORDS) in `run_dir` when its config.json is not a
    trainer's (a project folder's own config.json, another tool's logs): a fresh start would replace them.
    A start killed before its first checkpoint leaves a trainer's config.json, written before any other
    record, so its records are the new start's to replace."""
    present = [name for name in RUN_RECORDS if (run_dir / name).exists()]
    if not present:
        return []
    try:
        config = json.loads((run_dir / "config.json").read_text())
    except (OSError, ValueError):
        return present
    train = config.get("train") if isinstance(config, dict) else None
    return [] if isinstance(train, dict) and "run_dir" in train else present


def config_changes(old: dict, new: dict, default: dict) -> set[str]:
    """Fields whose value differs; a field the saved run predates counts as its default value."""
    return {f"{s}.{k}" for s in new for k in new[s] if old.get(s, {}).get(k, default[s].get(k)) != new[s][k]}


def resume_changes(saved: dict, now: dict, default: dict, free: set[str], with_warning: set[str], run_dir: Path,
                   warn: bool = True) -> dict[str, list]:
    """What a resume changes in the run's config (`saved`), or a ConfigError naming every field it may not
    change, with both values (an `auto` may have resolved to another value on this machine).

    `free` fields change what the run reads or shows, not what it computes; `with_warning` fields change
    the computation in a way a user may want (how a diverged run goes on with a lower learning rate): they
    are printed as a warning (when `warn`) and returned as {field: [the run's, this command's]} for the
    run's record. A field the saved run predates counts as its `default`. A run of the other trainer
    (its config has sections this one lacks) is named as such, not as a list of every field."""
    foreign = foreign_sections(saved, default)
    if foreign:
        raise ConfigError(f"--resume: {run_dir} holds a run of another trainer (its saved config has the sections "
                          f"{', '.join(foreign)}, which this recipe's config has not); resume it with the recipe "
                          f"that started it (run_info.json names it), or pass another --train.run_dir")
    changes = config_changes(saved, now, default) - free
    values = {name: [saved.get(section, {}).get(field, default[section][field]), now[section][field]]
              for name in changes for section, field in [name.split(".")]}
    refused = sorted(changes - with_warning)
    if refused:
        raise ConfigError(f"--resume: these fields differ from the run being resumed in {run_dir}: "
                          + ", ".join(f"{n} ({values[n][0]!r} in the run, {values[n][1]!r} now)" for n in refused)
                          + "; resume with the run's values (" + " ".join(flag_text(n, values[n][0]) for n in refused)
                          + ": drop your overrides of them, or pass them where a default changed since the run) or "
                          "start a new --train.run_dir")
    for name in sorted(changes) if warn else ():
        print(f"warning: --resume with {name} changed from {values[name][0]!r} to {values[name][1]!r}: the "
              f"run continues with the new value, so it no longer matches an uninterrupted run", file=sys.stderr)
    return {name: values[name] for name in sorted(changes)}


def flag_text(name: str, value: Any) -> str:
    """`--name value` as a command line sets it (tuples comma-separated, booleans true / false), quoted for a shell."""
    if isinstance(value, bool):
        text = "true" if value else "false"
    elif isinstance(value, (list, tuple)):
        text = ",".join(str(v) for v in value)
    else:
        text = str(value)
    return f"--{name} {shlex.quote(text)}"


def finished_run(run_dir: Path, epochs: int, step: int) -> str:
    """What a resume of a run that has done its `epochs` says (a requeue after the end, a repeated
    command): it trains nothing, and the run's files keep their content."""
    plural = "s" if epochs != 1 else ""
    return f"the run in {run_dir} has finished its {epochs} epoch{plural} (step {step}): nothing to do"


def run_info(cfg: Config, run_dir: Path, accelerator: Accelerator, resume: bool, changed: dict | None = None,
             command: list[str] | None = None) -> dict:
    """run_info.json's content: the machine, software and recipe of the run, for `tools/report.py`.
    The recipe is named by the script the command ran (`command[1]`), else by the run directory.

    A resumed run keeps the first record and adds the machine it resumed on (and the fields
    it changed, as [old, new]). A damaged record is a CheckpointError, not a record started over.
    """
    from fastssl.reports.environment import describe_environment, describe_recipe

    path = run_dir / "run_info.json"
    now = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    env = describe_environment(accelerator.device)
    if resume and path.exists():
        info = ckpt.read_json_record(path, "the run's record (machines, software, recipe) for tools/report.py")
        entry = {"date": now, "environment": env, "processes": accelerator.num_processes,
                 **({"changed": changed} if changed else {})}
        info.setdefault("resumed", []).append(entry)
    else:
        dtype = {"bf16": "bf16", "fp16": "fp16"}.get(accelerator.mixed_precision, "fp32")
        name = Path(command[1]).stem if command and len(command) > 1 else run_dir.name
        info = {"date": now, "environment": env,
                "recipe": describe_recipe(cfg, name, dtype, accelerator.num_processes)}
    info["cwd"] = str(Path.cwd())  # config.json's relative data paths are relative to it (tools/eval_*.py)
    return info

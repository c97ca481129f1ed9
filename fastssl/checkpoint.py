"""Resumable checkpoints and the exported backbone, written atomically.

A checkpoint holds everything a resumed run needs to continue the SAME run: student,
teacher (EMA), optimiser, grad scaler, the step/epoch counters (all schedules are
functions of the step), each rank's RNG state and the position inside the epoch (the
data order is a function of seed and epoch, so the loader skips what was consumed).

Every file is written to `<name>.tmp` and renamed, after checking the disk has room for
it: a full disk or a kill never leaves half a file, never costs the previous checkpoint,
and never leaves a checkpoint-sized temporary file that keeps the disk full.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import pickle
import random
import shutil
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from fastssl.relaunch import CHECKPOINT_NAME

if TYPE_CHECKING:
    from pipelines.sampler import ShardedLoader

# Free space asked for on top of the payload's tensor bytes: pickled metadata, zip records
# and their 64-byte alignment (a few KiB per tensor), and a little room for everything else.
SPACE_MARGIN_BYTES = 16 * 2**20
SPACE_MARGIN_SHARE = 0.05
MIB = 2**20


class CheckpointError(RuntimeError):
    """A checkpoint could not be written or read; the message names the file, the cause and the fix."""


@dataclass
class TrainState:
    """Where the run is: epoch, global optimiser step, batches done in this epoch.

    The loss of an epoch interrupted mid-way is carried as (sum, steps) so that the
    resumed run reports the same epoch loss as an uninterrupted one.
    """

    epoch: int = 0
    step: int = 0
    batch_in_epoch: int = 0
    epoch_loss_sum: float = 0.0
    epoch_loss_steps: int = 0
    initial_weight_norm: float = 0.0  # the divergence guard's reference (0: not measured yet)
    epoch_sums: dict[str, float] = field(default_factory=dict)  # other running sums (the distillation loss terms)


def tensor_bytes(obj: object) -> int:
    """Bytes of every tensor / array inside nested dicts, lists and tuples (what torch.save writes)."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, np.ndarray):
        return obj.nbytes
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    return 0


def bytes_needed(obj: object, path: Path) -> int:
    """What writing `obj` to `path` will take: its tensors plus a margin, and never less than the
    file it replaces (the old file stays until the rename, so both must fit at once)."""
    estimate = int(tensor_bytes(obj) * (1 + SPACE_MARGIN_SHARE)) + SPACE_MARGIN_BYTES
    return max(estimate, path.stat().st_size if path.is_file() else 0)


def check_free_space(folder: Path, needed: int, what: str) -> None:
    """Refuse before writing when `folder`'s disk has less than `needed` bytes free."""
    free = shutil.disk_usage(folder).free
    if free < needed:
        raise CheckpointError(
            f"not enough free space to save {what} in {folder}: it needs about {needed / MIB:,.0f} MiB and the disk "
            f"has {free / MIB:,.0f} MiB free (disk full), so it stopped before writing; what {folder} held is kept. "
            f"Free space on that disk (e.g. delete old runs) or move the run directory to a larger disk")


def check_room_at_start(run_dir: Path, checkpoint: dict, export: Path, exported: object) -> None:
    """Refuse to start a run on a disk without room for one save, before any record is written: the
    tensors a checkpoint holds (`checkpoint`) and the weights exported beside it (`exported`, at `export`)."""
    needed = bytes_needed(checkpoint, run_dir / CHECKPOINT_NAME) + bytes_needed(exported, export)
    check_free_space(run_dir, needed, f"a checkpoint and {export.name}")


def _reason(err: BaseException) -> str:
    """The exception's type and first sentence (PyTorch's reader errors run on for lines)."""
    text = str(err).strip().splitlines()[0] if str(err).strip() else ""
    return f"{type(err).__name__}: {text.split('. ')[0][:160]}"


def out_of_room(err: BaseException) -> bool:
    """Whether a write failed for want of room: ENOSPC/EDQUOT, by errno or by the words of a writer that
    kept only the message."""
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
        return True
    return "No space left" in str(err) or "Disk quota" in str(err)


def _is_disk_full(err: BaseException, folder: Path, needed: int) -> bool:
    """`out_of_room`, or PyTorch's zip writer failing ("unexpected pos ...") on a disk now short of room."""
    if out_of_room(err):
        return True
    try:
        return shutil.disk_usage(folder).free < needed
    except OSError:
        return False


# Why writing a file or folder failed, by errno, and what fixes it ({folder}: the folder of the file).
DISK_FULL_FIX = "free space on that disk (e.g. delete old runs) or move the run directory to a larger disk"
WRITE_CAUSES = {
    errno.ENOSPC: ("the disk is full", DISK_FULL_FIX),
    getattr(errno, "EDQUOT", errno.ENOSPC): ("the disk quota is used up", DISK_FULL_FIX),
    errno.EROFS: ("the file system is read-only", "choose a --train.run_dir on a writable disk"),
    errno.EACCES: ("permission denied", "make {folder} writable for this user or choose another --train.run_dir"),
    errno.EPERM: ("permission denied", "make {folder} writable for this user or choose another --train.run_dir"),
    errno.EISDIR: ("a folder stands where this file should be", "move that folder away"),
}


def write_error(path: Path, err: OSError) -> CheckpointError:
    """An OSError from writing a run's file or folder as one line: what, why, how to fix it. The
    path is the one the system names (`err.filename`) when it names one."""
    target = Path(err.filename) if isinstance(err.filename, str) else Path(path)
    if err.errno in (errno.ENOTDIR, errno.EEXIST):  # name the file in the way: the target or a parent
        blocker = next((p for p in [target, *target.parents] if p.is_file()), target)
        return CheckpointError(f"could not write {target}: {blocker} is a file where a folder should be; "
                               f"move it away or choose another --train.run_dir")
    cause, fix = WRITE_CAUSES.get(err.errno, (f"{type(err).__name__}: {err.strerror or err}",
                                              "check that disk and the permissions of {folder}"))
    return CheckpointError(f"could not write {target}: {cause}; {fix.format(folder=target.parent)}")


@contextlib.contextmanager
def writing(path: Path) -> Iterator[None]:
    """Writes under `path` (a run's log, results or folder) that fail with an OSError raise
    `write_error` instead: the trainers' command lines print a CheckpointError as one line."""
    try:
        yield
    except OSError as err:
        raise write_error(path, err) from err


def atomic_save(obj: object, path: Path) -> None:
    """torch.save to a temporary file, then rename: a kill or a full disk never leaves half a file.

    The free space is checked first; a failed write removes its temporary file (so the disk is
    not left full) and keeps the file it would have replaced.
    """
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.unlink(missing_ok=True)  # a killed earlier save's leftover: it only takes room
    needed = bytes_needed(obj, path)
    check_free_space(path.parent, needed, path.name)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except BaseException as err:
        tmp.unlink(missing_ok=True)
        if not isinstance(err, (OSError, RuntimeError)):
            raise
        kept = "the previous file is kept" if path.exists() else "no earlier file existed"
        if _is_disk_full(err, path.parent, needed):
            cause, fix = (f"the disk is full (it needs about {needed / MIB:,.0f} MiB free, "
                          f"{shutil.disk_usage(path.parent).free / MIB:,.0f} MiB are)"), DISK_FULL_FIX
        else:
            cause, fix = WRITE_CAUSES.get(getattr(err, "errno", None),
                                          ("the disk may be full, read-only or out of quota", DISK_FULL_FIX))
        fix = fix.format(folder=path.parent)
        raise CheckpointError(f"could not write {path}: {cause} ({_reason(err)}); "
                              f"the partial file was removed and {kept}. {fix[0].upper()}{fix[1:]}") from err


def rng_state() -> dict:
    """This process's random generators: Python's, numpy's, torch's CPU one and its own GPU's (not
    every visible GPU's: a process draws on one, and a resume may see fewer)."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()  # the current device: Accelerate set it to this process's
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available():
        if isinstance(cuda, (list, tuple)):  # a file from before: every visible GPU's, this one's by index
            index = torch.cuda.current_device()
            if index >= len(cuda):
                return
            cuda = cuda[index]
        torch.cuda.set_rng_state(cuda)


def rank_state_path(run_dir: Path, rank: int) -> Path:
    """Where process `rank` keeps its random generators and its loader's position."""
    return run_dir / "rng" / f"rank{rank}.pt"


def save_checkpoint(run_dir: Path, *, student: nn.Module, teacher: nn.Module, optimizer: torch.optim.Optimizer,
                    scaler: torch.amp.GradScaler | None, state: TrainState, config: dict, rank: int, is_main: bool,
                    critic: nn.Module | None = None, exports: dict[Path, object] | None = None,
                    loader_state: dict | None = None, world_size: int = 1) -> None:
    """Every rank writes its RNG state (and its loader's, `loader_state`: where DALI's random
    generators stand mid-epoch); the main process writes the shared state and `exports` (files
    that go with this step, e.g. the backbone: {path: object}).

    The main process first removes the temporary files a killed save left in the run directory,
    then checks that the exports, the checkpoint and its RNG file all fit, so a full disk fails
    before any file changes. The exports are written before the checkpoint, so a kill in between
    leaves them one step ahead of it (the resume redoes that step and writes them again), never
    behind it. The checkpoint is written before the RNG file: a failed checkpoint leaves both old
    ones. Each rank's file carries the step and the process count it was written at, so a resume
    uses it only with the checkpoint of that step, on as many processes (`load_checkpoint`).
    """
    exports = exports or {}
    rng_path = rank_state_path(run_dir, rank)
    rng_path.parent.mkdir(parents=True, exist_ok=True)
    rng = {**rng_state(), "step": state.step, "world_size": world_size}
    if loader_state is not None:
        rng["loader"] = loader_state
    if is_main:
        payload = {
            "student": student.state_dict(),
            "teacher": teacher.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scaler": scaler.state_dict() if scaler is not None else None,
            "state": asdict(state),
            "config": config,
            "critic": critic.state_dict() if critic is not None else None,  # the key queue
        }
        path = run_dir / CHECKPOINT_NAME
        for leftover in [*run_dir.glob("*.tmp"), rng_path.with_name(rng_path.name + ".tmp")]:
            leftover.unlink(missing_ok=True)  # the main process's own: no other process writes there
        check_free_space(run_dir, bytes_needed(payload, path) + bytes_needed(rng, rng_path)
                         + sum(bytes_needed(obj, p) for p, obj in exports.items()),
                         ", ".join([*(p.name for p in exports), CHECKPOINT_NAME, str(rng_path.relative_to(run_dir))]))
        for export_path, obj in exports.items():
            atomic_save(obj, export_path)
        atomic_save(payload, path)
        for stale in rng_path.parent.glob("rank*.pt"):  # of a run that had more processes (tidying only:
            number = stale.stem[len("rank"):]  # their stamps already keep a resume from using them)
            if number.isdigit() and int(number) >= world_size:
                with contextlib.suppress(OSError):
                    stale.unlink()
    atomic_save(rng, rng_path)


def _unreadable(path: Path, err: BaseException) -> CheckpointError:
    if isinstance(err, PermissionError):
        return CheckpointError(f"cannot read {path}: permission denied; run as the user who owns the run directory "
                               f"or fix the file's permissions")
    return CheckpointError(
        f"{path} is corrupt or truncated and cannot be read ({_reason(err)}); "
        f"it was probably cut short by a full disk or a crash. The state it held is lost: restore the file from a "
        f"backup, or start a new run with another --train.run_dir (or delete {path.name} to start this one afresh)")


def _foreign(path: Path, lacks: str) -> CheckpointError:
    """A readable torch file in the checkpoint's place that is not a fastssl training checkpoint."""
    return CheckpointError(
        f"{path} can be read but is not a training checkpoint of these recipes (it has no {lacks}: an exported "
        f"backbone, another trainer's checkpoint?); point --train.run_dir at the run it belongs to, or move "
        f"{path.name} out of {path.parent} to start this run afresh")


def _load(path: Path, mmap: bool = False) -> Any:
    """`path`'s object; `mmap`: tensors are mapped, not read, so only what is used is read from disk
    (where mapping fails, e.g. on a mount that cannot map files, it is read whole instead)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=False, mmap=mmap)
    except (OSError, RuntimeError, EOFError, ValueError, KeyError, AttributeError, ImportError,
            pickle.UnpicklingError) as err:  # torch's zip reader raises RuntimeError on a cut file
        if mmap:
            return _load(path)
        raise _unreadable(path, err) from err


def load_checkpoint(run_dir: Path, *, student: nn.Module, teacher: nn.Module, optimizer: torch.optim.Optimizer,
                    scaler: torch.amp.GradScaler | None, rank: int, critic: nn.Module | None = None,
                    loader: ShardedLoader | None = None, world_size: int = 1) -> tuple[TrainState, str | None]:
    """Restore everything `save_checkpoint` wrote (a loader's state into `loader`); returns where to
    continue, and why this process's own state (random generators, loader position) was not restored
    (None when it was): it belongs to another step (a save that failed part way) or to a run on
    another number of processes. The run then goes on from its fresh seeds: the same data order
    (it does not depend on the process count, except where FFCV deals the images to processes:
    `--data.ffcv_order random/sequential`), other augmentations than an uninterrupted run's."""
    path = run_dir / CHECKPOINT_NAME
    if not path.is_file():
        raise FileNotFoundError(f"--resume: no checkpoint at {path}; start the run without --resume "
                                f"or point --train.run_dir at the run to continue")
    ckpt = _load(path)
    if not isinstance(ckpt, dict) or not {"student", "teacher", "optimizer", "state"} <= ckpt.keys():
        raise _foreign(path, "student, teacher, optimizer and state")
    student.load_state_dict(ckpt["student"])
    teacher.load_state_dict(ckpt["teacher"])
    optimizer.load_state_dict(ckpt["optimizer"])
    if critic is not None and ckpt.get("critic") is not None:
        critic.load_state_dict(ckpt["critic"])
    if scaler is not None and ckpt.get("scaler") is not None:
        scaler.load_state_dict(ckpt["scaler"])
    state = TrainState(**ckpt["state"])
    rng_path = rank_state_path(run_dir, rank)
    if not rng_path.is_file():
        return state, f"{rng_path.relative_to(run_dir)} does not exist"
    try:
        rng = _load(rng_path)
    except CheckpointError as err:  # cut short by a crash: only this process's generators and position are lost
        why = _reason(err.__cause__) if err.__cause__ is not None else str(err)
        return state, f"{rng_path.relative_to(run_dir)} cannot be read ({why})"
    if not isinstance(rng, dict):
        return state, f"{rng_path.relative_to(run_dir)} holds no random generator states"
    written = (rng.get("step", state.step), rng.get("world_size", world_size))  # files from before had neither
    if written != (state.step, world_size):
        return state, (f"{rng_path.relative_to(run_dir)} was written at step {written[0]} by {written[1]} "
                       f"process(es); the checkpoint is of step {state.step}, resumed on {world_size}")
    set_rng_state(rng)
    if loader is not None and hasattr(loader, "load_state_dict"):
        loader.load_state_dict(rng.get("loader"))
    return state, None


def resolve_resume(resume: bool | str, run_dir: Path) -> bool:
    """`--resume auto` means: continue when `run_dir` holds a checkpoint, start afresh when it does not,
    so one command serves a job's first start and every requeue (tools/slurm/). Every process decides
    before the run starts, i.e. before any of them can write this run's first checkpoint."""
    if resume == "auto":
        return (Path(run_dir) / CHECKPOINT_NAME).is_file()
    if not isinstance(resume, bool):
        raise ValueError(f"resume must be True, False or 'auto', not {resume!r}")
    return resume


def weights_without_checkpoint(run_dir: Path, patterns: tuple[str, ...] = ("backbone_*.pth",)) -> list[str]:
    """The names of weight files an earlier run exported in `run_dir` (`patterns`) when it holds no
    checkpoint: a finished run whose checkpoint was deleted to save space. A fresh start there
    would replace them at its first save, so the trainers refuse it."""
    run_dir = Path(run_dir)
    if (run_dir / CHECKPOINT_NAME).is_file() or not run_dir.is_dir():
        return []
    return sorted({p.name for pattern in patterns for p in run_dir.glob(pattern) if p.is_file()})


def saved_config(run_dir: Path) -> dict | None:
    """The config stored in the run's checkpoint; None when there is no checkpoint. The weights
    and optimizer state are mapped, not read (hundreds of MB per process, read again to resume)."""
    path = run_dir / CHECKPOINT_NAME
    if not path.is_file():
        return None
    ckpt = _load(path, mmap=True)
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("config"), dict):
        raise _foreign(path, "config")
    return ckpt["config"]


def read_results(run_dir: Path) -> dict:
    """results.json of the run being resumed (its evaluation history so far), {} when there is none."""
    path = Path(run_dir) / "results.json"
    return read_json_record(path, "the run's evaluation history") if path.exists() else {}


def read_json_record(path: Path, holds: str, without: str = "resume without it") -> dict:
    """A run's JSON record (results.json, run_info.json, an evaluation's report). A damaged file is a
    CheckpointError naming it and what it `holds`, rather than a record silently started over;
    `without` ends the fix ("delete it to ...")."""
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{path} cannot be read ({type(err).__name__}: {err}); it holds {holds}: restore it, "
                              f"or delete it to {without}") from None
    if not isinstance(record, dict):
        raise CheckpointError(f"{path} holds no JSON object; it should hold {holds}: restore it, or delete it to "
                              f"{without}")
    return record


def backbone_state(backbone: torch.nn.Module) -> dict:
    """The encoder's weights with torchvision's keys, on the CPU."""
    return {k: v.detach().cpu().clone() for k, v in backbone.state_dict().items()}


def export_backbone(backbone: torch.nn.Module, path: Path) -> None:
    """The encoder's weights with torchvision's keys (loads into resnet50() but for fc.*)."""
    atomic_save(backbone_state(backbone), path)

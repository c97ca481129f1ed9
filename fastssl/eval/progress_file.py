"""An unfinished evaluation's progress, kept beside its report so that a stopped one goes on where it was.

Why: the long evaluations outlast many SLURM time limits. MIRA's linear protocol runs the frozen
backbone over the training set once per epoch, 100 times (hours on ImageNet, on one GPU); the
semi-supervised fine-tuning trains the whole network for 20 epochs; the transfer table fits a
penalty grid on each of 11 datasets. After every epoch (the probe, the fine-tuning) or dataset
(the table) the tool saves what it needs to go on, atomically, in `.<report name>.partial.pt`
beside its report; the same command finds it and goes on, ending with what an uninterrupted run
reports. A fingerprint (the settings, the weights, the data) guards it: anything else starts
over, saying so, as does `--restart`. The file goes once the report is written.
"""

from __future__ import annotations

import hashlib
import json
import sys
from collections.abc import Callable, Iterable
from typing import NoReturn
from pathlib import Path

import torch

from fastssl.checkpoint import CheckpointError, atomic_save

__all__ = ["state_path", "weights_digest", "fingerprint", "load_state", "save_state", "forget_state", "interrupted",
           "epoch_state", "restore_epoch_state"]

FORMAT = "fastssl-eval-progress/1"


def state_path(report: Path) -> Path:
    """Where the tool that writes `report` keeps its progress: a hidden file beside it."""
    return report.with_name(f".{report.name}.partial.pt")


def weights_digest(module: torch.nn.Module) -> str:
    """A hash of every tensor of `module`'s state: progress is resumed on the same weights only."""
    digest = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def fingerprint(settings: dict, items: Iterable[tuple[str, object]] = ()) -> str:
    """What an evaluation computes: its settings (JSON-able) and an ordered list of (path, label)
    items (a training list). Saved progress continues only under the same fingerprint."""
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode())
    for path, label in items:
        digest.update(f"{path}\0{label}\n".encode())
    return digest.hexdigest()


def epoch_state(epochs_done: int, module: torch.nn.Module, optimizer: torch.optim.Optimizer,
                order: torch.Generator, losses: list[float]) -> dict:
    """What a training evaluation (the probe, the fine-tuning) needs to go on after an epoch."""
    return {"epoch": epochs_done, "module": module.state_dict(), "optimizer": optimizer.state_dict(),
            "order": order.get_state(), "losses": list(losses)}


def restore_epoch_state(state: dict, module: torch.nn.Module, optimizer: torch.optim.Optimizer,
                        order: torch.Generator) -> tuple[list[float], int]:
    """Put an `epoch_state` back; returns the losses so far and the first epoch left to run."""
    module.load_state_dict(state["module"])
    optimizer.load_state_dict(state["optimizer"])
    order.set_state(state["order"])
    return list(state["losses"]), state["epoch"]


def load_state(path: Path, expected: str, restart: bool, what: str, done: Callable[[dict], str]) -> dict | None:
    """The saved progress at `path` when it is this evaluation's (same fingerprint), else None;
    says on stderr what it found and did with it. `what` names the evaluation ("the linear
    probe"); `done(state)` says how far the saved one got ("3 epochs done")."""
    if not path.exists():
        return None
    if restart:
        print(f"--restart: starting over; {path} (an unfinished run of {what}) will be replaced", file=sys.stderr)
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(state, dict) or state.get("format") != FORMAT:
            raise ValueError(f"not a {FORMAT} file")
    except Exception as err:  # noqa: BLE001 - an unreadable file only loses a head start
        why = err.strerror if isinstance(err, OSError) and err.strerror else "not a progress file this tool wrote"
        print(f"starting over: {path} cannot be read ({why}); it will be replaced", file=sys.stderr)
        return None
    if state.get("fingerprint") != expected:
        print(f"starting over: {path} is an unfinished run of {what} with other settings, weights or data; "
              "it will be replaced", file=sys.stderr)
        return None
    print(f"resuming {what} from {path}: {done(state)}", file=sys.stderr)
    return state


def save_state(path: Path, state: dict, expected: str) -> bool:
    """Write the progress (atomically), its folder made when missing (a --json into a new folder, which
    the report makes too); False, with one line on stderr, when it cannot be written (a full disk):
    the evaluation goes on, only its head start is not renewed."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_save({**state, "format": FORMAT, "fingerprint": expected}, path)
    except (CheckpointError, OSError) as err:
        print(f"warning: the progress was not saved: {err}", file=sys.stderr)
        return False
    return True


def forget_state(path: Path) -> None:
    """The report is written: the progress is no longer needed (one that cannot be removed, e.g. a
    folder of that name, is left with a line saying so: the report stands)."""
    try:
        path.unlink(missing_ok=True)
    except OSError as err:
        print(f"warning: {path} could not be removed ({err.strerror or err}); the report is written", file=sys.stderr)


def interrupted(path: Path, kept: str, err: KeyboardInterrupt) -> NoReturn:
    """After a Ctrl-C, SIGTERM or SIGHUP (`err`, see `fastssl.cli.stop_signals_interrupt`): one line
    saying whether progress (`kept`: "the epochs done") is kept at `path` for the same command to go
    on from, instead of a traceback; the shell's exit status for the signal (Ctrl-C: 130)."""
    from fastssl.cli import interrupt_exit_status, interrupted_by

    print(f"{interrupted_by(err)}; " + (f"{kept} are kept in {path}: the same command goes on from there"
                                         if path.exists() else "nothing was done yet: nothing is kept"),
          file=sys.stderr)
    raise SystemExit(interrupt_exit_status(err))

"""An unfinished linear probe, kept beside its report so that a stopped one goes on from its last epoch.

Why: MIRA's protocol (fresh crops every epoch) runs the frozen backbone over the training set
once per epoch, 100 times: on ImageNet, hours on one GPU, longer than many SLURM time limits.
After every epoch the probe saves what its next epoch needs (the head, the optimiser, the
data-order generator, the losses so far: a few MB) in `.<report name>.partial.pt` beside its
report, atomically; the same command finds it and goes on with the next epoch, ending with the
head and figures of an uninterrupted run. Other settings or another training list start over
(saying so), as does `--restart`; the file goes once the report is written.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import torch

from fastssl.checkpoint import CheckpointError, atomic_save

__all__ = ["state_path", "fingerprint", "load_state", "save_state", "forget_state"]

FORMAT = "fastssl-linear-probe/1"


def state_path(report: Path) -> Path:
    """Where the probe that writes `report` keeps its progress: a hidden file beside it."""
    return report.with_name(f".{report.name}.partial.pt")


def fingerprint(settings: dict, samples: list[tuple[str, int]]) -> str:
    """What a probe computes: its settings (target, protocol, epochs, batch, lr, seed, feature
    source...) and the ordered training list. A saved probe continues only under the same one."""
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode())
    for path, label in samples:
        digest.update(f"{path}\0{label}\n".encode())
    return digest.hexdigest()


def load_state(path: Path, expected: str, restart: bool) -> dict | None:
    """The saved progress at `path` when it is this probe's (same fingerprint), else None; says on
    stderr what it found and did with it."""
    if not path.exists():
        return None
    if restart:
        print(f"--restart: starting over; {path} (an unfinished probe) will be replaced", file=sys.stderr)
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        if state.get("format") != FORMAT:
            raise ValueError(f"not a {FORMAT} file")
    except Exception as err:  # noqa: BLE001 - any unreadable file is only a lost head start
        print(f"starting over: {path} cannot be read ({type(err).__name__}: {str(err)[:120]}); it will be replaced",
              file=sys.stderr)
        return None
    if state.get("fingerprint") != expected:
        print(f"starting over: {path} is an unfinished probe with other settings or training images; "
              "it will be replaced", file=sys.stderr)
        return None
    print(f"resuming the linear probe from {path}: {state['epoch']} epochs done", file=sys.stderr)
    return state


def save_state(path: Path, state: dict, expected: str) -> bool:
    """Write the progress after an epoch (atomically); False, with one line on stderr, when it
    cannot be written (a full disk): the probe goes on, only its head start is not renewed."""
    try:
        atomic_save({**state, "format": FORMAT, "fingerprint": expected}, path)
    except CheckpointError as err:
        print(f"warning: the probe's progress was not saved: {err}", file=sys.stderr)
        return False
    return True


def forget_state(path: Path) -> None:
    """The probe's report is written: its progress is no longer needed."""
    path.unlink(missing_ok=True)

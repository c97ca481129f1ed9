"""Resumable checkpoints and the exported backbone, written atomically.

A checkpoint holds everything a resumed run needs to continue the SAME run: student,
teacher (EMA), optimiser, grad scaler, the step/epoch counters (all schedules are
functions of the step), each rank's RNG state and the position inside the epoch (the
data order is a function of seed and epoch, so the loader skips what was consumed).
"""

from __future__ import annotations

import os
import random
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

CHECKPOINT_NAME = "checkpoint.pt"


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


def atomic_save(obj, path: Path) -> None:
    """torch.save to a temporary file, then rename: a kill never leaves half a file."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(run_dir: Path, *, student, teacher, optimizer, scaler, state: TrainState, config: dict,
                    rank: int, is_main: bool, critic=None) -> None:
    """Every rank writes its RNG state; the main process writes the shared state."""
    rng_dir = run_dir / "rng"
    rng_dir.mkdir(parents=True, exist_ok=True)
    atomic_save(rng_state(), rng_dir / f"rank{rank}.pt")
    if is_main:
        atomic_save({
            "student": student.state_dict(),
            "teacher": teacher.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scaler": scaler.state_dict() if scaler is not None else None,
            "state": asdict(state),
            "config": config,
            "critic": critic.state_dict() if critic is not None else None,  # the key queue
        }, run_dir / CHECKPOINT_NAME)


def load_checkpoint(run_dir: Path, *, student, teacher, optimizer, scaler, rank: int, critic=None) -> TrainState:
    """Restore everything `save_checkpoint` wrote; returns where to continue."""
    path = run_dir / CHECKPOINT_NAME
    if not path.is_file():
        raise FileNotFoundError(f"--resume: no checkpoint at {path}; start the run without --resume "
                                f"or point --train.run_dir at the run to continue")
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    student.load_state_dict(ckpt["student"])
    teacher.load_state_dict(ckpt["teacher"])
    optimizer.load_state_dict(ckpt["optimizer"])
    if critic is not None and ckpt.get("critic") is not None:
        critic.load_state_dict(ckpt["critic"])
    if scaler is not None and ckpt.get("scaler") is not None:
        scaler.load_state_dict(ckpt["scaler"])
    rng_path = run_dir / "rng" / f"rank{rank}.pt"
    if rng_path.is_file():
        set_rng_state(torch.load(rng_path, weights_only=False))
    return TrainState(**ckpt["state"])


def saved_config(run_dir: Path) -> dict | None:
    path = run_dir / CHECKPOINT_NAME
    if not path.is_file():
        return None
    return torch.load(path, map_location="cpu", weights_only=False)["config"]


def export_backbone(backbone: torch.nn.Module, path: Path) -> None:
    """The encoder's weights with torchvision's keys (loads into resnet50() but for fc.*)."""
    state = {k: v.detach().cpu().clone() for k, v in backbone.state_dict().items()}
    atomic_save(state, path)

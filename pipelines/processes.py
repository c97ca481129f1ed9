"""Child processes: how one ended, in words, and how loader workers keep out of the trainer's
signals. Shared by everything that runs workers or checks in children."""

from __future__ import annotations

import os
import signal

__all__ = ["describe_exit", "leave_process_group"]


def describe_exit(code: int) -> str:
    """A process's exit code as a person reads it: "exit status 1", "killed by SIGKILL" (negative codes)."""
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit status {code}"


def leave_process_group(_worker_id: int | None = None) -> None:
    """A DataLoader worker's first step (its `worker_init_fn`): a process group of its own.

    Why: torchrun (`accelerate launch`) starts each trainer in its own process group and
    forwards a SIGTERM, SIGINT or SIGUSR1 to that whole group (`os.killpg`), as a terminal
    does with Ctrl-C. The trainer turns the signal into a checkpoint and a clean stop
    (`fastssl.runtime.GracefulStop`), but torch's workers die on a SIGTERM, and the trainer
    then fails with "DataLoader worker ... is killed by signal: Terminated" before it can
    save. Outside the group, the workers are stopped by the trainer's loader as it ends (and
    exit on their own if the trainer is killed outright: torch's workers watch their parent)."""
    os.setpgid(0, 0)

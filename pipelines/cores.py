"""How many CPU threads a process may use: its share of the cores this machine lets the job use, and
libraries kept from changing it.

Shared by the training loop (`--data.num_workers -1`) and the DALI loaders' threads, so that
the processes of one node (8 GPUs, 8 processes) divide its cores instead of each taking all of them.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["default_num_workers", "processes_on_this_machine", "torch_threads_kept", "usable_cores"]


def usable_cores() -> int:
    """The cores this process may run on: its CPU affinity, which a SLURM job, a container or `taskset`
    narrows to what the job was given (8 of a 128-core node), else the machine's count. Every default
    that counts cores counts these: a worker pool sized by the machine would oversubscribe the job's."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return os.cpu_count() or 1  # pragma: no cover - not Linux


def processes_on_this_machine(num_processes: int) -> int:
    """How many of the run's `num_processes` share this machine: the launcher's LOCAL_WORLD_SIZE
    (torchrun and `accelerate launch` set it on every node), else all of them (one machine)."""
    local = os.environ.get("LOCAL_WORLD_SIZE", "")
    return int(local) if local.isdigit() and int(local) > 0 else num_processes


def default_num_workers(requested: int, num_processes: int) -> int:
    """-1 means: share this machine's cores among its processes (of a run's `num_processes`
    in all: on 8 nodes of 8 GPUs, a node's cores go to its 8 processes, not to 64)."""
    if requested >= 0:
        return requested
    return max(1, usable_cores() // max(1, processes_on_this_machine(num_processes)))


@contextmanager
def torch_threads_kept() -> Iterator[None]:
    """Whatever runs inside leaves torch's intra-op thread count (process-wide) as it found it.

    Why: importing FFCV sets it to 1 (its `Compiler.set_num_threads(1)` at import), which would leave
    the trainer's CPU work, and every other backend's in the same process, on one thread."""
    import torch

    threads = torch.get_num_threads()
    try:
        yield
    finally:
        torch.set_num_threads(threads)

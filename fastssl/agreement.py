"""Every process of a run agrees before its first step, or none starts.

The same settings, the same data, the same step to resume from, and the same run directory: a
node whose copy of the data differs, whose command misses an override, or whose disk is its own
would otherwise shard the data differently, train a replica that drifts apart, or leave a
collective unmatched (a hang). Each check is one collective and fails on every process together,
said once per node.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from pipelines.folder import DataLayoutError
from fastssl import checkpoint as ckpt
from fastssl.collectives import all_gather_objects
from fastssl.config import Config, ConfigError, to_dict
from fastssl.runtime import failing_together, per_process, said_once_per_node

if TYPE_CHECKING:
    from accelerate import Accelerator

    from pipelines.sampler import ShardedLoader

# Fields the processes of one run may set differently: where each node keeps its copy of the data, and how it
# reads it. Every other field must be the same everywhere (`check_same_config`).
PER_NODE_FIELDS = {"data.train", "data.val", "data.knn_train", "data.num_workers", "data.dali_read_threads",
                   "data.ffcv_os_cache", "train.progress"}
PER_NODE_PATHS = {"data.val", "data.knn_train"}  # set on every process or on none


def check_same_config(cfg: Config, accelerator: Accelerator) -> None:
    """Every process runs the same settings (but PER_NODE_FIELDS), or none starts: the same command
    typed on each node with one override missing or different (a learning rate, a seed, log_every)
    would train replicas that drift apart silently, or leave a collective unmatched. One all-gather."""
    if accelerator.num_processes == 1:
        return
    flat = {}
    for section, fields in to_dict(cfg).items():
        for name, value in fields.items():
            key = f"{section}.{name}"
            if key in PER_NODE_PATHS:  # may differ, but not whether it is set (an empty data.val: no k-NN collectives)
                flat[key] = bool(value)
            elif key not in PER_NODE_FIELDS:
                flat[key] = value
    everyone = all_gather_objects(flat)
    first_other = {name: next((r for r, c in enumerate(everyone) if c.get(name) != flat_0), None)
                   for name, flat_0 in everyone[0].items()}
    differ = sorted(name for name, rank in first_other.items() if rank is not None)
    if differ:
        shown = "; ".join(f"{name} (rank 0: {everyone[0][name]!r}, rank {first_other[name]}: "
                          f"{everyone[first_other[name]].get(name)!r})" for name in differ[:5])
        raise said_once_per_node(ConfigError(
            f"the processes were started with different settings: {shown}; start every node with the same command "
            f"(only the data paths, data.num_workers and the like may differ)"), accelerator)


SHARED_CHECK_WAIT_S = 10.0  # how long a process looks for the file rank 0 wrote in the run directory


def check_run_dir_shared(run_dir: Path, accelerator: Accelerator) -> None:
    """Every process sees the run directory rank 0 writes, or none starts.

    Why: rank 0 writes the checkpoints and every rank reads them at a resume. A run directory on
    a node-local disk passes every other check at a fresh start (all at step 0) and would fail
    at the first resume, a whole job later (`check_processes_agree`). Rank 0 writes a file of a
    name never used before, so that no NFS client has a cached "no such file" for it; the others
    look for it for up to SHARED_CHECK_WAIT_S, as a new entry can take a moment to show there."""
    if accelerator.num_processes == 1:
        return
    import secrets

    from accelerate.utils import broadcast_object_list

    name = broadcast_object_list([f".shared-check-{secrets.token_hex(8)}" if accelerator.is_main_process else None])
    probe = run_dir / name[0]
    with failing_together(accelerator):
        if accelerator.is_main_process:
            with ckpt.writing(run_dir):
                probe.write_text("rank 0 wrote this; every process of the run must see it (fastssl)\n")
    deadline = time.monotonic() + SHARED_CHECK_WAIT_S
    while not probe.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    seen = per_process(accelerator, [int(probe.exists())])  # a collective: every process has looked
    if accelerator.is_main_process:
        probe.unlink(missing_ok=True)
    blind = [rank for rank, (found,) in enumerate(seen) if not found]
    if blind:
        who = f"process {blind[0]} does" if len(blind) == 1 else f"processes {', '.join(map(str, blind))} do"
        raise said_once_per_node(ckpt.CheckpointError(
            f"{who} not see the run directory {run_dir} that rank 0 writes its checkpoints to: every node must see "
            f"the same run directory (a filesystem all nodes share), or a resume would find no checkpoint there; set "
            f"--train.run_dir to a shared path"), accelerator)


def check_processes_agree(accelerator: Accelerator, loader: ShardedLoader, state: ckpt.TrainState, run_dir: Path,
                          own_state_missed: str | None = None) -> None:
    """Every process sees the same data and resumes from the same step, or none starts.

    The shards and every collective assume it. Node-local copies of a dataset that differ, or a
    run directory that only some nodes see, would otherwise shard the data differently or
    leave ranks at different steps: a hang in a later collective, or silently wrong shards.
    A resume whose per-process states could not be restored on some processes (`own_state_missed`,
    `ckpt.load_checkpoint`) goes on, and the main process says so once."""
    rows = per_process(accelerator, [getattr(loader, "num_images", len(loader)), state.step,
                                     int(own_state_missed is not None)])
    missed = [rank for rank, r in enumerate(rows) if r[2]]
    if missed and accelerator.is_main_process:
        why = f" (rank 0: {own_state_missed})" if own_state_missed else ""
        print(f"warning: --resume: the random generators and loader positions of {len(missed)} of {len(rows)} "
              f"process(es) were not restored{why}; the run continues with the same data order (unless FFCV "
              f"deals it: --data.ffcv_order random/sequential on another process count), but other "
              f"augmentations than an uninterrupted run would draw", file=sys.stderr)
    images, steps = {r[0] for r in rows}, {r[1] for r in rows}
    if len(images) > 1:
        seen = ", ".join(f"rank {rank}: {r[0]}" for rank, r in enumerate(rows))
        raise said_once_per_node(DataLayoutError(
            f"the processes see different numbers of training images ({seen}); every process must read the same "
            f"data: are the nodes' copies of data.train the same?"), accelerator)
    if len(steps) > 1:
        seen = ", ".join(f"rank {rank}: step {r[1]}" for rank, r in enumerate(rows))
        raise said_once_per_node(ckpt.CheckpointError(
            f"the processes resume from different steps ({seen}): every node must see the same run directory "
            f"{run_dir} (a filesystem all nodes share)"), accelerator)

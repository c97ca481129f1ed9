"""Process-level set-up: Accelerate, precision, seeds, devices, graceful stop."""

from __future__ import annotations

import argparse
import os
import random
import signal
import socket
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from types import FrameType

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs

from fastssl.collectives import all_gather_objects, all_gather_rows
from fastssl.config import ConfigError, TrainConfig


def resolve_precision(precision: str, use_cuda: bool) -> str:
    """`auto`: bf16 on GPUs that have it, fp16 with a grad scaler on older GPUs, fp32 on CPU.

    CPU bf16 autocast is faster on CPUs with native bf16, but a tiny CPU run here produced
    a NaN loss in one of two identical runs under it, so CPU stays in fp32 unless asked
    (`--train.precision bf16`).
    """
    if precision != "auto":
        return precision
    if not use_cuda:
        return "no"
    return "bf16" if has_native_bf16(this_process_gpu()) else "fp16"


def this_process_gpu() -> int:
    """The GPU this process trains on: its launcher's LOCAL_RANK (Accelerate picks the same one)."""
    local = os.environ.get("LOCAL_RANK", "0")
    index = int(local) if local.isdigit() else 0
    return index if index < torch.cuda.device_count() else 0


def has_native_bf16(gpu: int) -> bool:
    """Whether `gpu` computes in bf16 natively (compute capability 8.0+: A100, H100, ...).

    Not `torch.cuda.is_bf16_supported()`: on older GPUs it counts emulated bf16 as support (slow)
    and probes by allocating on the current device, GPU 0 before Accelerate sets each rank's, so
    every rank would leave a CUDA context there."""
    return torch.cuda.get_device_capability(gpu)[0] >= 8


def build_accelerator(train: TrainConfig) -> Accelerator:
    """The Accelerator that owns processes, devices and autocast for this run.

    cuDNN's autotuner is on unless `train.cudnn_benchmark` is off: a run's shapes are fixed (two crop
    sizes, one batch), so the first steps' timing of each convolution's algorithms pays for itself."""
    use_cpu = train.cpu or not torch.cuda.is_available()
    if use_cpu and train.precision == "fp16":  # it failed at the first convolution, with a dtype traceback
        raise ConfigError(f"train.precision: fp16 (with its grad scaler) needs a CUDA GPU and this run is on the CPU"
                          f"{' (--train.cpu true)' if train.cpu else ' (no GPU is visible)'}; use --train.precision "
                          f"no (fp32) or bf16, or auto, which picks fp32 on the CPU")
    torch.backends.cudnn.benchmark = train.cudnn_benchmark
    accelerator = Accelerator(cpu=use_cpu, mixed_precision=resolve_precision(train.precision, not use_cpu),
                              dynamo_backend="no",  # compiling is `--train.compile`'s: the loop compiles the student
                              step_scheduler_with_optimizer=False,
                              kwargs_handlers=[process_group_timeout(train.collective_timeout_min)])
    configured = os.environ.get("ACCELERATE_DYNAMO_BACKEND", "no")  # set by `accelerate launch` from its config
    if configured.lower() != "no":
        accelerator.print(f"warning: Accelerate's dynamo_backend {configured} (from `accelerate config` or "
                          f"--dynamo_backend) is not used: compile with --train.compile true", file=sys.stderr)
    return accelerator


def process_group_timeout(minutes: float) -> InitProcessGroupKwargs:
    """Accelerate's process-group settings with this collective timeout, whatever its value.

    Accelerate passes on only the fields that differ from the class's defaults, and its default
    timeout is 10 minutes (NCCL's): 10 would be left out, and gloo would wait its own 30. This
    handler always passes the timeout (it must stay an `InitProcessGroupKwargs`: Accelerate
    looks handlers up by their exact class)."""
    handler = InitProcessGroupKwargs(timeout=timedelta(minutes=minutes))
    handler.to_kwargs = lambda: {"timeout": handler.timeout}
    return handler


def seed_everything(seed: int, rank: int) -> None:
    """One run seed: Python's and NumPy's generators per rank (so ranks do not draw identical
    noise), torch's the same on every rank.

    Why torch's is shared: model initialisation happens after this and must be the same on
    every rank (DDP also broadcasts rank 0's weights). Torch draws made during training use
    generators of their own (the loaders' per-batch seeds) or are broadcast from rank 0
    (shuffle-BN's permutation); a new per-rank torch draw needs a generator seeded with the rank.
    """
    random.seed(seed + rank)
    np.random.seed((seed + rank) % 2**32)
    torch.manual_seed(seed)


def device_arg(value: str) -> str:
    """argparse `type` of a tool's `--device`: `auto`, `cpu`, or a CUDA device this machine has. Anything
    else is a usage error, said in one line before any work (torch would fail later, with a traceback)."""
    if value == "auto":
        return value
    try:
        device = torch.device(value)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"unknown device {value!r}; choose auto, cpu or cuda (cuda:N)") from None
    if device.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"device {value!r} is not supported; choose auto, cpu or cuda (cuda:N)")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"{value!r}: no CUDA device is visible here; use cpu (or auto)")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise argparse.ArgumentTypeError(f"{value!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return value


def pick_device(name: str) -> torch.device:
    """A tool's `--device` (checked by `device_arg`): 'auto' is CUDA when present, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


class GracefulStop:
    """Turns a stop signal into a flag the loop checks between steps.

    SIGTERM/SIGINT: the loop writes a checkpoint and exits cleanly. The same signal again within
    REPEAT_WINDOW_S is ignored: under SLURM (scancel, preemption) and after a Ctrl-C in a terminal
    a worker gets it twice, from the job step or the terminal and forwarded by the launcher
    (torchrun), and dying on the echo would lose the checkpoint. Sent again later, it falls back to
    the earlier behaviour (an immediate exit) for users who really mean it.

    SIGUSR1 is SLURM's warning before the time limit (`#SBATCH --signal=B:USR1@<s>`,
    tools/slurm/): the loop checkpoints and exits so the job can be requeued and resumed
    with `--resume auto`. A repeated SIGUSR1 is always ignored.

    `signals`: the ones to catch (the training loop: all three; its set-up: SIGUSR1 alone).
    """

    SIGNALS = ("SIGTERM", "SIGINT", "SIGUSR1")
    REPEAT_WINDOW_S = 5.0

    def __init__(self, signals: tuple[str, ...] = SIGNALS) -> None:
        self.requested = False
        self.signal_name = ""
        self._previous = {}
        self._first_seen: dict[int, float] = {}  # signal -> when it first came
        for sig in (getattr(signal, name) for name in signals if hasattr(signal, name)):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. inside some test runners)
                pass

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        now = time.monotonic()
        first = self._first_seen.setdefault(signum, now)
        self.requested = True
        self.signal_name = self.signal_name or signal.Signals(signum).name
        if signum == getattr(signal, "SIGUSR1", None) or now - first <= self.REPEAT_WINDOW_S:
            return
        previous = self._previous.get(signum, signal.SIG_DFL)  # sent again, later: the user means it
        signal.signal(signum, previous)
        if callable(previous):
            previous(signum, frame)  # e.g. Python's KeyboardInterrupt for SIGINT
        elif previous == signal.SIG_DFL:
            signal.raise_signal(signum)

    def close(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def agreed(self, accelerator: Accelerator) -> bool:
        """True when any process was asked to stop (all ranks must stop at the same step)."""
        return any_process(accelerator, self.requested)


def any_process(accelerator: Accelerator, flag: bool) -> bool:
    """Whether `flag` holds on any process; every process must call it at the same point.

    What makes the processes stop or fail together: one that left alone (a stop signal, a
    failed save, weights it found diverged) would leave the others waiting for it in their
    next collective, for good on NCCL. One tiny all-reduce; none on one process."""
    if accelerator.num_processes == 1:
        return flag
    mine = torch.tensor([1.0 if flag else 0.0], device=accelerator.device)
    return bool(accelerator.reduce(mine, reduction="sum").item() > 0)


END_BARRIER_TIMEOUT_S = 120.0  # how long a finished process waits for the others
FAILED_END_TIMEOUT_S = 10.0  # ... and one that ends with an error (the others agreed on it within a collective)


def end_process_group(timeout_s: float | None = None) -> None:
    """At the end of a run (or of a stop with its checkpoint, or of an error): wait for every process,
    then release the process group. Nothing to do on one process.

    Why: a process that exits while a peer is still in the last collective aborts that peer
    (gloo: "terminate called without an active exception"), and NCCL warns at every exit whose
    group was not destroyed. The wait is a count in the group's key-value store, on the CPU,
    not a collective: an NCCL barrier cannot be given up, so a peer killed after the last
    collective would hold the others for the collective timeout (30 minutes). Here they give up
    after `timeout_s` (END_BARRIER_TIMEOUT_S by default) and exit without releasing the group."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return
    world, rank = dist.get_world_size(), dist.get_rank()
    deadline = time.monotonic() + (END_BARRIER_TIMEOUT_S if timeout_s is None else timeout_s)
    try:
        store = dist.distributed_c10d._get_default_store()
        if not _all_counted(store, "fastssl/end/arrived", world, deadline):
            return
        # The store lives in rank 0's process (torchrun: its agent's): rank 0 leaves last, so
        # no rank is still counting when it goes.
        if not _all_counted(store, "fastssl/end/read", world if rank == 0 else 0, deadline):
            return
    except (RuntimeError, OSError):  # the store is gone: a peer has already exited
        return
    dist.destroy_process_group()


def _all_counted(store: torch.distributed.Store, key: str, expected: int, deadline: float) -> bool:
    """Add this process to `key`'s count, then wait (until `deadline`) for it to reach `expected`."""
    count = store.add(key, 1)
    while count < expected:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
        count = store.add(key, 0)
    return True


def stop_exit_code(signal_name: str) -> int:
    """The exit status of a run stopped by a signal after its checkpoint: 128 + the signal's number,
    as a shell reports a process that signal ended (SIGTERM 143, SIGINT 130, SIGUSR1 138).

    A process that stopped because another rank was signalled (it received none) exits 130."""
    try:
        return 128 + signal.Signals[signal_name].value
    except KeyError:
        return 128 + signal.SIGINT.value


@contextmanager
def failing_together(accelerator: Accelerator) -> Iterator[None]:
    """Run a block on every process; when it raises on any, it raises on all of them.

    A process whose block raised re-raises its own error; the others raise the first failing
    rank's, of the same type when it takes a message (so the command line still exits 2 for a
    user error), naming that rank and its host. Without it, a process that fails alone in set-up
    (its node's copy of the data is missing, its view of the run directory holds no checkpoint)
    leaves the others waiting in their next collective: for good on NCCL. One tiny all-reduce (it runs
    at every log row), and an all-gather of the errors only when one failed; none on one process.

    A Ctrl-C (KeyboardInterrupt) is not agreed on: a launcher passes it to every process, and a
    process waiting here for peers still busy in the block could not be interrupted again.

    So that a node's log says each error once, not once per GPU, an error another process of
    this node prints is marked `said_elsewhere` (see `said_by_another_process`): the same error
    raised on a lower rank of this node, or a relayed error where a process of this node failed
    itself or on any process but the node's first. A node is its host and its first rank (launchers
    give each node a block of ranks), since containers or a test may give several nodes one name."""
    error: Exception | None = None
    try:
        yield
    except Exception as err:  # noqa: BLE001 - agreed on below, then re-raised
        error = err
    if accelerator.num_processes > 1 and any_process(accelerator, error is not None):
        me = accelerator.process_index
        here = (socket.gethostname(), me - accelerator.local_process_index)  # this node
        kind = None if error is None else (type(error).__module__, type(error).__qualname__)  # names: always pickle
        mine = None if error is None else (me, here, kind, str(error))
        failed = [row for row in all_gather_objects(mine) if row is not None]
        if error is None and failed:
            rank, (host, _), kind, message = failed[0]
            relayed = _same_kind(kind, f"rank {rank} on {host}: {message}")
            relayed.said_elsewhere = accelerator.local_process_index != 0 or any(n == here for _, n, _, _ in failed)
            raise relayed
        if error is not None and not hasattr(error, "said_elsewhere"):  # marked by an inner block already
            error.said_elsewhere = any(r < me and n == here and (k, m) == (kind, str(error)) for r, n, k, m in failed)
    if error is not None:
        raise error


def said_once_per_node(err: Exception, accelerator: Accelerator) -> Exception:
    """`err`, marked so that only each node's first process prints it (`said_by_another_process`).

    For an error every process raises alike from facts they all share (an all-gather of their
    settings or image counts, the split sizes of the k-NN): `failing_together` would find out the
    same with one more collective."""
    err.said_elsewhere = accelerator.local_process_index != 0
    return err


def said_by_another_process(err: BaseException) -> bool:
    """Whether another process of this node prints this error (or the one it was raised from): `failing_together`."""
    while err is not None:
        if getattr(err, "said_elsewhere", False):
            return True
        err = err.__cause__
    return False


def _same_kind(kind: tuple[str, str], message: str) -> Exception:
    """An error of the class named `kind` (module, qualified name) carrying `message`; a RuntimeError
    when that class cannot be found here or does not take one message."""
    import importlib

    try:
        cls = importlib.import_module(kind[0])
        for part in kind[1].split("."):
            cls = getattr(cls, part)
        return cls(message)
    except Exception:  # noqa: BLE001 - any failure: the message still goes through
        return RuntimeError(message)


def per_process(accelerator: Accelerator, values: list[int]) -> list[list[int]]:
    """Every process's `values`, by rank (one all-gather; every process must call it)."""
    if accelerator.num_processes == 1:
        return [list(values)]
    mine = torch.tensor([values], dtype=torch.int64, device=accelerator.device)
    return all_gather_rows(mine).tolist()


def rank0_buffers(module: torch.nn.Module, accelerator: Accelerator) -> None:
    """Give every process rank 0's buffers of `module` (BatchNorm's running statistics), in place.

    Why: a network whose BatchNorm normalises each process's batch alone (ML-CPC's shuffle-BN
    key encoder, `model.sync_bn false`) keeps other running statistics on each process, so in
    eval mode it is another network on each; rank 0's is the one the checkpoint exports. The
    parameters are equal already (DDP; the EMA of equal students). Nothing to do on one process."""
    if accelerator.num_processes == 1:
        return
    import torch.distributed as dist

    for buffer in module.buffers():
        dist.broadcast(buffer.data, src=0)

"""Child processes: how one ended, in words, and how loader workers keep out of the trainer's
signals. Shared by everything that runs workers or checks in children."""

from __future__ import annotations

import multiprocessing
import os
import signal
import sys
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from multiprocessing.context import BaseContext
from pathlib import Path

__all__ = ["describe_exit", "pid_alive", "left_by_dead_processes", "STOP_SIGNALS", "stop_signals_held",
           "leave_process_group", "loader_workers_context", "pool_worker_ignores_interrupts"]


def describe_exit(code: int) -> str:
    """A process's exit code as a person reads it: "exit status 1", "killed by SIGKILL" (negative codes)."""
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit status {code}"


def pid_alive(pid: int) -> bool:
    """Whether process `pid` still runs (someone else's counts): a file or folder named by a dead
    writer's PID is left over from a kill and may be removed."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's live process
    return True


def left_by_dead_processes(paths: Iterable[Path], marker: str) -> Iterator[tuple[Path, str]]:
    """(path, PID) of those `paths` named `<name><marker><PID>` whose PID no longer runs: what a writer
    killed outright (kill -9, power loss) left behind, which the next run may remove."""
    for path in paths:
        pid = path.name.rsplit(marker, 1)[-1]
        if pid.isdigit() and not pid_alive(int(pid)):
            yield path, pid


# The signals a launcher forwards to a trainer's process group and the trainer turns into a stop.
STOP_SIGNALS = frozenset(getattr(signal, name) for name in ("SIGTERM", "SIGINT", "SIGUSR1") if hasattr(signal, name))


@contextmanager
def stop_signals_held() -> Iterator[None]:
    """Around the start of loader workers (`iter(DataLoader)` forks them): the stop signals wait
    while the workers are forked, so that none reaches a worker before it leaves the trainer's
    process group (`leave_process_group`); the trainer gets them as soon as its workers exist.
    The workers are born with them held and release them in `leave_process_group`."""
    held = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, held)


def leave_process_group(_worker_id: int | None = None) -> None:
    """A DataLoader worker's first step (its `worker_init_fn`): a process group of its own.

    Why: torchrun (`accelerate launch`) starts each trainer in its own process group and
    forwards a SIGTERM, SIGINT or SIGUSR1 to that whole group (`os.killpg`), as a terminal
    does with Ctrl-C. The trainer turns the signal into a checkpoint and a clean stop
    (`fastssl.runtime.GracefulStop`), but torch's workers die on a SIGTERM, and the trainer
    then fails with "DataLoader worker ... is killed by signal: Terminated" before it can
    save. Outside the group, the workers are stopped by the trainer's loader as it ends (and
    exit on their own if the trainer is killed outright: torch's workers watch their parent).
    A worker started under `stop_signals_held` has them held: what the group was sent before
    it left is the trainer's, and is dropped here, before they are released."""
    os.setpgid(0, 0)
    while signal.sigtimedwait(STOP_SIGNALS, 0) is not None:  # a held one, sent to the trainer's group
        pass
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)


def pool_worker_ignores_interrupts() -> None:
    """A worker pool's initializer: Ctrl-C reaches the whole process group, and the worker leaves it
    to its parent, which stops the pool and says one line, where each worker would print a
    KeyboardInterrupt traceback; SIGTERM and SIGHUP take their default action, not a handler the
    worker inherited from its parent (`fastssl.cli.stop_signals_interrupt`). A pool started under
    `stop_signals_held` has its workers born with them held: released here, once ignored."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGHUP, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)


def loader_workers_context(num_workers: int) -> BaseContext | None:
    """The start method of every DataLoader's workers (its `multiprocessing_context`): fork on Linux,
    whatever Python's default; None (no workers, or another system: macOS forks unsafely and
    defaults to spawn) leaves DataLoader's own.

    Why not Python 3.14's default on Linux, forkserver (Python 3.13 and earlier fork there):
    * the fork server is a child of the trainer, in its process group, and its workers are born
      with SIGTERM and SIGINT unblocked (measured with Python 3.11 and forkserver): a stop signal
      sent to the group while they start kills them, and the trainer fails instead of saving
      (`stop_signals_held`); a SIGTERM to the group also kills the fork server itself;
    * each worker gets the dataset pickled, at every epoch's start: with ImageNet's 1.28 M file
      names (82 MB), 4 workers delivered their first batch after 14.9 s, against 0.19 s forked
      (docs/benchmarks.md, "Loader workers").
    Forking a trainer is safe because the workers never touch CUDA and the loaders free their DALI
    pipelines before any fork (tests/test_no_fork_hang.py). The converter's workers, which run FFCV's
    writer from any process, use a fork server of their own (`pipelines.beton_writer`)."""
    if num_workers <= 0 or not sys.platform.startswith("linux"):
        return None
    return multiprocessing.get_context("fork")

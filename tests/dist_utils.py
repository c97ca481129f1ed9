"""Run a function in N real processes with torch.distributed (gloo, CPU) from a pytest test.

Why: "computed over the global batch" bugs (a mean taken over the local rows, a missing
all-reduce, uneven shards) only show up with real collectives between real processes. This
helper gives every test the same short, hang-proof way to get them, with no GPU, no launcher
and no fixed port.

Usage::

    from dist_utils import run_distributed, requires_gloo

    def _worker(rank: int, world_size: int, x: torch.Tensor) -> torch.Tensor:
        # runs in a fresh (spawned) process; the default process group is already initialised
        return my_global_op(x.chunk(world_size)[rank])

    @requires_gloo
    def test_global_op():
        outs = run_distributed(_worker, world_size=2, args=(torch.randn(8, 3),))
        torch.testing.assert_close(torch.cat(outs), my_global_op(x))

Rules and behaviour:

- ``fn`` must be picklable: a TOP-LEVEL function of an importable module (a test module is
  fine, lambdas and closures are not). It is called as ``fn(rank, world_size, *args,
  **kwargs)``. ``args``/``kwargs`` and the return value must be picklable (tensors are fine);
  return values are sent back with ``torch.save``/``torch.load`` through files, so large
  results do not deadlock a pipe; tensors in them arrive on the CPU.
- ``DEVICES`` parametrises a test over CPU and, on a GPU machine, CUDA (both ranks on GPU 0 over
  gloo); the child calls ``on_device(name)`` to get its device.
- Processes are started with the ``spawn`` method (safe with threads and with CUDA in the
  parent). Each child inherits ``sys.path``, so modules importable in the test process are
  importable there. (pytest's default "prepend" import mode puts ``tests/`` on ``sys.path``,
  which is what makes ``from dist_utils import ...`` and test-module functions importable in
  the children; ``--import-mode=importlib`` would break that.) Spawning costs a couple of seconds per run (each child imports torch):
  put several cases into one ``fn`` rather than calling this many times.
- Before ``fn`` runs, each child has the environment a launcher (torchrun / accelerate launch)
  would give it: ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``,
  ``MASTER_ADDR=127.0.0.1``, ``MASTER_PORT`` (a port that was free a moment ago), and
  ``OMP_NUM_THREADS``; ``torch.set_num_threads(num_threads)`` is applied (default 1, so 2
  processes on a 2-core CI box do not oversubscribe). Extra variables: ``env={...}``.
- ``init_group=True`` (default): the child calls ``torch.distributed.init_process_group``
  with ``backend`` (default ``"gloo"``) on a FileStore in a private temporary directory (no
  port races), and destroys it after ``fn`` returns. Accelerate's ``Accelerator(cpu=True)``
  created inside ``fn`` then finds the group already initialised and uses it (MULTI_CPU).
  ``init_group=False``: nothing is initialised; ``fn`` (or Accelerate) must do it itself,
  e.g. with ``init_method="env://"`` using the variables above.
- Failures: if any child raises, the others are terminated and :class:`DistributedTestError`
  is raised in the parent with every failing child's full traceback. A child that dies
  without a Python exception (segfault, ``os._exit``) is reported with its exit code. If the
  whole run takes longer than ``timeout`` seconds (e.g. a rank waits in a collective its peer
  never joins), all children are killed and :class:`DistributedTestError` says which ranks
  were still running. The process-group timeout is set to the same value so blocked
  collectives also fail on their own.
"""

from __future__ import annotations

import datetime
import multiprocessing as _mp
import multiprocessing.connection as _mp_connection
import os
import shutil
import socket
import sys
import tempfile
import textwrap
import time
import traceback
from typing import Any, Callable, Mapping, Optional, Sequence

import torch
import torch.distributed as dist

__all__ = ["run_distributed", "DistributedTestError", "gloo_available", "requires_gloo", "free_port",
           "DEVICES", "on_device"]


class DistributedTestError(RuntimeError):
    """A child process failed, died, or the run timed out."""


def gloo_available() -> bool:
    """True when torch.distributed with the gloo backend can be used here."""
    return dist.is_available() and dist.is_gloo_available()


try:  # a ready-made skip marker; the helper itself does not need pytest
    import pytest as _pytest

    requires_gloo = _pytest.mark.skipif(not gloo_available(), reason="torch.distributed gloo backend unavailable")
except ImportError:  # pragma: no cover
    _pytest = None  # type: ignore[assignment]
    requires_gloo = None  # type: ignore[assignment]


# Where a two-process test computes: always on CPU; on CUDA too where a GPU is visible (`-m gpu`).
# gloo moves CUDA tensors through the host, so both ranks can share GPU 0, which NCCL refuses: the
# CUDA paths of the collectives' callers (gathered logits into the fused kernel, per-view BN's
# statistics, the critic's keys) then run with a world of two on the one GPU a check machine has.
DEVICES = ["cpu"]
if _pytest is not None:
    DEVICES.append(_pytest.param("cuda", marks=[
        _pytest.mark.gpu, _pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none is visible)")]))


def on_device(name: str) -> torch.device:
    """The device a spawned rank computes on, for a name of `DEVICES`.

    On CUDA every rank uses GPU 0, and TF32 is off so that float32 results keep the tolerances
    the CPU runs use (the tests compare groupings of one batch, which TF32 would round apart)."""
    if name == "cuda":
        torch.cuda.set_device(0)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        return torch.device("cuda", 0)
    return torch.device(name)


def _to_cpu(value: Any) -> Any:
    """`value` with every tensor in it (nested lists, tuples, dicts) moved to the host."""
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, (list, tuple)):
        return type(value)(_to_cpu(v) for v in value)
    if isinstance(value, dict):
        return {k: _to_cpu(v) for k, v in value.items()}
    return value


def free_port() -> int:
    """A localhost TCP port that was free when asked (for MASTER_PORT; may race, which is why
    the default initialisation uses a FileStore instead)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _result_path(tmp: str, rank: int) -> str:
    return os.path.join(tmp, f"result_{rank}.pt")


def _error_path(tmp: str, rank: int) -> str:
    return os.path.join(tmp, f"error_{rank}.txt")


def _write_atomic(path: str, write: Callable[[str], None]) -> None:
    """Write via a temporary name then rename, so the parent never reads a half-written file."""
    part = path + ".part"
    write(part)
    os.replace(part, path)


def _write_text(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


def _child(rank: int, world_size: int, fn: Callable[..., Any], args: Sequence[Any],
           kwargs: Mapping[str, Any], tmp: str, backend: str, timeout: float,
           num_threads: int, port: int, env: Mapping[str, str], init_group: bool) -> None:
    """Entry point of each spawned process (top level so that spawn can pickle it)."""
    os.environ.update({
        "RANK": str(rank), "WORLD_SIZE": str(world_size),
        "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": str(world_size),
        "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
        "OMP_NUM_THREADS": str(num_threads),
    })
    os.environ.update({k: str(v) for k, v in env.items()})
    torch.set_num_threads(num_threads)
    ok = False
    try:
        if init_group:
            dist.init_process_group(
                backend, init_method="file://" + os.path.join(tmp, "filestore"),
                rank=rank, world_size=world_size, timeout=datetime.timedelta(seconds=timeout),
            )
        result = _to_cpu(fn(rank, world_size, *args, **kwargs))  # the parent may have no GPU
        _write_atomic(_result_path(tmp, rank), lambda p: torch.save(result, p))
        ok = True
    except BaseException:  # noqa: BLE001 - report everything, including SystemExit
        tb = traceback.format_exc()
        _write_atomic(_error_path(tmp, rank), lambda p: _write_text(p, tb))
    finally:
        if ok and dist.is_available() and dist.is_initialized():
            try:
                # A rank whose last all-gather has returned may still be sending to a peer; tearing
                # the group down then aborts that peer's gloo thread ("terminate called without an
                # active exception", exit -6). Everyone leaves together.
                dist.barrier()
                dist.destroy_process_group()
            except Exception:  # noqa: BLE001 - teardown problems must not mask the result
                pass
    # Skip interpreter teardown either way. Failed: a peer may be blocked in a collective with us.
    # Done: the result is on disk, and a gloo thread that outlives the destroyed group can still
    # be running when the interpreter's C++ destructors run at exit, which aborts the process
    # ("terminate called without an active exception", exit -6) after the work has succeeded.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0 if ok else 1)


def _stop(procs: Sequence[Any]) -> None:
    """Terminate, then kill, every child still alive (only the processes we started)."""
    for p in procs:
        if p.is_alive():
            p.terminate()
    deadline = time.monotonic() + 5.0
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join(5.0)


def _collect_errors(tmp: str, world_size: int) -> dict[int, str]:
    errs = {}
    for r in range(world_size):
        path = _error_path(tmp, r)
        if os.path.exists(path):
            with open(path) as f:
                errs[r] = f.read()
    return errs


def _format_errors(errs: Mapping[int, str]) -> str:
    return "\n".join(f"--- rank {r} traceback ---\n{tb}" for r, tb in sorted(errs.items()))


def run_distributed(fn: Callable[..., Any], world_size: int = 2, args: Sequence[Any] = (),
                    kwargs: Optional[Mapping[str, Any]] = None, *, backend: str = "gloo",
                    timeout: float = 120.0, num_threads: int = 1,
                    env: Optional[Mapping[str, str]] = None, init_group: bool = True) -> list[Any]:
    """Run ``fn(rank, world_size, *args, **kwargs)`` in ``world_size`` spawned processes.

    Returns the list of return values, indexed by rank. Raises :class:`DistributedTestError`
    (with the children's tracebacks) if a child fails, dies, or the run exceeds ``timeout``
    seconds. See the module docstring for the environment each child gets.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    kwargs = dict(kwargs or {})
    env = dict(env or {})
    ctx = _mp.get_context("spawn")
    tmp = tempfile.mkdtemp(prefix="fastssl_dist_")
    port = free_port()
    procs = []
    try:
        for rank in range(world_size):
            p = ctx.Process(
                target=_child, name=f"dist-test-rank{rank}",
                args=(rank, world_size, fn, tuple(args), kwargs, tmp, backend, float(timeout),
                      num_threads, port, env, init_group),
            )
            p.start()
            procs.append(p)

        deadline = time.monotonic() + timeout
        while True:
            errs = _collect_errors(tmp, world_size)
            if errs:
                _stop(procs)
                errs = _collect_errors(tmp, world_size)  # peers may have failed too
                raise DistributedTestError(
                    f"{len(errs)} of {world_size} processes failed running "
                    f"{getattr(fn, '__qualname__', fn)}:\n{_format_errors(errs)}")
            crashed = {r: p.exitcode for r, p in enumerate(procs) if p.exitcode not in (None, 0)}
            if crashed and not _collect_errors(tmp, world_size):
                # died without a Python traceback (segfault, os._exit, OOM kill): peers may be
                # blocked in a collective with it, so stop now instead of waiting for the timeout
                _stop(procs)
                raise DistributedTestError(
                    f"rank(s) {sorted(crashed)} died with exit code(s) {list(crashed.values())} "
                    f"without a Python exception running {getattr(fn, '__qualname__', fn)} "
                    "(killed or crashed?)")
            if all(not p.is_alive() for p in procs):
                break
            if time.monotonic() > deadline:
                alive = [r for r, p in enumerate(procs) if p.is_alive()]
                _stop(procs)
                raise DistributedTestError(
                    f"timed out after {timeout:.0f}s running {getattr(fn, '__qualname__', fn)}; "
                    f"ranks still running: {alive} (a collective that not every rank joined?)")
            _mp_connection.wait([p.sentinel for p in procs if p.is_alive()], timeout=0.05)

        results = []
        for rank, p in enumerate(procs):
            path = _result_path(tmp, rank)
            if p.exitcode != 0 or not os.path.exists(path):
                errs = _collect_errors(tmp, world_size)
                raise DistributedTestError(
                    f"rank {rank} exited with code {p.exitcode} without a result"
                    + (f":\n{_format_errors(errs)}" if errs else " (killed or crashed?)"))
            results.append(torch.load(path, weights_only=False))
        return results
    finally:
        _stop(procs)
        shutil.rmtree(tmp, ignore_errors=True)


# Launcher tests' recipes run this first: when the run releases its process group at its end, each
# process writes rank<RANK>.json: the group's size and gloo timeout, and its launcher's variables.
RECORD_THE_GROUP = """
    import json, os
    from pathlib import Path
    import torch
    import torch.distributed as dist
    _destroy = dist.destroy_process_group

    def _record_then_destroy(*args, **kwargs):
        gloo = dist.distributed_c10d._get_default_group()._get_backend(torch.device("cpu"))
        where = {k: os.environ.get(k) for k in ("RANK", "LOCAL_RANK", "GROUP_RANK")}
        Path(f"rank{dist.get_rank()}.json").write_text(json.dumps(
            {"world": dist.get_world_size(), "timeout_s": gloo.options._timeout.total_seconds(), **where}))
        _destroy(*args, **kwargs)

    dist.destroy_process_group = _record_then_destroy
"""


def tiny_synthetic_recipe(epochs: int, after: str = "", before: str = "", log_every: int = 1) -> str:
    """A recipe file's text for launcher tests: a tiny MIRA run on synthetic data, from the command line.

    Why text: the launcher tests start it as `python FILE ...` through `accelerate launch`.
    `before` runs first (e.g. RECORD_THE_GROUP); `after` once training has returned.
    """
    return textwrap.dedent(before) + textwrap.dedent(f"""
        import sys
        from fastssl.cli import run
        from fastssl.config import Config
        cfg = Config()
        cfg.data.backend, cfg.data.synthetic_size = "synthetic", 32
        cfg.model.arch, cfg.model.proj_hidden_dim, cfg.model.proj_dim, cfg.model.num_prototypes = "resnet18", 32, 16, 12
        cfg.aug.global_size, cfg.aug.local_size, cfg.aug.num_local = 16, 8, 2
        cfg.train.epochs, cfg.train.global_batch_size, cfg.train.progress = {epochs}, 8, False
        cfg.train.log_every = {log_every}
        cfg.optim.warmup_epochs = 0
        results = run(cfg, sys.argv[1:])
    """) + textwrap.dedent(after)

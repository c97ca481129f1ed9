"""A check run in a separate process, once, its verdict kept on disk.

Why: a CUDA kernel that faults (an illegal address, a launch failure) poisons the CUDA context
of the process that ran it, so a self-check run in the training process could not fall back to
the reference afterwards; the run would die instead. Run first in a child process, a fault
costs only the child, and the training process never launches a kernel that failed there.

The verdict is cached in a JSON file named after everything that could change it (the caller
builds the name: the kernel build, the GPU model, the driver), so the child runs once for
them, not once per process and run; a file lock makes the processes of a machine (or of the
machines sharing the cache) wait for the first one's child instead of all starting their own.
"""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
from pathlib import Path
from typing import Optional

from pipelines.processes import describe_exit

__all__ = ["INCONCLUSIVE_EXIT", "verdict_in_child"]


INCONCLUSIVE_EXIT = 3  # the child could not run the check (no device, no kernel): no verdict


def verdict_in_child(argv: list[str], verdict_file: Path, timeout: float, env: Optional[dict] = None,
                     what: str = "the check") -> Optional[str]:
    """None when `argv` exits 0, else why not (its exit status and last stderr line), from
    `verdict_file` when an earlier process wrote it.

    Kept: a pass, a failure, a death by signal and a timeout (a kernel that hangs would hang in
    every process). Not kept, and None (the caller's own in-process check then decides, as it
    would without this): a child that cannot be started, or that exits `INCONCLUSIVE_EXIT`
    because it could not run the check here (e.g. a GPU in exclusive-process mode). With an
    unwritable cache folder the child runs in every process and nothing is kept.
    """
    try:
        verdict_file.parent.mkdir(parents=True, exist_ok=True)
        lock = open(verdict_file.with_name(verdict_file.name + ".lock"), "a")
    except OSError:
        return _run(argv, timeout, env, what)[1]
    with lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        except OSError:  # a filesystem without locks: each process may run its own child
            pass
        kept = _read(verdict_file)
        if kept is not None:
            return kept["failure"]
        started, failure = _run(argv, timeout, env, what)
        if not started:
            return None
        if failure is not None:
            failure += f" (kept in {verdict_file}: delete it to check again)"
        _write(verdict_file, {"failure": failure})
        return failure


def _run(argv: list[str], timeout: float, env: Optional[dict], what: str) -> tuple[bool, Optional[str]]:
    """(whether the child started and ran the check, why it failed or None)."""
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, errors="replace", timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return True, f"{what} in a separate process did not finish within {timeout:.0f} s"
    except OSError:
        return False, None
    if proc.returncode == INCONCLUSIVE_EXIT:
        return False, None
    if proc.returncode == 0:
        return True, None
    return True, f"{what} in a separate process failed ({describe_exit(proc.returncode)}): {_last_line(proc.stderr)}"


def _last_line(text: str) -> str:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return lines[-1] if lines else "no message"


def _read(path: Path) -> Optional[dict]:
    try:
        kept = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return kept if isinstance(kept, dict) and "failure" in kept else None


def _write(path: Path, verdict: dict) -> None:
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(json.dumps(verdict))
        os.replace(tmp, path)
    except OSError:
        tmp.unlink(missing_ok=True)

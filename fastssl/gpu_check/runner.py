"""The runner of tools/gpu_check.py: stages guarded one by one, each subprocess in its own
process group killed at its time budget, the run's deadline shared out among the stages left.

A stage is a function of a `Context`; whatever it raises is recorded (a traceback) and the next
stage runs, `StageSkipped` records a reason instead. Subprocesses run from the checkout's root with
it importable (the GPU machine does not install fastssl), their output in DIR/logs/<label>.log.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Optional

ROOT = Path(__file__).resolve().parents[2]  # the checkout
TOOL = ROOT / "tools" / "gpu_check.py"  # the command line, which also runs the workers
PY = sys.executable
DEFAULT_SCRATCH = Path("/tmp/fastssl_gpu_check")
DEFAULT_BUDGET_S = 420.0  # 7 minutes, all stages together
LOG_TAIL_CHARS = 3000  # of a failed command's output, kept in the JSON
LOG_MAX_BYTES = 200_000  # per command log under DIR/logs (the tail is kept)


class StageSkipped(Exception):
    """Raised by a stage that cannot run here (e.g. no CUDA); recorded as skipped, not failed."""


class Interrupted(BaseException):
    """SIGTERM / SIGINT to gpu_check itself: the running command's process group is killed (its
    children live in their own sessions and would outlive us), the report written, exit 128+N."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def raise_interrupted(signum: int, frame: Any) -> None:
    raise Interrupted(signum)


@dataclass
class Command:
    """What one subprocess did: enough to rerun it by hand and to read its log."""

    label: str
    argv: list[str]
    rc: Optional[int]
    seconds: float
    timed_out: bool
    log: str
    tail: str
    cpu_seconds: float

    def record(self) -> dict:
        out = {"label": self.label, "command": " ".join(self.argv), "rc": self.rc, "seconds": round(self.seconds, 2),
               "timed_out": self.timed_out, "log": self.log, "cpu_seconds": round(self.cpu_seconds, 1)}
        if self.rc != 0:
            out["tail"] = self.tail
        return out


@dataclass
class Context:
    """Where to write, how long is left, and how to run a subprocess within that time."""

    out: Path
    scratch: Path
    dry_run: bool
    cuda: bool
    deadline: float  # time.monotonic() at which the whole run must have ended
    stage_deadline: float = 0.0
    commands: list[Command] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def left(self) -> float:
        """Seconds left to the current stage."""
        return max(0.0, min(self.stage_deadline, self.deadline) - time.monotonic())

    def share(self, parts_left: int, cap: float = math.inf) -> float:
        """An even share of the stage's time for the next of `parts_left` steps (unused time rolls on)."""
        return min(cap, self.left() / max(parts_left, 1))

    def env(self) -> dict[str, str]:
        """The children's environment: this checkout importable, one JIT cache, CUDA hidden in dry runs."""
        env = dict(os.environ)
        paths = [str(ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and p != str(ROOT)]
        env["PYTHONPATH"] = os.pathsep.join(paths)
        env.setdefault("FASTSSL_EXT_DIR", str(self.scratch / "torch_extensions"))
        env["PYTHONUNBUFFERED"] = "1"
        if self.dry_run:  # CPU only; and no inductor build of the CPU colour jitter (minutes on 2 cores)
            env["CUDA_VISIBLE_DEVICES"] = ""
            env["FASTSSL_EAGER_AUGMENT"] = "1"
        return env

    def run(self, label: str, argv: list[str], timeout: Optional[float] = None) -> Command:
        """Run argv from the checkout's root, its output to DIR/logs/<label>.log, killed (with its
        whole process group: loader workers too) at `timeout` or at the stage's end."""
        timeout = self.left() if timeout is None else min(timeout, self.left())
        log = self.out / "logs" / f"{label}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        if timeout < 1:
            cmd = Command(label, argv, None, 0.0, True, str(log.relative_to(self.out)), "not started: no time left", 0)
            self.commands.append(cmd)
            return cmd
        before = _children_cpu()
        start = time.monotonic()
        timed_out = False
        with log.open("wb") as f:
            proc = subprocess.Popen(argv, cwd=ROOT, env=self.env(), stdout=f, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True)
            try:
                rc: Optional[int] = proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                timed_out = True
                _kill_group(proc)
                rc = proc.returncode
            except BaseException:  # Interrupted (or anything else): never leave the group running
                _kill_group(proc)
                raise
        seconds = time.monotonic() - start
        tail = _trim_log(log)
        cmd = Command(label, argv, rc, seconds, timed_out, str(log.relative_to(self.out)), tail[-LOG_TAIL_CHARS:],
                      _children_cpu() - before)
        self.commands.append(cmd)
        return cmd

    def worker(self, name: str, timeout: Optional[float] = None, **kwargs: Any) -> tuple[dict, Command]:
        """Run one of the stages' workers (code that has no tool of its own) in a subprocess; its JSON."""
        path = self.scratch / "workers" / f"{name}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.unlink(missing_ok=True)
        argv = [PY, str(TOOL), "--worker", name, "--worker-json", str(path),
                "--worker-args", json.dumps(kwargs)] + (["--dry-run"] if self.dry_run else [])
        cmd = self.run(name, argv, timeout)
        return read_json(path), cmd


def _children_cpu() -> float:
    """CPU seconds of every reaped child (a tool's loader workers included, once it has ended)."""
    import resource

    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGTERM the process group started for `proc`, SIGKILL after 10 s (only what we started)."""
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def _trim_log(log: Path) -> str:
    """Keep the last LOG_MAX_BYTES of a log (what comes back from the machine is limited); its text."""
    data = log.read_bytes()
    if len(data) > LOG_MAX_BYTES:
        data = b"[... earlier output cut ...]\n" + data[-LOG_MAX_BYTES:]
        log.write_bytes(data)
    return data.decode("utf-8", "replace")


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def save_json(path: Path, data: dict) -> None:
    write_atomic(path, json.dumps(data, indent=1, default=str))


def write_atomic(path: Path, text: str) -> None:
    """Write via a temporary file and a rename: a reader never sees half a report."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


@dataclass
class Stage:
    name: str
    title: str
    cap_s: float  # this stage's own time budget (GPU run); dry runs use DRY_CAP_S
    fn: Callable[[Context], dict]
    needs_cuda: bool = True


DRY_CAP_S = 240.0


def allotment(stages_left: list[Stage], ctx: Context) -> float:
    """Seconds for the first of `stages_left`: its cap, scaled down with every later stage's when
    their caps together exceed what is left of the run's budget (time a stage does not use
    flows on to the next ones)."""
    caps = [DRY_CAP_S if ctx.dry_run else s.cap_s for s in stages_left]
    left = max(0.0, ctx.deadline - time.monotonic())
    return caps[0] if sum(caps) <= left else left * caps[0] / sum(caps)


def run_stages(stages: list[Stage], ctx: Context, report: dict, write: Callable[[dict], None]) -> dict:
    """Run each stage guarded; the report is written when a stage starts and when it ends."""
    for i, stage in enumerate(stages):
        entry = {"name": stage.name, "title": stage.title, "status": "running", "seconds": 0.0,
                 "started": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        report["stages"].append(entry)
        write(report)
        ctx.stage_deadline = time.monotonic() + allotment(stages[i:], ctx)
        ctx.commands, ctx.errors = [], []
        start = time.monotonic()
        try:
            if ctx.left() < 1:
                raise StageSkipped("out of time: the run's --budget is spent")
            if stage.needs_cuda and not ctx.cuda and not ctx.dry_run:
                raise StageSkipped("no CUDA")
            result = stage.fn(ctx)
            timed_out = any(c.timed_out for c in ctx.commands)
            entry["status"] = "timeout" if timed_out else ("partial" if ctx.errors else "ok")
            entry.update(result)
        except StageSkipped as why:
            entry["status"], entry["reason"] = "skipped", f"skipped: {why}"
        except Interrupted as sig:
            entry["status"], entry["reason"] = "interrupted", f"interrupted by {sig}"
            entry["commands"] = [c.record() for c in ctx.commands]
            entry["seconds"] = round(time.monotonic() - start, 1)
            write(report)
            raise
        except Exception as exc:  # the guard: record and go on with the next stage
            entry["status"], entry["error"] = "failed", f"{type(exc).__name__}: {exc}"
            entry["traceback"] = traceback.format_exc()
        if ctx.errors:
            entry["errors"] = list(ctx.errors)
        entry["commands"] = [c.record() for c in ctx.commands]
        entry["seconds"] = round(time.monotonic() - start, 1)
        report["elapsed_s"] = round(time.monotonic() - report["_t0"], 1)
        write(report)
    return report

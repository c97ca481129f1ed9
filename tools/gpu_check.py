#!/usr/bin/env python3
"""Prove every GPU path of fastssl in one command, stage by stage, within about 7 minutes.

    python3 tools/gpu_check.py --out $OUT                        # on the CUDA machine (docs/gpu_check.md)
    python3 tools/gpu_check.py --out /tmp/gc --dry-run          # the same stages on CPU at tiny sizes
    python3 tools/gpu_check.py --out $OUT --stages loaders,end_to_end

Stages, in order (names or numbers for --stages):
  1 env          GPU, driver, torch / CUDA / nvcc / DALI / FFCV versions (or why not importable)
  2 fused        the fused MIRA kernel: JIT build time, the route taken, equality with the float64
                 reference over a grid of shapes, dtypes and hard inputs, the NVRTC route on its
                 own, microseconds per call and kernels per call (tools/bench_mira.py)
  3 compile      torch.compile(fullgraph=True) of a training step calling `mira_assign_views`:
                 graph breaks and equality with eager
  4 model_step   ResNet-50, 64 images, 2x224 + 6x96, eager vs compiled (tools/profile_throughput.py)
  5 bn_stats     per-view BatchNorm's cost in a ResNet-50 student step: per_view vs per_forward vs
                 8 separate forwards (tools/bench_bn_stats.py)
  6 loaders      ~1,500 ImageNet-like JPEGs made on local disk outside the checkout; every GPU
                 loader's source images/s (tools/bench_loaders.py)
  7 end_to_end   recipes/mira_bs512.py at 64 images per process, ~60 steps per loader and on
                 synthetic data; images/s, data-wait share, peak memory from the run's own logs
  8 gpu_tests    `pytest -m gpu`

Why this shape: GPU minutes are few and a machine may be taken back at any moment. So every
stage is guarded (a failure records its traceback and the next stage runs), every heavy step
runs in a subprocess killed at its time budget, the whole run has a deadline (--budget), and
DIR/gpu_check.json and DIR/gpu_check.md are rewritten when a stage starts and after it ends:
whatever ran is on disk even if the command itself is killed. Each stage calls the project's
own tools with their own flags and reads their JSON. `--dry-run` runs the same code on the
CPU at tiny sizes (CUDA hidden), so the script is proven before a GPU minute is spent; without
it, stages that need CUDA record "skipped: no CUDA" on a machine without one.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Optional

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
DEFAULT_SCRATCH = Path("/tmp/fastssl_gpu_check")
DEFAULT_BUDGET_S = 420.0  # 7 minutes, all stages together
LOG_TAIL_CHARS = 3000  # of a failed command's output, kept in the JSON
LOG_MAX_BYTES = 200_000  # per command log under DIR/logs (the tail is kept)

# Goals (issue targets), measured vs goal in the report.
GOAL_FUSED_US = 100.0  # 2 views x 512 x 3000, 30 iterations, per call
GOAL_FUSED_SPEEDUP = 20.0  # vs the per-view reference `mira_assign`
GOAL_FUSED_ERR = 1e-5  # max abs vs the float64 reference
GOAL_LOADER_IPS = 2000.0  # source images/s, each GPU loader
GOAL_E2E_IPS = 1300.0  # source images/s, each loader end to end
GOAL_E2E_VS_SYNTHETIC = 0.95  # within 5 % of synthetic data
GOAL_PEAK_MB = 8192.0  # 8 GiB at 64 images per GPU
BF16_LOSS_RTOL = 2e-2  # compiled vs eager step under bf16 autocast
BF16_TARGET_ATOL = 5e-2


class StageSkipped(Exception):
    """Raised by a stage that cannot run here (e.g. no CUDA); recorded as skipped, not failed."""


class Interrupted(BaseException):
    """SIGTERM / SIGINT to gpu_check itself: the running command's process group is killed (its
    children live in their own sessions and would outlive us), the report written, exit 128+N."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _raise_interrupted(signum: int, frame: Any) -> None:
    raise Interrupted(signum)


# ----------------------------------------------------------------------------- the runner
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
        """Run one of this file's workers (code that has no tool of its own) in a subprocess; its JSON."""
        path = self.scratch / "workers" / f"{name}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.unlink(missing_ok=True)
        argv = [PY, str(Path(__file__).resolve()), "--worker", name, "--worker-json", str(path),
                "--worker-args", json.dumps(kwargs)] + (["--dry-run"] if self.dry_run else [])
        cmd = self.run(name, argv, timeout)
        return _read_json(path), cmd


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


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


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


def goal(name: str, measured: Optional[float], target: float, unit: str, higher_is_better: bool,
         note: str = "") -> dict:
    """One goal row: measured vs goal, met / missed (None when nothing was measured)."""
    met = None
    if measured is not None and math.isfinite(measured):
        met = measured >= target if higher_is_better else measured <= target
    return {"goal": name, "measured": measured, "target": target, "unit": unit,
            "comparison": ">=" if higher_is_better else "<=", "met": met, "note": note}


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


def all_goals(report: dict) -> list[dict]:
    return [{"stage": s["name"], **g} for s in report["stages"] for g in s.get("goals", [])]


# ----------------------------------------------------------------------------- rendering
def _fmt(x: Any) -> str:
    if x is None:
        return "-"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, float):
        if not math.isfinite(x):
            return str(x)
        if x != 0 and (abs(x) < 1e-2 or abs(x) >= 1e6):
            return f"{x:.3g}"
        return f"{x:,.1f}" if abs(x) >= 100 else f"{x:.3g}"
    return str(x)


def render_markdown(report: dict) -> str:
    """The human half of the report: stages, goals, then each stage's summary and errors."""
    mode = "DRY RUN on CPU (tiny sizes; figures are NOT the goals' sizes)" if report["dry_run"] else "GPU run"
    lines = [f"# gpu_check: {mode}", "",
             f"Started {report['started']}, updated {report['updated']}, {_fmt(report.get('elapsed_s'))} s of a "
             f"{_fmt(report['budget_s'])} s budget. Device: {report.get('device') or '-'}.", "",
             f"Command: `{report['command']}`", "",
             "| # | stage | status | seconds | note |", "|---|---|---|---|---|"]
    for i, s in enumerate(report["stages"], 1):
        note = s.get("reason") or s.get("error") or "; ".join(s.get("errors", []))
        lines.append(f"| {i} | {s['name']} | {s['status']} | {_fmt(s['seconds'])} | {note.replace('|', '/')[:200]} |")
    goals = all_goals(report)
    if goals:
        lines += ["", "## Goals", "", "| stage | goal | measured | target | verdict | note |",
                  "|---|---|---|---|---|---|"]
        for g in goals:
            verdict = {True: "met", False: "MISSED", None: "not measured"}[g["met"]]
            measured = f"{_fmt(g['measured'])} {g['unit']}".strip()
            target = f"{g['comparison']} {_fmt(g['target'])} {g['unit']}".strip()
            lines.append(f"| {g['stage']} | {g['goal']} | {measured} | {target} | {verdict} | {g['note']} |")
    for s in report["stages"]:
        lines += ["", f"## {s['name']}: {s['title']} ({s['status']})", ""]
        lines += s.get("summary", []) or ([s["reason"]] if s.get("reason") else [])
        for c in s.get("commands", []):
            state = "timed out" if c["timed_out"] else f"rc {c['rc']}"
            lines.append(f"- `{c['label']}` ({state}, {_fmt(c['seconds'])} s, log `{c['log']}`)")
            if c.get("tail") and (c["rc"] != 0):
                lines += ["", "```", c["tail"][-1500:], "```"]
        if s.get("traceback"):
            lines += ["", "```", s["traceback"][-3000:], "```"]
    return "\n".join(lines) + "\n"


def table(header: list[str], rows: list[list[Any]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(_fmt(c) for c in row) + " |" for row in rows]
    return out + [""]


# ----------------------------------------------------------------------------- 1 environment
def stage_env(ctx: Context) -> dict:
    info, cmd = ctx.worker("env")
    if cmd.rc != 0:
        ctx.errors.append("the environment worker failed")
    for name, probe in (("nvidia-smi", ["nvidia-smi", "--query-gpu=name,driver_version,memory.total",
                                         "--format=csv,noheader"]),
                        ("nvcc", [info.get("nvcc") or "nvcc", "--version"])):
        if shutil.which(probe[0]) is None:
            info[name] = "not found"
            continue
        c = ctx.run(f"env-{name}", probe, timeout=30)
        lines = [ln for ln in c.tail.splitlines() if ln.strip()]
        info[name] = lines[-1].strip() if lines and c.rc == 0 else f"failed (rc {c.rc})"
    for module in ("nvidia.dali", "ffcv"):
        dist = "ffcv" if module == "ffcv" else "nvidia-dali-cuda130"
        code = (f"import importlib.metadata as m, {module} as x\n"  # the import is the check
                f"try:\n    v = m.version({dist!r})\n"  # ffcv's own __version__ is stale (0.0.3rc1 in 1.0.2)
                f"except m.PackageNotFoundError:\n    v = getattr(x, '__version__', '?')\n"
                f"print(v)")
        c = ctx.run(f"env-{module}", [PY, "-c", code], timeout=90)
        lines = [ln for ln in c.tail.splitlines() if ln.strip()]
        info[module] = lines[-1].strip() if c.rc == 0 and lines else \
            ("not checked: the stage's time ran out while importing it" if c.timed_out else
             f"not importable: {lines[-1].strip() if lines else f'rc {c.rc}'}")
    rows = [[k, v] for k, v in info.items() if not isinstance(v, dict)]
    rows += [[f"package {k}", v if v else "not installed"] for k, v in info.get("packages", {}).items()]
    summary = table(["item", "value"], rows)
    return {"results": info, "summary": summary}


def worker_env(args: dict, dry_run: bool) -> dict:
    import torch

    from fastssl.ops import _cuda_ext
    from fastssl.reports.environment import describe_environment

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    info = describe_environment(device)
    nvcc = _cuda_ext.nvcc_path()
    info.update(torch=torch.__version__, torch_cuda=torch.version.cuda,
                cudnn=torch.backends.cudnn.version() if cuda else None,
                capability=".".join(map(str, torch.cuda.get_device_capability())) if cuda else None,
                gpu_count=torch.cuda.device_count(), nvcc=str(nvcc) if nvcc else None,
                fastssl_ext_dir=str(_cuda_ext.cache_root()),
                pythonpath=os.environ.get("PYTHONPATH", ""))
    if cuda:
        free, total = torch.cuda.mem_get_info()
        info["gpu_memory_free_gb"] = round(free / 2**30, 1)
    import importlib.metadata

    for name in ("matplotlib", "pillow", "pytest", "tensorboard", "tqdm"):  # what the tools also need
        try:
            info["packages"][name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            info["packages"][name] = None
    return info


# ----------------------------------------------------------------------------- 2 fused kernel
FUSED_GRID_GPU = {"B": [64, 512, 4096], "K": [100, 3000, 16384], "views": [1, 2], "dtypes": ["fp32", "bf16", "fp16"],
                  "inputs": ["randn", "x50", "pm1e4", "empty"], "iters": 30}
FUSED_GRID_DRY = {"B": [8], "K": [10, 50], "views": [1, 2], "dtypes": ["fp32", "bf16", "fp16"],
                  "inputs": ["randn", "x50", "pm1e4", "empty"], "iters": 5}
BENCH_SIZES_GPU = "512x3000,64x3000,4096x3000,512x16384,4096x16384"


def hard_logits(kind: str, v: int, b: int, k: int, seed: int, device: Any = "cpu"):
    """V x B x K float32 logits of one kind, made on `device`: randn, x50 (randn * 50), pm1e4
    (+-1e4 extremes with ties) or empty (clusters nobody takes: -inf columns and hugely negative ones)."""
    import torch

    x = torch.randn(v, b, k, generator=torch.Generator(device=device).manual_seed(seed), device=device)
    if kind == "x50":
        x = 50.0 * x
    elif kind == "pm1e4":
        x = 1e4 * x.clamp(-1, 1)
        x[:, :, 0] = 1e4
        x[:, : max(1, b // 4), min(1, k - 1)] = -1e4
    elif kind == "empty":
        x[:, :, k // 2:] -= 1e4  # half the clusters: nobody likes them
        x[:, :, 0] = float("-inf")  # P = 0 exactly
    return x


def worker_fused_equality(args: dict, dry_run: bool) -> dict:
    """JIT build time of the fused kernel, then kernel vs the float64 reference over the grid.

    Writes its results after each case, so a timeout keeps the cases that finished.
    """
    import torch

    from fastssl.ops import _cuda_ext, mira_assign_views
    from fastssl.ops.mira_fused import solve_views

    out_path = Path(args["json"])
    grid = FUSED_GRID_DRY if dry_run else FUSED_GRID_GPU
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    res: dict[str, Any] = {"device": str(device), "grid": grid, "cases": []}
    ext = None
    if cuda:
        from fastssl.ops import _nvrtc

        # Each route's cache: the nvcc extension's build folders, NVRTC's compiled images.
        caches = {"nvcc": lambda: list(_cuda_ext.cache_root().glob("fastssl_mira_fused_*")),
                  "nvrtc": lambda: list(_nvrtc.cache_dir().glob("*")) if _nvrtc.cache_dir().is_dir() else []}
        cached_before = {route: bool(find()) for route, find in caches.items()}
        t = time.perf_counter()
        module = _cuda_ext.load_fused()
        res["build_s"] = time.perf_counter() - t
        route = _cuda_ext.status().get("route")
        res["build_cached"] = cached_before.get(route, False)  # the route that loaded found its cache: a warm rerun
        ext = _cuda_ext.fused_for(device)
        res["fused_status"] = _cuda_ext.status()
        res["loaded"] = module is not None and ext is not None
        # the custom op (what training calls) dispatches to the kernel
        before = _cuda_ext.status()["fused_calls"]
        mira_assign_views([torch.randn(64, 300, device=device) for _ in range(2)], tau=0.225, beta=0.7, num_iters=30)
        res["op_dispatches_to_fused"] = _cuda_ext.status()["fused_calls"] == before + 1
        res["routes"] = fused_routes_check(device)
    res["path"] = "fused kernel (mira_assign_views_cuda)" if ext is not None else \
        "custom op mira_assign_views (the fused kernel is not available here: solve_views)"
    _save(out_path, res)
    worst = 0.0
    for b in grid["B"]:
        for k in grid["K"]:
            for v in grid["views"]:
                for kind in grid["inputs"]:
                    base = hard_logits(kind, v, b, k, seed=b * 7 + k * 3 + v, device=device)
                    for dname in grid["dtypes"]:
                        x = base.to(dtypes[dname])
                        ref = solve_views(x.double(), 0.225, 0.7, grid["iters"])
                        if ext is not None:
                            got = ext.mira_assign_views_cuda(x.contiguous(), 0.225, 0.7, grid["iters"])
                        else:
                            got = torch.stack(mira_assign_views(list(x.unbind(0)), tau=0.225, beta=0.7,
                                                                num_iters=grid["iters"]))
                        err = (got.double() - ref).abs().max().item()
                        finite = bool(torch.isfinite(got).all().item())
                        err = err if finite and math.isfinite(err) else float("inf")
                        worst = max(worst, err)
                        res["cases"].append({"B": b, "K": k, "views": v, "input": kind, "dtype": dname,
                                             "max_abs_err": err})
                        del ref, got, x
                    res["max_abs_err"], res["cases_done"] = worst, len(res["cases"])
                    _save(out_path, res)
    if cuda:
        torch.cuda.synchronize()
    res["complete"] = True
    _save(out_path, res)
    return res


def fused_routes_check(device: Any, routes: tuple[str, ...] = ("nvrtc",)) -> dict:
    """Routes of the fused kernel on their own (default: NVRTC, launched from Python; the nvcc
    extension's cold build would eat the grid's time, and the GPU tests run it): load time and
    max abs error vs float64 on 2 x 512 x 3000 (three dtypes, randn and empty clusters), so the
    run proves the NVRTC route even where the chain picked another."""
    import torch

    from fastssl.ops import _cuda_ext, _nvrtc
    from fastssl.ops.mira_fused import solve_views

    out: dict[str, dict] = {}
    for route in routes:
        rec: dict[str, Any] = {}
        try:
            t = time.perf_counter()
            kernel = _nvrtc.load() if route == "nvrtc" else _cuda_ext.build()
            rec["load_s"] = time.perf_counter() - t
            worst = 0.0
            for kind in ("randn", "empty"):
                x = hard_logits(kind, 2, 512, 3000, seed=11, device=device)
                ref = solve_views(x.double(), 0.225, 0.7, 30)
                for dtype in (torch.float32, torch.bfloat16, torch.float16):
                    got = kernel.mira_assign_views_cuda(x.to(dtype).contiguous(), 0.225, 0.7, 30)
                    err = (got.double() - ref).abs().max().item()
                    worst = max(worst, err if math.isfinite(err) else float("inf"))
            rec["max_abs_err"] = worst
        except Exception as exc:  # recorded, not raised: the other route and the grid still run
            rec["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
        out[route] = rec
    return out


def _save(path: Path, data: dict) -> None:
    write_atomic(path, json.dumps(data, indent=1, default=str))


def bench_mira_argv(ctx: Context, views: int, json_path: Path, iters: int = 30) -> list[str]:
    """bench_mira for `views` teacher views; at 0 iterations only the goal's size and the fused paths
    (what a call costs besides its iterations)."""
    argv = [PY, "tools/bench_mira.py", "--views", str(views), "--json", str(json_path), "--iters", str(iters)]
    impls = "reference,views,solve_views,fused,fused_graph" if iters else "views,fused,fused_graph"
    if ctx.dry_run:
        return argv + ["--device", "cpu", "--sizes", "8x10", "--impls", impls, "--warmup", "1", "--repeats", "2"]
    sizes = BENCH_SIZES_GPU if views == 2 and iters else "512x3000"
    return argv + ["--device", "cuda", "--sizes", sizes, "--impls", impls, "--warmup", "5", "--repeats", "30"]


def per_iteration_us(timings: dict[str, list[dict]], b: int, k: int, iters: int = 30) -> dict[str, float]:
    """Microseconds one fixed-point iteration adds, per implementation: (t(iters) - t(0)) / iters at
    B x K, 2 views. Why: it tells the kernel's per-iteration work (column partials, grid barriers)
    from its fixed cost (launch, log P, the output) when the goal is missed."""
    at = {name: {r["implementation"]: r.get("median_us") for r in timings.get(name, []) if (r["B"], r["K"]) == (b, k)}
          for name in ("2views", "2views-iters0")}
    return {impl: (t - at["2views-iters0"][impl]) / iters for impl, t in at["2views"].items()
            if t is not None and at["2views-iters0"].get(impl) is not None}


def stage_fused(ctx: Context) -> dict:
    eq, cmd = ctx.worker("fused_equality", timeout=0.7 * ctx.left())  # includes the JIT build (~30-60 s cold)
    if cmd.rc != 0:
        ctx.errors.append(f"equality worker: {'timed out' if cmd.timed_out else f'rc {cmd.rc}'} after "
                          f"{eq.get('cases_done', 0)} cases")
    timings: dict[str, list[dict]] = {}
    for views in (2,) if ctx.dry_run else (2, 1):
        path = ctx.out / "fused" / f"bench_mira_{views}views.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        c = ctx.run(f"bench_mira-{views}views", bench_mira_argv(ctx, views, path),
                    timeout=0.75 * ctx.left() if views == 2 else None)
        data = _read_json(path)
        timings[f"{views}views"] = data.get("records", [])
        if c.rc != 0:
            ctx.errors.append(f"bench_mira --views {views}: {'timed out' if c.timed_out else f'rc {c.rc}'}")
    path = ctx.out / "fused" / "bench_mira_2views_iters0.json"
    c = ctx.run("bench_mira-2views-iters0", bench_mira_argv(ctx, 2, path, iters=0), timeout=0.5 * ctx.left())
    timings["2views-iters0"] = _read_json(path).get("records", [])
    if c.rc != 0:
        ctx.errors.append(f"bench_mira --iters 0: {'timed out' if c.timed_out else f'rc {c.rc}'}")
    # goal: 2 views x 512 x 3000 on the op training calls (views), vs the per-view reference
    b, k = (8, 10) if ctx.dry_run else (512, 3000)
    per_iter = per_iteration_us(timings, b, k)
    rec = {r["implementation"]: r for r in timings.get("2views", []) if (r["B"], r["K"]) == (b, k)}
    views_us = rec.get("views", {}).get("median_us")
    ref_us = rec.get("reference", {}).get("median_us")
    speedup = ref_us / views_us if views_us and ref_us else None
    fused_ran = rec.get("views", {}).get("fused")
    note = f"B={b} K={k}; the op ran the fused kernel: {_fmt(fused_ran)}"
    goals = [goal("fused assignment, 2 views x 512 x 3000 x 30 iters", views_us, GOAL_FUSED_US, "us", False, note),
             goal("speed-up vs per-view mira_assign", speedup, GOAL_FUSED_SPEEDUP, "x", True, note),
             goal("max abs error vs float64, whole grid", eq.get("max_abs_err"), GOAL_FUSED_ERR, "", False,
                  f"{eq.get('cases_done', 0)} cases, {eq.get('path', '?')}"
                  + ("" if eq.get("complete") else " (grid INCOMPLETE)"))]
    if not ctx.dry_run:  # the NVRTC route (no nvcc), launched on its own
        nv = eq.get("routes", {}).get("nvrtc", {})
        goals.append(goal("NVRTC route: max abs error vs float64, 2 x 512 x 3000", nv.get("max_abs_err"),
                          GOAL_FUSED_ERR, "", False, nv.get("error", f"load {_fmt(nv.get('load_s'))} s")))
    rows = []
    for key, recs in timings.items():
        for r in recs:
            kern = r.get("kernels", {})
            rows.append([key, r["implementation"], r["B"], r["K"], r.get("median_us"), kern.get("count"),
                         kern.get("triton"), r.get("error", "")[:80]])
    summary = [f"JIT build: {_fmt(eq.get('build_s'))} s (cache present before: {_fmt(eq.get('build_cached'))}); "
               f"fused loaded: {_fmt(eq.get('loaded'))}; "
               f"op dispatches to it: {_fmt(eq.get('op_dispatches_to_fused'))}; "
               f"status: {eq.get('fused_status', {}).get('reason') or '-'}; "
               f"route taken: {_fmt(eq.get('fused_status', {}).get('route'))}; "
               f"routes alone: {json.dumps(eq.get('routes', {}), default=str)}", "",
               f"Equality ({eq.get('path', '?')}): {eq.get('cases_done', 0)} cases, worst max abs error "
               f"{_fmt(eq.get('max_abs_err'))}" + ("" if eq.get("complete") else " (INCOMPLETE)"), ""]
    worst = sorted(eq.get("cases", []), key=lambda c: -c["max_abs_err"])[:5]
    summary += table(["B", "K", "views", "input", "dtype", "max abs err"],
                     [[c["B"], c["K"], c["views"], c["input"], c["dtype"], c["max_abs_err"]] for c in worst])
    summary += table(["views", "impl", "B", "K", "us/call", "kernels/call", "triton", "error"], rows)
    summary += ["", f"Per fixed-point iteration at 2 x {b} x {k} ((30 iterations - 0) / 30, us): "
                + (", ".join(f"{impl} {_fmt(us)}" for impl, us in per_iter.items()) or "-")]
    return {"results": {"equality": {k: v for k, v in eq.items() if k != "cases"}, "worst_cases": worst,
                        "timings": timings, "per_iteration_us": per_iter}, "goals": goals, "summary": summary}


# ----------------------------------------------------------------------------- 3 compile
def worker_compile_step(args: dict, dry_run: bool) -> dict:
    """torch.compile(fullgraph=True) of teacher forward + `mira_assign_views` + student loss.

    The step is the training step's forward half (fastssl.method.train_step's order); the
    backward runs through the compiled graph's autograd. Graph breaks come from
    torch._dynamo.explain; equality is loss, targets and gradients vs eager under bf16.
    """
    import torch

    from fastssl.losses import swapped_prediction_loss
    from fastssl.models import MiraNetwork, make_teacher
    from fastssl.ops import _cuda_ext, mira_assign_views

    out_path = Path(args["json"])
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    if dry_run:
        b, sizes, k, hidden, dim, backend = 4, (16, 16, 8, 8), 20, 32, 16, "aot_eager"  # no codegen: CPU-cheap
    else:
        b, sizes, k, hidden, dim, backend = 32, (96, 96, 48, 48), 3000, 2048, 256, "inductor"
    torch.manual_seed(0)
    student = MiraNetwork("resnet18", hidden, dim, k).to(device).to(memory_format=torch.channels_last)
    teacher = make_teacher(student)
    g = torch.Generator().manual_seed(1)
    views = [torch.randn(b, 3, s, s, generator=g).to(device).contiguous(memory_format=torch.channels_last)
             for s in sizes]
    res: dict[str, Any] = {"device": str(device), "backend": backend, "batch": b, "crops": list(sizes), "K": k}

    def step(views: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16):
            t_logits = teacher(views[:2])
        targets = mira_assign_views(t_logits, tau=0.225, beta=0.7, num_iters=30)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            s_logits = student(views)
        return swapped_prediction_loss(s_logits, targets, 0.1), torch.stack(targets)

    t = time.perf_counter()
    explained = torch._dynamo.explain(step)(views)
    res["explain_s"] = time.perf_counter() - t
    res["graph_count"] = explained.graph_count
    res["graph_break_count"] = explained.graph_break_count
    res["break_reasons"] = [str(r)[:300] for r in explained.break_reasons[:5]]
    _save(out_path, res)
    torch._dynamo.reset()

    def run(fn) -> tuple[float, torch.Tensor, list[torch.Tensor]]:
        student.zero_grad(set_to_none=True)
        loss, targets = fn(views)
        loss.backward()
        return loss.item(), targets.detach().float(), [p.grad.detach().float().clone() for p in student.parameters()
                                                      if p.grad is not None]

    eager = run(step)

    def compile_and_compare(backend: str) -> tuple[dict, Any]:
        """fullgraph=True with `backend`: whether it compiles, and the compiled step against eager."""
        torch._dynamo.reset()
        compiled_fn = torch.compile(step, fullgraph=True, backend=backend)
        calls = _cuda_ext.status()["fused_calls"]
        t = time.perf_counter()
        try:
            compiled = run(compiled_fn)
        except Exception as exc:  # a graph break under fullgraph=True, or a compiler error: that is the finding
            return {"fullgraph_ok": False, "fullgraph_error": f"{type(exc).__name__}: {str(exc)[:1500]}",
                    "compile_s": time.perf_counter() - t}, None
        ge, gc = torch.cat([x.flatten() for x in eager[2]]), torch.cat([x.flatten() for x in compiled[2]])
        return {"compile_s": time.perf_counter() - t, "fullgraph_ok": True,
                "fused_calls_in_compiled": _cuda_ext.status()["fused_calls"] - calls,
                "loss_eager": eager[0], "loss_compiled": compiled[0],
                "loss_rel_diff": abs(compiled[0] - eager[0]) / max(abs(eager[0]), 1e-12),
                "targets_max_abs_diff": (compiled[1] - eager[1]).abs().max().item(),
                "grad_cosine": torch.nn.functional.cosine_similarity(ge, gc, dim=0).item(),
                "grads": len(eager[2])}, compiled_fn

    if backend != "aot_eager":  # first AOTAutograd alone (seconds): the custom op's fake kernel and autograd
        res["aot_eager"], _ = compile_and_compare("aot_eager")  # under fullgraph, kept if inductor's cold
        _save(out_path, res)  # build (a minute or more) runs past the stage's time
    found, compiled_fn = compile_and_compare(backend)
    res.update(found)
    if compiled_fn is None:
        _save(out_path, res)
        return res
    if cuda:  # steady-state time of one compiled vs eager forward+backward, for scale
        for name, fn in (("eager", step), ("compiled", compiled_fn)):
            for _ in range(2):
                run(fn)
            torch.cuda.synchronize()
            t = time.perf_counter()
            for _ in range(5):
                run(fn)
            torch.cuda.synchronize()
            res[f"{name}_step_ms"] = 1e3 * (time.perf_counter() - t) / 5
    res["complete"] = True
    _save(out_path, res)
    return res


def stage_compile(ctx: Context) -> dict:
    res, cmd = ctx.worker("compile_step")
    if cmd.rc != 0:
        ctx.errors.append(f"compile worker: {'timed out' if cmd.timed_out else f'rc {cmd.rc}'}"
                          + ("" if "graph_break_count" not in res else " (after explain)"))
    if "fullgraph_ok" not in res and "aot_eager" in res:  # inductor did not finish: AOTAutograd's figures
        res = {**res, **res["aot_eager"], "backend": "aot_eager (inductor did not finish)"}
    fullgraph = res.get("fullgraph_ok")
    if fullgraph is False:
        ctx.errors.append(f"torch.compile(fullgraph=True) failed: {res.get('fullgraph_error', '?')[:300]}")
    goals = [goal("graph breaks (torch._dynamo.explain)", res.get("graph_break_count"), 0, "", False,
                  f"fullgraph=True compile succeeded: {_fmt(fullgraph)}"),
             goal("loss, compiled vs eager (relative)", res.get("loss_rel_diff"), BF16_LOSS_RTOL, "", False,
                  "bf16 autocast"),
             goal("targets, compiled vs eager (max abs)", res.get("targets_max_abs_diff"), BF16_TARGET_ATOL, "",
                  False, "bf16 teacher logits / (tau (1 - beta))")]
    if ctx.cuda and not ctx.dry_run:
        goals.append(goal("fused kernel calls from the compiled step", res.get("fused_calls_in_compiled"), 1, "",
                          True, "the custom op inside the compiled graph dispatches to the fused kernel"))
    keys = ["backend", "batch", "crops", "K", "graph_count", "graph_break_count", "fullgraph_ok", "explain_s",
            "compile_s", "loss_eager", "loss_compiled", "loss_rel_diff", "targets_max_abs_diff", "grad_cosine",
            "fused_calls_in_compiled", "eager_step_ms", "compiled_step_ms"]
    summary = table(["item", "value"], [[k, res.get(k)] for k in keys if k in res])
    if res.get("break_reasons"):
        summary += ["Break reasons:", ""] + [f"- {r}" for r in res["break_reasons"]]
    return {"results": res, "goals": goals, "summary": summary}


# ----------------------------------------------------------------------------- 4 model step
DRY_MODEL = ["--model.arch", "resnet18", "--model.num_prototypes", "20", "--model.proj_hidden_dim", "32",
             "--model.proj_dim", "16", "--aug.global_size", "16", "--aug.local_size", "8", "--aug.num_local", "2"]


def stage_model_step(ctx: Context) -> dict:
    results, rows = {}, []
    # Dry runs skip the compiled mode: inductor on a CPU takes minutes, and the flag is all that differs.
    modes = [("eager", "false")] + ([] if ctx.dry_run else [("compiled", "true")])
    for i, (mode, flag) in enumerate(modes):
        out = ctx.out / "model_step" / mode
        argv = [PY, "tools/profile_throughput.py", "--recipe", "recipes/mira_bs512.py", "--out", str(out),
                "--backends", "synthetic", "--data.backend", "synthetic", "--no-cross-check", "--repeats", "1",
                "--train.compile", flag]
        if ctx.dry_run:
            argv += ["--gpus", "128", "--steps", "1", "--warmup-steps", "1", "--loader-batches", "1",
                     "--warmup-batches", "0", "--assign-repeats", "1", "--assign-warmup", "0"] + DRY_MODEL
        else:  # 512 / 8 = 64 images per GPU, 2x224 + 6x96 (the recipe), bf16 (auto), channels_last
            argv += ["--gpus", "8", "--steps", "20", "--warmup-steps", "5", "--loader-batches", "3",
                     "--warmup-batches", "1", "--assign-repeats", "20"]
        cap = 45 if (mode == "eager" and not ctx.dry_run) else math.inf
        for name in ("report.json", "report.partial.json"):  # a rerun into the same --out must not read the last one's
            (out / name).unlink(missing_ok=True)
        c = ctx.run(f"profile-{mode}", argv, timeout=ctx.share(len(modes) - i, cap))
        # after a timeout: the model step's figures, written before the profile's stage 3
        rep = _read_json(out / "report.json") or _read_json(out / "report.partial.json")
        if c.rc != 0:
            ctx.errors.append(f"profile_throughput ({mode}): {'timed out' if c.timed_out else f'rc {c.rc}'}"
                              + (" after the model step" if rep.get("partial") else ""))
        if "model_step" not in rep.get("stages", {}):
            continue
        ms = rep["stages"]["model_step"]
        results[mode] = {"images_per_s": ms["images_per_s"], "step_ms": ms["step_ms"],
                         "device_busy_share": ms.get("device_busy_share"),
                         "device_ops_per_step": ms.get("device_ops_per_step"),
                         "partial": bool(rep.get("partial")),
                         "breakdown_ms": rep.get("breakdown_ms", {}),
                         "peak_device_mb": rep.get("memory", {}).get("peak_device_mb"),
                         "assignment": rep["stages"].get("assignment"), "recipe": rep.get("recipe"),
                         "report": str((out / "report.md").relative_to(ctx.out))}
        bd = results[mode]["breakdown_ms"]
        rows.append([mode, ms["images_per_s"], ms["step_ms"], ms.get("device_busy_share"), ms.get("device_ops_per_step"),
                     bd.get("teacher_forward"), bd.get("assignment"), bd.get("student_forward_backward"),
                     bd.get("update"), results[mode]["peak_device_mb"]])
    peak = max((r["peak_device_mb"] for r in results.values() if r.get("peak_device_mb") is not None), default=None)
    goals = [goal("peak device memory, model step at 64 per GPU", peak, GOAL_PEAK_MB, "MiB", False,
                  "max over eager and compiled" + ("" if ctx.cuda and not ctx.dry_run else "; CPU: not measured"))]
    if "eager" in results and "compiled" in results:
        results["compiled_vs_eager"] = results["compiled"]["images_per_s"] / results["eager"]["images_per_s"]
    summary = table(["mode", "source images/s", "step ms", "GPU busy share", "GPU ops per step", "teacher ms",
                     "assignment ms", "student f+b ms", "update ms", "peak MiB"], rows)
    if "compiled_vs_eager" in results:
        summary.append(f"compiled / eager: {results['compiled_vs_eager']:.2f}x")
    return {"results": results, "goals": goals, "summary": summary}


# ----------------------------------------------------------------------------- 5 BatchNorm statistics
def stage_bn_stats(ctx: Context) -> dict:
    """Per-view BatchNorm's cost: student step per_view vs per_forward vs 8 separate forwards (bench_bn_stats)."""
    path = ctx.out / "bn_stats.json"
    argv = [PY, "tools/bench_bn_stats.py", "--json", str(path)]
    argv += (["--arch", "resnet18", "--batch", "4", "--global-size", "32", "--local-size", "16", "--num-local", "2",
              "--prototypes", "20", "--steps", "1", "--rounds", "1"] if ctx.dry_run else ["--steps", "3", "--rounds", "3"])
    c = ctx.run("bench-bn-stats", argv)
    rep = _read_json(path)
    if c.rc != 0 or not rep:
        raise RuntimeError(f"bench_bn_stats: {'timed out' if c.timed_out else f'rc {c.rc}'} (see {c.log})")
    ratio = rep["ratio_to_per_forward"]["per_view"]
    goals = [goal("per_view student step / per_forward", ratio, 1.05, "x", False, rep["views"] + ", " + rep["precision"])]
    rows = [[m, rep["step_ms"][m], rep["ratio_to_per_forward"][m]] for m in rep["step_ms"]]
    return {"results": rep, "goals": goals, "summary": table(["mode", "student step ms", "x per_forward"], rows)}


# ----------------------------------------------------------------------------- data (6, 7)
def _photo(job: tuple[int, int, int, str, int]) -> None:
    """One ImageNet-like JPEG: 1/f colour noise (photographic entropy and file size)."""
    import numpy as np
    from PIL import Image

    i, w, h, path, quality = job
    rng = np.random.default_rng(i)
    w, h = w + int(rng.integers(-w // 25, w // 25 + 1)), h + int(rng.integers(-h // 25, h // 25 + 1))
    fy, fx = np.fft.fftfreq(h)[:, None], np.fft.rfftfreq(w)[None, :]
    amplitude = 1.0 / np.maximum(np.hypot(fy, fx), 1.0 / max(h, w))
    phase = rng.uniform(0, 2 * np.pi, (3, h, w // 2 + 1))
    img = np.fft.irfft2(amplitude * np.exp(1j * phase), s=(h, w))
    img = (img - img.mean(axis=(1, 2), keepdims=True)) / img.std(axis=(1, 2), keepdims=True)
    Image.fromarray(np.clip(128 + 45 * img.transpose(1, 2, 0), 0, 255).astype(np.uint8)).save(path, quality=quality)


def importable(module: str) -> bool:
    """Whether `module` can be found (without importing it: DALI and FFCV imports take seconds)."""
    import importlib.util

    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def dataset_spec(dry_run: bool) -> dict:
    return {"count": 24, "width": 64, "height": 48, "quality": 90, "classes": 4} if dry_run else \
        {"count": 1500, "width": 500, "height": 375, "quality": 90, "classes": 10}


def ensure_dataset(ctx: Context) -> dict:
    """The JPEG folder (ImageNet layout) and its .beton under the scratch dir, made once per machine."""
    spec = dataset_spec(ctx.dry_run)
    root = ctx.scratch / f"photo_{spec['count']}_{spec['width']}x{spec['height']}"
    train, beton = root / "train", root / "train.beton"
    info = {"train": str(train), "beton": str(beton), **spec}
    done = root / ".complete"
    if not done.exists():
        from concurrent.futures import ProcessPoolExecutor

        shutil.rmtree(root, ignore_errors=True)
        t = time.monotonic()
        jobs = []
        for i in range(spec["count"]):
            folder = train / f"n{i % spec['classes']:08d}"
            folder.mkdir(parents=True, exist_ok=True)
            jobs.append((i, spec["width"], spec["height"], str(folder / f"img_{i:05d}.JPEG"), spec["quality"]))
        import multiprocessing

        # spawn: the parent may have initialised CUDA (torch.cuda.is_available); the workers need only PIL
        with ProcessPoolExecutor(max_workers=min(16, os.cpu_count() or 1),
                                 mp_context=multiprocessing.get_context("spawn")) as pool:
            list(pool.map(_photo, jobs, chunksize=8))
        info["generate_s"] = time.monotonic() - t
        if not importable("ffcv"):
            ctx.errors.append("FFCV is not importable: no .beton (the ffcv loader is skipped)")
            return {**info, "beton_exists": False}
        c = ctx.run("convert_ffcv", [PY, "tools/convert_imagenet_to_ffcv.py", str(train), str(beton),
                                     "--write-mode", "jpg", "--no-progress", "--force"], timeout=ctx.share(3))
        if c.rc != 0:
            ctx.errors.append(f"FFCV conversion: {'timed out' if c.timed_out else f'rc {c.rc}'}")
        else:
            done.write_text(json.dumps(info))
        info["convert_s"] = c.seconds
    else:
        info.update(json.loads(done.read_text()))
        info["reused"] = True
    files = list(train.rglob("*.JPEG"))
    info["mean_file_kb"] = sum(f.stat().st_size for f in files) / max(len(files), 1) / 1024
    info["beton_exists"] = beton.exists()
    return info


# ----------------------------------------------------------------------------- 6 loaders
# One bench_loaders process per group (each writes its JSON when it ends, so a timeout loses one
# group, not all); within a group the backends are interleaved. Goal-bearing loaders first; the
# fixed-order variants price the jitter order drawn per view (`--aug.jitter_order`).
LOADER_GROUPS = [("dali", ["dali-hw0", "dali", "dali-hw1", "dali-fixed-order", "dali-device-augment"]),
                 ("ffcv", ["ffcv", "ffcv-fixed-order"]), ("torchvision", ["torchvision", "torchvision-device-augment"])]
LOADER_VARIANTS = [v for _, group in LOADER_GROUPS for v in group]
GPU_LOADERS = {"dali-hw0": "DALI mixed, hw decoder 0", "dali": "DALI mixed, hw decoder 0.65",
               "dali-hw1": "DALI mixed, hw decoder 1.0", "dali-device-augment": "DALI mixed crops + device ops",
               "ffcv": "FFCV + device ops"}


LOADER_TIMED_BATCHES = 18  # after 2 warm-up batches: 20 of an epoch's 23 batches of 64 (1,500 generated JPEGs)


def stage_loaders(ctx: Context) -> dict:
    data = ensure_dataset(ctx)
    workers = 2 if ctx.dry_run else min(16, os.cpu_count() or 1)
    backends: dict[str, dict] = {}
    runs, rows = {}, []
    for i, (group, variants) in enumerate(LOADER_GROUPS):
        path = ctx.out / "loaders" / f"bench_loaders_{group}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        argv = [PY, "tools/bench_loaders.py", "--data", data["train"], "--beton", data["beton"], "--backends",
                ",".join(variants), "--workers", str(workers), "--json", str(path)]
        if ctx.dry_run:
            argv += ["--device", "cpu", "--batch-size", "4", "--batches", "1", "--warmup", "0", "--repeats", "1",
                     "--global-size", "16", "--local-size", "8", "--num-local", "2"]
        else:  # the recipe's 8 crops (2x224 + 6x96), 64 per batch
            argv += ["--device", "cuda", "--batch-size", "64", "--batches", str(LOADER_TIMED_BATCHES), "--warmup",
                     "2", "--repeats", "2"]
        c = ctx.run(f"bench_loaders-{group}", argv, timeout=ctx.share(len(LOADER_GROUPS) - i))
        rep = _read_json(path)
        if c.rc != 0:
            ctx.errors.append(f"bench_loaders {group}: {'timed out' if c.timed_out else f'rc {c.rc}'}")
        busy = c.cpu_seconds / c.seconds if c.seconds else None
        runs[group] = {"seconds": c.seconds, "cpu_cores_busy_avg": busy, "config": rep.get("config")}
        for name, r in rep.get("backends", {}).items():
            backends[name] = r
            rows.append([name, r["images_per_s"], r["min"], r["max"], r.get("epoch_start_s"), r.get("device_added_mb"),
                         r.get("device_used_mb"), busy])
    goals = [goal(f"{label} source images/s", backends.get(n, {}).get("images_per_s"), GOAL_LOADER_IPS, "img/s",
                  True, "" if n in backends else "not measured (not installed, or its bench failed)")
             for n, label in GPU_LOADERS.items()]
    summary = [f"Data: {data['count']} JPEGs ~{data['width']}x{data['height']} q{data['quality']} "
               f"(mean {_fmt(data.get('mean_file_kb'))} KB) in {data['train']}; .beton {data['beton']}", "",
               f"Workers / threads per backend: {workers}. 'cores busy': CPU time of the bench process and its "
               f"workers over its wall time (start-up included), per group.",
               f"Each rate times {LOADER_TIMED_BATCHES} batches after 2 untimed ones; batches a loader had "
               f"queued before the clock started (DALI 2, FFCV 3, torchvision up to workers x 4) come free, so a "
               f"rate is an upper bound, by at most 3/{LOADER_TIMED_BATCHES} for DALI and FFCV.", ""]
    summary += ["Device memory (every allocator: DALI's and nvJPEG's pools too). 'added': what a loader's first "
                "batch added, i.e. its decoder's buffers and pools (nvJPEG's preallocation included); each group "
                "is one process, so the first loader of a group shows its backend's whole cost and a later one "
                "only what it did not reuse. 'in use': all the group's process held at the end of the loader's "
                "timed passes (the readings accumulate within a group).", ""]
    summary += ["'epoch start s': seconds from an epoch's start to its first batch on the GPU (median), which "
                "training pays once per epoch: DALI builds its pipeline per epoch, torchvision spawns its workers. "
                "Compare with an ImageNet epoch at the goal rate (1.28 M images / 8 GPUs / 2,000 per s: ~80 s).", ""]
    summary += table(["backend", "source images/s", "min", "max", "epoch start s", "added MiB", "in use MiB",
                      "cores busy (group)"], rows)
    return {"results": {"data": data, "workers": workers, "groups": runs, "backends": backends},
            "goals": goals, "summary": summary}


# ----------------------------------------------------------------------------- 7 end to end
E2E_RUNS = [("synthetic", "synthetic", []), ("torchvision", "torchvision", ["--data.device_augment", "true"]),
            ("dali", "dali", []), ("ffcv", "ffcv", [])]


def read_run_logs(run_dir: Path, skip_epochs: int = 1) -> dict:
    """Images/s, data-wait share and peak memory from the run's own epochs.csv / train_log.csv,
    over the epochs after the first `skip_epochs` (start-up, cuDNN autotuning, first batches)."""
    def rows(name: str) -> list[dict]:
        p = run_dir / name
        if not p.exists():
            return []
        with p.open() as f:
            return list(csv.DictReader(f))

    def num(r: dict, k: str) -> Optional[float]:
        try:
            return float(r[k])
        except (KeyError, TypeError, ValueError):
            return None

    epochs, steps = rows("epochs.csv"), rows("train_log.csv")
    steady = epochs[skip_epochs:] or epochs
    out: dict[str, Any] = {"epochs": len(epochs), "steps_logged": len(steps),
                           "steps": int(num(epochs[-1], "step") or 0) if epochs else 0}
    if steady:
        ips = [num(r, "images_per_s") for r in steady]
        wait = [num(r, "data_wait_share") for r in steady]
        out["images_per_s"] = sum(x for x in ips if x is not None) / len(steady)
        out["data_wait_share"] = sum(x for x in wait if x is not None) / len(steady)
        out["per_epoch_images_per_s"] = ips
    peaks = [num(r, "peak_memory_mb") for r in epochs]
    peaks = [p for p in peaks if p is not None and p > 0]
    out["peak_memory_mb"] = max(peaks) if peaks else None
    used = [u for u in (num(r, "device_used_mb") for r in epochs) if u is not None and u > 0]
    out["device_used_mb"] = max(used) if used else None  # DALI's pools, the cache and the context too
    # Growth from the first epoch's end to the last's: DALI builds a pipeline (nvJPEG state, pools) per
    # epoch, so memory that a dropped pipeline keeps would show here, epoch after epoch.
    out["per_epoch_device_used_mb"] = used
    out["device_used_growth_mb"] = used[-1] - used[0] if len(used) > 1 else None
    out["log_images_per_s"] = [num(r, "images_per_s") for r in steps]
    # Within epochs: the logged windows after the first of each epoch (where DALI builds its
    # pipeline and torchvision starts its workers) and after the first `skip_epochs` epochs. Short
    # epochs pay that start per epoch; an ImageNet epoch (2,500 steps at 512) does not.
    counted = set(sorted({e for e in (num(r, "epoch") for r in steps) if e is not None})[skip_epochs:])
    seen: set = set()
    inner = []
    for r in steps:
        e = num(r, "epoch")
        if e in counted and e in seen:
            inner.append(r)
        seen.add(e)
    ips = [x for x in (num(r, "images_per_s") for r in inner) if x is not None]
    wait = [x for x in (num(r, "data_wait_share") for r in inner) if x is not None]
    out["within_epochs_images_per_s"] = sum(ips) / len(ips) if ips else None
    out["within_epochs_data_wait_share"] = sum(wait) / len(wait) if wait else None
    return out


def stage_end_to_end(ctx: Context) -> dict:
    data = ensure_dataset(ctx)
    if ctx.dry_run:
        epochs, per_epoch, batch = 2, 1, 4
        size = ["--data.synthetic_size", str(per_epoch * batch)] + DRY_MODEL + ["--data.num_workers", "2"]
    else:
        epochs, per_epoch, batch = 3, 20, 64  # 60 steps; 1,500 images give 23 batches of 64 per epoch
        size = ["--data.synthetic_size", str(per_epoch * batch), "--data.num_workers", "-1"]
    results, rows = {}, []
    for i, (name, backend, extra) in enumerate(E2E_RUNS):
        module = {"dali": "nvidia.dali", "ffcv": "ffcv"}.get(backend)
        if (module and not importable(module)) or (backend == "ffcv" and not data.get("beton_exists")):
            results[name] = {"skipped": f"{module} is not importable (or no .beton)", "config": ""}
            rows.append([name, "-", None, None, None, None, None, None, None, None, "skipped: not installed"])
            continue
        run_dir = ctx.scratch / "e2e" / name
        shutil.rmtree(run_dir, ignore_errors=True)
        train = data["beton"] if backend == "ffcv" else data["train"]
        argv = [PY, "recipes/mira_bs512.py", "--data.backend", backend, "--data.train", train,
                "--train.global_batch_size", str(batch), "--train.epochs", str(epochs),
                "--train.steps_per_epoch", str(per_epoch), "--optim.warmup_epochs", "0", "--train.log_every", "5",
                "--train.progress", "false", "--eval.knn_every", "-1", "--train.run_dir", str(run_dir),
                "--train.checkpoint_every", str(epochs + 1),  # none mid-run: a checkpoint is not a step
                *size, *extra]
        c = ctx.run(f"e2e-{name}", argv, timeout=ctx.share(len(E2E_RUNS) - i))
        logs = read_run_logs(run_dir)
        logs["config"] = " ".join(extra) or "recipe defaults"
        results[name] = logs
        if c.rc != 0:
            ctx.errors.append(f"{name}: {'timed out' if c.timed_out else f'rc {c.rc}'}")
        rows.append([name, logs["config"], logs.get("steps"), logs.get("images_per_s"), logs.get("data_wait_share"),
                     logs.get("within_epochs_images_per_s"), logs.get("within_epochs_data_wait_share"),
                     logs.get("peak_memory_mb"), logs.get("device_used_mb"), logs.get("device_used_growth_mb"),
                     f"rc {c.rc}" + (" (timed out)" if c.timed_out else "")])
    synthetic = results.get("synthetic", {}).get("images_per_s")
    goals = []
    for name, r in results.items():
        if name == "synthetic" or "skipped" in r:
            continue
        ips = r.get("images_per_s")
        r["vs_synthetic"] = ips / synthetic if ips and synthetic else None
        goals.append(goal(f"{name} end to end images/s", ips, GOAL_E2E_IPS, "img/s", True))
        goals.append(goal(f"{name} vs synthetic", r["vs_synthetic"], GOAL_E2E_VS_SYNTHETIC, "x", True,
                          f"synthetic: {_fmt(synthetic)} img/s"))
    peak = max((r["peak_memory_mb"] for r in results.values() if r.get("peak_memory_mb")), default=None)
    goals.append(goal("peak memory, end to end at 64 per GPU", peak, GOAL_PEAK_MB, "MiB", False,
                      "max over the runs" + ("" if ctx.cuda and not ctx.dry_run else "; CPU: not measured")))
    used = max((r["device_used_mb"] for r in results.values() if r.get("device_used_mb")), default=None)
    goals.append(goal("device memory in use, end to end at 64 per GPU", used, GOAL_PEAK_MB, "MiB", False,
                      "max over the runs, at epoch ends: PyTorch's cache, the CUDA context and DALI's nvJPEG "
                      "pools included" + ("" if ctx.cuda and not ctx.dry_run else "; CPU: not measured")))
    summary = [f"{epochs} epochs x {per_epoch} steps x {batch} images per run; figures are the mean of epochs "
               f"2..{epochs} from each run's epochs.csv (epoch 1: start-up); 'within epochs': the mean of "
               f"train_log.csv's windows of those epochs without each epoch's first (the loader's epoch start).", ""]
    summary += table(["loader", "config", "steps", "images/s", "data wait", "images/s within epochs",
                      "data wait within epochs", "peak MiB (PyTorch)", "MiB in use on the device",
                      "MiB in use, last epoch - first", "exit"], rows)
    return {"results": results, "goals": goals, "summary": summary}


# ----------------------------------------------------------------------------- 8 gpu tests
def parse_pytest_summary(text: str) -> dict[str, int]:
    """Counts from pytest's last summary line ("3 passed, 1 failed, 2 skipped in 4.1s")."""
    counts: dict[str, int] = {}
    for line in reversed(text.splitlines()):
        found = re.findall(r"(\d+) (passed|failed|skipped|deselected|errors?|xfailed|xpassed)", line)
        if found and (" in " in line or line.startswith("=")):
            for n, what in found:
                counts["errors" if what.startswith("error") else what] = int(n)
            break
    return counts


def count_pytest_outcomes(text: str) -> tuple[dict[str, int], list[str]]:
    """Per-test outcomes of a verbose (-v) pytest log, for a run killed before its summary line:
    the counts, and the ids of the tests that failed or erred."""
    counts: dict[str, int] = {}
    failing = []
    for test_id, outcome in re.findall(r"^(\S+::\S+) (PASSED|FAILED|SKIPPED|ERROR|XFAIL|XPASS)\b", text, re.M):
        key = {"ERROR": "errors", "XFAIL": "xfailed", "XPASS": "xpassed"}.get(outcome, outcome.lower())
        counts[key] = counts.get(key, 0) + 1
        if outcome in ("FAILED", "ERROR"):
            failing.append(test_id)
    return counts, failing


def gpu_test_files() -> list[str]:
    """Every test file, tests/test_mira_cuda.py last: its nvcc-built kernel is a cold build of a
    minute or so (earlier stages take the NVRTC route), so the other files' GPU tests (the
    two-process ones among them) run before a deadline can stop it. pytest keeps the given order."""
    files = sorted(str(f.relative_to(ROOT)) for f in (ROOT / "tests").glob("test_*.py"))
    return sorted(files, key=lambda f: f.endswith("test_mira_cuda.py"))


def stage_gpu_tests(ctx: Context) -> dict:
    targets = ["tests/test_mira_cuda.py"] if ctx.dry_run else gpu_test_files()
    target = " ".join(targets) if ctx.dry_run else "tests (test_mira_cuda.py last)"
    # -v: one line per test as it ends, so a run killed at the deadline still says what passed.
    argv = [PY, "-m", "pytest", "-m", "gpu", "-v", "-rfEs", "-p", "no:cacheprovider", *targets]
    c = ctx.run("pytest-gpu", argv)
    log_text = (ctx.out / c.log).read_text(errors="replace") if (ctx.out / c.log).exists() else c.tail
    per_test, failing = count_pytest_outcomes(log_text)
    counts = parse_pytest_summary(c.tail) or per_test
    if c.rc not in (0, 5) or c.timed_out:  # 5: nothing collected
        ctx.errors.append(f"pytest: {'timed out' if c.timed_out else f'rc {c.rc}'}")
    failed = counts.get("failed", 0) + counts.get("errors", 0)
    goals = [goal("GPU tests failing", failed if counts else None, 0, "", False,
                  f"{counts.get('passed', 0)} passed, {counts.get('skipped', 0)} skipped")]
    return {"results": {"counts": counts, "rc": c.rc, "failing": failing,
                        "summary_line": bool(parse_pytest_summary(c.tail))}, "goals": goals,
            "summary": [f"`pytest -m gpu {target}`: " + (", ".join(f"{v} {k}" for k, v in counts.items()) or
                                                          "no test ended (see the log)")
                        + ("" if parse_pytest_summary(c.tail) else " (stopped before pytest's summary: counted "
                                                                   "from its per-test lines)"), ""]
                       + [f"- failing: `{t}`" for t in failing]}


# ----------------------------------------------------------------------------- main
STAGES = [
    Stage("env", "environment", 35, stage_env, needs_cuda=False),  # imports DALI and FFCV, cold
    Stage("fused", "fused MIRA kernel", 100, stage_fused),  # a cold JIT build: about a minute
    Stage("compile", "torch.compile(fullgraph=True) of a step with mira_assign_views", 60, stage_compile),
    # A cold inductor build of ResNet-50 (two crop sizes, forward and backward) outlasts any share of a
    # first run: eager is measured there, compiled in a rerun of this stage; end to end needs four starts.
    Stage("model_step", "model step alone: ResNet-50, 64 per GPU, eager vs compiled", 90, stage_model_step),
    Stage("bn_stats", "per-view BatchNorm: student step per_view vs per_forward vs separate forwards", 15,
          stage_bn_stats),
    Stage("loaders", "loaders on the GPU", 65, stage_loaders),
    Stage("end_to_end", "end to end: recipes/mira_bs512.py, 64 per GPU, each loader", 105, stage_end_to_end),
    Stage("gpu_tests", "pytest -m gpu", 55, stage_gpu_tests),
]
WORKERS: dict[str, Callable[[dict, bool], dict]] = {
    "env": worker_env, "fused_equality": worker_fused_equality, "compile_step": worker_compile_step}


def select_stages(text: Optional[str]) -> list[Stage]:
    """--stages: names or 1-based numbers, comma-separated; kept in the canonical order (None: all)."""
    if text is None:
        return list(STAGES)
    wanted = set()
    for part in (p.strip() for p in text.split(",") if p.strip()):
        if part.isdigit() and 1 <= int(part) <= len(STAGES):
            wanted.add(STAGES[int(part) - 1].name)
        elif part in {s.name for s in STAGES}:
            wanted.add(part)
        else:
            raise ValueError(f"unknown stage {part!r}; choose from {', '.join(s.name for s in STAGES)} or 1-"
                             f"{len(STAGES)}")
    if not wanted:
        raise ValueError(f"--stages {text!r} names no stage; choose from {', '.join(s.name for s in STAGES)} or "
                         f"1-{len(STAGES)}, or leave --stages out for all of them")
    return [s for s in STAGES if s.name in wanted]


class _OneLineErrors(argparse.ArgumentParser):
    """A bad option is one line and exit 2, as every other command of the project (fastssl.cli's parser,
    which this self-contained script does not import)."""

    def error(self, message: str):
        self.exit(2, f"error: {message} (options: {self.prog} --help)\n")


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    ap = _OneLineErrors(description=__doc__.split("\n\n")[0],
                        formatter_class=argparse.RawDescriptionHelpFormatter,
                        epilog="Stages: " + ", ".join(f"{i} {s.name}" for i, s in enumerate(STAGES, 1)))
    ap.add_argument("--out", type=Path, help="report folder: gpu_check.json, gpu_check.md, logs/, tool reports")
    ap.add_argument("--stages", help="comma-separated names or numbers (default: all, in order)")
    ap.add_argument("--dry-run", action="store_true", help="every stage on CPU at tiny sizes (CUDA hidden)")
    ap.add_argument("--scratch", type=Path, default=DEFAULT_SCRATCH,
                    help=f"generated data, JIT builds and runs, outside the checkout (default {DEFAULT_SCRATCH})")
    ap.add_argument("--budget", type=float, default=DEFAULT_BUDGET_S,
                    help=f"seconds for the whole run (default {DEFAULT_BUDGET_S:.0f}); later stages are "
                    "skipped when it is spent")
    ap.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    ap.add_argument("--worker-json", help=argparse.SUPPRESS)
    ap.add_argument("--worker-args", default="{}", help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def user_error(msg: str) -> int:
    print(f"error: {msg}", file=sys.stderr)
    return 2


def main(argv: Optional[list[str]] = None, stages: Optional[list[Stage]] = None) -> int:
    args = parse_args(argv)
    if args.worker:  # started by Context.run, whose environment makes this checkout importable
        path = Path(args.worker_json)
        res = WORKERS[args.worker]({**json.loads(args.worker_args), "json": str(path)}, args.dry_run)
        _save(path, res)
        return 0
    if args.out is None:
        return user_error("--out DIR is required; pass the folder for gpu_check.json and gpu_check.md")
    try:
        selected = stages if stages is not None else select_stages(args.stages)
    except ValueError as err:
        return user_error(f"{err}")
    if args.budget <= 0:
        return user_error(f"--budget must be positive, got {args.budget}; pass seconds, e.g. --budget 420")
    scratch = args.scratch.resolve()
    if scratch == ROOT or ROOT in scratch.parents:
        return user_error(f"--scratch {scratch} is inside the checkout; pass a folder outside it (e.g. /tmp/gc)")
    try:
        for folder in (args.out, scratch):  # created, and written to, before any stage: not a traceback later
            folder.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryFile(dir=folder):
                pass
    except OSError as err:
        where = err.filename or folder
        return user_error(f"cannot write in {where}: {err.strerror or err}; pass writable --out / --scratch folders")
    cuda = False
    if not args.dry_run:
        import torch

        cuda = torch.cuda.is_available()
    t0 = time.monotonic()
    ctx = Context(out=args.out, scratch=scratch, dry_run=args.dry_run, cuda=cuda, deadline=t0 + args.budget)
    report: dict[str, Any] = {
        "tool": "gpu_check", "dry_run": args.dry_run, "budget_s": args.budget, "scratch": str(scratch),
        "command": " ".join(["python3", "tools/gpu_check.py"] + (argv if argv is not None else sys.argv[1:])),
        "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "device": "CPU (dry run)" if args.dry_run else ("cuda" if cuda else "CPU (no CUDA)"),
        "selected": [s.name for s in selected], "stages": [], "_t0": t0}

    def write(rep: dict) -> None:
        rep["updated"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
        rep["elapsed_s"] = round(time.monotonic() - t0, 1)
        env = next((s for s in rep["stages"] if s["name"] == "env" and s.get("results")), None)
        if env and env["results"].get("device_name"):
            rep["device"] = env["results"]["device_name"] + (" (dry run: not used)" if args.dry_run else "")
        public = {k: v for k, v in rep.items() if not k.startswith("_")}
        public["goals"] = all_goals(rep)
        write_atomic(args.out / "gpu_check.json", json.dumps(public, indent=1, default=str))
        write_atomic(args.out / "gpu_check.md", render_markdown(public))

    handlers = {sig: signal.signal(sig, _raise_interrupted) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        run_stages(selected, ctx, report, write)
    except Interrupted as sig:
        print(f"gpu_check: interrupted by {sig}; wrote what ran to {args.out / 'gpu_check.md'}", file=sys.stderr)
        return 128 + sig.signum
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    goals = all_goals(report)
    print(f"gpu_check: {len(report['stages'])} stages in {report['elapsed_s']:.0f} s: "
          + ", ".join(f"{s['name']} {s['status']}" for s in report["stages"]))
    print(f"goals: {sum(g['met'] is True for g in goals)} met, {sum(g['met'] is False for g in goals)} missed, "
          f"{sum(g['met'] is None for g in goals)} not measured; wrote {args.out / 'gpu_check.md'} and .json")
    return 0


if __name__ == "__main__":
    sys.exit(main())

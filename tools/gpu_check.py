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

The stages live in `fastssl/gpu_check/`, one module each, with the runner and the report; this
file is their command line, and the entry point of the workers they start.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, NoReturn, Optional

# This checkout's fastssl: the GPU machine does not install it.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fastssl.arg_types import number_in  # noqa: E402 - after the path
from fastssl.gpu_check.bn_stats import stage_bn_stats  # noqa: E402
from fastssl.gpu_check.compile_step import stage_compile, worker_compile_step  # noqa: E402
from fastssl.gpu_check.end_to_end import stage_end_to_end  # noqa: E402
from fastssl.gpu_check.env import stage_env, worker_env  # noqa: E402
from fastssl.gpu_check.fused import stage_fused, worker_fused_equality  # noqa: E402
from fastssl.gpu_check.goals import all_goals  # noqa: E402
from fastssl.gpu_check.gpu_tests import stage_gpu_tests  # noqa: E402
from fastssl.gpu_check.loaders import stage_loaders  # noqa: E402
from fastssl.gpu_check.model_step import stage_model_step  # noqa: E402
from fastssl.gpu_check.report import next_steps, render_markdown  # noqa: E402
from fastssl.gpu_check.runner import (DEFAULT_BUDGET_S, DEFAULT_SCRATCH, ROOT, Context,  # noqa: E402
                                      Interrupted, Stage, raise_interrupted, run_stages, save_json, write_atomic)


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
    not imported here: it brings torch in, and a bad option should fail at once)."""

    def error(self, message: str) -> NoReturn:
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
    ap.add_argument("--budget", type=number_in(0, low_open=True), default=DEFAULT_BUDGET_S,
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
        save_json(path, res)
        return 0
    if args.out is None:
        return user_error("--out DIR is required; pass the folder for gpu_check.json and gpu_check.md")
    try:
        selected = stages if stages is not None else select_stages(args.stages)
    except ValueError as err:
        return user_error(f"{err}")
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
    caps = {s.name: s.cap_s for s in selected}
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
        public["next"] = next_steps(public, caps)
        write_atomic(args.out / "gpu_check.json", json.dumps(public, indent=1, default=str))
        write_atomic(args.out / "gpu_check.md", render_markdown(public))

    handlers = {sig: signal.signal(sig, raise_interrupted) for sig in (signal.SIGTERM, signal.SIGINT)}
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
    for line in next_steps(report, caps):
        print(f"next: {line}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

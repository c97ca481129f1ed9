#!/usr/bin/env python3
"""Where the time of a training step goes: one recipe measured stage by stage, in one run.

    python tools/profile_throughput.py --out runs/profile/demo                      # demo recipe, CPU-sized
    python tools/profile_throughput.py --recipe recipes/mira_bs512.py --gpus 8 \\
        --out docs/reports/bs512_h100 --data.backend dali --data.train /data/imagenet/train
    python tools/profile_throughput.py --compare runs/profile/a runs/profile/b      # side by side, B / A

Stages (one process, one device; `--gpus G` profiles ONE of the G processes of the
real run, with global_batch / G rows):
  1. loader only, every available backend: source images/s (each with all its crops),
     interleaved repetitions, median (fastssl.bench.loaders, as tools/bench_loaders.py);
  2. model step only on a synthetic batch already on the device (teacher forward,
     assignment, student forward and backward on all views, optimiser and EMA): the
     ceiling any loader can reach; then an instrumented pass that times each part;
  3. end to end: the training loop itself (`fastssl.engine.train`) with the recipe's
     loader (`--data.backend`) for the warm-up and timed steps; images/s, the share of
     wall time spent waiting for data and images/s per step are read from its own log
     (train_log.csv, one row per window of up to 10 steps: `log_every` in the report);
  4. the assignment alone (reference, custom op, Sinkhorn) at this process's rows, and with
     --gpus > 1 at the global batch too (without the reference there; fastssl.bench.assignment,
     as tools/bench_mira.py);
  5. peak memory, and one ImageNet epoch projected on 1 and 8 devices.
Cross-check, in the same run: the assignment time measured inside real steps (stage 2's
instrumented pass) is compared with the assignment timed alone on the same shape just
before and after that pass (interleaved, so that a noisy shared machine does not bias one
of them).

Writes DIR/report.md (tables, verdict naming the bottleneck), DIR/report.json (schema:
docs/report_schema.md) and PNG charts; until then DIR/report.partial.json holds the model
step's figures, so a run stopped later keeps them. Any `--section.field VALUE` overrides the recipe,
as on a recipe's command line.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from fastssl.arg_types import MAX_WORKERS, comma_list, int_at_least, one_of
from fastssl.bench.loaders import BACKEND_ORDER
from fastssl.bench.profile import PARTIAL_REPORT, ProfileSettings, configure, run_profile
from fastssl.cli import (ToolArgumentParser, interrupt_exit_status, interrupted_by, stop_signals_interrupt,
                         without_worker_traceback, write_fix)
from fastssl.config import ConfigError
from fastssl.eval.errors import EvalError, check_output_dir
from fastssl.reports.analysis import flatten_figures
from fastssl.reports.markdown import compare_markdown, profile_markdown
from fastssl.reports.schema import ReportError, load_report
from fastssl.run_log import write_json, write_text_atomic
from pipelines.beton import BetonError
from pipelines.beton_convert import ConversionError
from pipelines.folder import DataLayoutError
from pipelines.spec import BACKENDS, LoaderUnavailable

DEFAULT_RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "mira_demo.py"


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
    cpu = not torch.cuda.is_available()
    ap = ToolArgumentParser(description=__doc__.split("\n\n")[0],
                            epilog="Other --section.field VALUE arguments override the recipe.")
    ap.add_argument("--recipe", type=Path, default=DEFAULT_RECIPE, help="recipe file (default: the demo)")
    ap.add_argument("--out", type=Path, help="report directory (report.md, report.json, PNGs)")
    ap.add_argument("--compare", nargs=2, metavar=("A", "B"), help="compare two report directories or JSON files")
    ap.add_argument("--gpus", type=int_at_least(1), default=1,
                    help="processes of the real run: this one gets global batch / G")
    ap.add_argument("--backends", type=comma_list(one_of(list(BACKENDS))), default=list(BACKEND_ORDER),
                    help=f"loaders for the loader-only stage (default {','.join(BACKEND_ORDER)})")
    ap.add_argument("--beton", help="the data as a .beton for ffcv (default: converted into a temporary folder "
                    "under --out, deleted at the end)")
    ap.add_argument("--workers", type=int_at_least(-1, MAX_WORKERS), default=-1,
                    help="loader workers / threads (-1: every core this process may use)")
    ap.add_argument("--steps", type=int_at_least(1), default=10 if cpu else 50, help="timed steps per stage")
    ap.add_argument("--warmup-steps", type=int_at_least(0), default=2 if cpu else 10)
    ap.add_argument("--loader-batches", type=int_at_least(1), default=6 if cpu else 40)
    ap.add_argument("--warmup-batches", type=int_at_least(0), default=2 if cpu else 5)
    ap.add_argument("--repeats", type=int_at_least(1), default=3)
    ap.add_argument("--assign-warmup", type=int_at_least(0), default=3)
    ap.add_argument("--assign-repeats", type=int_at_least(1), default=10 if cpu else 50)
    ap.add_argument("--no-cross-check", action="store_true",
                    help="skip the cross-check (the assignment timed alone around the instrumented pass)")
    args, overrides = ap.parse_known_args(argv)
    if not args.compare and args.out is None:
        ap.error("--out DIR is required (or --compare A B)")
    return args, overrides


def settings_of(args: argparse.Namespace) -> ProfileSettings:
    return ProfileSettings(recipe=args.recipe, gpus=args.gpus, backends=tuple(args.backends), beton=args.beton,
                           workers=args.workers, steps=args.steps, warmup_steps=args.warmup_steps,
                           loader_batches=args.loader_batches, warmup_batches=args.warmup_batches,
                           repeats=args.repeats, assign_warmup=args.assign_warmup, assign_repeats=args.assign_repeats,
                           cross_check=not args.no_cross_check)


def run_compare(args: argparse.Namespace) -> int:
    a, b = (load_report(p) for p in args.compare)
    for path, report in zip(args.compare, (a, b)):
        if report["kind"] != "profile":
            raise ReportError(f"{str(path)!r} is a {report['kind']} report; --compare takes two profile reports "
                              "(tools/profile_throughput.py --out DIR writes one)")
        try:
            flatten_figures(report)
        except (KeyError, TypeError, AttributeError) as err:  # the schema's keys are there, their content is not
            raise ReportError(f"{str(path)!r} lacks the profile figure {err} (a stage stopped early, or the file "
                              "was edited); regenerate it with tools/profile_throughput.py --out DIR") from None
    text = compare_markdown(a, b, str(args.compare[0]), str(args.compare[1]))
    print(text)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        write_text_atomic(args.out / "compare.md", text + "\n")
        print(f"wrote {args.out / 'compare.md'}")
    return 0


def print_checks(checks: dict) -> int:
    """One line per cross-check; a failed one also gets a warning on stderr (the JSON alone goes unread).

    Returns the number of failed checks.
    """
    failed = 0
    for name, c in checks.items():
        ratio = "n/a" if c["ratio"] is None else f"{c['ratio']:.3f}"
        print(f"check {name}: profile {c['profile']:.1f} vs independent {c['independent']:.1f} (ratio {ratio})")
        if not c["within_15_percent"]:
            failed += 1
            print(f"warning: cross-check {name} FAILED: this profile and the independent measurement differ by more "
                  f"than 15% (ratio {ratio}), so the profile's figures are doubtful; rerun it on an idle machine "
                  f"(another job sharing the cores or the GPU is the usual cause)", file=sys.stderr, flush=True)
    return failed


def main(argv: list[str] | None = None) -> int:
    args, overrides = parse_args(argv)
    created = args.out is not None and not args.out.exists()
    try:
        with stop_signals_interrupt():
            return profile(args, overrides)
    except (ConfigError, ReportError, FileNotFoundError, BetonError, LoaderUnavailable, DataLayoutError,
            EvalError, ConversionError, OSError) as err:  # ConversionError: the data as a .beton for ffcv's stage
        remove_if_empty(args.out, created)  # refused: no empty folder left behind
        # a write that failed (a full disk, a forbidden folder) says what to do; a missing input names itself
        wrote = isinstance(err, OSError) and not isinstance(err, FileNotFoundError)
        fix = f"; {write_fix(err, '--out')}" if wrote else ""
        print(f"error: {without_worker_traceback(str(err))}{fix}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as err:  # Ctrl-C, SIGTERM, SIGHUP: one line, not a traceback or silence
        remove_if_empty(args.out, created)
        partial = args.out / PARTIAL_REPORT if args.out is not None else None
        kept = f"{partial} keeps the stages that finished" if partial and partial.exists() else "nothing is kept"
        print(f"{interrupted_by(err)}; {kept}: run the command again", file=sys.stderr)
        return interrupt_exit_status(err)


def remove_if_empty(out: Path | None, created: bool) -> None:
    """The --out folder this run created, if nothing was written into it."""
    if created and out is not None and out.is_dir() and not any(out.iterdir()):
        out.rmdir()


def profile(args: argparse.Namespace, overrides: list[str]) -> int:
    """The profile (or the comparison) and its report files: the tool's work, its failures main's to say."""
    if args.out is not None:  # before any work (its mkdir would otherwise fail after the recipe is built)
        check_output_dir(args.out, "--out")
    if args.compare:
        return run_compare(args)
    settings = settings_of(args)
    cfg, global_batch = configure(settings, overrides)
    report = run_profile(settings, cfg, global_batch, args.out)
    write_json(args.out / "report.json", report)
    (args.out / PARTIAL_REPORT).unlink(missing_ok=True)
    write_text_atomic(args.out / "report.md", profile_markdown(report))
    print(f"\n{report['verdict']}\n")
    print_checks(report["checks"])
    print(f"wrote {args.out / 'report.md'} and report.json ({report['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

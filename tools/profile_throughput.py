#!/usr/bin/env python3
"""Where the time of a training step goes: one recipe measured stage by stage, in one run.

    python tools/profile_throughput.py --out runs/profile/demo                      # demo recipe, CPU-sized
    python tools/profile_throughput.py --recipe recipes/mira_bs512.py --gpus 8 \\
        --out docs/reports/bs512_h100 --data.backend dali --data.train /data/imagenet/train
    python tools/profile_throughput.py --compare runs/profile/a runs/profile/b      # side by side, B / A

Stages (one process, one device; `--gpus G` profiles ONE of the G processes of the
real run, with global_batch / G rows):
  1. loader only, every available backend: source images/s (each with all its crops),
     interleaved repetitions, median (tools/bench_loaders.py's timing);
  2. model step only on a synthetic batch already on the device (teacher forward,
     assignment, student forward and backward on all views, optimiser and EMA): the
     ceiling any loader can reach; then an instrumented pass that times each part;
  3. end to end with the recipe's loader (`--data.backend`), with the share of wall time
     spent waiting for data, per step;
  4. the assignment alone (reference, custom op, Sinkhorn) at this process's rows and at
     the global batch (tools/bench_mira.py's timing);
  5. peak memory, and one ImageNet epoch projected on 1 and 8 devices.
Cross-checks, in the same run: the training loop itself (`fastssl.engine.train`) runs the
same number of steps halfway through stage 3 and its logged images/s is compared with
stage 3's; the assignment time measured inside real steps (stage 2's instrumented pass) is
compared with bench_mira's timing of the same shape taken just before and after that pass.
Interleaving the measurements that are compared keeps a noisy shared machine from biasing
one of them.

Writes DIR/report.md (tables, verdict naming the bottleneck), DIR/report.json (schema:
docs/report_schema.md) and PNG charts. Any `--section.field VALUE` overrides the recipe,
as on a recipe's command line.
"""

from __future__ import annotations

import argparse
import copy
import csv
import importlib.util
import resource
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing
sys.path.insert(0, str(ROOT / "tools"))

import pipelines  # noqa: E402
from fastssl.config import Config, ConfigError, apply_overrides, validate  # noqa: E402
from pipelines.beton import BetonError  # noqa: E402
from fastssl.engine import build_networks, loader_spec, train  # noqa: E402
from fastssl.method import StepParts, train_step  # noqa: E402
from fastssl.objectives import build_objective  # noqa: E402
from fastssl.optim import build_optimizer  # noqa: E402
from fastssl.profiling import PhaseTimer, peak_memory_mb, reset_peak_memory  # noqa: E402
from fastssl.reports import analysis, charts  # noqa: E402
from fastssl.reports.environment import describe_environment, describe_recipe  # noqa: E402
from fastssl.reports.markdown import compare_markdown, profile_markdown  # noqa: E402
from fastssl.reports.schema import ReportError, load_report, new_report  # noqa: E402
from fastssl.run_log import write_json  # noqa: E402
from fastssl.runtime import build_accelerator, seed_everything  # noqa: E402
from fastssl.schedules import scaled_lr, step_schedule  # noqa: E402

DEFAULT_RECIPE = ROOT / "recipes" / "mira_demo.py"


def load_recipe(path: Path) -> Config:
    """The Config built by a recipe file's `config()`."""
    if not path.is_file():
        raise ConfigError(f"recipe {str(path)!r} does not exist; pass a file under recipes/ (e.g. recipes/mira_bs512.py)")
    spec = importlib.util.spec_from_file_location(f"recipe_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "config"):
        raise ConfigError(f"{path} has no config() function: is it a fastssl recipe?")
    return module.config()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def host_peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


# ----------------------------------------------------------------------------- stage 1
def measure_loaders(cfg: Config, accelerator, backends: list[str], args, scratch: Path) -> dict:
    """Loader-only source images/s per backend, interleaved repetitions (bench_loaders' timing).

    The ffcv backend reads `--beton`, else a conversion of the recipe's folder written
    under `scratch` (the caller's temporary directory: nothing lands in the repository).
    """
    from bench_loaders import available, time_epoch

    names = [b for b in backends if available(b) and (b == "synthetic" or cfg.data.train)]
    loaders = {}
    for name in names:
        c = copy.deepcopy(cfg)
        c.data.backend = name
        if name == "ffcv" and not str(c.data.train).endswith(".beton"):
            c.data.train = str(args.beton or scratch_beton(Path(cfg.data.train), scratch))
        elif name != "ffcv" and str(c.data.train).endswith(".beton"):
            continue  # a .beton feeds only ffcv
        loaders[name] = pipelines.build_train_loader(loader_spec(c, accelerator, args.workers))
    runs: dict[str, list[float]] = {n: [] for n in loaders}
    for name, loader in loaders.items():  # first batches compile / spawn: not timed
        time_epoch(loader, 10_000, 0, 1, accelerator.device)
    for rep in range(args.repeats):
        for name, loader in loaders.items():
            runs[name].append(time_epoch(loader, rep, args.warmup_batches, args.loader_batches, accelerator.device))
            print(f"  loader {name:12s} repeat {rep + 1}/{args.repeats}: {runs[name][-1]:9.1f} images/s", flush=True)
    return {n: {"images_per_s": statistics.median(r), "min": min(r), "max": max(r), "runs": r} for n, r in runs.items()}


def scratch_beton(folder: Path, scratch: Path) -> Path:
    """`folder` converted to a .beton in `scratch`, for the ffcv loader-only stage (deleted with `scratch`)."""
    from convert_imagenet_to_ffcv import convert

    out = scratch / f"{folder.name}.beton"
    print(f"  converting {folder} to a temporary {out.name} for the ffcv backend (pass --beton FILE to reuse one)",
          flush=True)
    convert(folder, out, write_mode="jpg", progress=False)
    return out


# ----------------------------------------------------------------------------- stage 2 and 3
class StepRunner:
    """Student, teacher, optimiser and objective of the recipe, and one call per training step."""

    def __init__(self, cfg: Config, accelerator):
        self.cfg = cfg
        self.objective = build_objective(cfg, None, accelerator.device)
        student, teacher = build_networks(cfg, accelerator, self.objective)
        optimizer = build_optimizer(cfg.optim.name, student.named_parameters(),
                                    lr=scaled_lr(cfg.optim.base_lr, cfg.train.global_batch_size),
                                    momentum=cfg.optim.momentum, weight_decay=cfg.optim.weight_decay,
                                    lars_eta=cfg.optim.lars_eta)
        student, optimizer = accelerator.prepare(student, optimizer)
        if cfg.train.compile:
            student = torch.compile(student)
        self.parts = StepParts(student, teacher, optimizer, accelerator, self.objective, cfg.train.micro_batch_size)
        self.step_index = 0

    def __call__(self, views: list[torch.Tensor], phases: PhaseTimer | None = None) -> None:
        sched = step_schedule(self.cfg, self.step_index, 1000)
        kwargs = {"phases": phases} if phases is not None else {}
        train_step(self.parts, views, sched, **kwargs)
        self.step_index += 1


def measure_model_step(runner: StepRunner, cfg: Config, accelerator, args,
                       bench_assignment: Callable[[], float] | None = None) -> tuple[dict, PhaseTimer, float | None]:
    """Images/s of the step alone on a synthetic batch on the device; then the per-part breakdown.

    `bench_assignment` (the assignment timed alone) runs just before and just after the
    instrumented pass, so that the two measurements of the assignment sample the same
    stretch of a noisy machine; their mean is returned.
    """
    c = copy.deepcopy(cfg)
    c.data.backend, c.data.synthetic_size = "synthetic", 64 * cfg.train.global_batch_size
    views = next(iter(pipelines.build_train_loader(loader_spec(c, accelerator, 1)))).views
    device = accelerator.device
    for _ in range(args.warmup_steps):
        runner(views)
    sync(device)
    start = time.perf_counter()
    for _ in range(args.steps):
        runner(views)
    sync(device)
    seconds = time.perf_counter() - start
    step = {"images_per_s": analysis.images_per_s(args.steps * cfg.train.global_batch_size, seconds),
            "step_ms": 1e3 * seconds / args.steps, "steps": args.steps, "warmup": args.warmup_steps}
    around = [bench_assignment()] if bench_assignment else []
    phases = PhaseTimer(device, enabled=True)
    for _ in range(max(args.steps, 3)):
        runner(views, phases)
    if bench_assignment:
        around.append(bench_assignment())
    return step, phases, statistics.fmean(around) if around else None


def measure_end_to_end(runner: StepRunner, cfg: Config, accelerator, args,
                       midway: Callable[[], None] | None = None) -> dict:
    """The recipe's loader feeding the step: per-step data wait and step time.

    `midway` (the training-loop cross-check) runs after half of the timed steps, so that the
    profile's figure and the loop's own sample the same stretch of a noisy machine.
    """
    loader = pipelines.build_train_loader(loader_spec(cfg, accelerator, args.workers))
    need = args.warmup_steps + args.steps
    if len(loader) < need:
        raise ConfigError(f"the {cfg.data.backend} loader has {len(loader)} batches per epoch, the profile needs "
                          f"{need}; use fewer --steps/--warmup-steps or more data")
    loader.set_epoch(0)
    device, waits, steps = accelerator.device, [], []
    it = iter(loader)
    for i in range(need):
        if midway is not None and i == args.warmup_steps + args.steps // 2:
            midway()
        t0 = time.perf_counter()
        batch = next(it)
        sync(device)
        t1 = time.perf_counter()
        runner(batch.views)
        sync(device)
        t2 = time.perf_counter()
        if i >= args.warmup_steps:
            waits.append(t1 - t0)
            steps.append(t2 - t1)
    if hasattr(it, "close"):
        it.close()
    b = cfg.train.global_batch_size
    return {"backend": cfg.data.backend, "steps": args.steps, "warmup": args.warmup_steps,
            "images_per_s": analysis.images_per_s(b * len(steps), sum(waits) + sum(steps)),
            "data_wait_share": analysis.data_wait_share(waits, steps),
            "per_step_images_per_s": [b / (w + s) for w, s in zip(waits, steps)],
            "mean_wait_ms": 1e3 * statistics.fmean(waits), "mean_step_ms": 1e3 * statistics.fmean(steps)}


# ----------------------------------------------------------------------------- stage 4
def assignment_bench(cfg: Config, device: torch.device, args) -> Callable[[], float]:
    """Median microseconds of `mira_assign_views` on random logits of this process's shape (bench_mira)."""
    from bench_mira import implementations, time_call

    g = torch.Generator(device=device).manual_seed(0)
    views = [torch.randn(cfg.train.global_batch_size, cfg.model.num_prototypes, generator=g, device=device)
             for _ in range(2)]
    fn = implementations(cfg.method.num_iters)["views"]
    return lambda: time_call(fn, views, device, args.assign_warmup, args.assign_repeats)


def measure_assignment(cfg: Config, device: torch.device, gpus: int, args) -> dict:
    """The assignment alone on random logits, 2 views (tools/bench_mira.py's timing)."""
    from bench_mira import implementations, time_call

    k, iters, rows = cfg.model.num_prototypes, cfg.method.num_iters, cfg.train.global_batch_size
    out = {}
    sizes = [("this process", rows)] + ([("global batch", rows * gpus)] if gpus > 1 else [])
    for label, b in sizes:
        g = torch.Generator(device=device).manual_seed(0)
        views = [torch.randn(b, k, generator=g, device=device) for _ in range(2)]
        for name, fn in implementations(iters).items():
            if label == "global batch" and name == "reference":
                continue
            us = time_call(fn, views, device, args.assign_warmup, args.assign_repeats)
            out[f"{name} ({label})" if gpus > 1 else name] = {"B": b, "K": k, "median_us": us}
    return out


# ----------------------------------------------------------------------------- cross-check
def loop_logged_images_per_s(cfg: Config, args, scratch: Path) -> tuple[float, list[float]]:
    """Run the training loop itself for warm-up + steps and read its own log (train_log.csv)."""
    c = copy.deepcopy(cfg)
    c.train.run_dir = str(scratch / "loop_run")
    c.train.epochs, c.train.steps_per_epoch, c.train.log_every = 1, args.warmup_steps + args.steps, 1
    c.train.progress, c.eval.knn_every, c.eval.knn_at_start = False, -1, False
    c.data.num_workers = args.workers
    train(c)
    with (Path(c.train.run_dir) / "train_log.csv").open() as f:
        rows = [r for r in csv.DictReader(f)][args.warmup_steps:]
    seconds = sum(float(r["step_time_s"]) for r in rows)
    per_step = [float(r["images_per_s"]) for r in rows]
    return analysis.images_per_s(len(rows) * cfg.train.global_batch_size, seconds), per_step


def ratio_check(profile: float, independent: float, note: str) -> dict:
    return {"profile": profile, "independent": independent, "ratio": profile / independent if independent else None,
            "within_15_percent": bool(independent) and abs(profile / independent - 1) <= 0.15, "note": note}


# ----------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
    cpu = not torch.cuda.is_available()
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 epilog="Other --section.field VALUE arguments override the recipe.")
    ap.add_argument("--recipe", type=Path, default=DEFAULT_RECIPE, help="recipe file (default: the demo)")
    ap.add_argument("--out", type=Path, help="report directory (report.md, report.json, PNGs)")
    ap.add_argument("--compare", nargs=2, metavar=("A", "B"), help="compare two report directories or JSON files")
    ap.add_argument("--gpus", type=int, default=1, help="processes of the real run: this one gets global batch / G")
    ap.add_argument("--backends", default="torchvision,dali,ffcv,synthetic", help="loaders for the loader-only stage")
    ap.add_argument("--beton", help="the data as a .beton for ffcv (default: converted into a temporary folder "
                    "under --out, deleted at the end)")
    ap.add_argument("--workers", type=int, default=-1, help="loader workers / threads (-1: all cores)")
    ap.add_argument("--steps", type=int, default=10 if cpu else 50, help="timed steps per stage")
    ap.add_argument("--warmup-steps", type=int, default=2 if cpu else 10)
    ap.add_argument("--loader-batches", type=int, default=6 if cpu else 40)
    ap.add_argument("--warmup-batches", type=int, default=2 if cpu else 5)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--assign-warmup", type=int, default=3)
    ap.add_argument("--assign-repeats", type=int, default=10 if cpu else 50)
    ap.add_argument("--no-cross-check", action="store_true", help="skip the training-loop cross-check run")
    args, overrides = ap.parse_known_args(argv)
    if not args.compare and args.out is None:
        ap.error("--out DIR is required (or --compare A B)")
    if min(args.gpus, args.steps, args.loader_batches, args.repeats, args.assign_repeats) < 1:
        ap.error("--gpus, --steps, --loader-batches, --repeats and --assign-repeats must be >= 1")
    return args, overrides


def run_compare(args) -> int:
    a, b = (load_report(p) for p in args.compare)
    text = compare_markdown(a, b, str(args.compare[0]), str(args.compare[1]))
    print(text)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "compare.md").write_text(text + "\n")
        print(f"wrote {args.out / 'compare.md'}")
    return 0


def configure(args, overrides: list[str]) -> tuple[Config, int]:
    """The recipe with the overrides, cut to ONE process's share; and the recipe's global batch."""
    cfg = apply_overrides(load_recipe(args.recipe), overrides)
    global_batch = cfg.train.global_batch_size
    if global_batch % args.gpus:
        raise ConfigError(f"--gpus {args.gpus} does not divide the global batch {global_batch}")
    cfg.train.global_batch_size //= args.gpus  # this process's share of the real run
    cfg.train.micro_batch_size = 0 if cfg.train.micro_batch_size >= cfg.train.global_batch_size else \
        cfg.train.micro_batch_size
    validate(cfg)
    return cfg, global_batch


def profile(args, cfg: Config, global_batch: int) -> dict:
    accelerator = build_accelerator(cfg.train)
    if accelerator.num_processes > 1:
        raise ConfigError("run tools/profile_throughput.py as ONE process (not under accelerate launch "
                          "--num_processes > 1); --gpus G profiles one of G processes")
    if args.workers < 0:
        from fastssl.runtime import default_num_workers

        args.workers = default_num_workers(-1, 1)
    seed_everything(cfg.train.seed, 0)
    device = accelerator.device
    started = time.perf_counter()
    print(f"profiling {args.recipe.name} on {device} ({cfg.train.global_batch_size} images per step)", flush=True)

    print("1/5 loader only", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".scratch-", dir=args.out) as scratch:  # a .beton of the data, if any
        loaders = measure_loaders(cfg, accelerator, args.backends.split(","), args, Path(scratch))
    print("2/5 model step only (synthetic batch on the device)", flush=True)
    reset_peak_memory(device)
    runner = StepRunner(cfg, accelerator)
    uses_mira = runner.objective.assignment == "mira"
    model_step, phases, assign_alone = measure_model_step(
        runner, cfg, accelerator, args, assignment_bench(cfg, device, args) if uses_mira else None)
    breakdown = phases.mean_ms()
    # Peak memory of the training step alone (the cross-check below builds a second model).
    peak_device = peak_memory_mb(device) if device.type == "cuda" else None
    print(f"    {model_step['images_per_s']:.1f} images/s", flush=True)
    print(f"3/5 end to end ({cfg.data.backend}), with the training loop's own run of as many steps midway",
          flush=True)
    loop: dict = {}

    def run_loop() -> None:
        with tempfile.TemporaryDirectory() as scratch:
            loop["images_per_s"], loop["per_step"] = loop_logged_images_per_s(cfg, args, Path(scratch))

    e2e = measure_end_to_end(runner, cfg, accelerator, args, None if args.no_cross_check else run_loop)
    print(f"    {e2e['images_per_s']:.1f} images/s, data wait {100 * e2e['data_wait_share']:.0f}%", flush=True)
    print("4/5 assignment alone", flush=True)
    assignment = measure_assignment(cfg, device, args.gpus, args)
    print("5/5 cross-checks", flush=True)
    checks = {}
    if loop:
        checks["end_to_end_images_per_s"] = ratio_check(
            e2e["images_per_s"], loop["images_per_s"], "End to end: this profile's own loop vs the images/s the "
            "training loop (fastssl.engine.train) logged in train_log.csv over the same number of steps after the "
            "same warm-up, run midway through the profile's own steps.")
    if assign_alone is not None:
        checks["assignment_us"] = ratio_check(
            1e3 * phases.median_ms()["assignment"], assign_alone,
            "Assignment: median time inside real training steps (instrumented pass, real teacher logits) vs "
            "tools/bench_mira.py's timing of the same op on random logits of the same shape, taken just before "
            "and just after that pass.")
    per_step_loop = loop.get("per_step", [])

    env = describe_environment(device)
    dtype = {"bf16": "bf16", "fp16": "fp16"}.get(accelerator.mixed_precision, "fp32")
    recipe = describe_recipe(cfg, args.recipe.stem, dtype, args.gpus)
    recipe["global_batch_size"], recipe["batch_per_process"] = global_batch, cfg.train.global_batch_size
    report = new_report("profile", env, recipe, datetime.now(timezone.utc).isoformat(timespec="seconds"))
    loader_ips = loaders.get(cfg.data.backend, {}).get("images_per_s")
    report.update(
        stages={"loader": loaders, "model_step": model_step, "end_to_end": e2e, "assignment": assignment},
        breakdown_ms={**breakdown, "data_wait (end to end)": e2e["mean_wait_ms"]},
        memory={"peak_device_mb": peak_device, "peak_host_rss_mb": host_peak_rss_mb()},
        projection=analysis.epoch_projection(e2e["images_per_s"]),
        checks=checks,
        verdict=analysis.verdict(loader_ips, model_step["images_per_s"], e2e["images_per_s"], e2e["data_wait_share"],
                                 breakdown, cfg.data.backend, e2e["mean_step_ms"], model_step["step_ms"]),
        loop_per_step_images_per_s=per_step_loop,
        seconds=time.perf_counter() - started,
    )
    report["charts"] = write_charts(report, args.out)
    return report


def write_charts(report: dict, out: Path) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    s = report["stages"]
    labels = [f"loader {n}" for n in s["loader"]] + ["model step", "end to end"]
    values = [r["images_per_s"] for r in s["loader"].values()] + [s["model_step"]["images_per_s"],
                                                                   s["end_to_end"]["images_per_s"]]
    per_step = s["end_to_end"]["per_step_images_per_s"]
    series = {"this profile (end to end)": (list(range(1, len(per_step) + 1)), per_step)}
    if report["loop_per_step_images_per_s"]:
        loop = report["loop_per_step_images_per_s"]
        series["training loop's log"] = (list(range(1, len(loop) + 1)), loop)
    return {
        "stages": charts.bar_chart(out / "stages.png", labels, values, "source images/s", "Images/s per stage"),
        "breakdown": charts.stacked_breakdown(out / "breakdown.png", report["breakdown_ms"], "Step-time breakdown"),
        "over_steps": charts.line_chart(out / "over_steps.png", series, "timed step", "images/s",
                                        "Images/s over steps"),
    }


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
    try:
        if args.compare:
            return run_compare(args)
        cfg, global_batch = configure(args, overrides)
        report = profile(args, cfg, global_batch)
    except (ConfigError, ReportError, FileNotFoundError, BetonError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    write_json(args.out / "report.json", report)
    (args.out / "report.md").write_text(profile_markdown(report))
    print(f"\n{report['verdict']}\n")
    print_checks(report["checks"])
    print(f"wrote {args.out / 'report.md'} and report.json ({report['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

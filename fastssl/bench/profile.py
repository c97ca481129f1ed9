"""The throughput profile: one recipe measured stage by stage, in one process (tools/profile_throughput.py
is its command line; docs/profiling.md says how to read it).

Stages, each a function here, run by `run_profile`:
  1. loader only, every available backend: source images/s (each with all its crops), interleaved
     repetitions, median (`fastssl.bench.loaders`, as tools/bench_loaders.py);
  2. model step only on a synthetic batch already on the device: the ceiling any loader can reach;
     then an instrumented pass that times each part;
  3. end to end: the training loop itself (`fastssl.engine.train`), read from its own log;
  4. the assignment alone at this process's rows (and at the global batch with several GPUs;
     `fastssl.bench.assignment`, as tools/bench_mira.py);
  5. peak memory, one ImageNet epoch projected, and the cross-check of stage 2's assignment time
     against the assignment timed alone around it.
"""

from __future__ import annotations

import copy
import csv
import importlib.util
import resource
import signal
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch

import pipelines
from fastssl.bench import assignment as assignment_timing
from fastssl.bench import loaders as loader_timing
from fastssl.cli import StopSignal
from fastssl.config import Config, ConfigError, validate
from fastssl.overrides import apply_overrides
from fastssl.engine import build_parts, loader_spec, resolve_auto_settings, train
from fastssl.method import train_step
from fastssl.objectives import build_objective
from fastssl.profiling import PhaseTimer, device_activity, peak_memory_mb, reset_peak_memory
from fastssl.reports import analysis, charts
from fastssl.reports.environment import describe_environment, describe_recipe
from fastssl.reports.schema import new_report
from fastssl.run_log import utc_now, write_json
from fastssl.runtime import build_accelerator, seed_everything, stop_exit_code
from fastssl.schedules import step_schedule
from pipelines.beton_convert import convert
from pipelines.cores import default_num_workers

if TYPE_CHECKING:
    from accelerate import Accelerator

PARTIAL_REPORT = "report.partial.json"  # the model step's figures until the full report.json (not its schema)
LOG_WINDOW_MAX = 10  # steps per log row of the profiled loop, at most (the recipes' default log_every)


@dataclass(frozen=True)
class ProfileSettings:
    """How much the profile measures (the command line's flags; its defaults are the CPU-sized ones)."""

    recipe: Path
    gpus: int = 1  # processes of the real run: this one gets global batch / gpus
    backends: tuple[str, ...] = ("torchvision", "dali", "ffcv", "synthetic")  # for the loader-only stage
    beton: str | None = None  # the data as a .beton for ffcv (None: converted into a scratch folder)
    workers: int = -1  # loader workers / threads (-1: this process's share of the cores)
    steps: int = 10  # timed steps per stage
    warmup_steps: int = 2
    loader_batches: int = 6
    warmup_batches: int = 2
    repeats: int = 3
    assign_warmup: int = 3
    assign_repeats: int = 10
    cross_check: bool = True  # the assignment timed alone around the instrumented pass


def load_recipe(path: Path) -> Config:
    """The Config built by a recipe file's `config()`."""
    if not path.is_file():
        what = "is a folder" if path.is_dir() else "does not exist"
        raise ConfigError(f"recipe {str(path)!r} {what}; pass a file under recipes/ (e.g. recipes/mira_bs512.py)")
    spec = importlib.util.spec_from_file_location(f"recipe_{path.stem}", path)
    if spec is None:  # importlib only loads .py files (a .json, a .yaml ... gives no spec)
        raise ConfigError(f"recipe {str(path)!r} is not a Python file; pass a recipe .py under recipes/ "
                          "(e.g. recipes/mira_bs512.py)")
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except SyntaxError as err:  # another file named .py, or a recipe edited into invalid Python
        raise ConfigError(f"{path} is not valid Python (line {err.lineno}: {err.msg}): is it a fastssl recipe? "
                          "(e.g. recipes/mira_bs512.py)") from None
    if not hasattr(module, "config"):
        raise ConfigError(f"{path} has no config() function: is it a fastssl recipe?")
    cfg = module.config()
    if not isinstance(cfg, Config):  # e.g. the distillation recipe's DistillConfig: another trainer
        raise ConfigError(f"{path}'s config() returns a {type(cfg).__name__}, not a fastssl Config: the profile "
                          "measures the self-supervised trainer's recipes (recipes/mira_*.py, mlcpc_*.py)")
    return cfg


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def host_peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def measure_loaders(cfg: Config, accelerator: Accelerator, backends: list[str], s: ProfileSettings,
                    scratch: Path) -> dict:
    """Loader-only source images/s per backend, interleaved repetitions (bench_loaders' timing).

    The ffcv backend reads `--beton`, else a conversion of the recipe's folder written
    under `scratch` (the caller's temporary directory: nothing lands in the repository).
    """
    names = [b for b in backends if loader_timing.available(b) and (b == "synthetic" or cfg.data.train)]
    loaders = {}
    for name in names:
        c = copy.deepcopy(cfg)
        c.data.backend = name
        if name == "ffcv" and not str(c.data.train).endswith(".beton"):
            c.data.train = str(s.beton or scratch_beton(Path(cfg.data.train), scratch))
        elif name != "ffcv" and str(c.data.train).endswith(".beton"):
            continue  # a .beton feeds only ffcv
        loaders[name] = pipelines.build_train_loader(loader_spec(c, accelerator, s.workers))
        need = s.warmup_batches + s.loader_batches
        if len(loaders[name]) < need:  # before any timing: next() would end the epoch with a bare StopIteration
            raise ConfigError(f"the {name} loader has {len(loaders[name])} batches per epoch, the loader stage needs "
                              f"{need}; use fewer --loader-batches/--warmup-batches or more data")

    def progress(rep: int, name: str, rate: float) -> None:
        print(f"  loader {name:12s} repeat {rep + 1}/{s.repeats}: {rate:9.1f} images/s", flush=True)

    runs = loader_timing.interleaved_rates(loaders, s.repeats, s.warmup_batches, s.loader_batches,
                                           accelerator.device, progress)
    return {name: loader_timing.summarize(r) for name, r in runs.items()}


def scratch_beton(folder: Path, scratch: Path) -> Path:
    """`folder` converted to a .beton in `scratch`, for the ffcv loader-only stage (deleted with `scratch`)."""
    out = scratch / f"{folder.name}.beton"
    print(f"  converting {folder} to a temporary {out.name} for the ffcv backend (pass --beton FILE to reuse one)",
          flush=True)
    convert(folder, out, write_mode="jpg", progress=False)
    return out


class StepRunner:
    """Student, teacher, optimiser and objective of the recipe, and one call per training step."""

    def __init__(self, cfg: Config, accelerator: Accelerator):
        self.cfg = cfg
        self.objective = build_objective(cfg, None, accelerator.device)
        self.parts = build_parts(cfg, accelerator, self.objective)  # as the loop builds them
        self.step_index = 0

    def __call__(self, views: list[torch.Tensor], phases: PhaseTimer | None = None) -> None:
        sched = step_schedule(self.cfg, self.step_index, 1000)
        kwargs = {"phases": phases} if phases is not None else {}
        train_step(self.parts, views, sched, **kwargs)
        self.step_index += 1


def measure_model_step(runner: StepRunner, cfg: Config, accelerator: Accelerator, s: ProfileSettings,
                       bench_assignment: Callable[[], float] | None = None) -> tuple[dict, PhaseTimer, float | None]:
    """Images/s of the step alone on a synthetic batch on the device; then the per-part breakdown.

    `bench_assignment` (the assignment timed alone) runs just before and just after the
    instrumented pass, so that the two measurements of the assignment sample the same
    stretch of a noisy machine; their mean is returned (None with --no-cross-check).
    """
    if not s.cross_check:
        bench_assignment = None
    c = copy.deepcopy(cfg)
    c.data.backend, c.data.synthetic_size = "synthetic", 64 * cfg.train.global_batch_size
    views = next(iter(pipelines.build_train_loader(loader_spec(c, accelerator, 1)))).views
    device = accelerator.device
    for _ in range(s.warmup_steps):
        runner(views)
    sync(device)
    start = time.perf_counter()
    for _ in range(s.steps):
        runner(views)
    sync(device)
    seconds = time.perf_counter() - start
    step = {"images_per_s": analysis.images_per_s(s.steps * cfg.train.global_batch_size, seconds),
            "step_ms": 1e3 * seconds / s.steps, "steps": s.steps, "warmup": s.warmup_steps}
    if device.type == "cuda":  # is the GPU kept busy, or is the step launch-bound?
        try:
            step.update(device_activity(lambda: runner(views), 3, step["step_ms"]))
        except Exception as exc:  # a diagnostic: losing it must not lose the step's figures
            step["device_activity_error"] = f"{type(exc).__name__}: {exc}"
    around = [bench_assignment()] if bench_assignment else []
    phases = PhaseTimer(device, enabled=True)
    for _ in range(max(s.steps, 3)):
        runner(views, phases)
    if bench_assignment:
        around.append(bench_assignment())
    return step, phases, statistics.fmean(around) if around else None



def log_window(warmup: int, steps: int) -> int:
    """Steps per train_log.csv row of the profiled loop: the largest that divides both the warm-up
    and the timed steps, up to LOG_WINDOW_MAX. Why not one row per step: a log row waits for the
    device (the loss, the divergence guard's weight norm, the processes' agreement to go on), so on
    a GPU every step would drain the queue of launched work and the loop would measure slower than
    it trains."""
    return max(d for d in range(1, LOG_WINDOW_MAX + 1) if warmup % d == 0 and steps % d == 0)


def measure_end_to_end(cfg: Config, s: ProfileSettings, scratch: Path) -> dict:
    """The training loop itself (`fastssl.engine.train`) fed by the recipe's loader, read from its own log.

    The loop runs the warm-up and the timed steps with one log row per `log_window` steps
    (train_log.csv: images/s, data-wait share and mean step time of the window, as its meter
    took them); the timed steps' rows give the figures, so the profile's end-to-end rate is the
    training loop's, not a second measurement of it.
    """
    need = s.warmup_steps + s.steps
    window = log_window(s.warmup_steps, s.steps)
    c = copy.deepcopy(cfg)
    c.train.run_dir = str(scratch / "loop_run")
    c.train.epochs, c.train.steps_per_epoch, c.train.log_every = 1, need, window
    c.optim.warmup_epochs = min(c.optim.warmup_epochs, 1)  # one epoch of `need` steps; the lr costs no time
    c.train.progress, c.eval.knn_every, c.eval.knn_at_start = False, -1, False
    c.data.num_workers = s.workers
    stopped = train(c).get("interrupted")
    if stopped is not None:  # the loop checkpointed its scratch run and said so: the profile ends here
        print("    (that checkpoint is the profile's scratch run, deleted now: a profile is run again, not resumed)",
              flush=True)
        signum = stop_exit_code(stopped) - 128  # the loop's "signal" (a peer's stop) counts as Ctrl-C
        raise KeyboardInterrupt() if signum == signal.SIGINT else StopSignal(signum)
    with (Path(c.train.run_dir) / "train_log.csv").open() as f:
        rows = list(csv.DictReader(f))
    ran = int(rows[-1]["step"]) if rows else 0
    if ran < need:  # the loop ends the epoch with the loader
        raise ConfigError(f"the {cfg.data.backend} loader has {ran} batches per epoch, the profile needs "
                          f"{need}; use fewer --steps/--warmup-steps or more data")
    return end_to_end_figures(rows[s.warmup_steps // window:need // window], cfg.train.global_batch_size,
                              cfg.data.backend, s.warmup_steps, window)


def end_to_end_figures(rows: list[dict], batch: int, backend: str, warmup: int, steps_per_row: int = 1) -> dict:
    """Images/s, data-wait share and per-step figures of the loop's log rows (train_log.csv), each
    the mean of `steps_per_row` steps.

    A row's `step_time_s` is its steps' mean wall time, waiting for their batches included, and
    its `data_wait_share` the part of it spent waiting.
    """
    walls = [float(r["step_time_s"]) * steps_per_row for r in rows]
    waits = [w * float(r["data_wait_share"]) for w, r in zip(walls, rows)]
    steps = [w - t for w, t in zip(walls, waits)]
    timed = steps_per_row * len(rows)
    return {"backend": backend, "steps": timed, "warmup": warmup, "log_every": steps_per_row,
            "images_per_s": analysis.images_per_s(batch * timed, sum(walls)),
            "data_wait_share": analysis.data_wait_share(waits, steps),
            "per_step_images_per_s": [float(r["images_per_s"]) for r in rows],
            "mean_wait_ms": 1e3 * sum(waits) / timed, "mean_step_ms": 1e3 * sum(steps) / timed}


def assignment_bench(cfg: Config, device: torch.device, s: ProfileSettings) -> Callable[[], float]:
    """Median microseconds of `mira_assign_views` on random logits of this process's shape (bench_mira)."""
    g = torch.Generator(device=device).manual_seed(0)
    views = [torch.randn(cfg.train.global_batch_size, cfg.model.num_prototypes, generator=g, device=device)
             for _ in range(2)]
    fn = assignment_timing.implementations(cfg.method.num_iters)["views"]
    return lambda: assignment_timing.time_call(fn, views, device, s.assign_warmup, s.assign_repeats)


def measure_assignment(cfg: Config, device: torch.device, gpus: int, s: ProfileSettings) -> dict:
    """The assignment alone on random logits, 2 views (tools/bench_mira.py's timing)."""
    k, iters, rows = cfg.model.num_prototypes, cfg.method.num_iters, cfg.train.global_batch_size
    out = {}
    sizes = [("this process", rows)] + ([("global batch", rows * gpus)] if gpus > 1 else [])
    for label, b in sizes:
        g = torch.Generator(device=device).manual_seed(0)
        views = [torch.randn(b, k, generator=g, device=device) for _ in range(2)]
        for name, fn in assignment_timing.implementations(iters).items():
            if label == "global batch" and name == "reference":
                continue
            us = assignment_timing.time_call(fn, views, device, s.assign_warmup, s.assign_repeats)
            out[f"{name} ({label})" if gpus > 1 else name] = {"B": b, "K": k, "median_us": us}
    return out


def ratio_check(profile: float, independent: float, note: str) -> dict:
    """A figure of the profile beside an independent measurement of it: their ratio, and whether within 15%."""
    return {"profile": profile, "independent": independent, "ratio": profile / independent if independent else None,
            "within_15_percent": bool(independent) and abs(profile / independent - 1) <= 0.15, "note": note}



def configure(s: ProfileSettings, overrides: list[str]) -> tuple[Config, int]:
    """The recipe with the overrides, cut to ONE process's share; and the recipe's global batch."""
    cfg = apply_overrides(load_recipe(s.recipe), overrides)
    global_batch = cfg.train.global_batch_size
    if global_batch % s.gpus:
        raise ConfigError(f"--gpus {s.gpus} does not divide the global batch {global_batch}")
    cfg.train.global_batch_size //= s.gpus  # this process's share of the real run
    cfg.train.micro_batch_size = 0 if cfg.train.micro_batch_size >= cfg.train.global_batch_size else \
        cfg.train.micro_batch_size
    validate(cfg)
    return cfg, global_batch



def run_profile(s: ProfileSettings, cfg: Config, global_batch: int, out: Path) -> dict:
    accelerator = build_accelerator(cfg.train)
    resolve_auto_settings(cfg, accelerator)
    if accelerator.num_processes > 1:
        raise ConfigError("run tools/profile_throughput.py as ONE process (not under accelerate launch "
                          "--num_processes > 1); --gpus G profiles one of G processes")
    if s.workers < 0:
        s = replace(s, workers=default_num_workers(-1, 1))
    seed_everything(cfg.train.seed, 0)
    device = accelerator.device
    started = time.perf_counter()
    print(f"profiling {s.recipe.name} on {device} ({cfg.train.global_batch_size} images per step)", flush=True)

    print("1/5 loader only", flush=True)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".scratch-", dir=out) as scratch:  # a .beton of the data, if any
        loaders = measure_loaders(cfg, accelerator, list(s.backends), s, Path(scratch))
    print("2/5 model step only (synthetic batch on the device)", flush=True)
    reset_peak_memory(device)
    runner = StepRunner(cfg, accelerator)
    uses_mira = runner.objective.assignment == "mira"
    model_step, phases, assign_alone = measure_model_step(
        runner, cfg, accelerator, s, assignment_bench(cfg, device, s) if uses_mira else None)
    breakdown = phases.mean_ms()
    # Peak memory of the training step alone (stage 3's training loop builds its own model).
    peak_device = peak_memory_mb(device) if device.type == "cuda" else None
    print(f"    {model_step['images_per_s']:.1f} images/s", flush=True)
    # Kept if the run stops in a later stage (tools/gpu_check.py's deadline); removed with the full report.
    write_json(out / PARTIAL_REPORT, {"partial": "stopped after stage 2/5, the model step",
                                           "stages": {"model_step": model_step}, "breakdown_ms": breakdown,
                                           "memory": {"peak_device_mb": peak_device}})
    print(f"3/5 end to end ({cfg.data.backend}): the training loop, read from its own log", flush=True)
    with tempfile.TemporaryDirectory() as scratch:
        e2e = measure_end_to_end(cfg, s, Path(scratch))
    print(f"    {e2e['images_per_s']:.1f} images/s, data wait {100 * e2e['data_wait_share']:.0f}%", flush=True)
    print("4/5 assignment alone", flush=True)
    assignment = measure_assignment(cfg, device, s.gpus, s)
    print("5/5 cross-checks", flush=True)
    checks = {}
    if assign_alone is not None:
        checks["assignment_us"] = ratio_check(
            1e3 * phases.median_ms()["assignment"], assign_alone,
            "Assignment: median time inside real training steps (instrumented pass, real teacher logits) vs "
            "tools/bench_mira.py's timing of the same op on random logits of the same shape, taken just before "
            "and just after that pass.")

    env = describe_environment(device)
    dtype = {"bf16": "bf16", "fp16": "fp16"}.get(accelerator.mixed_precision, "fp32")
    recipe = describe_recipe(cfg, s.recipe.stem, dtype, s.gpus)
    recipe["global_batch_size"], recipe["batch_per_process"] = global_batch, cfg.train.global_batch_size
    report = new_report("profile", env, recipe, utc_now())
    loader_ips = loaders.get(cfg.data.backend, {}).get("images_per_s")
    report.update(
        stages={"loader": loaders, "model_step": model_step, "end_to_end": e2e, "assignment": assignment},
        breakdown_ms={**breakdown, "data_wait (end to end)": e2e["mean_wait_ms"]},
        memory={"peak_device_mb": peak_device, "peak_host_rss_mb": host_peak_rss_mb()},
        projection=analysis.epoch_projection(e2e["images_per_s"]),
        checks=checks,
        verdict=analysis.verdict(loader_ips, model_step["images_per_s"], e2e["images_per_s"], e2e["data_wait_share"],
                                 breakdown, cfg.data.backend, e2e["mean_step_ms"], model_step["step_ms"],
                                 model_step.get("device_busy_share"), cfg.train.compile),
        seconds=time.perf_counter() - started,
    )
    report["charts"] = write_charts(report, out)
    return report



def write_charts(report: dict, out: Path) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    s = report["stages"]
    labels = [f"loader {n}" for n in s["loader"]] + ["model step", "end to end"]
    values = [r["images_per_s"] for r in s["loader"].values()] + [s["model_step"]["images_per_s"],
                                                                   s["end_to_end"]["images_per_s"]]
    per_step, every = s["end_to_end"]["per_step_images_per_s"], s["end_to_end"].get("log_every", 1)
    series = {"training loop's log (end to end)": (list(range(every, every * len(per_step) + 1, every)), per_step)}
    return {
        "stages": charts.bar_chart(out / "stages.png", labels, values, "source images/s", "Images/s per stage"),
        "breakdown": charts.stacked_breakdown(out / "breakdown.png", report["breakdown_ms"], "Step-time breakdown"),
        "over_steps": charts.line_chart(out / "over_steps.png", series, "timed step", "images/s",
                                        "Images/s over steps"),
    }

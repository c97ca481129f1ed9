"""Loader-only throughput in SOURCE images/s (each image with all its crops), interleaved repetitions.

The backends are interleaved within each repetition (torchvision, dali, ffcv, synthetic,
then again), so that a noisy shared machine slows them alike; each repetition is a fresh
epoch whose first batches (pipeline start-up, worker spawn) are not timed; on a GPU the
clock stops after a synchronise. What that start-up costs is timed on its own: the seconds
from `set_epoch` to an epoch's first batch, which a training run pays once per epoch (a DALI
pipeline is built per epoch, torchvision's workers are spawned per epoch).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, NamedTuple

import torch

if TYPE_CHECKING:
    from pipelines.sampler import ShardedLoader

__all__ = ["BACKEND_ORDER", "available", "device_used_mb", "EpochTiming", "time_epoch", "interleaved_rates", "summarize"]

# The import that tells whether an optional backend is installed.
BACKEND_MODULES = {"dali": "nvidia.dali", "ffcv": "ffcv"}
# The training loaders a loader benchmark measures by default, in its table's order
# (tools/bench_loaders.py, tools/profile_throughput.py's loader stage).
BACKEND_ORDER = ("torchvision", "dali", "ffcv", "synthetic")


def available(backend: str) -> bool:
    """Whether `backend`'s optional package imports here (torchvision and synthetic always do)."""
    module = BACKEND_MODULES.get(backend)
    if module is None:
        return True
    try:
        __import__(module)
    except ImportError:
        return False
    return True


def device_used_mb(device: torch.device) -> float | None:
    """Memory in use on `device` by every allocator (DALI's and nvJPEG's pools are not torch's,
    so torch's own counters miss them); None off CUDA."""
    if device.type != "cuda":
        return None
    free, total = torch.cuda.mem_get_info(device)
    return (total - free) / 2**20


class EpochTiming(NamedTuple):
    """One timed epoch: the steady rate, and what starting the epoch cost."""

    images_per_s: float  # source images/s over the timed batches
    start_s: float | None  # seconds from `set_epoch` to the first batch on the device; None without warm-up


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_epoch(loader: ShardedLoader, epoch: int, warmup: int, batches: int, device: torch.device,
               on_timed: Callable[[], None] | None = None) -> EpochTiming:
    """Source images/s over `batches` batches after `warmup` untimed ones, and (when `warmup`
    is at least 1) the seconds to the first of those; `on_timed()` runs after the timed
    batches, while the epoch's pipeline or workers still live."""
    began, start_s = time.perf_counter(), None
    loader.set_epoch(epoch)
    it = iter(loader)
    for i in range(warmup):
        next(it)
        if i == 0:
            _synchronize(device)
            start_s = time.perf_counter() - began
    _synchronize(device)
    start, images = time.perf_counter(), 0
    for _ in range(batches):
        images += next(it).batch_size
    _synchronize(device)
    seconds = time.perf_counter() - start
    if on_timed is not None:
        on_timed()
    if hasattr(it, "close"):  # end the epoch's generator now: workers and pipelines stop
        it.close()
    return EpochTiming(images / seconds, start_s)


def interleaved_rates(loaders: dict, repeats: int, warmup: int, batches: int, device: torch.device,
                      on_rate: Callable[[int, str, float], None] | None = None,
                      memory: dict[str, dict[str, float | None]] | None = None,
                      starts: dict[str, list[float]] | None = None) -> dict[str, list[float]]:
    """Images/s of every loader in every repetition, the loaders interleaved within a repetition.

    Each loader first delivers one untimed batch (compilation, worker spawn). `on_rate(rep,
    name, images_per_s)` is called after each measurement (the tools print progress). A
    `memory` dict receives, per loader, device memory (MiB, every allocator: `device_used_mb`;
    None off CUDA): `added_mb`, what the loader's first batch added to the device (its
    decoder's buffers and pools: what one loader costs, as long as no loader before it in
    this process left memory it can reuse), and `used_mb`, the most in use at the end of its
    timed passes (everything this process holds then, the other loaders' memory included).
    A `starts` dict receives, per loader, each timed epoch's seconds to its first batch
    (`EpochTiming.start_s`; none when `warmup` is 0).
    """
    for name, loader in loaders.items():
        before = device_used_mb(device)
        time_epoch(loader, 10_000, 0, 1, device)
        after = device_used_mb(device)
        if memory is not None:
            memory[name] = {"added_mb": None if after is None else after - before, "used_mb": None}
    runs: dict[str, list[float]] = {name: [] for name in loaders}
    for rep in range(repeats):
        for name, loader in loaders.items():
            def note_memory(name: str = name) -> None:
                if memory is not None:
                    used = device_used_mb(device)
                    memory[name]["used_mb"] = None if used is None else max(used, memory[name]["used_mb"] or 0.0)

            timing = time_epoch(loader, rep, warmup, batches, device, note_memory)
            runs[name].append(timing.images_per_s)
            if starts is not None and timing.start_s is not None:
                starts.setdefault(name, []).append(timing.start_s)
            if on_rate is not None:
                on_rate(rep, name, runs[name][-1])
    return runs


def summarize(runs: list[float]) -> dict:
    """Median (the reported figure), spread and the repetitions of one loader."""
    return {"images_per_s": statistics.median(runs), "min": min(runs), "max": max(runs), "runs": runs}

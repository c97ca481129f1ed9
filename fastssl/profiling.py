"""Meters the loop keeps: data-wait share, step time, images/s, peak memory.

The data-wait share is the fraction of wall time the loop spent blocked on the loader:
near 0 means the model step is the bottleneck, near 1 means the loader is.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Iterable, Iterator

import torch


class ThroughputMeter:
    """Wraps a loader; accumulates time waiting for batches vs. total time, per window."""

    def __init__(self, images_per_batch: int):
        self.images_per_batch = images_per_batch
        self.reset()

    def reset(self) -> None:
        self.wait = 0.0
        self.steps = 0
        self.start = time.perf_counter()

    def wrap(self, loader: Iterable) -> Iterator:
        it = iter(loader)
        while True:
            t0 = time.perf_counter()
            try:
                batch = next(it)
            except StopIteration:
                return
            self.wait += time.perf_counter() - t0
            self.steps += 1
            yield batch

    def summary(self) -> dict:
        """Figures for the window since the last reset (time measured up to now)."""
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        steps = max(self.steps, 1)
        return {
            "images_per_s": self.steps * self.images_per_batch / elapsed,
            "data_wait_share": self.wait / elapsed,
            "step_time_s": elapsed / steps,
        }


def peak_memory_mb(device: torch.device) -> float:
    """Peak allocated device memory since the last reset (0 on CPU, where it is not tracked)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return 0.0


def device_memory_in_use_mb(device: torch.device) -> float:
    """Memory in use on the whole device now (cudaMemGetInfo: total - free; 0 on CPU).

    Beyond `peak_memory_mb` (what PyTorch allocated): PyTorch's cache, the CUDA context and
    other libraries' pools, which PyTorch does not see (DALI's nvJPEG buffers: padding per
    decoder thread), as nvidia-smi shows them. Pools are kept, so at an epoch's end this is
    close to the epoch's peak.
    """
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        return (total - free) / 2**20
    return 0.0


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


class PhaseTimer:
    """Wall time per named phase of the training step, for the step-time breakdown.

    Disabled (the default in training) it costs one attribute check per phase. Enabled, it
    synchronises the device at each phase boundary so that asynchronous GPU work is charged
    to the phase that launched it; that slows the step a little, which is why profiling
    measures throughput in a separate, uninstrumented pass.
    """

    def __init__(self, device: torch.device | None = None, enabled: bool = False):
        self.device, self.enabled = device, enabled
        self.samples: dict[str, list[float]] = {}  # seconds of every call, per phase

    def phase(self, name: str) -> "_Phase":
        return _Phase(self, name)

    def _sync(self) -> None:
        if self.device is not None and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @property
    def seconds(self) -> dict[str, float]:
        """Total seconds of each phase."""
        return {k: sum(v) for k, v in self.samples.items()}

    def mean_ms(self) -> dict[str, float]:
        """Mean milliseconds per call of each phase (shares of the step add up)."""
        return {k: 1e3 * statistics.fmean(v) for k, v in self.samples.items()}

    def median_ms(self) -> dict[str, float]:
        """Median milliseconds per call of each phase (robust to a stall on a shared machine)."""
        return {k: 1e3 * statistics.median(v) for k, v in self.samples.items()}


class _Phase:
    def __init__(self, timer: PhaseTimer, name: str):
        self.timer, self.name = timer, name

    def __enter__(self) -> None:
        if self.timer.enabled:
            self.timer._sync()
            self.start = time.perf_counter()

    def __exit__(self, *exc) -> None:
        if self.timer.enabled:
            self.timer._sync()
            self.timer.samples.setdefault(self.name, []).append(time.perf_counter() - self.start)


NO_PHASES = PhaseTimer()  # the training loop's default: records nothing

"""Meters the loop keeps: data-wait share, step time, images/s, peak memory.

The data-wait share is the fraction of wall time the loop spent blocked on the loader:
near 0 means the model step is the bottleneck, near 1 means the loader is.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterable, Iterator

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

    def __exit__(self, *exc: object) -> None:
        if self.timer.enabled:
            self.timer._sync()
            self.timer.samples.setdefault(self.name, []).append(time.perf_counter() - self.start)


NO_PHASES = PhaseTimer()  # the training loop's default: records nothing


def device_trace(fn: Callable[[], None]) -> list[tuple[str, float, float]]:
    """(name, start us, end us) of every CUDA kernel, copy and memset that `fn()` ran, from the torch profiler.

    User annotations are left out: on the device timeline they span others' work."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return [(e.name, e.time_range.start, e.time_range.end) for e in prof.events()
            if e.device_type == DeviceType.CUDA and not e.is_user_annotation]


def covered_us(spans: Iterable[tuple[float, float]]) -> float:
    """Microseconds covered by the union of (start, end) intervals: time the device was busy, overlaps counted once."""
    total, reach = 0.0, -float("inf")
    for start, end in sorted(spans):
        if end > reach:
            total += end - max(start, reach)
            reach = end
    return total


def device_activity(step: Callable[[], None], steps: int, step_ms: float, top: int = 10) -> dict:
    """How busy the GPU is during a training step: the share of `step_ms` (measured untraced, since
    tracing slows the host) in which some kernel or copy ran, the device operations launched per
    step, and the `top` kernels by device time per step. A share well below 1 means the host
    (Python, dispatch, kernel launches) cannot keep the GPU fed: the step is launch-bound, and
    compiling it or fewer, larger kernels would help; the top kernels say where the GPU's time goes."""
    def run() -> None:
        for _ in range(steps):
            step()

    trace = device_trace(run)
    if not trace:  # e.g. CUPTI unavailable: the profiler warns and records nothing
        return {"device_busy_share": None, "device_busy_ms": None, "device_ops_per_step": None, "device_top_ms": {}}
    busy_ms = covered_us((start, end) for _, start, end in trace) / 1e3 / steps
    return {"device_busy_share": busy_ms / step_ms if step_ms > 0 else None,
            "device_busy_ms": busy_ms, "device_ops_per_step": len(trace) / steps,
            "device_top_ms": top_by_time(trace, steps, top)}


def top_by_time(trace: list[tuple[str, float, float]], steps: int, top: int) -> dict[str, float]:
    """The `top` names of a device trace by total time, in ms per step (longest first; names cut to 100 characters)."""
    totals: dict[str, float] = {}
    for name, start, end in trace:
        totals[name[:100]] = totals.get(name[:100], 0.0) + (end - start) / 1e3 / steps
    return dict(sorted(totals.items(), key=lambda kv: -kv[1])[:top])

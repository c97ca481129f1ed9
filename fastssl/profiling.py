"""Meters the loop keeps: data-wait share, step time, images/s, peak memory.

The data-wait share is the fraction of wall time the loop spent blocked on the loader:
near 0 means the model step is the bottleneck, near 1 means the loader is.
"""

from __future__ import annotations

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


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

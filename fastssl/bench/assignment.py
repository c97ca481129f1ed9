"""The pseudo-label assignments timed alone: MIRA reference, the custom-op path, Sinkhorn.

The median of repeated calls after untimed warm-up calls; on CUDA with device events.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch

from fastssl.ops import mira_assign, mira_assign_views, sinkhorn_assign

__all__ = ["TAU", "BETA", "implementations", "time_call"]

TAU, BETA = 0.225, 0.7


def implementations(num_iters: int) -> dict[str, Callable[[list[torch.Tensor]], object]]:
    """fn(views) of each default implementation, at `num_iters` MIRA iterations (Sinkhorn: 3)."""
    return {
        "reference": lambda v: [mira_assign(x, tau=TAU, beta=BETA, num_iters=num_iters) for x in v],
        "views": lambda v: mira_assign_views(v, tau=TAU, beta=BETA, num_iters=num_iters),
        "sinkhorn": lambda v: [sinkhorn_assign(x, eps=0.05, num_iters=3) for x in v],
    }


def time_call(fn: Callable[[list[torch.Tensor]], object], views: list[torch.Tensor], device: torch.device,
              warmup: int, repeats: int) -> float:
    """Median microseconds of fn(views)."""
    for _ in range(warmup):
        fn(views)
    samples = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn(views)
            end.record()
            torch.cuda.synchronize()
            samples.append(start.elapsed_time(end) * 1e3)
        else:
            t = time.perf_counter()
            fn(views)
            samples.append((time.perf_counter() - t) * 1e6)
    return statistics.median(samples)

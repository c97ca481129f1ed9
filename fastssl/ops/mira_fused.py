"""MIRA's assignment for all teacher views at once, with ONE collective per step, as a torch custom op.

The reference `mira_assign` all-reduces the column marginal at every fixed-point step
(1 + 1 + 30 collectives per view). Here the teacher logits of every view and every rank
are gathered once (one all-gather, B_local x K per view per rank), each rank solves the
whole global problem locally, and keeps its own rows: the same answer (the global
problem is identical on every rank) for one collective instead of 64.

The local solve is `fastssl::mira_assign_views`, a `torch.library` custom op with a fake
(meta) implementation, so `torch.compile(fullgraph=True)` traces a training step that
calls it with no graph break; the gather uses functional collectives, which the compiler
traces too. Its implementations:

- CPU, and float64 anywhere: `solve_views`, the reference iteration (`mira.mira_fixed_point`,
  Eq. 5-7) batched over views.
- CUDA (fp32/bf16/fp16 logits): the fused kernel of `csrc/mira_fused.cu`, one cooperative
  launch for all views and all iterations, built just in time on first use (by NVRTC, else by
  nvcc: `fastssl.ops._cuda_ext`) and self-checked against `solve_views`. When it cannot be built
  or loaded (neither NVRTC nor nvcc, a compile error, ``FASTSSL_FUSED_MIRA=0``, a failed self-check) one warning says why
  and `solve_views` runs on CUDA instead; callers do not change either way.

Requirement: every rank passes the same number of rows (the training loop's per-process
batch); the reference `mira_assign` also handles uneven shards.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import Tensor

from fastssl.collectives import all_gather_traceable, world_size

from . import _cuda_ext
from ._common import check_iters, check_logits, check_positive, compute_dtype
from .mira import _check_beta, mira_fixed_point

__all__ = ["mira_assign_views", "solve_views"]


def solve_views(logits: Tensor, tau: float, beta: float, num_iters: int) -> Tensor:
    """V x B x K logits -> V x B x K targets, each view solved over ALL of its B rows.

    `mira_fixed_point` (the one log-space iteration, Eq. 5-7) with local column sums: the
    rows are already global, so no collective; float32 (float64 for float64 input).
    """
    return mira_fixed_point(logits, tau, beta, num_iters)


@torch.library.custom_op("fastssl::mira_assign_views", mutates_args=())
def _mira_assign_views_op(logits: Tensor, tau: float, beta: float, num_iters: int) -> Tensor:
    return solve_views(logits, tau, beta, num_iters)


@_mira_assign_views_op.register_kernel("cuda")
def _(logits: Tensor, tau: float, beta: float, num_iters: int) -> Tensor:
    """The fused kernel when it is available; float64 (and any other dtype) keeps the reference."""
    if logits.dtype in (torch.float32, torch.bfloat16, torch.float16):
        ext = _cuda_ext.fused_for(logits.device)
        if ext is not None:
            return _cuda_ext.mira_assign_views_fused(ext, logits, tau, beta, num_iters)
    return solve_views(logits, tau, beta, num_iters)


@_mira_assign_views_op.register_fake
def _(logits: Tensor, tau: float, beta: float, num_iters: int) -> Tensor:
    return logits.new_empty(logits.shape, dtype=compute_dtype(logits.dtype))


@torch.no_grad()
def mira_assign_views(views: Sequence[Tensor], tau: float = 0.225, beta: float = 2 / 3, num_iters: int = 30,
                      group: Optional[Any] = None) -> list[Tensor]:
    """MIRA targets for several teacher views (each b x K, this rank's rows), one collective.

    Returns one b x K target per view, rows summing to 1, float32 (float64 for float64
    input). In a distributed run the marginal is over the GLOBAL batch of each view, exactly
    as `mira_assign`; every rank must pass the same b.
    """
    views = [check_logits(v) for v in views]
    if not views or any(v.shape != views[0].shape for v in views):
        raise ValueError(f"views must be a non-empty list of equal-shape B x K logits, got "
                         f"{[tuple(v.shape) for v in views]}")
    tau = check_positive("tau", tau)
    beta = _check_beta(beta)
    num_iters = check_iters("num_iters", num_iters, 0)
    stacked = torch.stack(views)  # V x b x K
    if world_size(group) == 1:
        return list(_mira_assign_views_op(stacked, tau, beta, num_iters).unbind(0))
    rows = stacked.shape[1]
    targets = _mira_assign_views_op(all_gather_traceable(stacked, 1, group), tau, beta, num_iters)
    rank = dist.get_rank(group)
    return list(targets[:, rank * rows:(rank + 1) * rows].unbind(0))

"""Tiny torch.distributed helpers for the assignment ops.

Why this exists: the MIRA marginal (Eq. 6-7) and SwAV's equipartition are defined over
the GLOBAL batch, while each rank only holds its own rows. The ops need exactly two global
quantities: the global row count and a per-column log-sum-exp over all rows of all ranks.
Everything here is a no-op in a single process, so the same code runs in CI, on a laptop
and under Accelerate.

Conventions: ``group=None`` means the default process group when
``torch.distributed`` is available and initialised, otherwise "single process".
Ranks may hold different numbers of rows (including zero rows).
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = [
    "is_distributed",
    "group_world_size",
    "global_count",
    "global_logsumexp_cols",
]


def is_distributed(group: Optional[Any] = None) -> bool:
    """True when a collective on ``group`` would involve more than one process.

    A world of size 1 is treated as "not distributed" so no collective is issued at all.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return False
    return dist.get_world_size(group) > 1


def group_world_size(group: Optional[Any] = None) -> int:
    """World size of ``group`` (1 when not distributed)."""
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(group)


def global_count(n_local: int, device: torch.device, dtype: torch.dtype,
                 group: Optional[Any] = None) -> Tensor:
    """Total number of rows over all ranks, as a 0-d tensor on ``device``.

    Returned as a tensor (not a Python int) so that no host synchronisation is needed on
    accelerators; ranks may contribute different counts (global mean = global sum / this).
    """
    n = torch.full((), float(n_local), device=device, dtype=dtype)  # a fill on the device: no host-to-device copy
    if is_distributed(group):
        # float64/float32 sums of small integers are exact far beyond any batch size.
        dist.all_reduce(n, op=dist.ReduceOp.SUM, group=group)
    return n


def _local_max_and_sumexp(x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-column (max, sum exp(x - max)) of a possibly empty B x K block.

    An empty block (a rank with 0 rows) contributes max = -inf and sum = 0, which the merge
    in :func:`global_logsumexp_cols` weights to exactly zero.
    """
    k = x.shape[1]
    if x.shape[0] == 0:
        m = torch.full((k,), float("-inf"), device=x.device, dtype=x.dtype)
        s = torch.zeros(k, device=x.device, dtype=x.dtype)
        return m, s
    m = x.amax(dim=0)
    # A column that is -inf everywhere has m = -inf: shift by 0 there to avoid (-inf) - (-inf).
    m_safe = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    s = torch.exp(x - m_safe).sum(dim=0)
    return m, s


def global_logsumexp_cols(x: Tensor, group: Optional[Any] = None) -> Tensor:
    """``log(sum_i exp(x_ij))`` per column j, with i running over the rows of ALL ranks.

    Single process: exactly ``torch.logsumexp(x, dim=0)``.
    Distributed: ONE collective (an all-gather of each rank's per-column max and shifted
    sum of exponentials, 2 x K values), then an exact, overflow-free merge on every rank:
    ``M = max_r m_r``, ``lse = M + log(sum_r s_r * exp(m_r - M))``. (An all-reduce MAX
    followed by an all-reduce SUM would need two collectives.)
    """
    if x.dim() != 2:
        raise ValueError(f"x must be 2-D, got shape {tuple(x.shape)}")
    if not is_distributed(group):
        if x.shape[0] == 0:
            return torch.full((x.shape[1],), float("-inf"), device=x.device, dtype=x.dtype)
        return torch.logsumexp(x, dim=0)

    m, s = _local_max_and_sumexp(x)
    packed = torch.stack([m, s])  # 2 x K
    gathered = [torch.empty_like(packed) for _ in range(dist.get_world_size(group))]
    dist.all_gather(gathered, packed, group=group)
    allp = torch.stack(gathered)  # R x 2 x K
    ms, ss = allp[:, 0], allp[:, 1]
    big_m = ms.amax(dim=0)
    big_m_safe = torch.where(torch.isfinite(big_m), big_m, torch.zeros_like(big_m))
    # exp(-inf - M) = 0 removes empty ranks / empty columns without producing NaN.
    total = (ss * torch.exp(ms - big_m_safe)).sum(dim=0)
    return torch.log(total) + big_m_safe

"""The gathers across the training processes (one home: each is written and tested once), and the
global-batch quantities the assignment ops reduce.

Accelerate owns the processes and devices; the collectives go through torch.distributed on the
group it made (the default group) or on a group passed in. Everything here is a no-op in a
single process, so the same code runs in CI, on a laptop and under Accelerate.

- Gathers of tensors: `all_gather_stacked` (P x shape, rank order), `all_gather_rows` (rows of every
  rank, rank order), `all_gather_padded_rows` (ranks holding different row counts),
  `all_gather_traceable` (inside code torch.compile traces), `all_gather_objects` (picklable values).
- Global quantities of the assignment ops (MIRA's marginal, Eq. 6-7, and SwAV's equipartition are
  defined over the GLOBAL batch, while each rank holds its own rows): `global_count`,
  `global_logsumexp_cols`.

Conventions: ``group=None`` means the default process group when ``torch.distributed`` is
available and initialised, otherwise "single process". Ranks may hold different numbers of rows
(including zero rows) where a function says so.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = [
    "is_distributed",
    "world_size",
    "all_gather_stacked",
    "all_gather_rows",
    "all_gather_padded_rows",
    "all_gather_traceable",
    "all_gather_objects",
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


def world_size(group: Optional[Any] = None) -> int:
    """World size of ``group`` (1 when not distributed)."""
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(group)


def all_gather_stacked(x: Tensor, group: Optional[Any] = None) -> Tensor:
    """P x `x.shape`: every rank's `x` (the same shape on every rank), in rank order; one collective.

    `x` itself, unsqueezed, in a single process. No gradient flows back through it."""
    if not is_distributed(group):
        return x.unsqueeze(0)
    x = x.contiguous()
    out = x.new_empty((dist.get_world_size(group), *x.shape))
    if dist.get_backend(group) == "nccl":
        dist.all_gather_into_tensor(out, x, group=group)
    else:  # gloo: the list form (its support of the single-tensor form varies across versions and devices)
        dist.all_gather(list(out.unbind(0)), x, group=group)
    return out


def all_gather_rows(x: Tensor, group: Optional[Any] = None) -> Tensor:
    """(P * n) x ...: the n rows of every rank (the same n on every rank), rank after rank; one collective."""
    return all_gather_stacked(x, group).flatten(0, 1)


def all_gather_padded_rows(x: Tensor, pad_value: float, group: Optional[Any] = None) -> Tensor:
    """(P * m) x ...: every rank's rows, each rank's block padded with `pad_value` to the most rows any rank
    holds (m), rank after rank; two collectives (the counts, then the rows). For ranks holding different
    numbers of rows (a data split that does not divide evenly); the padding marks itself, e.g. -1 indices."""
    if not is_distributed(group):
        return x
    counts = all_gather_stacked(torch.tensor([x.shape[0]], device=x.device), group)
    most = int(counts.max())
    padded = x.new_full((most, *x.shape[1:]), pad_value)
    padded[:x.shape[0]] = x
    return all_gather_rows(padded, group)


def all_gather_traceable(x: Tensor, dim: int, group: Optional[Any] = None) -> Tensor:
    """Every rank's `x` concatenated along `dim` in rank order, as a functional collective that
    torch.compile traces (the in-place `dist.all_gather` would break its graph); one collective."""
    if not is_distributed(group):
        return x
    from torch.distributed import _functional_collectives as funcol

    # all_gather_single: its name from torch 2.14 on, where all_gather_tensor warns that it is deprecated
    gather = getattr(funcol, "all_gather_single", funcol.all_gather_tensor)
    return gather(x.contiguous(), gather_dim=dim, group=group if group is not None else dist.group.WORLD)


def all_gather_objects(value: Any, group: Optional[Any] = None) -> list[Any]:
    """Every rank's picklable `value`, in rank order (`[value]` in a single process); one collective."""
    if not is_distributed(group):
        return [value]
    out: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, value, group=group)
    return out


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
    allp = all_gather_stacked(packed, group)  # R x 2 x K
    ms, ss = allp[:, 0], allp[:, 1]
    big_m = ms.amax(dim=0)
    big_m_safe = torch.where(torch.isfinite(big_m), big_m, torch.zeros_like(big_m))
    # exp(-inf - M) = 0 removes empty ranks / empty columns without producing NaN.
    total = (ss * torch.exp(ms - big_m_safe)).sum(dim=0)
    return torch.log(total) + big_m_safe

"""BatchNorm with one set of batch statistics per view, for views stacked in one forward.

The authors of MIRA put every view through the network on its own (student: 8 forwards,
teacher: 2), so each view is normalised with its own batch statistics, and the running
statistics get one momentum update per view. Grouping the views of one resolution into
one forward (DINO's multi-crop wrapper) is much faster but normalises them together,
which changes the logits. `PerViewBatchNorm1d/2d` keep the single forward and the
authors' semantics: the batch is read as `num_views` consecutive blocks of equal size
(how `MiraNetwork` stacks its views), and every block is normalised with its own mean
and variance.

In one process every block goes through PyTorch's own BatchNorm kernel (so the result and
the running statistics are those of per-view forwards, bit for bit, and the cost is close
to one pooled BatchNorm: no second pass, only V small launches). Distributed: each view's
statistics are over the GLOBAL batch (the view's rows on every process), as SyncBN's
are. All views of a layer travel in ONE all-gather of
(count, mean, variance) per view, combined with Chan's parallel formula (exact, no
sum-of-squares cancellation); the backward is one all-reduce. Both work on gloo and NCCL.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn


class _AllGatherStats(torch.autograd.Function):
    """All-gather of a small tensor whose backward sums each rank's gradient slice.

    torch.distributed.nn's all_gather uses reduce-scatter / all-to-all in its backward,
    which gloo lacks; the stats are tiny, so one all-reduce of the whole gradient is as good.
    """

    @staticmethod
    def forward(ctx, local: torch.Tensor, group) -> torch.Tensor:
        ctx.group, ctx.rank = group, dist.get_rank(group)
        out = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
        dist.all_gather(out, local.contiguous(), group=group)
        return torch.stack(out)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        return grad[ctx.rank], None


def combine_view_stats(count: torch.Tensor, mean: torch.Tensor, var: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Chan et al.'s pooled mean and (biased) variance over the first dimension (processes).

    count: P x V, mean and var: P x V x C (biased, per process) -> (V, V x C, V x C).
    """
    total = count.sum(0)
    w = (count / total).unsqueeze(-1)
    pooled_mean = (w * mean).sum(0)
    pooled_var = (w * (var + (mean - pooled_mean) ** 2)).sum(0)
    return total, pooled_mean, pooled_var


class _PerViewBatchNorm(nn.modules.batchnorm._BatchNorm):
    """Shared by the 1d and 2d versions; see the module docstring.

    `rows_per_view` is set by the network before each forward (`set_rows_per_view`); None
    means the whole batch is one view (plain BatchNorm). `sync` asks for global statistics
    whenever a process group of more than one process exists.
    """

    rows_per_view: int | None = None
    sync: bool = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(x)
        if not (self.training or not self.track_running_stats):
            return super().forward(x)  # eval: running statistics, views do not matter
        rows = self.rows_per_view or x.shape[0]
        if x.shape[0] % rows:
            raise ValueError(f"{type(self).__name__}: a batch of {x.shape[0]} rows is not a whole number of "
                             f"views of {rows} rows; stack views of equal batch size")
        num_views = x.shape[0] // rows
        group = self._group()
        if group is None:  # each view through the native kernel: what per-view forwards compute, bit for bit
            if num_views == 1:
                return super().forward(x)
            return torch.cat([super(_PerViewBatchNorm, self).forward(view) for view in x.split(rows)])
        return self._global_forward(x, rows, num_views, group)

    def _global_forward(self, x: torch.Tensor, rows: int, num_views: int, group) -> torch.Tensor:
        """Every view normalised with its statistics over all processes: one all-gather for all views."""
        # Statistics and the affine map in float32 or better (as cuDNN's BatchNorm under autocast).
        xv = x.reshape(num_views, rows, *x.shape[1:])  # splits only the outermost dimension
        xv = xv.to(torch.promote_types(x.dtype, torch.float32))
        dims = (1,) + tuple(range(3, xv.dim()))  # every dimension but the view and the channel
        var, mean = torch.var_mean(xv, dim=dims, correction=0)  # V x C each
        count = torch.full((num_views,), float(xv[0].numel() // xv.shape[2]), dtype=mean.dtype, device=x.device)
        local = torch.cat([count.unsqueeze(1), mean, var], dim=1)  # V x (1 + 2C): one collective
        gathered = _AllGatherStats.apply(local, group)
        c = mean.shape[1]
        count, mean, var = combine_view_stats(gathered[..., 0], gathered[..., 1:1 + c], gathered[..., 1 + c:])
        if self.training and self.track_running_stats:
            self._update_running_stats(count, mean.detach(), var.detach())
        shape = (num_views, 1, -1) + (1,) * (xv.dim() - 3)
        scale = torch.rsqrt(var + self.eps)
        shift = -mean * scale
        if self.affine:
            scale, shift = scale * self.weight, shift * self.weight + self.bias
        y = torch.addcmul(shift.view(shape), xv, scale.view(shape))
        return y.reshape(x.shape).to(x.dtype)

    def _group(self):
        if not (self.sync and dist.is_available() and dist.is_initialized()):
            return None
        return dist.group.WORLD if dist.get_world_size() > 1 else None

    @torch.no_grad()
    def _update_running_stats(self, count: torch.Tensor, mean: torch.Tensor, var: torch.Tensor) -> None:
        """One momentum update per view, in view order, as separate per-view forwards make."""
        unbiased = var * (count / (count - 1).clamp(min=1)).unsqueeze(1)
        for v in range(mean.shape[0]):
            self.num_batches_tracked.add_(1)
            m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
            self.running_mean.lerp_(mean[v].to(self.running_mean.dtype), m)
            self.running_var.lerp_(unbiased[v].to(self.running_var.dtype), m)


class PerViewBatchNorm1d(_PerViewBatchNorm, nn.BatchNorm1d):
    """`nn.BatchNorm1d` (N x C) with per-view statistics."""


class PerViewBatchNorm2d(_PerViewBatchNorm, nn.BatchNorm2d):
    """`nn.BatchNorm2d` (N x C x H x W, any memory format) with per-view statistics."""


def convert_to_per_view(module: nn.Module, sync: bool = True) -> nn.Module:
    """Replace every BatchNorm1d/2d under `module` by its per-view twin, weights and buffers kept.

    The state-dict keys do not change, so exported backbones still load into torchvision.
    """
    if isinstance(module, _PerViewBatchNorm):
        return module
    twin = {nn.BatchNorm1d: PerViewBatchNorm1d, nn.BatchNorm2d: PerViewBatchNorm2d}.get(type(module))
    if twin is not None:
        new = twin(module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats)
        new.load_state_dict(module.state_dict())
        new.to(module.running_mean.device if module.running_mean is not None else "cpu").train(module.training)
        new.sync = sync
        return new
    for name, child in module.named_children():
        setattr(module, name, convert_to_per_view(child, sync))
    return module


def set_rows_per_view(module: nn.Module, rows: int | None) -> None:
    """Tell every per-view BatchNorm under `module` how many rows one view has."""
    for m in module.modules():
        if isinstance(m, _PerViewBatchNorm):
            m.rows_per_view = rows

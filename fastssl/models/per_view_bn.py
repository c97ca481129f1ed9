"""BatchNorm with one set of batch statistics per view, for views stacked in one forward.

The authors of MIRA put every view through the network on its own (student: 8 forwards,
teacher: 2), so each view is normalised with its own batch statistics, and the running
statistics get one momentum update per view. Grouping the views of one resolution into
one forward (DINO's multi-crop wrapper) is much faster but normalises them together,
which changes the logits. `PerViewBatchNorm1d/2d` keep the single forward and the
authors' semantics: the batch is read as `num_views` consecutive blocks of equal size
(how `MiraNetwork` stacks its views), and every block is normalised with its own mean
and variance.

Three routes, one result:
* One process on a CPU, or under torch.compile: every block through PyTorch's own BatchNorm,
  then one concatenation: the result and the running statistics are those of per-view
  forwards, bit for bit (inductor fuses the concatenation away).
* On a GPU, eagerly: `_PerViewNorm`, the per-view twin of `nn.SyncBatchNorm`'s function,
  made of the same CUDA kernels (`torch.batch_norm_stats`, `..._gather_stats_with_counts`,
  `..._elemt`, `..._backward_reduce`, `..._backward_elemt`): each view's statistics from
  its slice, bf16 read as bf16 (no float32 copy of the activations), the output written in
  place (no concatenation), the running statistics updated in the kernel, one per view.
* Distributed (a group of more than one process, `sync`): the same function, each view's
  statistics over the GLOBAL batch (the view's rows on every process), as SyncBN's are. All
  views of a layer travel in ONE all-gather of (mean, 1/std, count) per view, and the
  backward is ONE all-reduce of the per-view gradient sums. On a CPU (gloo) and under
  torch.compile the kernels are `PYTHON_KERNELS`, their definitions in float32 or better.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.autograd.function import FunctionCtx

from fastssl.collectives import all_gather_stacked


def combine_view_stats(count: torch.Tensor, mean: torch.Tensor, var: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Chan et al.'s pooled mean and (biased) variance over the first dimension (processes).

    count: P (x V), mean and var: P (x V) x C (biased, per process) -> total, mean, var without the P.
    """
    total = count.sum(0)
    w = (count / total).unsqueeze(-1)
    pooled_mean = (w * mean).sum(0)
    pooled_var = (w * (var + (mean - pooled_mean) ** 2)).sum(0)
    return total, pooled_mean, pooled_var


def _per_channel(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A C-vector shaped to broadcast over `like` (N x C x ...)."""
    return t.view(1, -1, *([1] * (like.dim() - 2)))


def _reduce_dims(x: torch.Tensor) -> tuple[int, ...]:
    return (0, *range(2, x.dim()))


def _compute(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _stats(x: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    var, mean = torch.var_mean(_compute(x), dim=_reduce_dims(x), correction=0)
    return mean, torch.rsqrt(var + eps)


def _gather_stats_with_counts(x: Tensor, mean: Tensor, invstd: Tensor, running_mean: Tensor | None,
                              running_var: Tensor | None, momentum: float, eps: float,
                              counts: Tensor) -> tuple[Tensor, Tensor]:
    var = invstd.reciprocal().square() - eps  # the exchanged form is SyncBN's: 1 / sqrt(var + eps)
    total, mean, var = combine_view_stats(counts, mean, var)
    if running_mean is not None:
        with torch.no_grad():
            running_mean.lerp_(mean.to(running_mean.dtype), momentum)
            running_var.lerp_((var * total / (total - 1).clamp(min=1)).to(running_var.dtype), momentum)
    return mean, torch.rsqrt(var + eps)


def _elemt(x: Tensor, weight: Tensor | None, bias: Tensor | None, mean: Tensor, invstd: Tensor, eps: float, *,
           out: Tensor) -> Tensor:
    y = (_compute(x) - _per_channel(mean, x)) * _per_channel(invstd, x)
    if weight is not None:
        y = y * _per_channel(weight, x) + _per_channel(bias, x)
    return out.copy_(y)


def _backward_reduce(grad: Tensor, x: Tensor, mean: Tensor, invstd: Tensor, weight: Tensor | None, input_g: bool,
                     weight_g: bool, bias_g: bool) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
    dy, xmu = _compute(grad), _compute(x) - _per_channel(mean, x)
    sum_dy, sum_dy_xmu = dy.sum(_reduce_dims(x)), (dy * xmu).sum(_reduce_dims(x))
    grad_weight = (sum_dy_xmu * invstd).to(weight.dtype) if weight_g else None
    grad_bias = sum_dy.to(weight.dtype) if bias_g else None
    return sum_dy, sum_dy_xmu, grad_weight, grad_bias


def _backward_elemt(grad: Tensor, x: Tensor, mean: Tensor, invstd: Tensor, weight: Tensor | None, sum_dy: Tensor,
                    sum_dy_xmu: Tensor, count: Tensor) -> Tensor:
    n = count.sum().to(sum_dy.dtype)
    xmu = _compute(x) - _per_channel(mean, x)
    scale = invstd if weight is None else invstd * weight
    dx = (_compute(grad) - _per_channel(sum_dy / n, x)
          - xmu * _per_channel(invstd.square() * sum_dy_xmu / n, x)) * _per_channel(scale, x)
    return dx.to(grad.dtype)


# SyncBatchNorm's kernels (CUDA only, no meta kernels: not traceable by torch.compile), and their
# definitions in PyTorch operations (any device, traceable). The same signatures.
CUDA_KERNELS = SimpleNamespace(stats=torch.batch_norm_stats,
                               gather_stats_with_counts=torch.batch_norm_gather_stats_with_counts,
                               elemt=torch.batch_norm_elemt, backward_reduce=torch.batch_norm_backward_reduce,
                               backward_elemt=torch.batch_norm_backward_elemt)
PYTHON_KERNELS = SimpleNamespace(stats=_stats, gather_stats_with_counts=_gather_stats_with_counts, elemt=_elemt,
                                 backward_reduce=_backward_reduce, backward_elemt=_backward_elemt)


class _PerViewNorm(torch.autograd.Function):
    """`nn.SyncBatchNorm`'s function with one set of statistics per view (consecutive blocks of
    `rows` rows); `group` None: this process's rows only, no collective."""

    @staticmethod
    def forward(ctx: FunctionCtx, x: Tensor, weight: Tensor | None, bias: Tensor | None,
                running_mean: Tensor | None, running_var: Tensor | None, momenta: list[float], eps: float,
                rows: int, group: dist.ProcessGroup | None, kernels: SimpleNamespace) -> Tensor:
        fmt = torch.channels_last if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) \
            else torch.contiguous_format
        x = x.contiguous(memory_format=fmt)  # each view's block is then contiguous too
        views = x.split(rows)
        c, num_views = x.shape[1], len(views)
        count = float(x[:rows].numel() // c)
        # (mean, 1 / std) per view, float32 or better; stacked whole, not per view: fewer kernel launches
        local_means, local_invstds = (torch.stack(t) for t in zip(*(kernels.stats(v, eps) for v in views)))
        local_counts = local_means.new_full((num_views, 1), count)
        if group is None:  # per view: P x C, P x C, P with P = 1
            per_view = local_means.unsqueeze(1), local_invstds.unsqueeze(1), local_counts
        else:  # one collective for all views; then each view's P x (2C + 1) block contiguous, as SyncBN's
            every = all_gather_stacked(torch.cat([local_means, local_invstds, local_counts], 1), group)
            every = every.transpose(0, 1).contiguous()
            per_view = every[..., :c], every[..., c:2 * c], every[..., 2 * c]
        out = torch.empty_like(x)
        means, invstds = [], []
        for v, (view, y) in enumerate(zip(views, out.split(rows))):
            mean, invstd = kernels.gather_stats_with_counts(view, per_view[0][v], per_view[1][v], running_mean,
                                                            running_var, momenta[v], eps, per_view[2][v])
            kernels.elemt(view, weight, bias, mean, invstd, eps, out=y)
            means.append(mean)
            invstds.append(invstd)
        counts = per_view[2][0].to(torch.int32)  # per process; the same for every view
        ctx.save_for_backward(x, weight, torch.stack(means), torch.stack(invstds), counts)
        ctx.rows, ctx.group, ctx.kernels, ctx.fmt = rows, group, kernels, fmt
        return out

    @staticmethod
    def backward(ctx: FunctionCtx, grad: Tensor) -> tuple[Tensor | None, ...]:
        x, weight, means, invstds, counts = ctx.saved_tensors
        input_g, weight_g, bias_g = ctx.needs_input_grad[:3]
        k, rows, c = ctx.kernels, ctx.rows, x.shape[1]
        grads = grad.contiguous(memory_format=ctx.fmt).split(rows)
        views = x.split(rows)
        reduced = [k.backward_reduce(g, v, means[i], invstds[i], weight, input_g, weight_g, bias_g)
                   for i, (g, v) in enumerate(zip(grads, views))]
        grad_weight = torch.stack([r[2] for r in reduced]).sum(0) if weight_g else None
        grad_bias = torch.stack([r[3] for r in reduced]).sum(0) if bias_g else None
        grad_x = None
        if input_g:
            sum_dy, sum_dy_xmu = [r[0] for r in reduced], [r[1] for r in reduced]
            if ctx.group is not None:  # V x 2C: one collective
                sums = torch.cat([torch.stack(sum_dy), torch.stack(sum_dy_xmu)], 1)
                dist.all_reduce(sums, group=ctx.group)
                sum_dy, sum_dy_xmu = sums[:, :c], sums[:, c:]
            grad_x = torch.cat([k.backward_elemt(g, v, means[i], invstds[i], weight, sum_dy[i], sum_dy_xmu[i], counts)
                                for i, (g, v) in enumerate(zip(grads, views))])
        return grad_x, grad_weight, grad_bias, None, None, None, None, None, None, None


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
        group, compiling = self._group(), torch.compiler.is_compiling()
        if group is None and num_views == 1:
            return super().forward(x)  # plain BatchNorm
        if group is None and (x.device.type != "cuda" or compiling):
            # each view through the native kernel: what per-view forwards compute, bit for bit
            return torch.cat([super(_PerViewBatchNorm, self).forward(view) for view in x.split(rows)])
        track = self.training and self.track_running_stats
        kernels = CUDA_KERNELS if x.device.type == "cuda" and not compiling and self._cuda_dtypes_fit(x, track) \
            else PYTHON_KERNELS
        momenta = self._momenta(num_views) if track else [0.0] * num_views
        return _PerViewNorm.apply(x, self.weight, self.bias, self.running_mean if track else None,
                                  self.running_var if track else None, momenta, self.eps, rows, group, kernels)

    def _cuda_dtypes_fit(self, x: torch.Tensor, track: bool) -> bool:
        """Whether SyncBatchNorm's CUDA kernels take this module as it is: they read the counts in the
        running statistics' dtype (counts above 256 are not bf16 numbers) and the weight in the statistics'
        dtype; ours are float32 (float64) beside any activation dtype, as under autocast."""
        stats = torch.promote_types(x.dtype, torch.float32)
        return track and self.running_mean.dtype == stats and (self.weight is None or self.weight.dtype == stats)

    def _momenta(self, num_views: int) -> list[float]:
        """Each view's running-statistics momentum, counting one tracked batch per view (as per-view forwards)."""
        if self.momentum is not None:
            self.num_batches_tracked.add_(num_views)
            return [self.momentum] * num_views
        seen = int(self.num_batches_tracked)  # cumulative average (momentum None): a host sync, as nn.BatchNorm's
        self.num_batches_tracked.add_(num_views)
        return [1.0 / (seen + v + 1) for v in range(num_views)]

    def _group(self) -> dist.ProcessGroup | None:
        if not (self.sync and dist.is_available() and dist.is_initialized()):
            return None
        return dist.group.WORLD if dist.get_world_size() > 1 else None


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

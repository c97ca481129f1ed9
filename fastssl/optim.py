"""Optimisers: SGD and LARS, with BN and bias parameters excluded.

BN and bias parameters (every parameter with fewer than 2 dimensions) get neither
weight decay nor LARS adaptation, as in the authors' code: decaying a BN scale towards
zero or rescaling a bias by its own tiny norm only hurts. MoCo (and the ML-CPC authors'
MoCo code) decays every parameter: `decay_bn_bias=True` (`--optim.decay_bn_bias`) gives
BN and bias the same weight decay (still no LARS adaptation).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn


def is_excluded(name: str, param: nn.Parameter) -> bool:
    """True for BN and bias parameters: no weight decay, no LARS trust ratio."""
    return param.ndim <= 1 or name.endswith(".bias")


def param_groups(named_params: Iterable[tuple[str, nn.Parameter]], weight_decay: float,
                 decay_bn_bias: bool = False) -> list[dict]:
    """Two groups: regular weights (decayed, LARS-adapted) and BN/bias (neither; decayed
    too with `decay_bn_bias`)."""
    regular, excluded = [], []
    for name, p in named_params:
        if p.requires_grad:
            (excluded if is_excluded(name, p) else regular).append(p)
    return [
        {"params": regular, "weight_decay": weight_decay, "lars_exclude": False},
        {"params": excluded, "weight_decay": weight_decay if decay_bn_bias else 0.0, "lars_exclude": True},
    ]


class LARS(torch.optim.Optimizer):
    """Layer-wise Adaptive Rate Scaling (You, Gitman & Ginsburg 2017, Algorithm 1), SGD-momentum form.

    For each parameter w, with gradient g, of a group that is not `lars_exclude`:

        d     = g + wd * w                                  (g when wd = 0)
        trust = eta * ||w|| / ||d||   if ||w|| > 0 and ||d|| > 0, else 1
        buf   = momentum * buf + trust * d                  (buf = trust * d on the first step)
        w     = w - lr * buf

    Excluded groups (`lars_exclude=True`: BN and bias) are plain SGD with momentum (trust = 1).
    Parameters whose grad is None are skipped. Sparse gradients are refused (foreach ops take dense
    tensors; nothing in fastssl makes sparse ones).

    Why multi-tensor (`torch._foreach_*`) ops: a per-parameter loop dispatches ~7 small ops per
    parameter (1,133 aten ops per step for ResNet-50's 161 parameters, about one kernel launch
    each on a GPU), so the step is bound by host launch time, not by memory bandwidth. Here every
    op takes all the parameters of one group of one (device, dtype) at once: 22 ops per step for
    ResNet-50, whatever the number of parameters (tools/bench_optim.py counts them). The trust
    ratios stay on the device (`torch.where`, no `.item()`): nothing in a step waits for the GPU.
    On a CPU a foreach op loops over its tensors inside and d is one model-sized temporary, not
    one parameter's: a full-size ResNet-50 step there is ~20% slower than the loop's (allocation
    and cache locality), a price paid for the GPU step, where the training runs.

    The momentum buffer is `state[p]["momentum_buffer"]`, as before (checkpoints load unchanged).
    A missing buffer starts at zero, so the first step's buffer is momentum * 0 + trust * d =
    trust * d. buf += trust * d is one addcmul (no temporary trust * d), rounded once where a
    multiply then an add would round twice (float32: an ulp apart; float64 equal to 1e-12,
    tests/test_optim.py).
    """

    def __init__(self, params: Iterable[torch.nn.Parameter] | Iterable[dict[str, Any]], lr: float,
                 momentum: float = 0.9, weight_decay: float = 0.0, eta: float = 0.001):
        if lr < 0 or momentum < 0 or weight_decay < 0 or eta <= 0:
            raise ValueError(f"LARS: invalid lr={lr}, momentum={momentum}, weight_decay={weight_decay}, eta={eta}")
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, eta=eta, lars_exclude=False)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            self._step_group(group)
        return loss

    def _step_group(self, group: dict) -> None:
        """One group's update (the class docstring's equations), in a fixed number of ops per (device, dtype)."""
        for params, grads, bufs in self._buckets(group):
            _lars_update(params, grads, bufs, lr=group["lr"], momentum=group["momentum"],
                         weight_decay=group["weight_decay"], eta=None if group["lars_exclude"] else group["eta"])

    def _buckets(self, group: dict) -> Iterable[tuple[list[Tensor], list[Tensor], list[Tensor]]]:
        """(params, grads, momentum buffers) of the group's parameters that have a gradient, one
        triple per (device, dtype): a foreach op takes tensors of one device and dtype. Creates the
        missing buffers (zeros, see the class docstring)."""
        buckets: dict[tuple[torch.device, torch.dtype], tuple[list[Tensor], list[Tensor], list[Tensor]]] = {}
        for p in group["params"]:
            if p.grad is None:
                continue
            if p.grad.layout != torch.strided:
                raise RuntimeError(f"LARS does not support sparse gradients (got layout {p.grad.layout})")
            state = self.state[p]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            params, grads, bufs = buckets.setdefault((p.device, p.dtype), ([], [], []))
            params.append(p)
            grads.append(p.grad)
            bufs.append(state["momentum_buffer"])
        return buckets.values()


def _trust_ratios(params: list[Tensor], d: list[Tensor], eta: float) -> list[Tensor]:
    """eta * ||w|| / ||d|| per parameter, 1 where either norm is 0 (a zero-initialised weight or
    a zero update must not be scaled to 0 or inf), as 0-dim device tensors: no host sync."""
    w_norm, d_norm = torch.stack(torch._foreach_norm(params)), torch.stack(torch._foreach_norm(d))
    trust = torch.where((w_norm > 0) & (d_norm > 0), eta * w_norm / d_norm.clamp_min(1e-30), 1.0)
    return list(trust.unbind())


def _lars_update(params: list[Tensor], grads: list[Tensor], bufs: list[Tensor], *, lr: float, momentum: float,
                 weight_decay: float, eta: float | None) -> None:
    """One LARS step (the class docstring's equations) of tensors of one device and dtype, in a
    fixed number of foreach ops; `eta=None` is an excluded group (trust = 1)."""
    d = torch._foreach_add(grads, params, alpha=weight_decay) if weight_decay else grads  # d is read only
    torch._foreach_mul_(bufs, momentum)
    if eta is None:
        torch._foreach_add_(bufs, d)
    else:  # buf += trust * d: with a 0-dim tensor1, recent PyTorch runs addcmul_ as one multi-tensor CUDA kernel
        torch._foreach_addcmul_(bufs, _trust_ratios(params, d, eta), d)
    torch._foreach_add_(params, bufs, alpha=-lr)


def build_optimizer(name: str, named_params: Iterable[tuple[str, nn.Parameter]], *, lr: float, momentum: float,
                    weight_decay: float, lars_eta: float, decay_bn_bias: bool = False) -> torch.optim.Optimizer:
    """SGD (Table 8 setting) or LARS (the paper's batch-4096 setting) over the two groups."""
    groups = param_groups(named_params, weight_decay, decay_bn_bias)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum)
    if name == "lars":
        return LARS(groups, lr=lr, momentum=momentum, eta=lars_eta)
    raise ValueError(f"unknown optimiser {name!r}; choose sgd or lars")

"""Optimisers: SGD and LARS, with BN and bias parameters excluded.

BN and bias parameters (every parameter with fewer than 2 dimensions) get neither
weight decay nor LARS adaptation, as in the authors' code: decaying a BN scale towards
zero or rescaling a bias by its own tiny norm only hurts. MoCo (and the ML-CPC authors'
MoCo code) decays every parameter: `decay_bn_bias=True` (`--optim.decay_bn_bias`) gives
BN and bias the same weight decay (still no LARS adaptation).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn


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
    """Layer-wise Adaptive Rate Scaling (You et al. 2017), SGD-momentum form.

    For each non-excluded parameter: d = g + wd * w; d *= eta * ||w|| / ||d|| (when both
    norms are positive); buf = momentum * buf + d; w -= lr * buf. Excluded groups
    (`lars_exclude=True`) are plain SGD with momentum.
    """

    def __init__(self, params, lr: float, momentum: float = 0.9, weight_decay: float = 0.0, eta: float = 0.001):
        if lr < 0 or momentum < 0 or weight_decay < 0 or eta <= 0:
            raise ValueError(f"LARS: invalid lr={lr}, momentum={momentum}, weight_decay={weight_decay}, eta={eta}")
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, eta=eta, lars_exclude=False)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                d = p.grad
                if group["weight_decay"]:
                    d = d.add(p, alpha=group["weight_decay"])
                if not group["lars_exclude"]:
                    w_norm, d_norm = torch.linalg.vector_norm(p), torch.linalg.vector_norm(d)
                    ok = (w_norm > 0) & (d_norm > 0)
                    trust = torch.where(ok, group["eta"] * w_norm / d_norm.clamp_min(1e-30), torch.ones_like(w_norm))
                    d = d * trust
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = d.detach().clone()
                else:
                    state["momentum_buffer"].mul_(group["momentum"]).add_(d)
                p.add_(state["momentum_buffer"], alpha=-group["lr"])
        return loss


def build_optimizer(name: str, named_params: Iterable[tuple[str, nn.Parameter]], *, lr: float, momentum: float,
                    weight_decay: float, lars_eta: float, decay_bn_bias: bool = False) -> torch.optim.Optimizer:
    """SGD (Table 8 setting) or LARS (the paper's batch-4096 setting) over the two groups."""
    groups = param_groups(named_params, weight_decay, decay_bn_bias)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum)
    if name == "lars":
        return LARS(groups, lr=lr, momentum=momentum, eta=lars_eta)
    raise ValueError(f"unknown optimiser {name!r}; choose sgd or lars")

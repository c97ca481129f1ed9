"""MIRA pseudo-label assignment (Lee et al., NeurIPS 2022, "Unsupervised Representation
Learning via Mutual Information Regularized Assignment"), Sec. 3.1-3.2, Eq. 1-7.

This is the exact REFERENCE implementation, and the only one in Python: `mira_fixed_point`
is the log-space iteration, written once; `mira_assign` runs it with the column sums
all-reduced at every step, `fastssl.ops.mira_fused.solve_views` on rows already gathered,
and the fused CUDA kernel is tested against it. It favours clarity and exactness over speed.

Problem (Eq. 4), per global mini-batch of B samples and K clusters, p_i = softmax(z_i / tau):

    W* = argmin_{W in simplex^B}  -1/B sum_ij w_ij log p_ij
                                  + (1-beta)/B sum_ij w_ij log w_ij
                                  + beta sum_j wbar_j log wbar_j,     wbar = colmean(W)

which is the KL to the model probabilities minus beta times the mini-batch mutual information
between pseudo-labels and samples (Eq. 1-3). It is strictly convex for 0 <= beta < 1
(Proposition 1) and its optimum satisfies (Eq. 5)

    w*_ij  proportional to  wbar*_j^(-beta/(1-beta)) * p_ij^(1/(1-beta)),

with the marginal wbar* the fixed point of Eq. 6, found by the iteration of Eq. 7.

The authors' code (NOTES.md) runs Eq. 7 in probability space with
P = softmax(z / tau / (1-beta)) (= rownorm(p^(1/(1-beta)))):

    u <- (colmean P)^(1-beta)
    repeat num_iters:  T = P / rowsum(P * u^(-beta/(1-beta)));   u <- (colmean T)^(1-beta)
    W = rownorm(P * u^(-beta/(1-beta)))

In probability space a cluster that no sample likes underflows to u_j = 0 and u_j^(-a) = inf
(NaN targets). Here every quantity is carried as a logarithm (log_softmax / logsumexp), which is
the same iteration, step for step, but finite for logits of +-1e4, empty clusters and bf16/fp16
input.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Optional, Union

import torch
from torch import Tensor

from ._common import check_iters, check_logits, check_positive, compute_dtype
from fastssl.collectives import global_count, global_logsumexp_cols

__all__ = ["mira_assign", "mira_fixed_point"]


def _check_beta(beta: Any) -> float:
    """0 <= beta < 1: Proposition 1 needs beta < 1 for strict convexity (and 1/(1-beta))."""
    try:
        b = float(beta)
    except (TypeError, ValueError):
        raise ValueError(f"beta must be a number in [0, 1), got {beta!r}") from None
    if not (0.0 <= b < 1.0):
        raise ValueError(f"beta must be in [0, 1), got {beta!r}")
    return b


def _add_log_prior(log_p: Tensor, log_u: Tensor, a: float) -> Tensor:
    """``log(P * u^(-a))`` elementwise, i.e. ``log_p - a * log_u`` broadcast over rows.

    Where P_ij = 0 exactly (a logit of -inf), the product is 0 whatever u_j is; without the
    mask a column that is -inf everywhere would give -inf - a*(-inf) = NaN.
    """
    out = log_p - a * log_u
    return torch.where(log_p == float("-inf"), log_p, out)


def local_col_logsumexp(x: Tensor) -> Tensor:
    """Per-column ``log sum_i exp(x_ij)`` over the rows (dim -2) of this tensor only, kept broadcastable."""
    return torch.logsumexp(x, dim=-2, keepdim=True)


def mira_fixed_point(logits: Tensor, tau: float, beta: float, num_iters: int,
                     col_logsumexp: Callable[[Tensor], Tensor] = local_col_logsumexp,
                     log_n: Union[Tensor, float, None] = None) -> Tensor:
    """THE MIRA solve (Eq. 5-7) in log space: ``... x B x K`` logits -> targets of the same shape.

    Every MIRA path runs this one function: `mira_assign` (the column sums all-reduced at
    every step), `solve_views` (the rows already gathered: local sums, batched over views),
    and through `solve_views` the reference the CUDA kernel is held to.

    Args:
        logits: rows on dim -2, clusters on dim -1 (leading dims, e.g. views, are solved apart).
        col_logsumexp: ``x -> log sum_i exp(x_ij)`` over ALL rows of the batch, broadcastable
            against ``x``; the default sums the rows given here, a distributed caller passes
            its collective (the only thing that makes the batch global).
        log_n: log of the global row count B; default ``log(logits.shape[-2])``.

    Arguments are not checked here (the public ops do); float32 (float64 for float64 input).
    """
    x = logits.to(compute_dtype(logits.dtype))
    if log_n is None:
        log_n = math.log(x.shape[-2])
    a = beta / (1.0 - beta)  # exponent of the marginal in Eq. 5-7
    # Sec. 3.1: p = softmax(z / tau); Eq. 5-7 only use p^(1/(1-beta)), and row-normalising it
    # gives the authors' P = softmax(z / tau / (1 - beta)).
    log_p = torch.log_softmax(x / tau / (1.0 - beta), dim=-1)
    # Initial guess (authors' code): u^(0) = (colmean P)^(1-beta).
    log_u = (1.0 - beta) * (col_logsumexp(log_p) - log_n)
    for _ in range(num_iters):
        # Eq. 7: T_ij = P_ij / sum_k P_ik u_k^(-a) (the inner fraction), u_j = (1/B sum_i T_ij)^(1-beta).
        log_row = torch.logsumexp(_add_log_prior(log_p, log_u, a), dim=-1, keepdim=True)
        log_u = (1.0 - beta) * (col_logsumexp(log_p - log_row) - log_n)
    # Eq. 5 with wbar* ~ u^(n): w_ij proportional to u_j^(-beta/(1-beta)) p_ij^(1/(1-beta)).
    return torch.softmax(_add_log_prior(log_p, log_u, a), dim=-1)


@torch.no_grad()
def mira_assign(logits: Tensor, tau: float = 0.225, beta: float = 2 / 3, num_iters: int = 30,
                group: Optional[Any] = None) -> Tensor:
    """MIRA pseudo-labels (Eq. 5) for teacher ``logits`` (B x K), via ``num_iters`` steps of Eq. 7.

    Args:
        logits: B x K teacher logits of THIS rank's samples (any float dtype; each row needs at
            least one finite entry). A logit of -inf means "probability exactly 0".
        tau: teacher temperature tau_t (p = softmax(logits / tau)); > 0.
        beta: weight of the mutual-information term, 0 <= beta < 1 (beta = 0: targets = p).
        num_iters: fixed-point steps of Eq. 7 (0 = the authors' initial guess only); >= 0.
        group: process group for the global marginal; None = default group if initialised.

    Returns:
        B x K targets, rows summing to 1, float32 (float64 for float64 input), no gradient
        (pseudo-labels are constants for the swapped-prediction loss, Eq. 8). In a distributed
        run the cluster marginal is over the GLOBAL batch (ranks may hold different numbers
        of rows) and each rank gets back the rows of its own samples. Every rank must call
        this with the same K, tau, beta and num_iters (it issues 1 + 1 + num_iters collectives:
        the row count, then one all-reduce of the column sums per step, `mira_fixed_point`).
    """
    x = check_logits(logits)
    tau = check_positive("tau", tau)
    beta = _check_beta(beta)
    num_iters = check_iters("num_iters", num_iters, 0)
    log_n = torch.log(global_count(x.shape[0], x.device, compute_dtype(x.dtype), group))
    return mira_fixed_point(x, tau, beta, num_iters, lambda t: global_logsumexp_cols(t, group), log_n)


def pseudo_label_mi(targets: Tensor) -> Tensor:
    """The mini-batch mutual information between pseudo-labels and samples, Eq. 2, in nats:

        I(Y_W; B) = H(wbar) - 1/B sum_i H(w_i),      wbar = colmean(W),

    for `targets` W (B x K, rows on the simplex), with 0 log 0 = 0. It is the quantity MIRA's
    assignment maximises (Eq. 1); 0 when every row is the same (the labels tell nothing of
    the sample: what a collapsed teacher gives), at most log(min(B, K)), which one-hot
    labels spread evenly over min(B, K) clusters reach. A 0-dim float32 tensor (no sync)."""
    w = targets.float()
    wbar = w.mean(0)
    return torch.special.xlogy(w, w).sum(1).mean() - torch.special.xlogy(wbar, wbar).sum()

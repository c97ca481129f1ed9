"""alpha-CPC and alpha-ML-CPC lower bounds on mutual information (Song & Ermon, NeurIPS 2020).

Inputs are LOG-critic scores, log g(x, y): `pos` holds the n positive pairs (x_i, y_i),
`neg` the n x (m - 1) negative pairs, row i pairing x_i with m - 1 samples of p(y). Every
sum of critic values is a logsumexp of scores, so any finite scores (and -inf, a critic
value of exactly 0) are safe; the arithmetic is float32 or better whatever the input dtype.

Re-weighting: positives are multiplied by alpha and negatives by (m - alpha) / (m - 1),
which keeps the expected denominator unchanged when g is constant, and lifts the
estimator's ceiling from log m to log(m / alpha).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["BOUNDS", "alpha_min", "cpc_bound", "ml_cpc_bound"]


def alpha_min(n: int, m: int) -> float:
    """alpha_{m,n} = m / (n (m - 1) + 1): the smallest alpha for which alpha-ML-CPC is a lower
    bound on MI (Theorem 2); its ceiling log(m / alpha) is then log(n (m - 1) + 1)."""
    if n < 1 or m < 1:
        raise ValueError(f"n and m must be positive, got n={n}, m={m}")
    return m / (n * (m - 1) + 1)


def _prepare(pos: Tensor, neg: Tensor, alpha: float) -> tuple[Tensor, Tensor, int, int, float]:
    if pos.dim() != 1 or neg.dim() != 2 or neg.shape[0] != pos.shape[0]:
        raise ValueError(f"pos must be (n,) and neg (n, m-1); got {tuple(pos.shape)} and {tuple(neg.shape)}")
    n, m = pos.shape[0], neg.shape[1] + 1
    if n < 1:
        raise ValueError("need at least one positive pair")
    alpha = float(alpha)
    if not (alpha > 0 and (m == 1 or alpha <= m)):
        raise ValueError(f"alpha must lie in (0, m] = (0, {m}], got {alpha}")
    dtype = torch.promote_types(pos.dtype, torch.float32)
    return pos.to(dtype), neg.to(dtype), n, m, alpha


def _log_weights(m: int, alpha: float) -> tuple[float, float]:
    """(log alpha, log((m - alpha) / (m - 1))): -inf for the negatives when alpha = m."""
    log_neg = math.log((m - alpha) / (m - 1)) if m > 1 and alpha < m else -math.inf
    return math.log(alpha), log_neg


def cpc_bound(pos: Tensor, neg: Tensor, alpha: float = 1.0) -> Tensor:
    """alpha-CPC, Eq. 4 (Eq. 2 at alpha = 1), in nats:

        1/n sum_i log [ m g(x_i, y_i) / (alpha g(x_i, y_i) + (m - alpha)/(m - 1) sum_j g(x_i, y_ij)) ]

    Each row is normalised on its own. At alpha = 1 it is at most log m; for alpha < 1
    it is NOT guaranteed to be a lower bound on MI (Example 1).
    """
    pos, neg, n, m, alpha = _prepare(pos, neg, alpha)
    log_a, log_w = _log_weights(m, alpha)
    denominators = torch.logsumexp(torch.cat([pos.unsqueeze(1) + log_a, neg + log_w], dim=1), dim=1)
    return (math.log(m) + pos - denominators).mean()


def ml_cpc_bound(pos: Tensor, neg: Tensor, alpha: float = 1.0) -> Tensor:
    """alpha-ML-CPC, Eq. 6 (Eq. 5 at alpha = 1), in nats:

        1/n sum_i log [ n m g(x_i, y_i) / (alpha sum_j g(x_j, y_j) + (m - alpha)/(m - 1) sum_jk g(x_j, y_jk)) ]

    ONE denominator over all n m pairs (the multi-label classification). A lower bound on
    MI for alpha >= alpha_min(n, m) (Theorem 2), with ceiling log(n m / (alpha n)) = log(m / alpha).
    """
    pos, neg, n, m, alpha = _prepare(pos, neg, alpha)
    log_a, log_w = _log_weights(m, alpha)
    denominator = torch.logsumexp(torch.cat([pos + log_a, (neg + log_w).reshape(-1)]), dim=0)
    return pos.mean() + math.log(n * m) - denominator


# The bounds by the names the configs use (critic.bound, the distillation's loss.bound):
# J_alpha (Eq. 6) and L_alpha (Eq. 4; InfoNCE, the authors' `--loss cpc`, at alpha 1).
BOUNDS = {"mlcpc": ml_cpc_bound, "cpc": cpc_bound}

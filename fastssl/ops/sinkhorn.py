"""SwAV's Sinkhorn-Knopp equipartition assignment (Caron et al., 2020), the baseline that MIRA
replaces. MIRA's footnote 4: adding the equipartition constraint to Eq. 4 gives SwAV's
optimal-transport problem.

SwAV's code (probability space, K x B):

    Q = exp(scores / eps).T;  Q /= sum(Q)
    repeat num_iters:  Q /= rowsum(Q); Q /= K      # every cluster gets mass 1/K
                       Q /= colsum(Q); Q /= B      # every sample gets mass 1/B (global B)
    return (Q * B).T                               # B x K, rows sum to 1

exp(scores / eps) overflows for |scores| / eps > 88 in float32 (SwAV relies on cosine scores
and eps = 0.05 staying small); here every quantity is a logarithm, so the same iteration is
finite for any finite logits.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch
from torch import Tensor

from ._common import check_iters, check_logits, check_positive, compute_dtype
from fastssl.collectives import global_count, global_logsumexp_cols

__all__ = ["sinkhorn_assign"]


def _subtract_finite(x: Tensor, log_norm: Tensor) -> Tensor:
    """``x - log_norm`` (broadcast), leaving slices whose normaliser is -inf (all-zero mass,
    i.e. all logits -inf) at -inf instead of turning them into NaN."""
    safe = torch.where(torch.isfinite(log_norm), log_norm, torch.zeros_like(log_norm))
    return x - safe


@torch.no_grad()
def sinkhorn_assign(logits: Tensor, eps: float = 0.05, num_iters: int = 3,
                    group: Optional[Any] = None) -> Tensor:
    """SwAV targets for ``logits`` (B x K): ``num_iters`` Sinkhorn-Knopp sweeps towards equal
    cluster sizes over the GLOBAL batch.

    Args:
        logits: B x K scores of THIS rank's samples (any float dtype).
        eps: entropic regularisation (SwAV: 0.05); > 0.
        num_iters: Sinkhorn sweeps (SwAV: 3); >= 1, so that the last operation is the
            per-sample normalisation and rows sum to 1.
        group: process group; None = default group if initialised.

    Returns:
        B x K targets, rows summing to 1, float32 (float64 for float64 input), no gradient.
        Each rank gets the rows of its own samples; cluster masses are normalised over all
        ranks (one collective per sweep plus one for the global batch size).
    """
    x = check_logits(logits)
    eps = check_positive("eps", eps)
    num_iters = check_iters("num_iters", num_iters, 1)

    x = x.to(compute_dtype(x.dtype))
    log_n = torch.log(global_count(x.shape[0], x.device, x.dtype, group))  # B (global)
    log_k = math.log(x.shape[1])

    # log of Q^T, kept B x K (samples x clusters). SwAV's "Q /= sum(Q)" multiplies Q by one
    # global constant, which the first cluster normalisation removes exactly; it is folded
    # into it (one collective fewer, same result).
    log_q = x / eps
    for _ in range(num_iters):
        # Clusters (rows of SwAV's K x B Q, columns here): mass 1/K each, summed over all ranks.
        log_q = _subtract_finite(log_q, global_logsumexp_cols(log_q, group) + log_k)
        # Samples (columns of SwAV's Q, rows here): mass 1/B each; purely local.
        log_q = _subtract_finite(log_q, torch.logsumexp(log_q, dim=1, keepdim=True) + log_n)
    # (Q * B).T: each row sums to 1.
    return torch.exp(log_q + log_n)

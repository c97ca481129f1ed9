"""The math of distillation with ML-CPC, as pure functions (no state, no queue).

- `kd_loss`: Hinton et al. (2015), Sec. 2: soft targets p = softmax(z / T); the student
  minimises KL(p_teacher || p_student) at temperature T, multiplied by T^2 so that its
  gradients keep the same scale as the hard-label loss when T changes (Sec. 2, last
  paragraph). Batch mean, as CRD's `DistillKL` (T = 4 there and here).
- `queue_scores`: the separable critic of CRD / ML-CPC, log g(q, k) = <q, k> / tau between
  L2-normalised embeddings (tau = 0.07, CRD's `nce_t`): the query is one network's embedding
  of an image, the positive key the other network's embedding of the same image, the
  negatives that network's embeddings of earlier batches (the memory queue). As in CRD,
  both directions are scored (student queries against teacher keys, teacher queries against
  student keys: CRD's `s_loss + t_loss`), and keys are constants: each head learns as a query.
- `memory_scores`, `memory_update`: the same critic against CRD's memory (`fastssl.distill.memory`):
  the positive is the query's own image's entry in the other network's memory, the negatives
  entries of images of other classes; after the step the entries move towards the embeddings.
- `mi_bound`: the alpha-ML-CPC bound J_alpha (Song & Ermon 2020, Eq. 6) or alpha-CPC
  L_alpha (Eq. 4) on those scores, with alpha fixed through training (Sec. 5.2). It calls
  `fastssl.losses.ml_cpc_bound` / `cpc_bound`; the distillation loss is its negation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from fastssl.losses import BOUNDS


def kd_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 4.0) -> Tensor:
    """T^2 KL(softmax(z_t / T) || softmax(z_s / T)), averaged over the batch (Hinton et al. 2015, Sec. 2)."""
    if temperature <= 0:
        raise ValueError(f"KD temperature must be positive, got {temperature}")
    log_p_s = F.log_softmax(student_logits / temperature, dim=1)
    log_p_t = F.log_softmax(teacher_logits.detach() / temperature, dim=1)
    kl = (log_p_t.exp() * (log_p_t - log_p_s)).sum(dim=1)  # a zero teacher probability adds 0, as 0 log 0 = 0
    return kl.mean() * temperature ** 2


def queue_scores(queries: Tensor, keys: Tensor, queue: Tensor, temperature: float) -> tuple[Tensor, Tensor]:
    """(positives n, negatives n x Q): <q_i, k_i> / tau and <q_i, queue_j> / tau, all L2-normalised.

    Keys and queue are constants (no gradient), as CRD's memory; float32 or wider, whatever the inputs
    (the critic in `fastssl.critic` scores in float32; this keeps float64 for exact checks).
    """
    dtype = torch.promote_types(queries.dtype, torch.float32)
    q = F.normalize(queries.to(dtype), dim=1)
    k = F.normalize(keys.detach().to(dtype), dim=1)
    pos = (q * k).sum(dim=1) / temperature
    neg = q @ F.normalize(queue.detach().to(dtype), dim=1).t() / temperature
    return pos, neg


def mi_bound(queries: Tensor, keys: Tensor, queue: Tensor, alpha: float, temperature: float,
             bound: str = "mlcpc") -> Tensor:
    """The alpha-ML-CPC (Eq. 6) or alpha-CPC (Eq. 4) estimate, in nats, between one network's
    embeddings (queries) and the other's (keys), with m - 1 = Q queue negatives per row
    (ML-CPC: one denominator over all n m pairs)."""
    if bound not in BOUNDS:
        raise ValueError(f"unknown bound {bound!r}; choose one of {', '.join(BOUNDS)}")
    pos, neg = queue_scores(queries, keys, queue, temperature)
    return BOUNDS[bound](pos, neg, alpha)


def distill_loss(ce: Tensor, kd: Tensor, bound: Tensor, ce_weight: float, kd_weight: float, mi_weight: float
                 ) -> Tensor:
    """CRD's total loss with its contrastive term replaced (ML-CPC Sec. 5.2):
    gamma CE + alpha_KD KD - beta J_alpha (CRD's flags -r, -a, -b); `bound` is the sum of
    both directions' estimates, as CRD sums its two contrastive losses."""
    return ce_weight * ce + kd_weight * kd - mi_weight * bound


def memory_scores(queries: Tensor, rows: Tensor, temperature: float) -> tuple[Tensor, Tensor]:
    """(positives n, negatives n x K): <q_i, r_i0> / tau and <q_i, r_ij> / tau for CRD's memory rows
    (`rows`: n x (K + 1) x d, each image's own entry of the other network's memory first, then its K
    drawn negatives). The queries are L2-normalised, the rows are stored normalised and are constants.
    CRD's scores are exp(<q, r> / tau) / Z with one constant Z: it cancels in J_alpha and L_alpha."""
    dtype = torch.promote_types(queries.dtype, torch.float32)
    q = F.normalize(queries.to(dtype), dim=1)
    scores = torch.bmm(rows.detach().to(dtype), q.unsqueeze(2)).squeeze(2) / temperature
    return scores[:, 0], scores[:, 1:]


def memory_update(entries: Tensor, embeddings: Tensor, momentum: float) -> Tensor:
    """CRD's memory update of the batch's own entries: normalise(m * entry + (1 - m) * embedding),
    m = 0.5 (CRD's nce_m); the embeddings are L2-normalised first, as CRD's Embed outputs."""
    mixed = momentum * entries + (1 - momentum) * F.normalize(embeddings.detach().to(entries.dtype), dim=1)
    return F.normalize(mixed, dim=1)

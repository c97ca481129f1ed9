"""The swapped-prediction loss with multi-crop (MIRA Eq. 8, extended as the authors do)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def cross_entropy(target: torch.Tensor, student_logits: torch.Tensor, tau_student: float) -> torch.Tensor:
    """l(U, Q) = -1/B sum_i sum_j u_ij log q_ij with q = softmax(logits / tau_s) (Eq. 8)."""
    log_q = F.log_softmax(student_logits.float() / tau_student, dim=-1)
    return -(target * log_q).sum(dim=-1).mean()


def swapped_prediction_loss(student_logits: list[torch.Tensor], targets: list[torch.Tensor],
                            tau_student: float) -> torch.Tensor:
    """Multi-crop swapped prediction.

    `targets[t]` is the pseudo-label of global view t (t = 0, 1). It supervises every
    student view except view t itself (the other global view and all the locals); each
    half is the mean cross-entropy over its student views and the halves are averaged.
    With only the 2 global views this is Eq. 8 divided by 2.
    """
    if len(targets) < 1 or len(student_logits) < 2:
        raise ValueError("swapped prediction needs >= 1 target and >= 2 student views")
    halves = []
    for t, target in enumerate(targets):
        terms = [cross_entropy(target, s, tau_student) for v, s in enumerate(student_logits) if v != t]
        halves.append(torch.stack(terms).mean())
    return torch.stack(halves).mean()

"""The swapped-prediction loss with multi-crop (MIRA Eq. 8, extended as the authors do)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def swapped_prediction_loss(student_logits: list[torch.Tensor], targets: list[torch.Tensor],
                            tau_student: float) -> torch.Tensor:
    """Multi-crop swapped prediction.

    `targets[t]` is the pseudo-label of global view t (t = 0, 1). It supervises every
    student view except view t itself (the other global view and all the locals); each
    half is the mean cross-entropy over its student views and the halves are averaged.
    With only the 2 global views this is Eq. 8 divided by 2.

    Each term is Eq. 8's l(U, Q) = -1/B sum_i sum_j u_ij log q_ij with q = softmax(logits / tau_s).
    All terms come from one log-softmax over the stacked student views and one contraction with
    the stacked targets (views of one batch size, as the network makes them): a handful of
    kernels per step, whatever the number of views.
    """
    if len(targets) < 1 or len(student_logits) < 2:
        raise ValueError("swapped prediction needs >= 1 target and >= 2 student views")
    if any(s.shape != targets[0].shape for s in (*student_logits, *targets)):
        raise ValueError(f"swapped prediction needs views of one shape, got "
                         f"{[tuple(s.shape) for s in student_logits]} and targets {[tuple(t.shape) for t in targets]}")
    logits, u = torch.stack(student_logits), torch.stack(targets)  # V x B x K, T x B x K
    dtype = torch.promote_types(torch.promote_types(logits.dtype, u.dtype), torch.float32)
    with torch.autocast(logits.device.type, enabled=False):  # a matrix product: autocast would run it in bf16
        log_q = F.log_softmax(logits.to(dtype) / tau_student, dim=-1)
        ce = -torch.einsum("tbk,vbk->tv", u.to(dtype), log_q) / u.shape[1]  # mean cross-entropy of target t on view v
    others = ~torch.eye(len(targets), len(student_logits), dtype=torch.bool, device=ce.device)  # not its own view
    return ((ce * others).sum(1) / others.sum(1)).mean()

"""The distillation objective as an object: the ML-CPC critic's negatives plus CE and KD.

The negatives are CRD's memory by default (`fastssl.distill.memory`, the ML-CPC authors' critic: each
image's own entry of the other network's memory is its positive, K entries of other classes its
negatives), or, with `--loss.negatives queue`, FIFO queues of the latest embeddings: it reuses
`fastssl.critic.MlCpcCritic` (its `KeyQueue`: a FIFO of L2-normalised keys, refusing a queue not
smaller than the dataset) and its temperature, one queue of teacher embeddings (negatives of the
student's queries) and, as CRD keeps two memories, one of student embeddings (negatives of the
teacher head's queries: without it nothing would teach the teacher's head to tell images apart).
The scores and the bound are the pure functions of `fastssl.distill.losses`. As in
`fastssl.objectives`, the memory or the queues change only after the step was scored
(`finish_step`), so no key is ever its own negative, and `state` (the memories or the queues) is
what the checkpoint keeps.

Unlike the self-supervised `MlCpc` objective, the term is -J_alpha (not -J_alpha / alpha):
alpha is fixed here and CRD's weight beta = 0.8 multiplies the bound itself.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastssl.critic import MlCpcCritic
from fastssl.distill.losses import distill_loss, kd_loss, mi_bound
from fastssl.distill.memory import ContrastMemory
from fastssl.losses import BOUNDS


@dataclass
class DistillTerms:
    loss: Tensor
    ce: Tensor
    kd: Tensor
    mi_nats: Tensor  # the estimate with student queries, teacher keys (0 when the term is off), detached
    mi_t_nats: Tensor  # the other direction: teacher queries, student keys


class DistillObjective:
    """gamma CE + alpha_KD KD(T) - beta [J_alpha(s -> t; teacher queue) + J_alpha(t -> s; student queue)]."""

    def __init__(self, *, ce_weight: float, kd_weight: float, mi_weight: float, kd_temperature: float,
                 alpha: float, bound: str, critic: MlCpcCritic | None = None,
                 student_critic: MlCpcCritic | None = None, memory: ContrastMemory | None = None):
        self.ce_weight, self.kd_weight, self.mi_weight = ce_weight, kd_weight, mi_weight
        self.kd_temperature, self.alpha, self.bound = kd_temperature, alpha, bound
        self.critic, self.student_critic = critic, student_critic  # queues of teacher / student embeddings
        self.memory = memory  # or CRD's memories of both networks' embeddings
        kept = {"teacher_keys": critic, "student_keys": student_critic, "memory": memory}
        # what the checkpoint keeps (the queues or the memories), None: nothing
        self.state: nn.Module | None = (nn.ModuleDict({k: c for k, c in kept.items() if c is not None})
                                        if critic is not None or memory is not None else None)

    @property
    def needs_teacher(self) -> bool:
        return self.kd_weight > 0 or self.mi_weight > 0

    def __call__(self, student_logits: Tensor, labels: Tensor, teacher_logits: Tensor | None,
                 student_emb: Tensor | None, teacher_emb: Tensor | None, indices: Tensor | None = None,
                 step: int = 0) -> DistillTerms:
        """The step's terms; `indices` (the batch's dataset indices) and `step` (which negatives are drawn)
        are the memory's."""
        ce = F.cross_entropy(student_logits, labels)
        zero = ce.new_zeros(())
        kd = kd_loss(student_logits, teacher_logits, self.kd_temperature) if self.kd_weight > 0 else zero
        bound_s = bound_t = zero
        if self.mi_weight > 0 and self.memory is not None:
            (pos_s, neg_s), (pos_t, neg_t) = self.memory.scores(student_emb, teacher_emb,
                                                                self.memory.rows(indices, labels, step))
            bound = BOUNDS[self.bound]
            bound_s, bound_t = bound(pos_s, neg_s, self.alpha), bound(pos_t, neg_t, self.alpha)
        elif self.mi_weight > 0:
            bound_s = mi_bound(student_emb, teacher_emb, self.critic.queue.keys, self.alpha,
                               self.critic.temperature, self.bound)
            if self.student_critic is not None:
                bound_t = mi_bound(teacher_emb, student_emb, self.student_critic.queue.keys, self.alpha,
                                   self.student_critic.temperature, self.bound)
        loss = distill_loss(ce, kd, bound_s + bound_t, self.ce_weight, self.kd_weight, self.mi_weight)
        return DistillTerms(loss, ce.detach(), kd.detach(), bound_s.detach(), bound_t.detach())

    @torch.no_grad()
    def finish_step(self, student_emb: Tensor | None, teacher_emb: Tensor | None,
                    indices: Tensor | None = None) -> None:
        """After the optimiser step: this batch's keys join the queues (oldest out), or its memory entries
        move towards its embeddings."""
        if self.memory is not None and student_emb is not None:
            self.memory.update(indices, student_emb, teacher_emb)
            return
        for critic, keys in ((self.critic, teacher_emb), (self.student_critic, student_emb)):
            if critic is not None and keys is not None:
                critic.queue.push(F.normalize(keys.detach().float(), dim=1))

    def to(self, device: torch.device | str) -> DistillObjective:
        if self.state is not None:
            self.state.to(device)
        return self

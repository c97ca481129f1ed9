"""CRD's contrastive memory (Tian et al. 2020; the ML-CPC authors' distillation critic, `ContrastMemory`).

One entry per training image and per network (student, teacher), stored L2-normalised. A query
of one network is scored against the other network's memory: its image's own entry is the
positive, K entries drawn from images of OTHER classes are the negatives (CRD's "exact"
sampling, with replacement). After the step the batch's entries move half-way to its new
embeddings (momentum 0.5). The entries start uniform in [-1/sqrt(d/3), 1/sqrt(d/3)], as CRD's.

Negatives are drawn from (seed, step), not from a worker's RNG, so a resumed run draws those of an
uninterrupted one; the memory is a buffer, so the checkpoint keeps it.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor, nn

from fastssl.distill.losses import memory_scores, memory_update

# CRD's `nce_m`: how much of an entry survives each update.
MEMORY_MOMENTUM = 0.5


class ClassExclusiveSampler:
    """K image indices per query, uniform over the images of every class but the query's own.

    The images are kept sorted by class: a draw u in [0, N - n_c) is the u-th image outside class c
    (u itself below c's block, u + n_c from it on), so one vectorised draw serves every query."""

    def __init__(self, labels: Tensor):
        labels = labels.long().cpu()
        self.by_class = torch.argsort(labels, stable=True)
        counts = torch.bincount(labels)
        self.start = torch.cumsum(counts, 0) - counts
        self.count = counts
        self.num_images = len(labels)
        if int(counts.max()) == self.num_images:
            raise ValueError("every training image has the same class: there are no other classes to draw "
                             "negatives from")

    def draw(self, labels: Tensor, k: int, generator: torch.Generator) -> Tensor:
        """(len(labels), k) image indices, each of a class other than its row's label."""
        labels = labels.long().cpu()
        outside = (self.num_images - self.count[labels]).unsqueeze(1)
        u = (torch.rand(len(labels), k, generator=generator, dtype=torch.float64) * outside).long()
        u = torch.minimum(u, outside - 1)  # rand < 1 exactly, but float64 * N may round up to N
        start = self.start[labels].unsqueeze(1)
        return self.by_class[torch.where(u < start, u, u + self.count[labels].unsqueeze(1))]


def step_generator(seed: int, step: int) -> torch.Generator:
    """The generator of step `step`'s negatives: a function of (seed, step) only."""
    state = np.random.SeedSequence([seed, step]).generate_state(1, np.uint64)[0]
    return torch.Generator().manual_seed(int(state) & (2**63 - 1))


class ContrastMemory(nn.Module):
    """The two memories and the negatives' sampler; `scores` for both directions, `update` after the step."""

    def __init__(self, labels: Tensor, dim: int, negatives: int, temperature: float, seed: int,
                 momentum: float = MEMORY_MOMENTUM):
        super().__init__()
        self.negatives, self.temperature, self.seed, self.momentum = negatives, temperature, seed, momentum
        self.sampler = ClassExclusiveSampler(labels)
        bound = 1 / math.sqrt(dim / 3)
        init = torch.Generator().manual_seed(seed)
        n = len(labels)
        self.register_buffer("student", (torch.rand(n, dim, generator=init) * 2 - 1) * bound)
        self.register_buffer("teacher", (torch.rand(n, dim, generator=init) * 2 - 1) * bound)

    def rows(self, indices: Tensor, labels: Tensor, step: int) -> Tensor:
        """(n, K + 1) memory rows per query: its own image, then K images of other classes."""
        negatives = self.sampler.draw(labels, self.negatives, step_generator(self.seed, step))
        return torch.cat([indices.long().cpu().unsqueeze(1), negatives], dim=1).to(self.student.device)

    def scores(self, student_emb: Tensor, teacher_emb: Tensor, rows: Tensor
               ) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
        """((pos, neg) of student queries on the teacher memory, (pos, neg) of teacher queries on the student's)."""
        return (memory_scores(student_emb, self.teacher[rows], self.temperature),
                memory_scores(teacher_emb, self.student[rows], self.temperature))

    @torch.no_grad()
    def update(self, indices: Tensor, student_emb: Tensor, teacher_emb: Tensor) -> None:
        """The batch's own entries move towards its embeddings (CRD's update, after the step)."""
        i = indices.long().to(self.student.device)
        self.student[i] = memory_update(self.student[i], student_emb, self.momentum)
        self.teacher[i] = memory_update(self.teacher[i], teacher_emb, self.momentum)

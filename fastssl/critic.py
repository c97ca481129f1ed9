"""The queue-based ML-CPC critic (Song & Ermon 2020, Sec. 5.3; MoCo-v2 style key queue).

Scores are those of a separable critic, log g(q, k) = q . k / T, between L2-normalised
student queries q and teacher keys k. Row i has ONE positive (its own key, the other view
of the same image) and m - 1 = Q negatives (the queue: keys of earlier steps, gathered
from every rank), and the whole n x (1 + Q) matrix enters ONE ML-CPC denominator
(`fastssl.losses.ml_cpc_bound`; with `critic.bound cpc`, alpha-CPC, each row on its own). n is
this process's rows, as in the authors' MoCo code (each GPU flattens its own queries' N x (1 + Q)
logits): the bound, and alpha_min(n, m), are those of the per-process batch, so on 8 processes a
batch of 256 scores 8 bounds of 32 rows each.
The training loss is minus the bound divided by alpha, as the authors' main_moco_cifar.py
(`loss / alpha`). The bound's own gradient keeps about one scale across alpha, so the loss's
grows tenfold from alpha 10 to 1 and again to 0.1: in `mira+mlcpc` the critic's weight against
MIRA's loss moves from 0.1x to 10x `method.mlcpc_weight` over the curriculum.

Direction (`critic.direction`): "one_way" is the authors' MoCo-v2 setting (queries from
the student on view 0, keys from the EMA teacher on view 1, B keys enqueued per step);
"symmetric" is ours (both directions, 2B rows in ONE denominator, 2B keys enqueued).

Shuffle-BN (`critic.shuffle_bn`, MoCo's): the key encoder's BatchNorm must not see the
query's sub-batch, or the batch statistics leak which key is the positive. Across
processes the inputs are gathered, permuted (one permutation, broadcast from rank 0),
each process forwards its slice of the permuted batch with LOCAL BN statistics, and the
outputs are gathered and unpermuted (moco_builder.py's `_batch_shuffle_ddp`). On one
process the permuted batch is cut into `shuffle_bn_splits` groups, each normalised on its
own (the per-view BatchNorm reads each group as a "view"), which is what MoCo's
single-GPU CIFAR demo does with its SplitBatchNorm. Running statistics get one update per
group (MoCo's SplitBatchNorm averages them into one update; each of its GPUs updates its
own with local statistics).

The current step's keys are scored BEFORE they are enqueued, so no key is ever its own
negative; the queue must be shorter than the dataset, or stale copies of an image would
be scored as negatives of itself.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from fastssl.collectives import all_gather_rows, world_size
from fastssl.config import DIRECTIONS
from fastssl.losses import BOUNDS
from fastssl.models.per_view_bn import PerViewBatchNorm1d, PerViewBatchNorm2d


@torch.no_grad()
def shuffled_forward(net: nn.Module, views: list[Tensor], splits: int = 8
                     ) -> tuple[list[Tensor], list[Tensor], Tensor]:
    """`net(views, with_embeddings=True)` with shuffle-BN; (logits, embeddings, permutation).

    One process: rows permuted, BN over `splits` groups of the permuted batch. Several:
    the global batch (rank order) permuted, BN over each process's slice (local statistics,
    whatever `sync` says). Outputs come back in the input order of this process's rows.
    The permutation (over this process's rows, or over the global batch) is returned for tests.
    """
    world, b, device = world_size(), views[0].shape[0], views[0].device
    if world == 1:
        perm, groups = torch.randperm(b, device=device), splits
        if b % groups:
            raise ValueError(f"shuffle-BN: {b} rows do not split into {groups} groups; pick a divisor")
        local = [v[perm] for v in views]
    else:
        perm, groups = torch.randperm(world * b, device=device), 1
        dist.broadcast(perm, src=0)
        rank = dist.get_rank()
        local = [all_gather_rows(v)[perm[rank * b:(rank + 1) * b]] for v in views]
    bns = [m for m in net.modules() if isinstance(m, (PerViewBatchNorm1d, PerViewBatchNorm2d))]
    syncs = [m.sync for m in bns]
    for m in bns:
        m.sync = False  # local statistics: the sub-batches are the point
    try:
        logits, z = net([chunk for v in local for chunk in v.chunk(groups)], with_embeddings=True)
    finally:
        for m, s in zip(bns, syncs):
            m.sync = s
    inverse = torch.argsort(perm)
    outs = []
    for parts in (logits, z):
        per_view = [torch.cat(parts[i * groups:(i + 1) * groups]) for i in range(len(views))]
        if world == 1:
            outs.append([x[inverse] for x in per_view])
        else:
            rank = dist.get_rank()
            outs.append([all_gather_rows(x)[inverse][rank * b:(rank + 1) * b] for x in per_view])
    return outs[0], outs[1], perm


class QueueLongerThanData(ValueError):
    """A key queue at least as long as the dataset (the trainers report it as their config field's error)."""


class KeyQueue(nn.Module):
    """A FIFO ring buffer of Q L2-normalised keys (d-dim), the same on every rank.

    Starts filled with random unit vectors (MoCo's initialisation): a fresh queue's
    negatives are noise, not missing. A buffer, so it is checkpointed with the module.
    """

    def __init__(self, size: int, dim: int, dataset_size: int | None = None, seed: int = 0):
        super().__init__()
        # A positive size is the config's to check (critic.queue_size, loss.queue_size); the
        # dataset's size is only known here.
        if dataset_size is not None and size >= dataset_size:
            raise QueueLongerThanData(f"{size} is not smaller than the dataset ({dataset_size} images): "
                             "the queue would hold stale copies of the current images as their own negatives; "
                             f"use a queue below {dataset_size}")
        g = torch.Generator().manual_seed(seed)
        self.register_buffer("keys", F.normalize(torch.randn(size, dim, generator=g), dim=1))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))

    @property
    def size(self) -> int:
        return self.keys.shape[0]

    @torch.no_grad()
    def push(self, keys: Tensor) -> None:
        """Write the keys of ALL ranks (gathered here) after the newest, wrapping around."""
        keys = all_gather_rows(keys.detach().to(self.keys.dtype))
        if keys.shape[0] > self.size:
            keys = keys[-self.size:]
        slots = (self.ptr + torch.arange(keys.shape[0], device=self.keys.device)) % self.size
        self.keys[slots] = keys
        self.ptr.copy_((self.ptr + keys.shape[0]) % self.size)

    def ordered(self) -> Tensor:
        """Keys from oldest to newest (for tests and inspection)."""
        return torch.roll(self.keys, shifts=-int(self.ptr), dims=0)


@dataclass
class CriticOutput:
    loss: Tensor  # -bound / alpha (to minimise)
    mi_nats: Tensor  # the ML-CPC estimate, detached
    ceiling_nats: float  # log(m / alpha): the most this estimator can report


class MlCpcCritic(nn.Module):
    """Separable critic q . k / T against a key queue, scored with alpha-ML-CPC (or, `bound="cpc"`,
    alpha-CPC: at alpha 1 InfoNCE, the paper's CPC baseline)."""

    def __init__(self, queue_size: int, dim: int, temperature: float = 0.07, dataset_size: int | None = None,
                 direction: str = "symmetric", bound: str = "mlcpc"):
        super().__init__()
        # The temperature and queue size come validated by the config (critic.*, the distillation's
        # loss.*); the direction is checked here because a wrong one would silently score the
        # symmetric pairs.
        if direction not in DIRECTIONS:
            raise ValueError(f"critic direction: unknown {direction!r}; choose one of {', '.join(DIRECTIONS)}")
        if bound not in BOUNDS:
            raise ValueError(f"critic bound: unknown {bound!r}; choose one of {', '.join(BOUNDS)}")
        self.temperature = temperature
        self.direction, self.bound = direction, BOUNDS[bound]
        self.queue = KeyQueue(queue_size, dim, dataset_size)

    def pairs(self, student_z: list[Tensor], teacher_z: list[Tensor]) -> tuple[Tensor, Tensor]:
        """(queries, keys) of the two global views for this critic's direction.

        one_way (the authors'): student view 0 queries teacher view 1. symmetric (ours):
        also student view 1 against teacher view 0, all 2B rows in one denominator.
        """
        if self.direction == "one_way":
            return student_z[0], teacher_z[1]
        return torch.cat([student_z[0], student_z[1]]), torch.cat([teacher_z[1], teacher_z[0]])

    def keys_to_enqueue(self, teacher_z: list[Tensor]) -> Tensor:
        """This step's keys for the queue: B (one_way, view 1's) or 2B (symmetric, both views)."""
        return teacher_z[1] if self.direction == "one_way" else torch.cat(teacher_z)

    def scores(self, queries: Tensor, keys: Tensor) -> tuple[Tensor, Tensor]:
        """(positives n, negatives n x Q) log-critic scores, in float32."""
        q = F.normalize(queries.float(), dim=1)
        k = F.normalize(keys.float(), dim=1).detach()
        pos = (q * k).sum(dim=1) / self.temperature
        # A snapshot (as MoCo): the queue is written in place before the backward pass needs it.
        neg = q @ self.queue.keys.float().clone().t() / self.temperature
        return pos, neg

    def forward(self, queries: Tensor, keys: Tensor, alpha: float) -> CriticOutput:
        """Score against the queue as it is; the caller enqueues the step's keys afterwards
        (`keys_to_enqueue`, `queue.push`), once every micro-batch was scored."""
        pos, neg = self.scores(queries, keys)
        bound = self.bound(pos, neg, alpha)
        m = neg.shape[1] + 1
        return CriticOutput(loss=-bound / alpha, mi_nats=bound.detach(), ceiling_nats=math.log(m / alpha))

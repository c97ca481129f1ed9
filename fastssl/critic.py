"""The queue-based ML-CPC critic (Song & Ermon 2020, Sec. 5.3; MoCo-v2 style key queue).

Scores are those of a separable critic, log g(q, k) = q . k / T, between L2-normalised
student queries q and teacher keys k. Row i has ONE positive (its own key, the other view
of the same image) and m - 1 = Q negatives (the queue: keys of earlier steps, gathered
from every rank), and the whole n x (1 + Q) matrix enters ONE ML-CPC denominator
(`fastssl.losses.ml_cpc_bound`). The training loss is minus the bound divided by alpha,
as the authors do, so that the gradient scale does not grow as alpha shrinks.

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

from fastssl.losses import ml_cpc_bound


def gather_keys(keys: Tensor) -> Tensor:
    """Keys of every rank, rank order (no gradient); the keys themselves without a group."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return keys
    out = [torch.empty_like(keys) for _ in range(dist.get_world_size())]
    dist.all_gather(out, keys.contiguous())
    return torch.cat(out)


class KeyQueue(nn.Module):
    """A FIFO ring buffer of Q L2-normalised keys (d-dim), the same on every rank.

    Starts filled with random unit vectors (MoCo's initialisation): a fresh queue's
    negatives are noise, not missing. A buffer, so it is checkpointed with the module.
    """

    def __init__(self, size: int, dim: int, dataset_size: int | None = None, seed: int = 0):
        super().__init__()
        if size < 1:
            raise ValueError(f"queue size must be positive, got {size}")
        if dataset_size is not None and size >= dataset_size:
            raise ValueError(f"critic.queue_size {size} is not smaller than the dataset ({dataset_size} images): "
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
        keys = gather_keys(keys.detach().to(self.keys.dtype))
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
    """Separable critic q . k / T against a key queue, scored with alpha-ML-CPC."""

    def __init__(self, queue_size: int, dim: int, temperature: float = 0.07, dataset_size: int | None = None):
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"critic temperature must be positive, got {temperature}")
        self.temperature = temperature
        self.queue = KeyQueue(queue_size, dim, dataset_size)
        self.last_mi_nats = torch.zeros(())  # the latest step's estimate (set by the training step)

    def scores(self, queries: Tensor, keys: Tensor) -> tuple[Tensor, Tensor]:
        """(positives n, negatives n x Q) log-critic scores, in float32."""
        q = F.normalize(queries.float(), dim=1)
        k = F.normalize(keys.float(), dim=1).detach()
        pos = (q * k).sum(dim=1) / self.temperature
        # A snapshot (as MoCo): the queue is written in place before the backward pass needs it.
        neg = q @ self.queue.keys.float().clone().t() / self.temperature
        return pos, neg

    def forward(self, queries: Tensor, keys: Tensor, alpha: float, enqueue: bool = True) -> CriticOutput:
        """Score, then (by default) enqueue this step's keys: never their own negatives."""
        pos, neg = self.scores(queries, keys)
        bound = ml_cpc_bound(pos, neg, alpha)
        if enqueue:
            self.queue.push(F.normalize(keys.float(), dim=1))
        m = neg.shape[1] + 1
        return CriticOutput(loss=-bound / alpha, mi_nats=bound.detach(), ceiling_nats=math.log(m / alpha))

"""Epoch order and per-rank shards, as pure functions of (seed, epoch).

Every backend shards the same way: a permutation of all images drawn from
(seed, epoch), dealt round-robin to the ranks, cut to whole batches. Because the order
is a function of (seed, epoch), a resumed run replays exactly the epochs it missed,
and `start_batch` skips the batches it had already trained on without loading them.
`ShardedLoader` is what every training loader shares of this: its length, `set_epoch`
and this rank's batches of the epoch.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import numpy as np
import torch

from pipelines.folder import DataLayoutError
from pipelines.spec import LoaderSpec


def epoch_permutation(num_items: int, seed: int, epoch: int) -> torch.Tensor:
    """The order of the whole dataset in `epoch` (the same on every rank)."""
    g = torch.Generator().manual_seed(int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0]))
    return torch.randperm(num_items, generator=g)


def batches_per_epoch(num_items: int, batch_size: int, world_size: int) -> int:
    """Whole per-rank batches per epoch; the remainder of the epoch is dropped."""
    return (num_items // world_size) // batch_size


def check_batches_per_epoch(num_items: int, batch_size: int, world_size: int) -> int:
    """`batches_per_epoch`, or a user error (DataLayoutError) when the data cannot fill one global batch."""
    n = batches_per_epoch(num_items, batch_size, world_size)
    if n == 0:
        raise DataLayoutError(f"the dataset has {num_items} images, fewer than one global batch of "
                              f"{batch_size * world_size}; lower the batch size (train.global_batch_size; "
                              "--batch-size in the bench tools) or add images")
    return n


def shard_batches(num_items: int, batch_size: int, rank: int, world_size: int, seed: int, epoch: int,
                  start_batch: int = 0) -> list[list[int]]:
    """This rank's batches of dataset indices for `epoch`, from batch `start_batch` on.

    Ranks get disjoint shards of equal length (so DDP never waits on a rank that ran
    out); all shards together cover the epoch except fewer than world_size x batch_size
    images, which differ each epoch.
    """
    n = check_batches_per_epoch(num_items, batch_size, world_size)
    perm = epoch_permutation(num_items, seed, epoch)
    mine = perm[rank : n * batch_size * world_size : world_size]
    return [mine[b * batch_size : (b + 1) * batch_size].tolist() for b in range(start_batch, n)]


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """The augmentation seed of one (epoch, image): independent of workers and ranks."""
    return int(np.random.SeedSequence([seed, epoch, index]).generate_state(1)[0])


@contextlib.contextmanager
def sample_rng(seed: int, epoch: int, index: int) -> Iterator[None]:
    """torch's CPU generator seeded with `sample_seed(seed, epoch, index)` inside, restored on exit.

    The CPU generator only: `torch.manual_seed` would also reseed every CUDA generator, which
    `fork_rng(devices=[])` does not restore (a GPU process loading without workers)."""
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(sample_seed(seed, epoch, index))
        yield


def batch_seed(seed: int, epoch: int, rank: int, batch: int) -> int:
    """The seed of one rank's batch (or of a DALI pipeline starting at that batch), < 2^31.

    For randomness drawn per batch rather than per image: the device-side augmentations
    and DALI's pipelines. A function of (seed, epoch, rank, batch) only."""
    return int(np.random.SeedSequence([seed, epoch, rank, batch]).generate_state(1)[0] % (2**31 - 1))


def rank_share(num_items: int, rank: int, world_size: int) -> list[int]:
    """An evaluation loader's share: every world_size-th item from `rank`, in dataset order
    (all items are seen once, so an evaluation covers the whole split)."""
    return list(range(rank, num_items, world_size))


class ShardedLoader:
    """The part every training loader shares: length, epoch and mid-epoch start, this rank's batches.

    A subclass sets up its source, then calls `super().__init__(spec, num_images)`, which
    fails before training when the data cannot fill one global batch.
    """

    def __init__(self, spec: LoaderSpec, num_images: int):
        self.spec, self.num_images = spec, num_images
        self.epoch, self.start_batch = 0, 0
        check_batches_per_epoch(num_images, spec.batch_size, spec.world_size)

    def __len__(self) -> int:
        return batches_per_epoch(self.num_images, self.spec.batch_size, self.spec.world_size)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """The next iteration reads `epoch`, from batch `start_batch` on (a resumed run)."""
        self.epoch, self.start_batch = epoch, start_batch

    def shard(self) -> list[list[int]]:
        """This rank's batches of dataset indices for the current epoch, from `start_batch` on."""
        s = self.spec
        return shard_batches(self.num_images, s.batch_size, s.rank, s.world_size, s.seed, self.epoch,
                             self.start_batch)

"""Random tensors of the right shapes, already on the device: the compute-only ceiling."""

from __future__ import annotations

from collections.abc import Iterator

import torch

from pipelines.batch import MultiCropBatch
from pipelines.sampler import batches_per_epoch, check_batches_per_epoch
from pipelines.spec import LoaderSpec

POOL = 4  # distinct batches cycled through, generated once


class SyntheticLoader:
    """Yields a few pre-made random batches over and over: no decode, no copy.

    Measures what the model step alone can do; the loss still moves because the
    batches differ from step to step.
    """

    def __init__(self, spec: LoaderSpec):
        self.spec = spec
        self.num_images = spec.synthetic_size
        self.epoch, self.start_batch = 0, 0
        check_batches_per_epoch(self.num_images, spec.batch_size, spec.world_size)  # fail before training
        g = torch.Generator().manual_seed(spec.seed * 1000 + spec.rank)
        self.pool = [self._make(g) for _ in range(POOL)]

    def _make(self, g: torch.Generator) -> MultiCropBatch:
        s, b = self.spec, self.spec.batch_size
        views = [s.to_device(torch.randn(b, 3, v.size, v.size, generator=g)) for v in s.recipe.views()]
        label = torch.randint(0, s.synthetic_classes, (b,), generator=g)
        return MultiCropBatch(views=views, index=torch.arange(b), label=label)

    def __len__(self) -> int:
        return batches_per_epoch(self.num_images, self.spec.batch_size, self.spec.world_size)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = epoch, start_batch

    def __iter__(self) -> Iterator[MultiCropBatch]:
        for b in range(self.start_batch, len(self)):
            yield self.pool[(self.epoch * len(self) + b) % POOL]

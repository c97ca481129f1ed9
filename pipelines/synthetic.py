"""Random tensors of the right shapes, already on the device: the compute-only ceiling."""

from __future__ import annotations

from collections.abc import Iterator

import torch

from pipelines.batch import MultiCropBatch
from pipelines.sampler import ShardedLoader
from pipelines.spec import LoaderSpec

POOL = 4  # distinct batches cycled through, generated once


class SyntheticLoader(ShardedLoader):
    """Yields a few pre-made random batches over and over: no decode, no copy.

    Measures what the model step alone can do; the loss still moves because the
    batches differ from step to step.
    """

    def __init__(self, spec: LoaderSpec):
        super().__init__(spec, spec.data.synthetic_size)
        g = torch.Generator().manual_seed(spec.seed * 1000 + spec.rank)
        self.pool = [self._make(g) for _ in range(POOL)]

    def _make(self, g: torch.Generator) -> MultiCropBatch:
        s, b = self.spec, self.spec.batch_size
        views = [s.to_device(torch.randn(b, 3, v.size, v.size, generator=g)) for v in s.recipe.views()]
        label = torch.randint(0, s.data.synthetic_classes, (b,), generator=g)
        return MultiCropBatch(views=views, index=torch.arange(b), label=label)

    def __iter__(self) -> Iterator[MultiCropBatch]:
        for b in range(self.start_batch, len(self)):
            yield self.pool[(self.epoch * len(self) + b) % POOL]

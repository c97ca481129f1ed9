"""The one contract between loaders and the training loop."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class MultiCropBatch:
    """Augmented views of one batch of source images, ready for the model.

    `views` holds the 2 global views first (B x 3 x Hg x Wg), then the local views
    (B x 3 x Hl x Wl): normalised, channels_last, on the training device. Every view
    of row i is cut from the same source image `index[i]`. `label` is for evaluation
    and debugging only, never for training. `num_skipped` counts the unreadable source
    images (distinct files) that this batch was the first of its epoch to meet and
    replace by another image, so the sum over an epoch's batches is the number of bad
    files this rank met in the epoch (`skipped_images` in the logs), however many
    lookups passed over each.
    """

    views: list[torch.Tensor]
    index: torch.Tensor
    label: torch.Tensor | None = None
    num_skipped: int = 0

    @property
    def batch_size(self) -> int:
        return self.views[0].shape[0]

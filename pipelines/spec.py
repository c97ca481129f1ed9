"""What the training loop tells a loader: the seam every backend plugs into."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from pipelines.augment import MultiCropRecipe


@dataclass
class LoaderSpec:
    """Everything a backend needs to produce this rank's `MultiCropBatch`es."""

    path: str
    recipe: MultiCropRecipe
    batch_size: int  # per process
    rank: int = 0
    world_size: int = 1
    seed: int = 0
    num_workers: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    channels_last: bool = True
    # The views' dtype: the autocast dtype on GPU (bf16 halves the loader's output traffic),
    # float32 otherwise. The model's first layer would cast to it anyway.
    dtype: torch.dtype = torch.float32
    dali_hw_decoder_load: float = 0.65  # share of images nvJPEG sends to the hardware decoder
    dali_cpu_fast: bool = True  # CPU mode only: bilinear crops, fast IDCT, numba photometric steps
    device_augment: bool = False  # torchvision backend: photometric steps batched on the device
    ffcv_order: str = "sampler"  # sampler (shared, resumable) | random | quasi_random | sequential
    ffcv_os_cache: bool = True  # FFCV: read through the OS page cache (False: its own process cache)
    synthetic_size: int = 1_281_167
    synthetic_classes: int = 1000

    def to_device(self, x: torch.Tensor) -> torch.Tensor:
        """Move one view to the training device in the training dtype and memory format."""
        x = x.to(self.device, dtype=self.dtype, non_blocking=True)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

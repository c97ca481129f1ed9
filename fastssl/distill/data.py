"""Labelled train / evaluation datasets for distillation, read from the user's disk only.

CIFAR-10/100 in torchvision's own on-disk format (`cifar-100-python/` under `data.root`,
read by `torchvision.datasets.CIFAR100(download=False)`), or ImageNet-layout folders
(checked by `pipelines.folder.scan_image_folder`, read by `ImageFolder`). Augmentation is
CRD's for CIFAR: random 32-px crop with 4 px padding, horizontal flip, CIFAR-100 mean/std.
`SeededItems` draws each (epoch, image)'s augmentation from its own seed, as the SSL loaders
do (`pipelines.sampler.sample_seed`), so a run stopped mid-epoch resumes on the same batches
whatever the worker count.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING

from torch.utils.data import Dataset, default_collate

from fastssl.distill.config import DistillDataConfig
from pipelines.folder import DataLayoutError, scan_image_folder
from pipelines.images import UnreadableImage, decoded_rgb, next_readable
from pipelines.sampler import sample_rng

if TYPE_CHECKING:
    import torch
    from PIL import Image

# CIFAR-100 channel statistics, as CRD's dataset/cifar100.py normalises
MEAN, STD = (0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761)
CIFAR_DIRS = {"cifar100": "cifar-100-python", "cifar10": "cifar-10-batches-py"}


def transforms(size: int, train: bool, resize: bool) -> Callable[[Image.Image], torch.Tensor]:
    from torchvision import transforms as T

    steps = [T.Resize((size, size))] if resize else []
    if train:
        steps += [T.RandomCrop(size, padding=size // 8), T.RandomHorizontalFlip()]
    return T.Compose(steps + [T.ToTensor(), T.Normalize(MEAN, STD)])


def build_datasets(cfg: DistillDataConfig) -> tuple[Dataset, Dataset, int]:
    """(train, eval, number of classes); every layout problem is a DataLayoutError naming the fix."""
    import torchvision

    if cfg.source in CIFAR_DIRS:
        cls = torchvision.datasets.CIFAR100 if cfg.source == "cifar100" else torchvision.datasets.CIFAR10
        try:
            train = cls(cfg.root, train=True, download=False, transform=transforms(32, True, False))
            test = cls(cfg.root, train=False, download=False, transform=transforms(32, False, False))
        except RuntimeError:  # torchvision: "Dataset not found or corrupted. You can use download=True" (we cannot)
            raise DataLayoutError(f"data.root {cfg.root!r}: no readable {CIFAR_DIRS[cfg.source]}/ in it; "
                                  f"point --data.root at the folder that holds {CIFAR_DIRS[cfg.source]}/ "
                                  f"(torchvision's format; nothing is downloaded)") from None
        return train, test, len(train.classes)
    from torchvision.datasets import ImageFolder

    labels_for = ("the distillation trainer's classifier and its top-1", "")
    _, classes = scan_image_folder(cfg.train, labels_for=labels_for)
    _, val_classes = scan_image_folder(cfg.val, labels_for=labels_for)
    if classes != val_classes:
        raise DataLayoutError(f"data.val {cfg.val!r} has other class folders than data.train {cfg.train!r} "
                              f"({len(val_classes)} vs {len(classes)}); give both splits of one dataset")
    train = ImageFolder(cfg.train, transform=transforms(cfg.image_size, True, True), loader=decoded_rgb)
    val = ImageFolder(cfg.val, transform=transforms(cfg.image_size, False, True), loader=decoded_rgb)
    return train, val, len(classes)


def read_or_warn(dataset: Dataset, index: int) -> tuple[torch.Tensor, int] | None:
    """`dataset[index]`, or None with a warning naming the file when its image cannot be read (an
    ImageFolder's bad file: one file must not end a run, as in the SSL loaders, `pipelines.images`)."""
    try:
        return dataset[index]
    except UnreadableImage as err:  # the decode's (`build_datasets`' loader); a transform's error stops the run
        path = dataset.samples[index][0] if hasattr(dataset, "samples") else f"item {index}"
        warnings.warn(f"skipping unreadable image {path}: {err}", stacklevel=2)
        return None


class SeededItems(Dataset):
    """`dataset` addressed by (epoch, index): the item's random augmentation is drawn from
    `sample_seed(seed, epoch, index)`, not from whichever worker's RNG happens to load it.
    An unreadable image is replaced by the next readable one, so every batch keeps its size."""

    def __init__(self, dataset: Dataset, seed: int):
        self.dataset, self.seed = dataset, seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor, int, int]:
        """(image, label, its index in the dataset: `index`, or the readable image that replaced it)."""
        epoch, index = key

        def read(i: int) -> tuple[torch.Tensor, int] | None:
            with sample_rng(self.seed, epoch, i):
                return read_or_warn(self.dataset, i)

        samples = getattr(self.dataset, "samples", None)  # an ImageFolder's files; CIFAR's arrays always read
        if samples is None:
            with sample_rng(self.seed, epoch, index):
                return (*self.dataset[index], index)
        (image, label), used, _ = next_readable(samples, index, read)
        return image, label, used


class ReadableItems(Dataset):
    """An evaluation dataset whose unreadable images are left out with a warning (`collate_readable`
    drops them): the accuracy is over the images that can be read, as the SSL evaluation loaders'."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int] | None:
        return read_or_warn(self.dataset, index)


def collate_readable(items: list[tuple[torch.Tensor, int] | None]) -> list[torch.Tensor] | None:
    """A batch of the readable items; None when none of them was."""
    items = [it for it in items if it is not None]
    return default_collate(items) if items else None

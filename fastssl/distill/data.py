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

from torch.utils.data import Dataset

from fastssl.distill.config import DistillDataConfig
from pipelines.folder import DataLayoutError, scan_image_folder
from pipelines.sampler import sample_rng

# CIFAR-100 channel statistics, as CRD's dataset/cifar100.py normalises
MEAN, STD = (0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761)
CIFAR_DIRS = {"cifar100": "cifar-100-python", "cifar10": "cifar-10-batches-py"}


def transforms(size: int, train: bool, resize: bool):
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
        except RuntimeError as err:  # torchvision: "Dataset not found or corrupted"
            raise DataLayoutError(f"data.root {cfg.root!r}: no readable {CIFAR_DIRS[cfg.source]}/ in it ({err}); "
                                  f"point --data.root at the folder that holds {CIFAR_DIRS[cfg.source]}/ "
                                  f"(torchvision's format; nothing is downloaded)") from None
        return train, test, len(train.classes)
    from torchvision.datasets import ImageFolder

    _, classes = scan_image_folder(cfg.train)
    _, val_classes = scan_image_folder(cfg.val)
    if classes != val_classes:
        raise DataLayoutError(f"data.val {cfg.val!r} has other class folders than data.train {cfg.train!r} "
                              f"({len(val_classes)} vs {len(classes)}); give both splits of one dataset")
    train = ImageFolder(cfg.train, transform=transforms(cfg.image_size, True, True))
    val = ImageFolder(cfg.val, transform=transforms(cfg.image_size, False, True))
    return train, val, len(classes)


class SeededItems(Dataset):
    """`dataset` addressed by (epoch, index): the item's random augmentation is drawn from
    `sample_seed(seed, epoch, index)`, not from whichever worker's RNG happens to load it."""

    def __init__(self, dataset: Dataset, seed: int):
        self.dataset, self.seed = dataset, seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]):
        epoch, index = key
        with sample_rng(self.seed, epoch, index):
            return self.dataset[index]

"""The transfer datasets' splits and features (fastssl/eval/transfer.py has the protocol).

Each of Table 5's datasets through its torchvision class, or a user's own ImageNet-layout folder,
as train / val / test splits the way Ericsson et al. take them (the dataset's own val split where
it has one, else 20 % of train held out), resized and centre-cropped to 224 with ImageNet
normalisation, then through the frozen backbone.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset
from torchvision import transforms as T

from fastssl.eval.classifier import batches_loader, extract, progress_bar
from fastssl.eval.errors import EvalError
from fastssl.eval.transfer import DATASETS, spec_of
from pipelines.augment import IMAGENET_MEAN, IMAGENET_STD
from pipelines.eval import LabelledImages
from pipelines.folder import DataLayoutError, scan_image_folder
from pipelines.images import UNREADABLE, why_unreadable

# A torchvision transform: a PIL image in, the network's input tensor out.
Transform = Callable[[Any], torch.Tensor]


VOC_CLASSES = ("aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "diningtable",
               "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor")
HELD_OUT = 0.2  # fraction of train held out for validation where a dataset has no val split
CALTECH_TRAIN_PER_CLASS = 30


def transfer_transform(size: int = 224) -> T.Compose:
    """Ericsson's transform: shorter side to `size` (bicubic), centre crop, ImageNet normalisation."""
    return T.Compose([T.Resize(size, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(size), T.ToTensor(),
                      T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


class Indexed(Dataset):
    """Images `indices` of a torchvision dataset, as (image, position, position).

    The position stands in for the label (extraction then returns the positions that were
    readable; the targets are looked up by position, which also serves VOC's multi-label ones).
    """

    def __init__(self, base: Dataset, indices: Sequence[int], transform: Transform):
        self.base, self.indices, self.transform = base, list(indices), transform

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, j: int) -> tuple[torch.Tensor, int, int] | None:
        try:
            image = self.base[self.indices[j]][0].convert("RGB")  # decodes: a bad file fails here
        except UNREADABLE as err:  # only the read: a transform's error is a bug, not a file to pass over
            import warnings

            warnings.warn(f"skipping unreadable image {j} of {type(self.base).__name__}: {why_unreadable(err)}",
                          stacklevel=1)
            return None
        return self.transform(image), j, j


@dataclass
class Split:
    """A split's images (a Dataset of (image, position, position)) and its targets by position."""

    images: Dataset
    targets: np.ndarray


def held_out(n: int, seed: int, fraction: float = HELD_OUT) -> tuple[np.ndarray, np.ndarray]:
    """(train, val) positions: Ericsson's split (np.random.seed(seed); shuffle; the first
    floor(fraction * n) are validation)."""
    order = np.arange(n)
    np.random.RandomState(seed).shuffle(order)
    cut = int(np.floor(fraction * n))
    return order[cut:], order[:cut]


def _labels_of(ds: Dataset) -> np.ndarray:
    """Class indices of a torchvision classification dataset without decoding its images."""
    for attr in ("_labels", "targets", "y"):
        if isinstance(getattr(ds, attr, None), list):
            return np.asarray(getattr(ds, attr), dtype=np.int64)
    if hasattr(ds, "_samples"):  # StanfordCars
        return np.asarray([c for _, c in ds._samples], dtype=np.int64)
    return np.asarray([ds[i][1] for i in range(len(ds))], dtype=np.int64)  # slow: decodes every image


def voc_targets(ds: Dataset) -> np.ndarray:
    """N x 20 targets of a VOCDetection split: 1 a non-difficult object of the class, -1 only
    difficult ones (ignored when scoring), 0 none."""
    out = np.zeros((len(ds), len(VOC_CLASSES)), dtype=np.int64)
    for i, path in enumerate(ds.annotations):
        for obj in ET.parse(path).getroot().iter("object"):
            c = VOC_CLASSES.index(obj.findtext("name").strip())
            difficult = (obj.findtext("difficult") or "0").strip() == "1"
            if not difficult:
                out[i, c] = 1
            elif out[i, c] == 0:
                out[i, c] = -1
    return out


def _open(name: str, root: str, **kwargs: Any) -> Dataset:
    """The torchvision dataset, download=False; 'not found' becomes an EvalError naming the layout."""
    import torchvision.datasets as tvd

    spec = DATASETS[name]
    try:
        return getattr(tvd, spec.torchvision_class)(root, download=False, **kwargs)
    except (RuntimeError, FileNotFoundError, OSError) as err:
        said = str(err).split(". You can use download")[0]  # download=True is not what this tool does
        raise EvalError(f"{name}: torchvision's {spec.torchvision_class} found no usable dataset under {root!r} "
                        f"({said}); "
                        f"put it there in torchvision's layout ({root}/{spec.layout}), or pass "
                        f"--folder {name}=DIR with DIR/train and DIR/test in ImageNet layout") from err


def _sun397_partition(ds: Dataset, root: str) -> tuple[np.ndarray, np.ndarray]:
    """Positions of the official partition 01 (Training_01.txt / Testing_01.txt) in torchvision's SUN397."""
    data_dir = Path(ds._data_dir)
    where = {"/" + p.relative_to(data_dir).as_posix(): i for i, p in enumerate(ds._image_files)}
    parts = []
    for fname in ("Training_01.txt", "Testing_01.txt"):
        path = data_dir / fname
        if not path.is_file():
            raise EvalError(f"sun397: no {path} (the official partitions); unpack Partitions.zip into {data_dir}")
        lines = [line.strip() for line in path.read_text().splitlines() if line.strip()]
        missing = [line for line in lines if line not in where]
        if missing:
            raise EvalError(f"sun397: {len(missing)} images of {fname} are not under {data_dir}, e.g. {missing[0]}")
        parts.append(np.asarray([where[line] for line in lines]))
    return parts[0], parts[1]


def _caltech_split(labels: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """30 training images per class (seeded), the rest test."""
    rng = np.random.RandomState(seed)
    train, test = [], []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        rng.shuffle(idx)
        train.extend(idx[:CALTECH_TRAIN_PER_CLASS])
        test.extend(idx[CALTECH_TRAIN_PER_CLASS:])
    return np.sort(train), np.sort(test)


def torchvision_splits(name: str, root: str, transform: Transform, seed: int = 0) -> tuple[dict[str, Split], int, str]:
    """(train / val / test splits, number of classes, where val came from) of one of the 11 datasets
    read by its torchvision class from `root` (download=False)."""

    def take(ds: Dataset, idx: Sequence[int] | np.ndarray, targets: np.ndarray) -> Split:
        return Split(Indexed(ds, idx, transform), targets[np.asarray(idx, dtype=np.int64)])

    def from_train(ds: Dataset, labels: np.ndarray, test_ds: Dataset, test_labels: np.ndarray
                   ) -> dict[str, Split]:
        tr, va = held_out(len(ds), seed)
        return {"train": take(ds, tr, labels), "val": take(ds, va, labels),
                "test": take(test_ds, range(len(test_ds)), test_labels)}

    val_from = f"{HELD_OUT:.0%} of train held out (seed {seed})"
    if name in ("aircraft", "dtd", "flowers", "voc2007"):
        extra = {"aircraft": {"annotation_level": "variant"}, "voc2007": {"year": "2007"}}.get(name, {})
        key = "image_set" if name == "voc2007" else "split"
        sets = {s: _open(name, root, **{key: s}, **extra) for s in ("train", "val", "test")}
        labels = {s: (voc_targets(ds) if name == "voc2007" else _labels_of(ds)) for s, ds in sets.items()}
        splits = {s: take(ds, range(len(ds)), labels[s]) for s, ds in sets.items()}
        classes = len(VOC_CLASSES) if name == "voc2007" else len(sets["train"].classes)
        return splits, classes, "official val split"
    if name in ("cifar10", "cifar100"):
        train, test = _open(name, root, train=True), _open(name, root, train=False)
        return from_train(train, _labels_of(train), test, _labels_of(test)), len(train.classes), val_from
    if name in ("cars", "food", "pets"):
        first = "trainval" if name == "pets" else "train"
        train, test = _open(name, root, split=first), _open(name, root, split="test")
        return from_train(train, _labels_of(train), test, _labels_of(test)), len(train.classes), val_from
    if name == "caltech101":
        ds = _open(name, root, target_type="category")
        labels = _labels_of(ds)
        train_all, test = _caltech_split(labels, seed)
        tr, va = held_out(len(train_all), seed)
        return ({"train": take(ds, train_all[tr], labels), "val": take(ds, train_all[va], labels),
                 "test": take(ds, test, labels)}, len(ds.categories),
                f"{CALTECH_TRAIN_PER_CLASS} train images per class (seed {seed}), {val_from}")
    if name == "sun397":
        ds = _open(name, root)
        labels = _labels_of(ds)
        train_all, test = _sun397_partition(ds, root)
        tr, va = held_out(len(train_all), seed)
        return ({"train": take(ds, train_all[tr], labels), "val": take(ds, train_all[va], labels),
                 "test": take(ds, test, labels)}, len(ds.classes), f"partition 01, {val_from}")
    raise EvalError(f"unknown dataset {name!r}; choose from {', '.join(DATASETS)}")


def folder_splits(name: str, root: str, transform: Transform, seed: int = 0) -> tuple[dict[str, Split], int, str]:
    """The same from ImageNet-layout folders ROOT/train, ROOT/test and, if present, ROOT/val
    (else 20 % of train held out). Single-label only (VOC2007's multi-label needs torchvision's VOC)."""
    if spec_of(name).metric == "map11":
        raise EvalError(f"{name} is multi-label: the folder layout cannot hold it; pass --data-root with "
                        f"torchvision's {DATASETS[name].layout}")
    base = Path(root)
    try:
        train, classes = scan_image_folder(base / "train")
        test, test_classes = scan_image_folder(base / "test")
        val, val_classes = scan_image_folder(base / "val") if (base / "val").is_dir() else (None, classes)
    except DataLayoutError as err:
        raise EvalError(f"{name}: {err} (--folder {name}=DIR needs DIR/train and DIR/test, optionally DIR/val, "
                        "in ImageNet layout)") from err
    for other, split in ((test_classes, "test"), (val_classes, "val")):
        if other != classes:
            raise EvalError(f"{name}: {root}/{split} has other class folders than {root}/train "
                            f"({len(other)} vs {len(classes)}); the same classes are needed in every split")

    def make(samples: list[tuple[str, int]]) -> Split:
        return Split(LabelledImages([(p, i) for i, (p, _) in enumerate(samples)], transform),
                     np.asarray([c for _, c in samples], dtype=np.int64))

    if val is None:
        tr, va = held_out(len(train), seed)
        return ({"train": make([train[i] for i in tr]), "val": make([train[i] for i in va]), "test": make(test)},
                len(classes), f"{HELD_OUT:.0%} of train held out (seed {seed})")
    return {"train": make(train), "val": make(val), "test": make(test)}, len(classes), "val folder"


def extract_split(backbone: torch.nn.Module, split: Split, batch_size: int, num_workers: int, device: torch.device,
                  progress: bool, desc: str, precision: str = "bf16") -> tuple[np.ndarray, np.ndarray]:
    """(features, targets) of a split's readable images through the frozen backbone (eval mode),
    with a progress bar: the package's `extract`, fed positions as labels."""
    n = len(split.images)
    batches = [list(range(i, min(i + batch_size, n))) for i in range(0, n, batch_size)]
    bar = progress_bar(n, desc, progress, unit="img")
    feats, positions, valid = extract(backbone, batches_loader(split.images, batches, num_workers), n, device, bar,
                                      precision)
    if bar is not None:
        bar.close()
    return feats[valid].numpy(), split.targets[positions[valid].numpy()]

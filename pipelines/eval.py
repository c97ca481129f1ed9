"""Evaluation loader: resize + centre crop of a labelled folder, sharded across ranks.

The MIRA authors' evaluation transform scaled to the crop size (`pipelines.augment.EvalView`):
resize the shorter side to size / crop_fraction (0.875 by default: 256 for 224; 1.0 for CIFAR's
32 px, kept whole as their CIFAR code does), bilinear by default, as their code ("bicubic" for
comparison), centre-crop `size`, normalise with the run's training mean and std. `EvalLoader`
does it with PIL in DataLoader workers; `pipelines.dali_eval.DaliEvalLoader` with DALI (same
arguments, same batches). `build_eval_loader` picks one by name, importing DALI only
when it is chosen (the names: `pipelines.spec.EVAL_BACKENDS`).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms as T

from pipelines.augment import EvalView
from pipelines.folder import Listing, scan_image_folder
from pipelines.images import UNREADABLE, load_rgb, why_unreadable
from pipelines.processes import leave_process_group, loader_workers_context, stop_signals_held
from pipelines.sampler import rank_share, sample_rng
from pipelines.spec import EVAL_BACKENDS, DataConfig, LoaderUnavailable, registered_class

if TYPE_CHECKING:
    from PIL import Image


def eval_transform(view: EvalView) -> T.Compose:
    return T.Compose([
        T.Resize(view.resize, interpolation=T.InterpolationMode(view.interpolation)),
        T.CenterCrop(view.size),
        T.ToTensor(),
        T.Normalize(view.mean, view.std),
    ])


class LabelledImages(Dataset):
    """(image, label, index) of a list of (path, label); an unreadable image comes back as
    None (and `collate` drops it), so one bad file does not stop a long evaluation.

    With a `seed`, items are looked up by (epoch, index) and a random transform draws from
    torch's generator seeded by (seed, epoch, index) (`pipelines.sampler.sample_rng`): the crops
    of a linear probe or a fine-tuning run are then the same whatever the number of loader
    workers, which otherwise each draw from a generator of their own."""

    def __init__(self, samples: Sequence[tuple[str, int]], transform: Callable[[Image.Image], torch.Tensor],
                 seed: int | None = None):
        self.samples, self.transform, self.seed = list(samples), transform, seed

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, int, int] | None:
        epoch, i = key if isinstance(key, tuple) else (None, key)
        path, label = self.samples[i]
        try:
            image = load_rgb(path)
        except UNREADABLE as err:  # only the decode: a transform's error is a bug, not a file to pass over
            warnings.warn(f"skipping unreadable image {path}: {why_unreadable(err)}", stacklevel=1)
            return None
        if self.seed is None or epoch is None:
            return self.transform(image), label, i
        with sample_rng(self.seed, epoch, i):
            return self.transform(image), label, i


class EvalFolder(LabelledImages):
    """(image, label, index) of an ImageNet-layout folder with the evaluation transform."""

    def __init__(self, root: str, view: EvalView, listing: Listing | None = None):
        samples, self.classes = listing if listing is not None else scan_image_folder(root)
        super().__init__(samples, eval_transform(view))


def collate(items: list[tuple[torch.Tensor, int, int] | None]
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """Stack the readable items of a batch; None when none of them was readable."""
    items = [it for it in items if it is not None]
    if not items:
        return None
    return (torch.stack([it[0] for it in items]), torch.tensor([it[1] for it in items]),
            torch.tensor([it[2] for it in items]))


class EvalLoader:
    """This rank's share (every world_size-th image) of a labelled folder, in order.

    `data` (the run's data configuration) is accepted for the eval loaders' common
    signature; PIL has none of the options it holds."""

    def __init__(self, root: str, view: EvalView, batch_size: int, rank: int = 0, world_size: int = 1,
                 num_workers: int = 0, device: torch.device | None = None, channels_last: bool = True,
                 data: DataConfig | None = None, listing: Listing | None = None):
        self.dataset = EvalFolder(root, view, listing)
        self.classes = self.dataset.classes
        self.indices = rank_share(len(self.dataset), rank, world_size)
        self.batch_size, self.num_workers = batch_size, num_workers
        self.device = device or torch.device("cpu")
        self.channels_last = channels_last

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        batches = [self.indices[i : i + self.batch_size] for i in range(0, len(self.indices), self.batch_size)]
        loader = DataLoader(self.dataset, batch_sampler=batches, num_workers=self.num_workers,
                            collate_fn=collate, pin_memory=self.device.type == "cuda",
                            worker_init_fn=leave_process_group if self.num_workers else None,
                            multiprocessing_context=loader_workers_context(self.num_workers))
        with stop_signals_held():
            delivered = iter(loader)  # starts the workers
        for batch in delivered:
            if batch is None:
                continue
            images, labels, index = batch
            images = images.to(self.device, non_blocking=True)
            if self.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            yield images, labels, index


class EvalBackendError(LoaderUnavailable, ValueError):
    """An unknown or uninstalled evaluation loader: the message names the fix."""


def eval_loader_class(backend: str) -> type:
    """The loader class of `backend`, imported now so that a missing DALI fails before any work."""
    return registered_class(EVAL_BACKENDS, backend, "eval loader",
                            "use the torchvision loader (--loader torchvision; in a recipe, --eval.loader torchvision)",
                            error=EvalBackendError)


def build_eval_loader(backend: str, root: str, view: EvalView, batch_size: int, rank: int = 0, world_size: int = 1,
                      num_workers: int = 0, device: torch.device | None = None, channels_last: bool = True,
                      data: DataConfig | None = None, listing: Listing | None = None) -> Any:
    """This rank's evaluation loader of `root` through `backend` (a name of `pipelines.spec.EVAL_BACKENDS`),
    each image seen as `view` says.

    `data`: the run's data configuration, whose DALI options the DALI eval loader uses as
    the training loader does (its defaults when not given). `listing`: `root`'s (samples,
    classes) when the caller has scanned it already, e.g. to keep a labelled subset of it
    (`tools/eval_knn.py --subset`); else `root` is scanned here."""
    return eval_loader_class(backend)(root, view, batch_size, rank=rank, world_size=world_size,
                                      num_workers=num_workers, device=device, channels_last=channels_last,
                                      data=data, listing=listing)

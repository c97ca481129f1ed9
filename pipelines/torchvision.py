"""The reference loader: PIL + torchvision transforms + a DataLoader.

The yardstick for the fast pipelines, both for speed and for augmentation statistics.
Each (epoch, image) draws its augmentation from its own seed (`sample_seed`), so the
batches are the same whatever the worker count, and a resumed run sees the same
augmentations as an uninterrupted one.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator

import torch
from PIL import Image, ImageFilter
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms as T
from torchvision.transforms import functional as TF

from pipelines.augment import MultiCropRecipe, ViewSpec
from pipelines.batch import MultiCropBatch
from pipelines.device_augment import augment_views, normalize_uint8
from pipelines.folder import scan_source
from pipelines.images import UNREADABLE, load_rgb, next_readable, why_unreadable
from pipelines.processes import leave_process_group, loader_workers_context, stop_signals_held
from pipelines.sampler import ShardedLoader, batch_seed, sample_rng
from pipelines.spec import LoaderSpec


class PILGaussianBlur:
    """Gaussian blur with sigma ~ U(lo, hi), as DINO/MIRA (PIL's blur, radius = sigma)."""

    def __init__(self, sigma: tuple[float, float]):
        self.sigma = sigma

    def __call__(self, img: Image.Image) -> Image.Image:
        lo, hi = self.sigma
        radius = lo + (hi - lo) * torch.rand(()).item()
        return img.filter(ImageFilter.GaussianBlur(radius=radius))


class FixedOrderColorJitter(T.ColorJitter):
    """ColorJitter with its steps always in the order brightness, contrast, saturation, hue
    (`--aug.jitter_order fixed`); it draws what ColorJitter draws, the order included."""

    def forward(self, img: Image.Image | torch.Tensor) -> Image.Image | torch.Tensor:
        _, *factors = self.get_params(self.brightness, self.contrast, self.saturation, self.hue)
        steps = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)
        for step, factor in zip(steps, factors):
            if factor is not None:
                img = step(img, factor)
        return img


def view_transform(recipe: MultiCropRecipe, view: ViewSpec, photometric: bool = True) -> T.Compose:
    """PIL image -> uint8 C x H x W tensor of one view, from the shared recipe; the loader
    normalises it on the training device (`device_augment.normalize_uint8`: ToTensor's and
    Normalize's float32 operations, so the views are those of the whole torchvision chain, and
    a batch crosses to the GPU in 1 byte per value instead of 4).

    `photometric=False` stops after the crop: flip, colour, blur and solarize then run batched
    on the training device too (`pipelines.device_augment`).
    """
    if not photometric:
        return T.Compose([T.RandomResizedCrop(view.size, scale=view.scale, ratio=recipe.ratio,
                                              interpolation=T.InterpolationMode(recipe.interpolation)),
                          T.PILToTensor()])
    b, c, s, h = recipe.jitter
    jitter = T.ColorJitter if recipe.jitter_order == "random" else FixedOrderColorJitter
    return T.Compose([
        T.RandomResizedCrop(view.size, scale=view.scale, ratio=recipe.ratio,
                            interpolation=T.InterpolationMode(recipe.interpolation)),
        T.RandomHorizontalFlip(p=recipe.flip_p),
        T.RandomApply([jitter(brightness=b, contrast=c, saturation=s, hue=h)], p=recipe.jitter_p),
        T.RandomGrayscale(p=recipe.grayscale_p),
        T.RandomApply([PILGaussianBlur(recipe.blur_sigma)], p=view.blur_p),
        T.RandomSolarize(threshold=128, p=view.solarize_p),
        T.PILToTensor(),
    ])


class MultiCropFolder(Dataset):
    """An ImageNet-layout folder whose items are all views of one image.

    Items are addressed by (epoch, index) so that the augmentation seed is a function
    of the sample, not of the worker that happens to load it.
    """

    def __init__(self, root: str, recipe: MultiCropRecipe, seed: int, photometric: bool = True):
        self.samples, _ = scan_source(root)
        self.transforms = [view_transform(recipe, v, photometric) for v in recipe.views()]
        self.seed = seed

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key: tuple[int, int]) -> tuple[list[torch.Tensor], int, int, list[int]]:
        """(views, index of the image used, its label, indices of the unreadable images passed over).

        The unreadable ones are returned by index, not counted: consecutive bad files are
        passed over by several lookups, and only the loader sees them all to count each once.
        """
        epoch, index = key
        img, i, bad = next_readable(self.samples, index, self._read)
        with sample_rng(self.seed, epoch, i):
            views = [t(img) for t in self.transforms]  # every transform draws from torch's RNG
        return views, i, self.samples[i][1], bad

    def _read(self, i: int) -> Image.Image | None:
        """Image `i` in RGB, or None (with a warning) when PIL cannot decode it."""
        path = self.samples[i][0]
        try:
            return load_rgb(path)
        except UNREADABLE as err:
            warnings.warn(f"skipping unreadable image {path}: {why_unreadable(err)}", stacklevel=1)
            return None


def collate_views(items: list[tuple[list[torch.Tensor], int, int, list[int]]]
                  ) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor, set[int]]:
    views = [torch.stack([it[0][v] for it in items]) for v in range(len(items[0][0]))]
    index = torch.tensor([it[1] for it in items])
    label = torch.tensor([it[2] for it in items])
    return views, index, label, {i for it in items for i in it[3]}


def _worker_init(worker_id: int) -> None:
    leave_process_group(worker_id)  # a stop signal to the trainer's group is the trainer's alone
    torch.set_num_threads(1)  # workers are processes: one thread each avoids oversubscription


class TorchvisionLoader(ShardedLoader):
    """Multi-crop batches from a JPEG folder via PIL and DataLoader workers."""

    def __init__(self, spec: LoaderSpec):
        self.dataset = MultiCropFolder(spec.path, spec.recipe, spec.seed, photometric=not spec.data.device_augment)
        super().__init__(spec, len(self.dataset))

    def __iter__(self) -> Iterator[MultiCropBatch]:
        s = self.spec
        keyed = [[(self.epoch, i) for i in b] for b in self.shard()]
        loader = DataLoader(self.dataset, batch_sampler=keyed, num_workers=s.num_workers,
                            collate_fn=collate_views, pin_memory=s.device.type == "cuda",
                            worker_init_fn=_worker_init if s.num_workers else None,
                            prefetch_factor=4 if s.num_workers else None,
                            multiprocessing_context=loader_workers_context(s.num_workers))
        met: set[int] = set()  # unreadable images met this epoch: each counts once (MultiCropBatch.num_skipped)
        with stop_signals_held():
            batches = iter(loader)  # starts the workers
        for b, (views, index, label, bad) in enumerate(batches, start=self.start_batch):
            if s.data.device_augment:
                views = self._augment_on_device(views, b)
            else:
                views = [normalize_uint8(x.to(s.device, non_blocking=True), s.recipe, s.dtype) for x in views]
            yield MultiCropBatch(views=[s.to_device(v) for v in views], index=index, label=label,
                                 num_skipped=len(bad - met))
            met |= bad

    def _augment_on_device(self, crops: list[torch.Tensor], batch_no: int) -> list[torch.Tensor]:
        """uint8 crops -> the recipe's flip and photometric steps, batched on the device.

        Their randomness is drawn per (seed, epoch, batch, rank), so it does not depend on
        the worker count either."""
        s = self.spec
        g = torch.Generator().manual_seed(batch_seed(s.seed, self.epoch, s.rank, batch_no))  # host draws
        return augment_views([x.to(s.device, non_blocking=True).permute(0, 2, 3, 1) for x in crops], s.recipe,
                             s.recipe.views(), g, dtype=s.dtype)

"""Every backend draws its augmentations from the one recipe: checked statistically.

Each test feeds probe images whose pixels make one augmentation measurable (a coordinate
ramp for crops and flips, a flat colour for jitter, grayscale and solarize, a fine checker
for blur), switches the other augmentations off, and compares the observed rates with the
recipe's probabilities by a binomial test at about 4.5 standard deviations (a wrong rate,
say 0.3 for 0.2, fails with certainty at these sample sizes; a right one passes except with
probability ~1e-5, and the seeds are fixed, so a pass is repeatable).
"""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import FILE_BACKENDS, data_path, requires_dali
from pipelines import DataConfig, LoaderSpec, MultiCropRecipe, build_train_loader
from pipelines.augment import IMAGENET_MEAN, IMAGENET_STD

SOURCE = 64  # probe images are SOURCE x SOURCE
COPIES = 256  # images in the probe folder: 8 batches of 32 per epoch
BATCH = 32
EPOCHS = 2  # 2 epochs x 256 images = 512 samples per view (few epochs: DALI builds a pipeline per epoch, ~1.5 s
# on a CPU under conditionals, and torchvision spawns its workers)

# "torchvision-device": the torchvision workers only crop; the rest runs in pipelines.device_augment.
# "dali-conditionals": DALI's GPU graph (DALI operators under conditionals) run on the CPU;
# plain "dali" on a CPU runs the photometric steps as numba functions (pipelines.dali_photometric).
BACKENDS = [*FILE_BACKENDS, "torchvision-device", pytest.param("dali-conditionals", marks=requires_dali)]
# "dali-device": DALI only crops (as "dali"), the rest runs in pipelines.device_augment (as
# "torchvision-device"): what is its own is the hand-over, each view's steps drawn per batch.
WITH_DALI_DEVICE = [*BACKENDS, pytest.param("dali-device", marks=requires_dali)]

QUIET = MultiCropRecipe(global_size=32, local_size=16, num_local=2, flip_p=0.0, jitter_p=0.0, grayscale_p=0.0,
                        blur_p=(0.0, 0.0, 0.0), solarize_p=(0.0, 0.0, 0.0))


def probe_folder(root: Path, pixels: np.ndarray) -> Path:
    """COPIES identical lossless (PNG) images in 2 class folders."""
    for c in range(2):
        (root / f"c{c}").mkdir(parents=True)
        for i in range(COPIES // 2):
            Image.fromarray(pixels).save(root / f"c{c}" / f"img{i:03d}.png")
    return root


def collect(backend: str, root: Path, recipe: MultiCropRecipe, epochs: int = EPOCHS) -> list[torch.Tensor]:
    """Every view of `epochs` epochs, un-normalised to [0, 255] float64, each N x 3 x H x W."""
    device_augment = backend in ("torchvision-device", "dali-device")
    dali_cpu_fast = backend != "dali-conditionals"
    backend = backend.split("-")[0]  # the loader each name runs
    data = DataConfig(backend=backend, train=data_path(backend, root), device_augment=device_augment,
                      dali_cpu_fast=dali_cpu_fast)
    loader = build_train_loader(LoaderSpec(data=data, recipe=recipe, batch_size=BATCH, seed=3))
    per_view: list[list[torch.Tensor]] = [[] for _ in range(recipe.num_views)]
    for epoch in range(epochs):
        loader.set_epoch(epoch)
        for batch in loader:
            for v, x in enumerate(batch.views):
                per_view[v].append(x.double().cpu())
    mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float64).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=torch.float64).view(1, 3, 1, 1)
    return [(torch.cat(xs) * std + mean) * 255 for xs in per_view]


def assert_rate(hits: torch.Tensor, p: float, what: str) -> None:
    """Binomial test of a 0/1 vector against probability p (exact at p = 0 or 1)."""
    n, k = hits.numel(), int(hits.sum())
    slack = 4.5 * math.sqrt(n * p * (1 - p))
    assert abs(k - n * p) <= slack, f"{what}: {k}/{n} = {k / n:.3f}, expected {p}"


def assert_independent(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    """Sample correlation of two per-sample draws is zero within 4.5 / sqrt(n)."""
    a, b = a.double() - a.double().mean(), b.double() - b.double().mean()
    r = float((a * b).sum() / (a.norm() * b.norm()))
    assert abs(r) <= 4.5 / math.sqrt(a.numel()), f"{what}: correlation {r:.3f}"


def within_batch_agreement(x: torch.Tensor) -> float:
    """Share of samples whose 0/1 draw equals the first sample's of their batch.

    One draw per BATCH instead of per sample gives 1.0; independent draws at rate p give
    p^2 + (1-p)^2 (0.5 for a fair coin)."""
    rows = x.view(-1, BATCH).double()
    return float((rows == rows[:, :1]).double().mean())


def within_batch_variance(x: torch.Tensor) -> float:
    """Mean over batches of the Bernoulli variance of the batch's draws, p_b (1 - p_b).

    Independent per-sample draws at rate p give p (1 - p) (1 - 1/BATCH) (0.155 at p = 0.8,
    standard error ~0.01 over 16 batches); one draw per BATCH gives 0. Unlike the agreement
    with each batch's first sample, its spread does not depend on how many of those first
    samples happened to draw 1 (a 1.7-sigma test at p = 0.8 with 16 batches)."""
    rate = x.view(-1, BATCH).double().mean(dim=1)
    return float((rate * (1 - rate)).mean())


# ------------------------------------------------------------------ crops and flips


def ramp_image() -> np.ndarray:
    """R = 4x, G = 4y (+2): the crop box and the flip can be read back from any view."""
    ramp = np.arange(SOURCE) * (256 // SOURCE) + 2
    img = np.zeros((SOURCE, SOURCE, 3), np.uint8)
    img[..., 0] = ramp[None, :]
    img[..., 1] = ramp[:, None]
    img[..., 2] = 128
    return img


def crop_geometry(view: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(area fraction, aspect ratio w/h, flipped) of each view of the ramp image.

    The ramp value at the first and last output pixel centres spans (size - 1) / size of
    the crop, so the crop extent in source pixels is span / 4 * size / (size - 1).
    """
    size = view.shape[-1]
    red, green = view[:, 0], view[:, 1]
    width = (red.amax(dim=(1, 2)) - red.amin(dim=(1, 2))) / (256 // SOURCE) * size / (size - 1)
    height = (green.amax(dim=(1, 2)) - green.amin(dim=(1, 2))) / (256 // SOURCE) * size / (size - 1)
    flipped = red[:, :, -1].mean(1) < red[:, :, 0].mean(1)
    return width * height / SOURCE**2, width / height, flipped


@pytest.mark.parametrize("backend", BACKENDS)
def test_crops_cover_the_configured_scale_and_ratio(backend, tmp_path):
    recipe = replace(QUIET, global_scale=(0.25, 1.0), local_scale=(0.05, 0.25), flip_p=0.5)
    views = collect(backend, probe_folder(tmp_path / "ramp", ramp_image()), recipe)
    areas, flips = [], []
    for v, view in enumerate(views):
        lo, hi = recipe.view(v).scale
        area, aspect, flipped = crop_geometry(view)
        # Inside the range (5% slack for pixel rounding of the crop box) ...
        assert area.min() >= lo * 0.9 - 0.01 and area.max() <= hi * 1.05 + 0.01, (v, area.min(), area.max())
        assert aspect.min() >= recipe.ratio[0] * 0.85 and aspect.max() <= recipe.ratio[1] / 0.85, v
        # ... and covering it: both ends of each range are reached.
        assert area.min() <= lo + 0.15 * (hi - lo) and area.max() >= hi - 0.15 * (hi - lo), (v, area.min(), area.max())
        assert aspect.min() <= 0.85 and aspect.max() >= 1 / 0.85, (v, aspect.min(), aspect.max())
        assert_rate(flipped, recipe.flip_p, f"flip rate of view {v}")
        areas.append(area)
        flips.append(flipped)
    assert_independent(areas[0], areas[1], "crop areas of the two global views")
    assert_independent(areas[2], areas[3], "crop areas of two local views")
    assert_independent(flips[0], flips[1], "flips of the two global views")
    assert abs(within_batch_agreement(flips[0]) - 0.5) < 0.1, "one flip per batch, not per sample"


# ------------------------------------------------------------------ colour operations

FLAT = (200, 120, 40)  # R >= 128 > G, B: solarize changes R only; far from gray


def flat_views(backend: str, tmp_path: Path, recipe: MultiCropRecipe, colour: tuple[int, int, int] = FLAT,
               epochs: int = EPOCHS) -> list[torch.Tensor]:
    pixels = np.broadcast_to(np.array(colour, np.uint8), (SOURCE, SOURCE, 3)).copy()
    views = collect(backend, probe_folder(tmp_path / "flat", pixels), recipe, epochs)
    return [v.mean(dim=(2, 3)) for v in views]  # N x 3 mean colour per view


@pytest.mark.parametrize("backend", BACKENDS)
def test_colour_jitter_rate_and_independence(backend, tmp_path):
    recipe = replace(QUIET, jitter_p=0.8)
    colours = flat_views(backend, tmp_path, recipe)
    jittered = [(c - torch.tensor(FLAT)).abs().amax(dim=1) > 2.0 for c in colours]
    for v, hits in enumerate(jittered):
        assert_rate(hits, 0.8, f"jitter rate of view {v}")
    assert_independent(jittered[0], jittered[1], "jitter draws of the two global views")
    assert_independent(colours[0][:, 0], colours[1][:, 0], "jittered red of the two global views")
    expected = 0.8 * 0.2 * (1 - 1 / BATCH)
    assert abs(within_batch_variance(jittered[2]) - expected) < 0.05, "one jitter draw per batch"


# Saturation (factor 0..2) and hue (-0.5..0.5) only. Saturation blends each pixel with its own luma l and
# keeps l; the hue shift keeps a pixel's max and min. So saturation then hue leaves (max - l) / (min - l)
# at the probe's own ratio, whatever the factors, while hue first changes the luma the blend pivots on
# (the luma weights differ per channel), which moves the ratio. The probe never clips in either order.
ORDER_PROBE = (80, 170, 80)
ORDER_RECIPE = replace(QUIET, jitter=(0.0, 0.0, 1.0, 0.5), jitter_p=1.0)


def hue_before_saturation(colours: torch.Tensor) -> torch.Tensor:
    """Per sample of N x 3 colours (levels): 1 where the hue shift came before the saturation, 0 where
    after, -1 where the colour is too gray to tell (a saturation factor near 0)."""
    luma = sum(w * c for w, c in zip((0.2989, 0.587, 0.114), ORDER_PROBE))
    probe_ratio = (max(ORDER_PROBE) - luma) / (min(ORDER_PROBE) - luma)
    top, bottom = colours.amax(dim=1), colours.amin(dim=1)
    moved = ((top - luma) / (bottom - luma) - probe_ratio).abs() > 0.1  # rounding moves it < 0.05
    return torch.where(top - bottom >= 30, moved.long(), -1)


def expected_hue_first_share(n: int = 40000) -> float:
    """The share `hue_before_saturation` finds among the colours it can tell, for torchvision's
    ColorJitter (an order per sample): float64 steps in each drawn order, rounded to levels once."""
    from pipelines.augment import JITTER_ORDERS
    from pipelines.device_augment import color_jitter

    g = torch.Generator().manual_seed(0)
    x = (torch.tensor(ORDER_PROBE, dtype=torch.float64) / 255).view(1, 3, 1, 1).expand(n, 3, 1, 1)
    one = torch.ones(n, dtype=torch.float64)
    saturation = 2 * torch.rand(n, generator=g, dtype=torch.float64)
    hue = torch.rand(n, generator=g, dtype=torch.float64) - 0.5
    order = torch.randint(len(JITTER_ORDERS), (n,), generator=g)
    found = hue_before_saturation((color_jitter(x, one, one, saturation, hue, order=order) * 255).round().view(n, 3))
    return float((found == 1).sum() / (found >= 0).sum())


@pytest.mark.parametrize("backend", WITH_DALI_DEVICE)
def test_colour_jitter_draws_its_order_per_view(backend, tmp_path):
    """torchvision's ColorJitter draws its steps' order per call: hue comes before saturation in half of
    them, which a flat probe shows (`hue_before_saturation`); the share matches the float64 reference's
    (binomial, 4.5 sigma). `jitter_order: fixed` (saturation always before hue) shows none."""
    found = torch.cat(flat_views(backend, tmp_path / "random", ORDER_RECIPE, ORDER_PROBE, epochs=1))  # n = 1024
    found = hue_before_saturation(found)
    assert (found >= 0).double().mean() > 0.7  # saturation factors under ~1/3 are too gray to tell
    assert_rate(found[found >= 0], expected_hue_first_share(), "hue before saturation")
    fixed = flat_views(backend, tmp_path / "fixed", replace(ORDER_RECIPE, jitter_order="fixed"), ORDER_PROBE, epochs=1)
    assert int((hue_before_saturation(torch.cat(fixed)) == 1).sum()) == 0


@pytest.mark.parametrize("backend", WITH_DALI_DEVICE)
def test_grayscale_rate(backend, tmp_path):
    recipe = replace(QUIET, grayscale_p=0.2)
    for v, colour in enumerate(flat_views(backend, tmp_path, recipe)):
        gray = (colour.amax(dim=1) - colour.amin(dim=1)) < 3.0
        assert_rate(gray, 0.2, f"grayscale rate of view {v}")


@pytest.mark.parametrize("backend", WITH_DALI_DEVICE)
def test_solarize_only_on_the_second_global_view(backend, tmp_path):
    recipe = replace(QUIET, solarize_p=(0.0, 0.2, 0.0))
    for v, colour in enumerate(flat_views(backend, tmp_path, recipe)):
        solarized = colour[:, 0] < 128  # 200 -> 55; G and B (< 128) stay
        assert_rate(solarized, recipe.view(v).solarize_p, f"solarize rate of view {v}")
        torch.testing.assert_close(colour[:, 1:], torch.tensor(FLAT[1:], dtype=torch.float64).expand(len(colour), 2),
                                   atol=2.0, rtol=0)


@pytest.mark.parametrize("backend", WITH_DALI_DEVICE)
def test_blur_rates_per_view(backend, tmp_path):
    # Crops of the whole image at its own size, so only the blur changes sharpness; sigma
    # from 1 up, where a 2-pixel checker loses most of its contrast (sigma 0.1 would not).
    recipe = replace(QUIET, global_size=SOURCE, local_size=SOURCE, global_scale=(1.0, 1.0), local_scale=(1.0, 1.0),
                     ratio=(1.0, 1.0), blur_p=(1.0, 0.1, 0.5), blur_sigma=(1.0, 2.0))
    yy, xx = np.mgrid[:SOURCE, :SOURCE]
    checker = np.where(((xx // 2) + (yy // 2)) % 2 == 0, 230, 25).astype(np.uint8)
    views = collect(backend, probe_folder(tmp_path / "checker", np.stack([checker] * 3, axis=-1)), recipe)
    for v, view in enumerate(views):
        contrast = view[:, 0].std(dim=(1, 2))  # 102 unblurred; under 40 from sigma 1
        blurred = contrast < 60
        assert_rate(blurred, recipe.view(v).blur_p, f"blur rate of view {v}")
    assert_independent(views[2][:, 0].std(dim=(1, 2)) < 60, views[3][:, 0].std(dim=(1, 2)) < 60,
                       "blur draws of two local views")

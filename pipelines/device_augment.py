"""The recipe's photometric augmentations as batched tensor ops, on whatever device the batch is on.

Why: FFCV ships no hue, grayscale, blur or solarize, and running them per sample on CPU
workers is what makes multi-crop loading slow. Here each step draws its coin and its
parameters per SAMPLE (one brightness factor, one blur sigma per image), then runs once
on the rows that drew it: no Python loop over samples, and a skipped step costs an index
select, not a compute-and-blend. Any loader that delivers crops (uint8, N x H x W x 3) can
finish them here, on the GPU or on the CPU.

Every coin and parameter is drawn on the HOST (a CPU generator seeded per batch) and sent to
the device asynchronously: which rows draw a step and the blur window are then known without
asking the GPU, so preparing a batch never waits for the training step still queued on it
(a `nonzero()` or `.item()` on the device would, and the loop would count the step as data wait).

The definitions follow torchvision's tensor ops: ColorJitter's brightness, contrast,
saturation and hue (in an order drawn per sample, as ColorJitter's, or in that fixed order:
the recipe's `jitter_order`), grayscale with torchvision's weights, Gaussian blur with
sigma ~ U(blur_sigma) and a window of 2 * ceil(3 sigma) + 1, solarize at 128 / 255.
"""

from __future__ import annotations

import functools
import math
import os
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from pipelines.augment import JITTER_ORDERS, MultiCropRecipe, ViewSpec

GRAY_WEIGHTS = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale
SOLARIZE_THRESHOLD = 128 / 255


def _uniform(n: int, lo: float, hi: float, g: torch.Generator) -> torch.Tensor:
    """n draws from U(lo, hi) on the generator's device (the host)."""
    return lo + (hi - lo) * torch.rand(n, generator=g, device=g.device)


def _coin(n: int, p: float | torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Indices (on the host) of the rows that draw this step (all of them at p = 1, none at p = 0).
    `p` is one probability for every row, or a host tensor of one per row."""
    if isinstance(p, torch.Tensor):
        return (torch.rand(n, generator=g, device=g.device, dtype=p.dtype) < p).nonzero().squeeze(1)
    if p <= 0:
        return torch.empty(0, dtype=torch.long)
    if p >= 1:
        return torch.arange(n)
    return (torch.rand(n, generator=g, device=g.device) < p).nonzero().squeeze(1).cpu()


def _to(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on `device` without a wait: pinned (PyTorch's caching host allocator), then an
    asynchronous copy on the current stream (a pageable copy would block the host)."""
    if t.device == device:
        return t
    if device.type == "cuda" and t.device.type == "cpu":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


@functools.lru_cache(maxsize=None)
def _channel_constants(values: tuple[float, ...], device: torch.device) -> torch.Tensor:
    """Per-channel constants as a 1 x 3 x 1 x 1 tensor on `device`, made once per device."""
    return torch.tensor(values, dtype=torch.float32).view(1, 3, 1, 1).to(device)


def grayscale(x: torch.Tensor) -> torch.Tensor:
    """N x 3 x H x W -> N x 1 x H x W luma, with torchvision's weights (and its order of terms)."""
    wr, wg, wb = GRAY_WEIGHTS
    return wr * x[:, 0:1] + wg * x[:, 1:2] + wb * x[:, 2:3]


def _rgb_to_hsv(x: torch.Tensor) -> torch.Tensor:
    r, g, b = x.unbind(1)
    maxc, _ = x.max(dim=1)
    minc, _ = x.min(dim=1)
    delta = maxc - minc
    s = torch.where(maxc > 0, delta / maxc.clamp_min(1e-12), torch.zeros_like(maxc))
    safe = delta.clamp_min(1e-12)
    rc, gc, bc = (maxc - r) / safe, (maxc - g) / safe, (maxc - b) / safe
    h = torch.where(maxc == r, bc - gc, torch.where(maxc == g, 2.0 + rc - bc, 4.0 + gc - rc))
    h = torch.where(delta > 0, (h / 6.0) % 1.0, torch.zeros_like(h))
    return torch.stack([h, s, maxc], dim=1)


def _hsv_to_rgb(x: torch.Tensor) -> torch.Tensor:
    """Closed form, elementwise only (no per-sector gather, so inductor fuses it):
    channel_n = v - v s clamp(min(k, 4 - k), 0, 1) with k = (n + 6 h) mod 6, n = 5, 3, 1."""
    h, s, v = x.unbind(1)
    out = []
    for n in (5.0, 3.0, 1.0):
        k = torch.remainder(n + 6.0 * h, 6.0)
        out.append(v - v * s * torch.clamp(torch.minimum(k, 4.0 - k), 0.0, 1.0))
    return torch.stack(out, dim=1)


def jitter_step(x: torch.Tensor, step: int, factor: torch.Tensor) -> torch.Tensor:
    """One step of torchvision's ColorJitter (0 brightness, 1 contrast, 2 saturation, 3 hue) with one
    factor per sample (a length-N tensor), on N x 3 x H x W values in [0, 1]."""
    f = factor.view(-1, 1, 1, 1)
    if step == 0:
        return (x * f).clamp(0, 1)
    if step == 1:
        mean = grayscale(x).mean(dim=(1, 2, 3), keepdim=True)
        return (mean + (x - mean) * f).clamp(0, 1)
    if step == 2:
        gray = grayscale(x)
        return (gray + (x - gray) * f).clamp(0, 1)
    hsv = _rgb_to_hsv(x)
    hsv = torch.cat([((hsv[:, :1] + f) % 1.0), hsv[:, 1:]], dim=1)
    return _hsv_to_rgb(hsv).clamp(0, 1)


def color_jitter(x: torch.Tensor, brightness: torch.Tensor, contrast: torch.Tensor, saturation: torch.Tensor,
                 hue: torch.Tensor, order: torch.Tensor | None = None,
                 step: Callable[[torch.Tensor, int, torch.Tensor], torch.Tensor] = jitter_step) -> torch.Tensor:
    """torchvision's ColorJitter with one factor per sample (each a length-N tensor), in [0, 1].

    `order`: per sample, an index into `JITTER_ORDERS` (a host tensor), or None for brightness,
    contrast, saturation, hue. At each of the 4 positions the rows are grouped by the step they
    take there, so every row runs each step once: the work of the fixed order, in up to 16
    groups. `step` computes one step (`jitter_step`, or a compiled copy of it).
    """
    factors = (brightness, contrast, saturation, hue)
    if order is None or not bool(order.any()):
        for i, f in enumerate(factors):
            x = step(x, i, f)
        return x
    at = torch.tensor(JITTER_ORDERS)[order.cpu()]  # row -> the step it takes at each position
    x = x.clone()
    for position in range(4):
        for i, f in enumerate(factors):
            rows = (at[:, position] == i).nonzero().squeeze(1)
            if len(rows) == len(x):
                x = step(x, i, f)
            elif len(rows):
                dev_rows = _to(rows, x.device)
                x[dev_rows] = step(x[dev_rows], i, f[dev_rows])
    return x


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian blur with one sigma per sample: one grouped conv per axis.

    The window is sized for the largest sigma in the batch (2 * ceil(3 sigma) + 1); smaller
    sigmas get kernels that are ~0 in the outer taps. Borders are reflected, as torchvision.
    `sigma` is best on the host: its largest value sizes the window without a device wait.
    """
    n, c, h, w = x.shape
    radius = max(1, math.ceil(3 * float(sigma.max())))
    radius = min(radius, (min(h, w) - 1))  # reflect padding needs pad < size
    sigma = _to(sigma, x.device)
    taps = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
    kernel = torch.exp(-0.5 * (taps.view(1, -1) / sigma.view(-1, 1).to(x.dtype)) ** 2)
    kernel = (kernel / kernel.sum(dim=1, keepdim=True)).repeat_interleave(c, dim=0)  # (n*c) x k
    y = x.reshape(1, n * c, h, w)
    y = F.conv2d(F.pad(y, (radius, radius, 0, 0), mode="reflect"), kernel.view(n * c, 1, 1, -1), groups=n * c)
    y = F.conv2d(F.pad(y, (0, 0, radius, radius), mode="reflect"), kernel.view(n * c, 1, -1, 1), groups=n * c)
    return y.view(n, c, h, w)


def solarize(x: torch.Tensor) -> torch.Tensor:
    return torch.where(x >= SOLARIZE_THRESHOLD, 1.0 - x, x)


_compiled_step = None


def _jitter_step_for(device: torch.device) -> Callable[[torch.Tensor, int, torch.Tensor], torch.Tensor]:
    """The colour jitter's step function to use on `device` (`jitter_step`, maybe compiled).

    On a CPU the ~40 elementwise passes over the crops dominate the loader, each one reading
    and writing the whole batch through memory; inductor fuses each step into one C++ loop
    (compiled once per process and step, a one-off delay at the first batch, and cached on disk
    by inductor). On a GPU the eager ops are already cheap, and inductor would emit Triton
    kernels, so the eager version is used there. FASTSSL_EAGER_AUGMENT=1 turns the compilation
    off; a failed compilation falls back to eager with one warning.
    """
    global _compiled_step
    if device.type != "cpu" or os.environ.get("FASTSSL_EAGER_AUGMENT") == "1":
        return jitter_step
    if _compiled_step is None:
        compiled = torch.compile(jitter_step, dynamic=True)

        def step(*args: Any) -> torch.Tensor:
            global _compiled_step
            try:
                return compiled(*args)
            except Exception as err:  # no compiler on this machine, or an inductor bug
                warnings.warn(f"colour jitter runs eagerly: torch.compile failed ({type(err).__name__}: {err})",
                              stacklevel=2)
                _compiled_step = jitter_step
                return jitter_step(*args)

        _compiled_step = step
    return _compiled_step


def augment_view(crops: torch.Tensor, recipe: MultiCropRecipe, view: ViewSpec, generator: torch.Generator,
                 dtype: torch.dtype = torch.float32, flip: bool = True) -> torch.Tensor:
    """uint8 crops (N x H x W x 3) of one view -> augmented, normalised N x 3 x H x W (channels_last) in `dtype`
    (`augment_views` with a single view)."""
    return augment_views([crops], recipe, [view], generator, dtype, flip)[0]


def augment_views(crops: Sequence[torch.Tensor], recipe: MultiCropRecipe, views: Sequence[ViewSpec],
                  generator: torch.Generator, dtype: torch.dtype = torch.float32, flip: bool = True) -> list[torch.Tensor]:
    """Each view's uint8 crops (N_v x H x W x 3) -> augmented, normalised N_v x 3 x H x W (channels_last)
    in `dtype`, one tensor per view.

    Steps and order as the torchvision reference: flip, jitter (p; its 4 steps in the recipe's
    `jitter_order`), grayscale (p), blur (p, per view), solarize (p, per view), normalise.
    `flip=False` when the loader already flipped. `generator` is a CPU generator: every draw is
    made on the host (module docstring).

    Views of one size run as ONE batch (their crops concatenated, each row with its own view's
    blur and solarize probability): the recipe's 2 x 224 + 6 x 96 is 2 passes of ~180 ops
    instead of 8, which on a GPU is launch overhead the training step waits for.
    """
    if len(crops) != len(views):
        raise ValueError(f"augment_views: {len(crops)} crop batches for {len(views)} views")
    out: list[torch.Tensor | None] = [None] * len(views)
    by_size: dict[tuple[int, ...], list[int]] = {}
    for v, x in enumerate(crops):
        by_size.setdefault(tuple(x.shape[1:]), []).append(v)
    for members in by_size.values():
        rows_per_view = [crops[v].shape[0] for v in members]
        group = crops[members[0]] if len(members) == 1 else torch.cat([crops[v] for v in members])
        blur_p = _per_row([views[v].blur_p for v in members], rows_per_view)
        solarize_p = _per_row([views[v].solarize_p for v in members], rows_per_view)
        done = _augment_rows(group, recipe, blur_p, solarize_p, generator, dtype, flip)
        for v, x in zip(members, done.split(rows_per_view)):
            out[v] = x
    return out


def _per_row(p: list[float], rows_per_view: list[int]) -> float | torch.Tensor:
    """One probability per row of a group of views: a number when every view has the same."""
    if len(set(p)) == 1:
        return p[0]
    return torch.tensor(p, dtype=torch.float64).repeat_interleave(torch.tensor(rows_per_view))


def _augment_rows(crops: torch.Tensor, recipe: MultiCropRecipe, blur_p: float | torch.Tensor,
                  solarize_p: float | torch.Tensor, generator: torch.Generator, dtype: torch.dtype,
                  flip: bool) -> torch.Tensor:
    """`augment_views` on one batch of equal-size crops, with the blur and solarize probability per row."""
    dev = crops.device
    # channels_last memory, values in [0, 1]; a device 255, as in normalize_uint8 (true division on CUDA too)
    x = crops.permute(0, 3, 1, 2).float().div_(_channel_constants((255.0,) * 3, dev))
    n = x.shape[0]

    def rows_drawing(p: float | torch.Tensor) -> torch.Tensor:
        return _to(_coin(n, p, generator), dev)

    if flip:
        rows = rows_drawing(recipe.flip_p)
        x[rows] = x[rows].flip(-1)
    b, c, s, h = recipe.jitter
    rows = rows_drawing(recipe.jitter_p)
    if len(rows):
        k = len(rows)
        factors = [_uniform(k, max(0.0, 1 - b), 1 + b, generator), _uniform(k, max(0.0, 1 - c), 1 + c, generator),
                   _uniform(k, max(0.0, 1 - s), 1 + s, generator), _uniform(k, -h, h, generator)]
        order = torch.randint(recipe.num_jitter_orders, (k,), generator=generator, device=generator.device)
        x[rows] = color_jitter(x[rows], *(_to(f, dev) for f in factors), order=order, step=_jitter_step_for(dev))
    rows = rows_drawing(recipe.grayscale_p)
    if len(rows):
        x[rows] = grayscale(x[rows]).expand(-1, 3, -1, -1)
    rows = rows_drawing(blur_p)
    if len(rows):
        x[rows] = gaussian_blur(x[rows], _uniform(len(rows), *recipe.blur_sigma, generator))
    rows = rows_drawing(solarize_p)
    if len(rows):
        x[rows] = solarize(x[rows])
    return _normalize(x, recipe, dtype)


def normalize_crops(crops: torch.Tensor, recipe: MultiCropRecipe, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 crops (N x H x W x 3) already augmented -> normalised N x 3 x H x W (channels_last) in `dtype`."""
    return normalize_uint8(crops.permute(0, 3, 1, 2), recipe, dtype)


def normalize_uint8(x: torch.Tensor, recipe: MultiCropRecipe, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 N x 3 x H x W -> torchvision's ToTensor then Normalize (the same float32 operations), in `dtype`,
    channels_last. Done where the batch lands, so a loader moves 1 byte per value instead of 4.

    The 255 is a tensor on the batch's device: CUDA divides by a host scalar as a multiplication by its
    reciprocal (one bit off for half the byte values), by a device tensor as a true division, as the CPU."""
    return _normalize(x.float().div_(_channel_constants((255.0,) * 3, x.device)), recipe, dtype)


def _normalize(x: torch.Tensor, recipe: MultiCropRecipe, dtype: torch.dtype) -> torch.Tensor:
    mean = _channel_constants(tuple(recipe.mean), x.device)
    std = _channel_constants(tuple(recipe.std), x.device)
    return ((x - mean) / std).to(dtype=dtype, memory_format=torch.channels_last)

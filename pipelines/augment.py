"""The multi-crop augmentation recipe as data.

Every backend (torchvision reference, DALI, FFCV) reads its crop sizes, scales and
per-view probabilities from one `MultiCropRecipe`, so that they cannot drift apart.
Defaults are DINO's / MIRA's ResNet-50 recipe (the authors' code): 2 x 224 global
crops at scale (0.14, 1), 6 x 96 local crops at scale (0.05, 0.14), colour jitter
(0.4, 0.4, 0.2, 0.1) with p 0.8, grayscale p 0.2, Gaussian blur with p 1.0 / 0.1 /
0.5 on global view 0 / global view 1 / locals (sigma 0.1-2), solarize p 0.2 on
global view 1 only, horizontal flip p 0.5, ImageNet mean and std, bicubic crops, and
the colour jitter's four steps in an order drawn per image and view (torchvision's
`ColorJitter`, which the authors use).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
NUM_GLOBAL_VIEWS = 2
MIN_CROP = 8  # the smallest crop side, in pixels, a recipe accepts (global_size, local_size)
MAX_CROP = 4096  # the largest (PIL overflows far above it, and one 4096 px view is 200 MB of floats)
MAX_LOCAL_VIEWS = 64  # local crops per image (the paper's 6; every one is a student forward)
MAX_BLUR_SIGMA = 1000.0  # pixels (the paper's 0.1-2); PIL refuses astronomically large radii
# Resampling filters a crop or an evaluation resize may use. The authors differ: MIRA's
# (DINO's) training crops are bicubic, ML-CPC's MoCo crops and MIRA's evaluation
# resizes bilinear. The names are torchvision's `InterpolationMode` values; DALI's filters:
# `pipelines.dali_decoder.dali_interp`.
INTERPOLATIONS = ("bicubic", "bilinear")
EVAL_INTERPOLATION = "bilinear"
# The evaluation transform's centre crop as a share of the resized shorter side: ImageNet's
# 224 of 256. 1.0 keeps the whole shorter side: 32-px CIFAR images as they are, the CIFAR
# protocol of the MIRA and ML-CPC authors' code (ToTensor + Normalize only).
EVAL_CROP_FRACTION = 0.875
# The colour jitter's steps: 0 brightness, 1 contrast, 2 saturation, 3 hue. torchvision's
# ColorJitter applies them in a random order per call (`torch.randperm(4)`); a sample's order
# is an index into JITTER_ORDERS, all 24 equally likely, and index 0 is the fixed order.
JITTER_ORDERS: tuple[tuple[int, int, int, int], ...] = tuple(itertools.permutations(range(4)))
JITTER_ORDER_MODES = ("random", "fixed")


def eval_resize(size: int, crop_fraction: float = EVAL_CROP_FRACTION) -> int:
    """The shorter side the evaluation transform resizes to before its centre crop of `size`: 256 for 224."""
    return round(size / crop_fraction)


@dataclass(frozen=True)
class EvalView:
    """How every evaluation (the loop's k-NN, the eval loaders, the eval tools) sees an image: the shorter side
    resized to `size / crop_fraction` with `interpolation`, the centre `size` x `size` crop, normalised with
    the run's training mean and std (`MultiCropRecipe.mean` / `.std`): both authors' code normalises train and
    test images alike, ImageNet's statistics on ImageNet and CIFAR's on CIFAR."""

    size: int
    interpolation: str = EVAL_INTERPOLATION
    crop_fraction: float = EVAL_CROP_FRACTION
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    @property
    def resize(self) -> int:
        return eval_resize(self.size, self.crop_fraction)

    def describe(self) -> str:
        """The transform in words, for reports."""
        return (f"resize {self.resize} ({self.interpolation}) + centre crop {self.size}, "
                f"normalised with mean {list(self.mean)} and std {list(self.std)}")


def crop_fraction_errors(field: str, value: float) -> list[str]:
    """`field: ...` when `value` is not a share in (0, 1] (`EVAL_CROP_FRACTION`)."""
    if isinstance(value, (int, float)) and 0 < value <= 1:
        return []
    return [f"{field}: the centre crop's share of the resized shorter side must lie in (0, 1], got {value} "
            f"(ImageNet: 0.875, i.e. 224 of 256; 1.0: the whole image, as CIFAR's 32 px)"]


def interpolation_errors(field: str, value: str) -> list[str]:
    """`field: ...` when `value` is not a name of `INTERPOLATIONS`."""
    if value in INTERPOLATIONS:
        return []
    return [f"{field}: unknown interpolation {value!r}; choose one of {', '.join(INTERPOLATIONS)}"]


@dataclass(frozen=True)
class ViewSpec:
    """What one view (one crop of the source image) gets: resolved from the recipe."""

    size: int
    scale: tuple[float, float]
    blur_p: float
    solarize_p: float


@dataclass
class MultiCropRecipe:
    """Crop geometry and augmentation probabilities, shared by all backends."""

    global_size: int = 224  # side in pixels of the 2 global crops
    local_size: int = 96  # side in pixels of the local crops
    num_local: int = 6  # local crops per image (0 = only the 2 global views)
    global_scale: tuple[float, float] = (0.14, 1.0)  # area fraction range of the global random-resized crops
    local_scale: tuple[float, float] = (0.05, 0.14)  # area fraction range of the local random-resized crops
    ratio: tuple[float, float] = (3 / 4, 4 / 3)  # aspect-ratio range of every random-resized crop
    flip_p: float = 0.5  # probability of a horizontal flip, per view
    jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.2, 0.1)  # brightness, contrast, saturation, hue jitter
    jitter_p: float = 0.8  # probability of colour jitter, per view
    # fixed: always brightness, contrast, saturation, hue (no per-order batch splits in the fast loaders).
    jitter_order: str = "random"  # random (an order of the jitter's 4 steps per view, as torchvision's) | fixed
    grayscale_p: float = 0.2  # probability of grayscale, per view
    # Blur probability for global view 0, global view 1, and every local view.
    blur_p: tuple[float, float, float] = (1.0, 0.1, 0.5)
    blur_sigma: tuple[float, float] = (0.1, 2.0)  # range of the Gaussian blur's sigma, in pixels
    # Solarize probability for global view 0, global view 1, and every local view.
    solarize_p: tuple[float, float, float] = (0.0, 0.2, 0.0)
    mean: tuple[float, float, float] = IMAGENET_MEAN  # per-channel mean subtracted after augmentation (RGB, 0..1)
    std: tuple[float, float, float] = IMAGENET_STD  # per-channel std divided by after augmentation (RGB, 0..1)
    # Resampling of the random-resized crops: bicubic (MIRA / DINO) | bilinear (ML-CPC's MoCo code).
    # torchvision and DALI's GPU graph use it; FFCV always resizes with INTER_AREA, DALI's fast CPU path linearly.
    interpolation: str = "bicubic"

    @property
    def num_views(self) -> int:
        return NUM_GLOBAL_VIEWS + self.num_local

    @property
    def num_jitter_orders(self) -> int:
        """How many orders of the jitter's steps a sample draws from (JITTER_ORDERS[:n], uniformly)."""
        return len(JITTER_ORDERS) if self.jitter_order == "random" else 1

    def view(self, v: int) -> ViewSpec:
        """The spec of view `v`: 0 and 1 are the global views, the rest are local."""
        if not 0 <= v < self.num_views:
            raise IndexError(f"view {v} out of range for {self.num_views} views")
        slot = min(v, 2)
        if v < NUM_GLOBAL_VIEWS:
            return ViewSpec(self.global_size, self.global_scale, self.blur_p[slot], self.solarize_p[slot])
        return ViewSpec(self.local_size, self.local_scale, self.blur_p[slot], self.solarize_p[slot])

    def views(self) -> list[ViewSpec]:
        return [self.view(v) for v in range(self.num_views)]

    def errors(self) -> list[str]:
        """Every problem with the values, as `field: what is wrong (fix)` strings."""
        out: list[str] = []
        for name in ("global_size", "local_size"):
            if not MIN_CROP <= getattr(self, name) <= MAX_CROP:
                out.append(f"{name}: must lie in [{MIN_CROP}, {MAX_CROP}] pixels, got {getattr(self, name)}")
        if not 0 <= self.num_local <= MAX_LOCAL_VIEWS:
            out.append(f"num_local: must lie in [0, {MAX_LOCAL_VIEWS}], got {self.num_local}")
        if self.blur_sigma[1] > MAX_BLUR_SIGMA:
            out.append(f"blur_sigma: at most {MAX_BLUR_SIGMA:g} pixels, got {self.blur_sigma}")
        for name in ("global_scale", "local_scale", "ratio", "blur_sigma"):
            lo, hi = getattr(self, name)
            if not 0 < lo <= hi:
                out.append(f"{name}: needs 0 < low <= high, got ({lo}, {hi})")
        for name in ("global_scale", "local_scale"):
            if getattr(self, name)[1] > 1:
                out.append(f"{name}: the area fraction cannot exceed 1, got {getattr(self, name)}")
        b, c, s, h = self.jitter
        if min(b, c, s) < 0 or not 0 <= h <= 0.5:
            out.append(f"jitter: (brightness, contrast, saturation, hue) need values >= 0 and hue <= 0.5 "
                       f"(torchvision's ColorJitter), got {self.jitter}")
        probs = [("flip_p", self.flip_p), ("jitter_p", self.jitter_p), ("grayscale_p", self.grayscale_p)]
        probs += [(f"blur_p[{i}]", p) for i, p in enumerate(self.blur_p)]
        probs += [(f"solarize_p[{i}]", p) for i, p in enumerate(self.solarize_p)]
        out += [f"{n}: a probability must lie in [0, 1], got {p}" for n, p in probs if not 0 <= p <= 1]
        if self.jitter_order not in JITTER_ORDER_MODES:
            out.append(f"jitter_order: choose one of {', '.join(JITTER_ORDER_MODES)}, got {self.jitter_order!r}")
        if any(s <= 0 for s in self.std):
            out.append(f"std: must be positive, got {self.std}")
        return out + interpolation_errors("interpolation", self.interpolation)

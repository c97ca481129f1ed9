"""The fast loaders' photometric steps (numba uint8; DALI's colour steps) equal the float64 tensor ops
within uint8 rounding."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from numba import njit

from pipelines import cpu_augment as ca
from pipelines import device_augment as da
from conftest import requires_dali
from pipelines.augment import JITTER_ORDERS, MultiCropRecipe


def images(n: int = 6, h: int = 23, w: int = 31, seed: int = 0) -> np.ndarray:
    """Random uint8 crops with smooth and noisy parts (odd sizes catch index slips)."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (n, h, w, 3), dtype=np.uint8)
    base[:, : h // 2] = (np.linspace(0, 255, w)[None, None, :, None] * np.ones((n, h // 2, 1, 3))).astype(np.uint8)
    return base


def as_float64(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(x).permute(0, 3, 1, 2).double() / 255


def max_level_error(ours: np.ndarray, reference: torch.Tensor) -> float:
    """Largest difference in uint8 levels between our crops and the float reference."""
    ref = (reference * 255).permute(0, 2, 3, 1).numpy()
    return float(np.abs(ours.astype(np.float64) - ref).max())


def test_flip_and_solarize_are_exact():
    x = images()
    y = x.copy()
    for img in y:
        ca.flip_u8(img)
    np.testing.assert_array_equal(y, x[:, :, ::-1])
    for img in y:
        ca.solarize_u8(img)
    ref = da.solarize(as_float64(x[:, :, ::-1].copy()))
    assert max_level_error(y, ref) <= 1e-9


def test_grayscale_matches_the_tensor_op():
    x = images()
    y = x.copy()
    for img in y:
        ca.grayscale_u8(img)
    assert max_level_error(y, da.grayscale(as_float64(x)).expand(-1, 3, -1, -1)) <= 0.5


@pytest.mark.parametrize("factors", [(1.0, 1.0, 1.0, 0.0), (1.4, 0.6, 1.2, 0.1), (0.6, 1.4, 0.8, -0.1),
                                     (1.0, 1.0, 1.0, 0.5), (0.0, 1.0, 1.0, 0.0)])
def test_colour_jitter_matches_the_tensor_op(factors):
    x = images()
    y = x.copy()
    for img in y:
        ca.jitter_u8(img, *factors)
    n = len(x)
    ref = da.color_jitter(as_float64(x), *(torch.full((n,), f, dtype=torch.float64) for f in factors))
    assert max_level_error(y, ref) <= 0.5 + 1e-3  # one rounding at the end; float32 adds ~1e-4 of a level


def test_colour_jitter_holds_over_many_random_factors():
    """Random factors over the recipe's ranges and beyond, on larger odd-sized crops."""
    rng = np.random.default_rng(1)
    for k in range(12):
        x = images(4, 57, 61, seed=k)
        y = x.copy()
        factors = (rng.uniform(0.0, 2.0), rng.uniform(0.0, 2.0), rng.uniform(0.0, 2.0), rng.uniform(-0.5, 0.5))
        for img in y:
            ca.jitter_u8(img, *factors)
        ref = da.color_jitter(as_float64(x), *(torch.full((4,), f, dtype=torch.float64) for f in factors))
        assert max_level_error(y, ref) <= 0.5 + 1e-3, factors


def test_colour_jitter_in_every_order_matches_the_tensor_op():
    """`jitter_in_order_u8`, each of the 24 orders with random factors (contrast sees the mean luma of
    the steps before it): the float64 tensor op in that order, within the final rounding."""
    rng = np.random.default_rng(2)
    for order in range(len(JITTER_ORDERS)):
        x = images(2, 29, 33, seed=order)
        y = x.copy()
        factors = (rng.uniform(0.0, 2.0), rng.uniform(0.0, 2.0), rng.uniform(0.0, 2.0), rng.uniform(-0.5, 0.5))
        for img in y:
            ca.jitter_in_order_u8(img, *factors, order)
        ref = da.color_jitter(as_float64(x), *(torch.full((2,), f, dtype=torch.float64) for f in factors),
                              order=torch.full((2,), order))
        assert max_level_error(y, ref) <= 0.5 + 1e-3, (order, factors)


@pytest.mark.parametrize("sigma", [0.1, 0.7, 2.0])
def test_blur_matches_the_tensor_op(sigma):
    x = images()
    y = x.copy()
    for img in y:
        ca.blur_u8(img, sigma)
    ref = da.gaussian_blur(as_float64(x), torch.full((len(x),), sigma, dtype=torch.float64))
    assert max_level_error(y, ref) <= 0.5 + 1e-6


def test_the_coins_follow_the_recipe():
    """augment_crop_u8's steps fire at the recipe's rates (binomial, 4.5 sigma)."""
    recipe = MultiCropRecipe(flip_p=0.0, jitter_p=0.0, grayscale_p=0.3, blur_p=(0.0, 0.0, 0.0),
                             solarize_p=(0.0, 0.0, 0.0))
    params = ca.crop_params(recipe, recipe.view(0))
    n, hits = 2000, 0
    for _ in range(n):
        img = np.full((4, 4, 3), (200, 120, 40), np.uint8)
        ca.augment_crop_u8(img, params)
        hits += int(img[0, 0, 0] == img[0, 0, 1])
    assert abs(hits - 0.3 * n) <= 4.5 * np.sqrt(n * 0.3 * 0.7)


def _dali_colour(x: np.ndarray, factors: np.ndarray, gray: np.ndarray, device: str,
                 order: np.ndarray | None = None) -> np.ndarray:
    """`pipelines.dali.jitter_exact` on uint8 crops (N x H x W x 3), per-sample factors (N x 4), gray
    flags and orders (indices into JITTER_ORDERS; None: the fixed order)."""
    from nvidia.dali import fn, pipeline_def, types

    from pipelines.dali import jitter_exact

    def column(values: np.ndarray):  # a source that takes no argument (DALI passes one to those that do)
        return lambda: [np.array(v, dtype=np.float32) for v in values]

    @pipeline_def(batch_size=len(x), num_threads=1, device_id=0 if device == "gpu" else None,
                  enable_conditionals=order is not None)
    def pipe():
        img = fn.external_source(source=lambda: list(x), batch=True, dtype=types.UINT8, layout="HWC")
        b, c, s, h, g = (fn.external_source(source=column(v), batch=True, dtype=types.FLOAT)
                         for v in (*factors.T, gray))
        k = None if order is None else fn.external_source(  # on the CPU, as a conditional's predicate must be
            source=lambda: [np.array(v, dtype=np.int32) for v in order], batch=True, dtype=types.INT32)
        return jitter_exact(img.gpu() if device == "gpu" else img, b, c, s, h, g, k)

    p = pipe()
    p.build()
    (out,) = p.run()
    out = out.as_cpu() if device == "gpu" else out
    return np.stack([np.array(t) for t in out])


DALI_DEVICES = ["cpu", pytest.param("gpu", marks=[pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU (none is visible)")])]


@requires_dali
@pytest.mark.parametrize("device", DALI_DEVICES)
def test_dali_colour_steps_match_the_tensor_op(device):
    """DALI's colour jitter + grayscale are torchvision's: contrast around the image's mean luma and
    an HSV hue shift (DALI's own colour twist pivots on mid-grey and rotates hue in YIQ space)."""
    rng = np.random.default_rng(3)
    x = images(8, 23, 31, seed=3)
    x[0] = 40  # a flat dark crop: DALI's colour twist brightened it at contrast < 1
    x[1, :, :8] = (200, 200, 90)  # ties between the largest channels
    factors = np.stack([rng.uniform(0.0, 2.0, 8), rng.uniform(0.0, 2.0, 8), rng.uniform(0.0, 2.0, 8),
                        rng.uniform(-0.5, 0.5, 8)], axis=1)
    factors[0] = (1.0, 0.6, 1.0, 0.0)
    factors[2] = (1.0, 1.0, 1.0, 0.0)  # identity factors: a sample that drew only grayscale
    gray = np.array([0, 0, 1, 0, 1, 0, 0, 1], dtype=np.float32)
    ours = _dali_colour(x, factors, gray, device)
    ref = da.color_jitter(as_float64(x), *torch.from_numpy(factors).T)
    ref = torch.where(torch.from_numpy(gray).bool().view(-1, 1, 1, 1), da.grayscale(ref).expand(-1, 3, -1, -1), ref)
    assert max_level_error(ours, ref) <= 0.5 + 1e-3  # float32, one rounding at the end
    np.testing.assert_array_equal(ours[0], 40)  # a flat crop keeps its mean whatever the contrast


@requires_dali
@pytest.mark.parametrize("device", DALI_DEVICES)
def test_dali_colour_steps_in_every_order_match_the_tensor_op(device):
    """DALI's graph with a drawn order per sample (each position's step under conditionals): every one
    of the 24 orders, with random factors, is the float64 tensor op in that order."""
    rng = np.random.default_rng(5)
    n = len(JITTER_ORDERS)
    x = images(n, 19, 23, seed=5)
    factors = np.stack([rng.uniform(0.0, 2.0, n), rng.uniform(0.0, 2.0, n), rng.uniform(0.0, 2.0, n),
                        rng.uniform(-0.5, 0.5, n)], axis=1)
    order = rng.permutation(n)
    gray = (np.arange(n) % 5 == 0).astype(np.float32)
    ours = _dali_colour(x, factors, gray, device, order)
    ref = da.color_jitter(as_float64(x), *torch.from_numpy(factors).T, order=torch.from_numpy(order))
    ref = torch.where(torch.from_numpy(gray).bool().view(-1, 1, 1, 1), da.grayscale(ref).expand(-1, 3, -1, -1), ref)
    assert max_level_error(ours, ref) <= 0.5 + 1e-3


@njit
def _seed_numba(seed: int) -> None:
    np.random.seed(seed)  # numba's generator of this thread (augment_crop_u8 draws from it)


def _levels_ks_distance(levels, level_of, lo: float, hi: float) -> float:
    """A lower bound on the KS distance between hidden draws theta_i and U(lo, hi), seen only through
    integer levels y_i = level_of(theta_i), level_of non-decreasing: for x on a grid over [lo, hi],
    #{y_i < level_of(x)} <= #{theta_i <= x} <= #{y_i <= level_of(x)}, so whatever the rounding hid,
    max(F(x) - upper, lower - F(x)) is at most sup |F_n - F| (the same DKW bound applies)."""
    levels, n = np.sort(np.asarray(levels)), len(levels)
    x = np.linspace(lo, hi, 4001)
    at_x = level_of(x)
    lower = np.searchsorted(levels, at_x, side="left") / n
    upper = np.searchsorted(levels, at_x, side="right") / n
    cdf = (x - lo) / (hi - lo)
    return float(max((cdf - upper).max(), (lower - cdf).max()))


def _round(v):
    return np.floor(v + 0.5)  # uint8 rounding of a value in [0, 255]


def test_augment_crop_draws_every_parameter_over_the_recipe_range():
    """The draws, seen through crafted crops whose output level is a closed-form monotone function of the
    one drawn parameter (float64), are U(1 -+ b), U(1 -+ c), U(1 -+ s), U(-h, h), U(0.1, 2) with the
    authors' (b, c, s, h) = (0.4, 0.4, 0.2, 0.1) (NOTES): KS distance under the DKW bound at 1e-4.

    One step at a time, the others at identity: brightness on flat grey 180; contrast on a 38 / 218 grey
    split (mean luma 128 x 0.9999, the sum of the luma weights); saturation on (200, 20, 20); hue on pure
    red (G - B = 1530 h); blur on a one-pixel line (centre 255 k_0, window 2 ceil(3 sigma) + 1). float32
    may move an output at a rounding edge by one level: a few of 2000 samples, ~1e-3 of a distance whose
    bound is 0.05."""
    b, c, s, h = 0.4, 0.4, 0.2, 0.1
    gray = np.array([0.2989, 0.587, 0.114])
    split = np.full((4, 4, 3), 38, np.uint8)
    split[2:] = 218
    line = np.zeros((16, 16, 3), np.uint8)
    line[:, 8] = 255

    def centre_level(sigma):
        radius = np.maximum(1, np.ceil(3 * sigma))
        taps = np.arange(-6, 7)[None, :]
        weights = np.where(np.abs(taps) <= radius[:, None], np.exp(-0.5 * (taps / sigma[:, None]) ** 2), 0.0)
        return 255 - _round(255 / weights.sum(axis=1))  # non-decreasing in sigma

    mean = gray.sum() * 128 / 255
    luma = gray @ np.array([200, 20, 20]) / 255
    cases = {  # name: (jitter, image, observed level, its closed form, range)
        "brightness": ((b, 0, 0, 0), np.full((4, 4, 3), 180, np.uint8), lambda y: y[0, 0, 0],
                       lambda f: _round(180 * f), (1 - b, 1 + b)),
        "contrast": ((0, c, 0, 0), split, lambda y: y[3, 3, 0],
                     lambda f: _round(255 * (mean + (218 / 255 - mean) * f)), (1 - c, 1 + c)),
        "saturation": ((0, 0, s, 0), np.full((4, 4, 3), (200, 20, 20), np.uint8), lambda y: y[0, 0, 0],
                       lambda f: _round(255 * (luma + (200 / 255 - luma) * f)), (1 - s, 1 + s)),
        "hue": ((0, 0, 0, h), np.full((4, 4, 3), (255, 0, 0), np.uint8),
                lambda y: int(y[0, 0, 1]) - int(y[0, 0, 2]), lambda f: np.sign(f) * _round(1530 * np.abs(f)), (-h, h)),
        "sigma": ((0, 0, 0, 0), line, lambda y: 255 - int(y[0, 8, 0]), centre_level, (0.1, 2.0)),
    }
    n = 2000
    bound = math.sqrt(math.log(2 / 1e-4) / (2 * n))  # DKW (Massart): P(sup |F_n - F| > bound) <= 1e-4
    for name, (jitter, image, observe, level_of, (lo, hi)) in cases.items():
        recipe = MultiCropRecipe(flip_p=0.0, jitter=jitter, jitter_p=float(name != "sigma"), grayscale_p=0.0,
                                 blur_p=(float(name == "sigma"),) * 3, solarize_p=(0.0, 0.0, 0.0))
        params = ca.crop_params(recipe, recipe.view(0))
        _seed_numba(0)
        levels = []
        for _ in range(n):
            img = image.copy()
            ca.augment_crop_u8(img, params)
            levels.append(observe(img))
        assert _levels_ks_distance(levels, level_of, lo, hi) < bound, name

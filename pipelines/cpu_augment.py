"""The recipe's photometric steps on ONE uint8 crop, compiled with numba, for CPU training.

Why: when the training device is the CPU, the batched float32 tensor ops of
`pipelines.device_augment` run in the main process, on the same cores as the model and
serially after the loader (they capped the FFCV loader at about the PIL reference's
speed on 2 cores). Here the same steps run per crop inside FFCV's numba decode stage,
right after the crop is cut: on uint8 pixels (as PIL's ops), in the loader's threads
(which release the GIL), and a step a sample did not draw costs nothing.

Definitions are those of `pipelines.device_augment` (torchvision's tensor ops): colour
jitter as brightness, contrast, saturation, hue in that order; grayscale with
torchvision's weights; Gaussian blur with sigma ~ U(blur_sigma), a window of
2 * ceil(3 sigma) + 1 and reflected borders; solarize at 128. Each step rounds back to
uint8 at its end (PIL does the same between steps); `tests/test_cpu_augment.py` holds
each one to the float64 tensor version within that rounding.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

GRAY_R, GRAY_G, GRAY_B = 0.2989, 0.587, 0.114  # torchvision's rgb_to_grayscale


@njit(cache=True, nogil=True)
def _to_u8(x: float) -> np.uint8:
    """[0, 1] float -> uint8, rounded to nearest and clamped."""
    v = x * 255.0 + 0.5
    if v < 0.0:
        v = 0.0
    elif v > 255.0:
        v = 255.0
    return np.uint8(v)


@njit(cache=True, nogil=True)
def _clamp01(x: float) -> float:
    return min(max(x, 0.0), 1.0)


@njit(cache=True, nogil=True)
def flip_u8(img: np.ndarray) -> None:
    """Mirror an H x W x 3 crop left-right, in place."""
    h, w = img.shape[0], img.shape[1]
    for y in range(h):
        for x in range(w // 2):
            for c in range(3):
                t = img[y, x, c]
                img[y, x, c] = img[y, w - 1 - x, c]
                img[y, w - 1 - x, c] = t


@njit(cache=True, nogil=True, fastmath=True)
def _wrap01(x: float) -> float:
    """x mod 1 for x in [-1, 2): a compare instead of a floating-point remainder."""
    if x < 0.0:
        return x + 1.0
    if x >= 1.0:
        return x - 1.0
    return x


@njit(cache=True, nogil=True, fastmath=True)
def _hsv_channel(n: float, h: float, s: float, v: float) -> float:
    """One RGB channel of (h, s, v): v - v s clamp(min(k, 4 - k), 0, 1), k = (n + 6 h) mod 6."""
    k = n + 6.0 * h
    if k >= 6.0:
        k -= 6.0
    return v - v * s * min(max(min(k, 4.0 - k), 0.0), 1.0)


@njit(cache=True, nogil=True, fastmath=True)
def _hue_shift(r: float, g: float, b: float, shift: float) -> tuple[float, float, float]:
    """RGB -> HSV (torchvision's formulas), h += shift mod 1, -> RGB (closed form)."""
    maxc = max(r, max(g, b))
    minc = min(r, min(g, b))
    delta = maxc - minc
    if delta <= 0.0:
        return r, g, b  # gray pixels have no hue: unchanged
    s = delta / maxc
    if maxc == r:
        h = (g - b) / delta  # = bc - gc
    elif maxc == g:
        h = 2.0 + (b - r) / delta  # = 2 + rc - bc
    else:
        h = 4.0 + (r - g) / delta  # = 4 + gc - rc
    h = _wrap01(_wrap01(h / 6.0) + shift)
    return _hsv_channel(5.0, h, s, maxc), _hsv_channel(3.0, h, s, maxc), _hsv_channel(1.0, h, s, maxc)


@njit(cache=True, nogil=True, fastmath=True)
def jitter_u8(img: np.ndarray, brightness: float, contrast: float, saturation: float, hue: float) -> None:
    """torchvision's ColorJitter with these factors, in place on an H x W x 3 uint8 crop.

    Brightness and then contrast map each channel value through the same curve, so they are
    256-entry tables; contrast needs the mean luma after brightness, a first pass over the
    pixels. Saturation and hue are per pixel.
    """
    h, w = img.shape[0], img.shape[1]
    bright = np.empty(256)
    for v in range(256):
        bright[v] = _clamp01(v / 255.0 * brightness)
    flat = img.reshape(h * w, 3)
    total = 0.0
    for p in range(h * w):
        total += GRAY_R * bright[flat[p, 0]] + GRAY_G * bright[flat[p, 1]] + GRAY_B * bright[flat[p, 2]]
    mean = total / (h * w)
    curve = np.empty(256)
    for v in range(256):
        curve[v] = _clamp01(mean + (bright[v] - mean) * contrast)
    for p in range(h * w):
        r, g, b = curve[flat[p, 0]], curve[flat[p, 1]], curve[flat[p, 2]]
        gray = GRAY_R * r + GRAY_G * g + GRAY_B * b
        r = _clamp01(gray + (r - gray) * saturation)
        g = _clamp01(gray + (g - gray) * saturation)
        b = _clamp01(gray + (b - gray) * saturation)
        r, g, b = _hue_shift(r, g, b, hue)
        flat[p, 0], flat[p, 1], flat[p, 2] = _to_u8(r), _to_u8(g), _to_u8(b)


@njit(cache=True, nogil=True)
def grayscale_u8(img: np.ndarray) -> None:
    """Luma with torchvision's weights into all three channels, in place."""
    for y in range(img.shape[0]):
        for x in range(img.shape[1]):
            v = (GRAY_R * img[y, x, 0] + GRAY_G * img[y, x, 1] + GRAY_B * img[y, x, 2]) / 255.0
            u = _to_u8(v)
            img[y, x, 0], img[y, x, 1], img[y, x, 2] = u, u, u


@njit(cache=True, nogil=True)
def _reflect(i: int, n: int) -> int:
    """Index into 0..n-1 mirrored at the borders without repeating the edge (torch 'reflect')."""
    if i < 0:
        return -i
    if i >= n:
        return 2 * (n - 1) - i
    return i


@njit(cache=True, nogil=True, fastmath=True)
def blur_u8(img: np.ndarray, sigma: float) -> None:
    """Separable Gaussian blur (window 2 * ceil(3 sigma) + 1, reflected borders), in place.

    Both passes are sums of shifted contiguous rows (one multiply-add per tap over a whole
    row of w * 3 values), which the compiler vectorises: the borders are handled once per
    row by copying the reflected pixels into a padded row.
    """
    h, w = img.shape[0], img.shape[1]
    radius = max(1, int(math.ceil(3.0 * sigma)))
    radius = min(radius, min(h, w) - 1)
    taps = np.empty(2 * radius + 1, dtype=np.float32)
    for t in range(-radius, radius + 1):
        taps[t + radius] = math.exp(-0.5 * (t / sigma) ** 2)
    taps /= taps.sum()
    flat = img.reshape(h, w * 3)
    rows = np.empty((h, w * 3), dtype=np.float32)
    padded = np.empty((w + 2 * radius) * 3, dtype=np.float32)
    for y in range(h):  # horizontal pass: padded row, then shifted sums
        for x in range(-radius, w + radius):
            src = _reflect(x, w) * 3
            for c in range(3):
                padded[(x + radius) * 3 + c] = flat[y, src + c]
        acc = rows[y]
        acc[:] = 0.0
        for t in range(2 * radius + 1):
            k = taps[t]
            for i in range(w * 3):
                acc[i] += k * padded[t * 3 + i]
    line = np.empty(w * 3, dtype=np.float32)
    for y in range(h):  # vertical pass: shifted sums of whole rows, back into the crop
        line[:] = 0.0
        for t in range(-radius, radius + 1):
            k = taps[t + radius]
            src = rows[_reflect(y + t, h)]
            for i in range(w * 3):
                line[i] += k * src[i]
        for i in range(w * 3):
            v = line[i] + np.float32(0.5)
            flat[y, i] = np.uint8(min(max(v, np.float32(0.0)), np.float32(255.0)))


@njit(cache=True, nogil=True)
def solarize_u8(img: np.ndarray) -> None:
    """Invert every value >= 128 (the tensor op's threshold 128 / 255), in place."""
    flat = img.reshape(-1)
    for i in range(flat.size):
        v = flat[i]
        flat[i] = 255 - v if v >= 128 else v


@njit(cache=True, nogil=True)
def augment_crop_u8(img: np.ndarray, params: np.ndarray) -> None:
    """Every photometric step of one view on one crop, each drawn with its own coin, in place.

    `params` (float64, see `crop_params`): flip_p, jitter_p, brightness, contrast,
    saturation, hue, grayscale_p, blur_p, sigma_lo, sigma_hi, solarize_p. Order as the
    torchvision reference: flip, jitter, grayscale, blur, solarize. Random numbers come from
    numba's generator, independent per thread (as FFCV's own random crops).
    """
    if np.random.random() < params[0]:
        flip_u8(img)
    if np.random.random() < params[1]:
        b, c, s, hu = params[2], params[3], params[4], params[5]
        jitter_u8(img, np.random.uniform(max(0.0, 1 - b), 1 + b), np.random.uniform(max(0.0, 1 - c), 1 + c),
                  np.random.uniform(max(0.0, 1 - s), 1 + s), np.random.uniform(-hu, hu))
    if np.random.random() < params[6]:
        grayscale_u8(img)
    if np.random.random() < params[7]:
        blur_u8(img, np.random.uniform(params[8], params[9]))
    if np.random.random() < params[10]:
        solarize_u8(img)


def crop_params(recipe, view) -> np.ndarray:
    """The float64 parameter row `augment_crop_u8` reads for one view of the recipe."""
    b, c, s, h = recipe.jitter
    return np.array([recipe.flip_p, recipe.jitter_p, b, c, s, h, recipe.grayscale_p, view.blur_p,
                     recipe.blur_sigma[0], recipe.blur_sigma[1], view.solarize_p], dtype=np.float64)

"""The recipe's photometric steps on ONE uint8 crop, compiled with numba, for CPU training.

Why: when the training device is the CPU, the batched float32 tensor ops of
`pipelines.device_augment` run in the main process, on the same cores as the model and
serially after the loader (they capped the FFCV loader at about the PIL reference's
speed on 2 cores). Here the same steps run per crop inside FFCV's numba decode stage,
right after the crop is cut: on uint8 pixels (as PIL's ops), in the loader's threads
(which release the GIL), and a step a sample did not draw costs nothing.

Definitions are those of `pipelines.device_augment` (torchvision's tensor ops): colour
jitter as brightness, contrast, saturation, hue in the drawn order (`JITTER_ORDERS`); grayscale with
torchvision's weights; Gaussian blur with sigma ~ U(blur_sigma), a window of
2 * ceil(3 sigma) + 1 and reflected borders; solarize at 128. Each step rounds back to
uint8 at its end (PIL does the same between steps); `tests/test_cpu_augment.py` holds
each one to the float64 tensor version within that rounding.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

from pipelines.augment import JITTER_ORDERS, MultiCropRecipe, ViewSpec

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


JITTER_CHUNK = 1024  # pixels per pass of the vectorised colour loop (3 x 4 KiB of float32: stays in L1)


@njit(cache=True, nogil=True, fastmath=True)
def _brighten(r: np.ndarray, g: np.ndarray, b: np.ndarray, brightness: np.float32) -> None:
    """Brightness on planar float32 channels in [0, 1], in place."""
    zero, one = np.float32(0.0), np.float32(1.0)
    for i in range(r.shape[0]):
        r[i] = min(max(r[i] * brightness, zero), one)
        g[i] = min(max(g[i] * brightness, zero), one)
        b[i] = min(max(b[i] * brightness, zero), one)


@njit(cache=True, nogil=True, fastmath=True)
def _contrast(r: np.ndarray, g: np.ndarray, b: np.ndarray, contrast: np.float32) -> None:
    """Contrast around the mean luma of the whole image (every pixel of r, g, b), in place."""
    total = 0.0
    for i in range(r.shape[0]):
        total += GRAY_R * r[i] + GRAY_G * g[i] + GRAY_B * b[i]
    mean = np.float32(total / max(r.shape[0], 1))
    zero, one = np.float32(0.0), np.float32(1.0)
    for i in range(r.shape[0]):
        r[i] = min(max(mean + (r[i] - mean) * contrast, zero), one)
        g[i] = min(max(mean + (g[i] - mean) * contrast, zero), one)
        b[i] = min(max(mean + (b[i] - mean) * contrast, zero), one)


@njit(cache=True, nogil=True, fastmath=True)
def _saturate(r: np.ndarray, g: np.ndarray, b: np.ndarray, saturation: np.float32) -> None:
    """Saturation (a blend with each pixel's luma) on planar float32 channels in [0, 1], in place."""
    zero, one = np.float32(0.0), np.float32(1.0)
    wr, wg, wb = np.float32(GRAY_R), np.float32(GRAY_G), np.float32(GRAY_B)
    for i in range(r.shape[0]):
        gray = wr * r[i] + wg * g[i] + wb * b[i]
        r[i] = min(max(gray + (r[i] - gray) * saturation, zero), one)
        g[i] = min(max(gray + (g[i] - gray) * saturation, zero), one)
        b[i] = min(max(gray + (b[i] - gray) * saturation, zero), one)


@njit(cache=True, nogil=True, fastmath=True)
def _shift_hue(r: np.ndarray, g: np.ndarray, b: np.ndarray, shift6: np.float32) -> None:
    """torchvision's HSV hue shift by `shift6` sixths of the wheel, on planar float32 channels, in place.

    Branch-free (selects only) so that the compiler vectorises it. In closed form: HSV keeps
    the max v and the chroma c = v - min of a pixel, only the hue h (here in sixths of the
    wheel, h6 = 6 h) moves, and channel n of (h6, v, c) is v - c clamp(min(k, 4 - k), 0, 1)
    with k = (n + h6) mod 6 (n = 5, 3, 1 for R, G, B). A gray pixel (c = 0) comes out
    unchanged whatever its hue.
    """
    zero, one, six = np.float32(0.0), np.float32(1.0), np.float32(6.0)
    for i in range(r.shape[0]):
        red, green, blue = r[i], g[i], b[i]
        v = max(red, max(green, blue))
        chroma = v - min(red, min(green, blue))
        inv = one / (chroma if chroma > zero else one)
        h6 = (green - blue) * inv if v == red else (
            np.float32(2.0) + (blue - red) * inv if v == green else np.float32(4.0) + (red - green) * inv)
        h6 = h6 + shift6  # in [-4, 8) for |shift| <= 1/2
        h6 = h6 + six if h6 < zero else h6
        h6 = h6 - six if h6 >= six else h6
        k = np.float32(5.0) + h6
        k = k - six if k >= six else k
        r[i] = v - chroma * min(max(min(k, np.float32(4.0) - k), zero), one)
        k = np.float32(3.0) + h6
        k = k - six if k >= six else k
        g[i] = v - chroma * min(max(min(k, np.float32(4.0) - k), zero), one)
        k = np.float32(1.0) + h6
        k = k - six if k >= six else k
        b[i] = v - chroma * min(max(min(k, np.float32(4.0) - k), zero), one)


@njit(cache=True, nogil=True, fastmath=True)
def jitter_u8(img: np.ndarray, brightness: float, contrast: float, saturation: float, hue: float) -> None:
    """torchvision's ColorJitter with these factors, in place on an H x W x 3 uint8 crop.

    Brightness and then contrast map each channel value through the same curve, so they are
    256-entry tables; contrast needs the mean luma after brightness, which a per-channel
    histogram gives in one cheap pass. Saturation and hue run per pixel in float32 on planar
    chunks (vectorised; float32 moves a result by ~1e-4 of a level before the final rounding).
    """
    h, w = img.shape[0], img.shape[1]
    n = h * w
    flat = img.reshape(n * 3)
    hist = np.zeros((3, 256), dtype=np.int64)
    for p in range(n):
        hist[0, flat[3 * p]] += 1
        hist[1, flat[3 * p + 1]] += 1
        hist[2, flat[3 * p + 2]] += 1
    bright = np.empty(256)
    total = 0.0
    for v in range(256):
        bright[v] = _clamp01(v / 255.0 * brightness)
        total += bright[v] * (GRAY_R * hist[0, v] + GRAY_G * hist[1, v] + GRAY_B * hist[2, v])
    mean = total / n
    curve = np.empty(256, dtype=np.float32)
    for v in range(256):
        curve[v] = _clamp01(mean + (bright[v] - mean) * contrast)
    red = np.empty(JITTER_CHUNK, dtype=np.float32)
    green = np.empty(JITTER_CHUNK, dtype=np.float32)
    blue = np.empty(JITTER_CHUNK, dtype=np.float32)
    for start in range(0, n, JITTER_CHUNK):
        m = min(JITTER_CHUNK, n - start)
        base = 3 * start
        for i in range(m):
            red[i], green[i], blue[i] = curve[flat[base + 3 * i]], curve[flat[base + 3 * i + 1]], curve[flat[base + 3 * i + 2]]
        _saturate(red[:m], green[:m], blue[:m], np.float32(saturation))
        _shift_hue(red[:m], green[:m], blue[:m], np.float32(6.0 * hue))
        for i in range(m):  # values are in [0, 1]: + 0.5 and truncation round to nearest
            flat[base + 3 * i] = np.uint8(red[i] * np.float32(255.0) + np.float32(0.5))
            flat[base + 3 * i + 1] = np.uint8(green[i] * np.float32(255.0) + np.float32(0.5))
            flat[base + 3 * i + 2] = np.uint8(blue[i] * np.float32(255.0) + np.float32(0.5))


ORDERS = np.array(JITTER_ORDERS, dtype=np.int64)  # row k: the jitter's steps in order k (0 = fixed)


@njit(cache=True, nogil=True)
def jitter_in_order_u8(img: np.ndarray, brightness: float, contrast: float, saturation: float, hue: float,
                       order: int) -> None:
    """torchvision's ColorJitter with these factors and its steps in `JITTER_ORDERS[order]`, in
    place on an H x W x 3 uint8 crop. Order 0 (brightness, contrast, saturation, hue) takes
    `jitter_u8`'s table path; any other runs each step over the whole crop in planar float32
    (contrast needs the mean luma of what the steps before it made)."""
    if order == 0:
        jitter_u8(img, brightness, contrast, saturation, hue)
        return
    n = img.shape[0] * img.shape[1]
    flat = img.reshape(n * 3)
    red = np.empty(n, dtype=np.float32)
    green = np.empty(n, dtype=np.float32)
    blue = np.empty(n, dtype=np.float32)
    scale = np.float32(1.0 / 255.0)
    for i in range(n):
        red[i], green[i], blue[i] = flat[3 * i] * scale, flat[3 * i + 1] * scale, flat[3 * i + 2] * scale
    for position in range(4):
        step = ORDERS[order, position]
        if step == 0:
            _brighten(red, green, blue, np.float32(brightness))
        elif step == 1:
            _contrast(red, green, blue, np.float32(contrast))
        elif step == 2:
            _saturate(red, green, blue, np.float32(saturation))
        else:
            _shift_hue(red, green, blue, np.float32(6.0 * hue))
    for i in range(n):  # values are in [0, 1]: + 0.5 and truncation round to nearest
        flat[3 * i] = np.uint8(red[i] * np.float32(255.0) + np.float32(0.5))
        flat[3 * i + 1] = np.uint8(green[i] * np.float32(255.0) + np.float32(0.5))
        flat[3 * i + 2] = np.uint8(blue[i] * np.float32(255.0) + np.float32(0.5))


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


# A drawn row (`apply_drawn_u8`): what one sample drew for one view. Flags are 0 or 1.
DRAWN_JITTER, DRAWN_BRIGHTNESS, DRAWN_CONTRAST, DRAWN_SATURATION, DRAWN_HUE = 0, 1, 2, 3, 4
DRAWN_GRAYSCALE, DRAWN_BLUR, DRAWN_SIGMA, DRAWN_SOLARIZE, DRAWN_ORDER = 5, 6, 7, 8, 9  # order: of JITTER_ORDERS
NUM_DRAWN = 10


@njit(cache=True, nogil=True)
def apply_drawn_u8(img: np.ndarray, drawn: np.ndarray) -> None:
    """The photometric steps one sample drew, in the reference's order, in place.

    Order as torchvision's: jitter (its steps in the drawn order), grayscale, blur, solarize. A step whose flag is 0 is
    not run at all. Shared by FFCV's decoder (`augment_crop_u8` draws with numba's
    generator) and DALI's CPU mode (`pipelines.dali_photometric` draws with DALI's).
    """
    if drawn[DRAWN_JITTER] > 0.5:
        jitter_in_order_u8(img, drawn[DRAWN_BRIGHTNESS], drawn[DRAWN_CONTRAST], drawn[DRAWN_SATURATION],
                           drawn[DRAWN_HUE], int(drawn[DRAWN_ORDER]))
    if drawn[DRAWN_GRAYSCALE] > 0.5:
        grayscale_u8(img)
    if drawn[DRAWN_BLUR] > 0.5:
        blur_u8(img, drawn[DRAWN_SIGMA])
    if drawn[DRAWN_SOLARIZE] > 0.5:
        solarize_u8(img)


@njit(cache=True, nogil=True)
def _flag(p: float) -> float:
    return 1.0 if np.random.random() < p else 0.0


@njit(cache=True, nogil=True)
def augment_crop_u8(img: np.ndarray, params: np.ndarray) -> None:
    """Every photometric step of one view on one crop, each drawn with its own coin, in place.

    `params` (float64, see `crop_params`): flip_p, jitter_p, brightness, contrast,
    saturation, hue, grayscale_p, blur_p, sigma_lo, sigma_hi, solarize_p, number of jitter
    orders (24, or 1 for the fixed order). The flip comes
    first (it commutes with the rest), then `apply_drawn_u8`. Random numbers come from
    numba's generator of the calling thread, which FFCV's decoder reseeds before each
    image (`pipelines.ffcv.image_seed`), as for its crop boxes.
    """
    if np.random.random() < params[0]:
        flip_u8(img)
    b, c, s, hu = params[2], params[3], params[4], params[5]
    drawn = np.zeros(NUM_DRAWN)
    drawn[DRAWN_JITTER] = _flag(params[1])
    drawn[DRAWN_BRIGHTNESS] = np.random.uniform(max(0.0, 1 - b), 1 + b)
    drawn[DRAWN_CONTRAST] = np.random.uniform(max(0.0, 1 - c), 1 + c)
    drawn[DRAWN_SATURATION] = np.random.uniform(max(0.0, 1 - s), 1 + s)
    drawn[DRAWN_HUE] = np.random.uniform(-hu, hu)
    drawn[DRAWN_GRAYSCALE] = _flag(params[6])
    drawn[DRAWN_BLUR] = _flag(params[7])
    drawn[DRAWN_SIGMA] = np.random.uniform(params[8], params[9])
    drawn[DRAWN_SOLARIZE] = _flag(params[10])
    drawn[DRAWN_ORDER] = np.random.randint(0, int(params[11]))
    apply_drawn_u8(img, drawn)


def crop_params(recipe: MultiCropRecipe, view: ViewSpec) -> np.ndarray:
    """The float64 parameter row `augment_crop_u8` reads for one view of the recipe."""
    b, c, s, h = recipe.jitter
    return np.array([recipe.flip_p, recipe.jitter_p, b, c, s, h, recipe.grayscale_p, view.blur_p,
                     recipe.blur_sigma[0], recipe.blur_sigma[1], view.solarize_p, recipe.num_jitter_orders],
                    dtype=np.float64)

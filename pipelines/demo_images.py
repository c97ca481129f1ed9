"""The demo dataset's images: one class per (shape, texture) pair, drawn on a random background.

Why a synthetic dataset: the CPU demo must run anywhere, offline, in minutes,
and still show that self-supervised pretraining learns something a randomly
initialised network does not already know.  So the classes are defined by
SHAPE and TEXTURE only, while everything a lazy feature could latch onto is
randomised identically for every class:

* foreground, second-texture and background colours are drawn independently
  per image from ONE distribution (random hue, saturation, brightness), so
  mean colour carries no label information;
* position, scale and rotation of the object are random, so a representation
  has to survive random crops;
* the background has low-frequency colour noise and there is pixel noise.

The object is large and central and the background carries no clutter: with only
2,500 images, anything instance-specific in the background (strokes, blobs) is an
easier cue for self-supervision to cluster on than the object, and a few CPU
minutes of MIRA then learn the clutter, not the classes (a trained k-NN no better
than the randomly initialised network's).

A class is a (shape, texture) pair. With the default 10 classes each class has its
own shape AND its own texture (redundant cues, as real categories have), and the
texture's period range differs between classes: when textures are shared among
classes, so that neither attribute alone names the class, a few CPU minutes of MIRA
learn colour invariance but little class structure. Beyond 10 classes, shapes and
textures are reused in a Latin square, so every prefix still spreads them evenly.

Like the rest of `pipelines`, it imports nothing from `fastssl`.
"""

from __future__ import annotations

import colorsys
from functools import lru_cache
from io import BytesIO

import numpy as np
from PIL import Image

#: Bump when the rendering changes: manifests of other versions do not match.
GENERATOR_VERSION = 3
JPEG_QUALITY = 92
SUPERSAMPLE = 2  # render masks/textures at 2x and box-filter: anti-aliasing
SHAPES: tuple[str, ...] = (
    "disc", "square", "triangle", "star", "plus", "ring", "crescent", "bar", "hexagon", "semicircle",
)
TEXTURES: tuple[str, ...] = (
    "smooth", "stripes", "dots", "checker", "coarse_stripes", "grid", "rings", "waves", "big_dots", "diamonds",
)
MAX_CLASSES = len(SHAPES) * len(TEXTURES)


def class_specs(num_classes: int) -> list[tuple[str, str]]:
    """(shape, texture) of each class, in label order.

    Latin-square enumeration: class i gets shape i % S and texture
    (i // S + i % S) % T.  With S = T = 10 the first 10 classes pair shape i
    with texture i; every prefix spreads shapes and textures evenly.
    """
    if not 2 <= num_classes <= MAX_CLASSES:
        raise ValueError(f"num_classes must be in [2, {MAX_CLASSES}], got {num_classes}")
    s, t = len(SHAPES), len(TEXTURES)
    return [(SHAPES[i % s], TEXTURES[(i // s + i % s) % t]) for i in range(num_classes)]


def class_names(num_classes: int) -> list[str]:
    """Folder names; zero-padded index first so sorted order == label order."""
    return [f"{i:02d}_{shape}_{tex}" for i, (shape, tex) in enumerate(class_specs(num_classes))]


def _random_colour(rng: np.random.Generator) -> np.ndarray:
    """One RGB colour in [0, 1] from the single, class-independent distribution."""
    h = rng.random()
    s = rng.uniform(0.15, 1.0)
    v = rng.uniform(0.2, 1.0)
    return np.array(colorsys.hsv_to_rgb(h, s, v), dtype=np.float64)


def _contrasting_colour(rng: np.random.Generator, other: np.ndarray, min_dist: float = 0.3) -> np.ndarray:
    """A colour visibly different from ``other`` (else the object is invisible).

    Rejection sampling from the same distribution keeps it symmetric across
    classes; the attempt cap keeps generation time bounded.
    """
    colour = _random_colour(rng)
    for _ in range(50):
        if np.linalg.norm(colour - other) >= min_dist:
            break
        colour = _random_colour(rng)
    return colour


def _polygon_mask(u: np.ndarray, v: np.ndarray, verts: np.ndarray) -> np.ndarray:
    """Even-odd point-in-polygon test, vectorised over pixels."""
    inside = np.zeros(u.shape, dtype=bool)
    n = len(verts)
    for i in range(n):
        x0, y0 = verts[i]
        x1, y1 = verts[(i + 1) % n]
        crosses = (y0 > v) != (y1 > v)
        with np.errstate(divide="ignore", invalid="ignore"):
            x_at = x0 + (v - y0) * (x1 - x0) / (y1 - y0)
        inside ^= crosses & (u < x_at)
    return inside


def _regular_polygon(n: int, radius: float) -> np.ndarray:
    """Vertices of a regular n-gon of circumradius ``radius``, one vertex straight up."""
    ang = np.pi / 2 + 2 * np.pi * np.arange(n) / n
    return radius * np.stack([np.cos(ang), np.sin(ang)], axis=1)


def _star_polygon(points: int, outer: float, inner: float) -> np.ndarray:
    """Vertices of a star, alternating outer and inner radius, the first point straight up."""
    ang = np.pi / 2 + np.pi * np.arange(2 * points) / points
    rad = np.where(np.arange(2 * points) % 2 == 0, outer, inner)
    return np.stack([rad * np.cos(ang), rad * np.sin(ang)], axis=1)


def shape_mask(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Boolean mask of ``shape`` in object coordinates (radius ~1).

    Sizes are chosen so that areas are roughly comparable (about 1.6-2.3),
    so the foreground fraction is a weak cue at best.
    """
    r2 = u * u + v * v
    if shape == "disc":
        return r2 <= 0.85**2
    if shape == "square":
        return np.maximum(np.abs(u), np.abs(v)) <= 0.75
    if shape == "triangle":
        return _polygon_mask(u, v, _regular_polygon(3, 1.2))
    if shape == "star":
        return _polygon_mask(u, v, _star_polygon(5, 1.2, 0.5))
    if shape == "plus":
        au, av = np.abs(u), np.abs(v)
        return (np.maximum(au, av) <= 1.0) & (np.minimum(au, av) <= 0.3)
    if shape == "ring":
        return (r2 <= 0.95**2) & (r2 >= 0.55**2)
    if shape == "crescent":
        return (r2 <= 0.95**2) & ((u - 0.45) ** 2 + v * v >= 0.8**2)
    if shape == "bar":
        return (np.abs(u) <= 1.1) & (np.abs(v) <= 0.4)
    if shape == "hexagon":
        return _polygon_mask(u, v, _regular_polygon(6, 0.85))
    if shape == "semicircle":
        return (r2 <= 1.05**2) & (v >= -0.2)
    raise ValueError(f"unknown shape {shape!r}")


def _dot_lattice(a: np.ndarray, b: np.ndarray, rng: np.random.Generator, spacing: tuple[float, float],
                 radius_frac: tuple[float, float]) -> np.ndarray:
    """Discs on a square lattice in the rotated frame (a, b); spacing and radius drawn per image."""
    step = rng.uniform(*spacing)
    radius = step * rng.uniform(*radius_frac)
    da = np.mod(a, step) - step / 2
    db = np.mod(b, step) - step / 2
    return da * da + db * db <= radius * radius


def texture_mask(texture: str, x: np.ndarray, y: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Where the second colour goes (bool); pixel coordinates, random frame.

    Period, angle and phase are random per image so that texture is a
    category ("striped"), not a fixed template a random filter could match.
    """
    phi = rng.uniform(0, np.pi)
    c, s = np.float32(np.cos(phi)), np.float32(np.sin(phi))
    a = x * c + y * s + np.float32(rng.uniform(0, 100))
    b = y * c - x * s + np.float32(rng.uniform(0, 100))
    if texture == "smooth":
        return np.zeros(x.shape, dtype=bool)
    if texture == "stripes":
        period = rng.uniform(5.0, 10.0)
        return np.mod(a, period) < period / 2
    if texture == "dots":
        return _dot_lattice(a, b, rng, spacing=(6.0, 10.0), radius_frac=(0.25, 0.35))
    if texture == "checker":
        cell = rng.uniform(4.0, 8.0)
        return (np.floor(a / cell) + np.floor(b / cell)) % 2 == 1
    if texture == "coarse_stripes":
        period = rng.uniform(12.0, 18.0)
        return np.mod(a, period) < period * 0.35
    if texture == "grid":
        cell = rng.uniform(7.0, 11.0)
        return (np.mod(a, cell) < 1.6) | (np.mod(b, cell) < 1.6)
    if texture == "rings":
        period = rng.uniform(6.0, 10.0)
        r = np.hypot(x - np.float32(rng.uniform(0, x.max())), y - np.float32(rng.uniform(0, y.max())))
        return np.mod(r, period) < period / 2
    if texture == "waves":
        period = rng.uniform(7.0, 11.0)
        wobble = np.float32(3.0) * np.sin(b * np.float32(2 * np.pi / rng.uniform(10.0, 16.0)))
        return np.mod(a + wobble, period) < period / 2
    if texture == "big_dots":
        return _dot_lattice(a, b, rng, spacing=(14.0, 20.0), radius_frac=(0.25, 0.32))
    if texture == "diamonds":
        cell = rng.uniform(8.0, 12.0)
        da = np.abs(np.mod(a, cell) - cell / 2)
        db = np.abs(np.mod(b, cell) - cell / 2)
        return da + db <= cell * 0.3
    raise ValueError(f"unknown texture {texture!r}")


def _upsample_bilinear(grid: np.ndarray, size: int) -> np.ndarray:
    """Bilinear upsampling of a small (g, g, C) grid to (size, size, C)."""
    g = grid.shape[0]
    pos = np.linspace(0, g - 1, size)
    i0 = np.clip(np.floor(pos).astype(int), 0, g - 2)
    f = (pos - i0)[:, None]
    rows = grid[i0] * (1 - f[..., None]) + grid[i0 + 1] * f[..., None]  # (size, g, C)
    cols = rows[:, i0] * (1 - f.T[..., None]) + rows[:, i0 + 1] * f.T[..., None]
    return cols


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """Random colour + low-frequency colour noise (no clutter: see the module docstring)."""
    bg = np.broadcast_to(_random_colour(rng), (size, size, 3)).astype(np.float64)
    grid = rng.normal(0.0, rng.uniform(0.05, 0.15), size=(4, 4, 3))
    return np.clip(bg + _upsample_bilinear(grid, size), 0.0, 1.0)


def _box_downsample(mask: np.ndarray, factor: int) -> np.ndarray:
    """Coverage fraction of each output pixel (mean over factor x factor blocks)."""
    total = np.zeros((mask.shape[0] // factor, mask.shape[1] // factor), dtype=np.float32)
    for dy in range(factor):
        for dx in range(factor):
            total += mask[dy::factor, dx::factor]
    return total * np.float32(1.0 / (factor * factor))


@lru_cache(maxsize=8)
def _pixel_grid(size: int, supersample: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates (in output-pixel units) of a supersampled grid."""
    coords = ((np.arange(size * supersample) + 0.5) / supersample).astype(np.float32)
    x, y = np.meshgrid(coords, coords)
    x.flags.writeable = False
    y.flags.writeable = False
    return x, y


def _object_frame(x: np.ndarray, y: np.ndarray, cx: float, cy: float, theta: float, radius: float) -> tuple[np.ndarray, np.ndarray]:
    """Pixel coordinates -> rotated, scaled object coordinates (object radius ~1)."""
    dx, dy = x - np.float32(cx), y - np.float32(cy)
    c, s = np.float32(np.cos(theta) / radius), np.float32(np.sin(theta) / radius)
    return dx * c + dy * s, dy * c - dx * s


def render_image(shape: str, texture: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """One (size, size, 3) uint8 image of a textured shape on a noisy background.

    The mask and texture are binary patterns evaluated on a 2x grid and
    box-filtered (anti-aliasing); colours are then mixed at output resolution,
    which is exact for a two-colour object and keeps generation fast.
    """
    background = _background(rng, size)
    colour_a = _contrasting_colour(rng, background.mean(axis=(0, 1)))
    colour_b = _contrasting_colour(rng, colour_a)

    radius = rng.uniform(0.3, 0.42) * size
    cx, cy = rng.uniform(0.4, 0.6, size=2) * size
    theta = rng.uniform(0, 2 * np.pi)
    x, y = _pixel_grid(size, SUPERSAMPLE)
    u, v = _object_frame(x, y, cx, cy, theta, radius)
    mask = shape_mask(shape, u, v)
    second = mask & texture_mask(texture, x, y, rng)
    alpha = _box_downsample(mask, SUPERSAMPLE)[..., None]
    alpha_b = _box_downsample(second, SUPERSAMPLE)[..., None]

    x_lo, y_lo = _pixel_grid(size, 1)
    u_lo, _ = _object_frame(x_lo, y_lo, cx, cy, theta, radius)
    shading = (1.0 + rng.uniform(-0.25, 0.25) * u_lo)[..., None]  # soft lighting gradient
    shaded_a = np.clip(colour_a * shading, 0.0, 1.0)
    shaded_b = np.clip(colour_b * shading, 0.0, 1.0)

    img = background * (1 - alpha) + shaded_a * (alpha - alpha_b) + shaded_b * alpha_b
    img = img + rng.normal(0.0, rng.uniform(0.01, 0.05), size=img.shape)
    return np.round(np.clip(img, 0.0, 1.0) * 255).astype(np.uint8)


def encode_jpeg(pixels: np.ndarray) -> bytes:
    """Fixed encoder settings, so encoding is reproducible."""
    buf = BytesIO()
    Image.fromarray(pixels, mode="RGB").save(buf, format="JPEG", quality=JPEG_QUALITY, optimize=False, progressive=False)
    return buf.getvalue()

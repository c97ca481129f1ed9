"""The small, download-free demo dataset (ImageNet folder layout): rendering, manifest, writing.

`tools/make_demo_dataset.py` is its command line; this module is the generator, so
that it is importable by name: the process pool pickles `_render_chunk` by reference
to its module, which must be a package module every process (and every test) imports
the same way, not a script loaded by path.

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

Layout written::

    OUT/train/<class_name>/<class_name>_<i>.JPEG
    OUT/val/<class_name>/<class_name>_<i>.JPEG
    OUT/manifest.json          (written last; marks the dataset complete)

Determinism: every image has its own RNG seeded from (seed, split, class,
index) and JPEG encoding uses fixed settings, so the same arguments give
byte-identical files (for the same numpy/Pillow builds) however many worker
processes render them and in whatever order.

Like the rest of `pipelines`, it imports nothing from `fastssl`.
"""

from __future__ import annotations

import colorsys
import hashlib
import json
import multiprocessing
import os
import shutil
import time
from dataclasses import dataclass
from functools import lru_cache
from io import BytesIO
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image
from tqdm import tqdm

from pipelines.cores import usable_cores

#: Bump when the rendering changes: manifests of other versions do not match.
GENERATOR_VERSION = 3

DEFAULT_NUM_CLASSES = 10
DEFAULT_TRAIN_PER_CLASS = 250
DEFAULT_VAL_PER_CLASS = 50
DEFAULT_IMAGE_SIZE = 96
DEFAULT_SEED = 0
MIN_IMAGE_SIZE = 32
MAX_IMAGE_SIZE = 1024

JPEG_QUALITY = 92
SUPERSAMPLE = 2  # render masks/textures at 2x and box-filter: anti-aliasing
SPLITS = ("train", "val")
MANIFEST_NAME = "manifest.json"

SHAPES: tuple[str, ...] = (
    "disc", "square", "triangle", "star", "plus", "ring", "crescent", "bar", "hexagon", "semicircle",
)
TEXTURES: tuple[str, ...] = (
    "smooth", "stripes", "dots", "checker", "coarse_stripes", "grid", "rings", "waves", "big_dots", "diamonds",
)
MAX_CLASSES = len(SHAPES) * len(TEXTURES)


class DatasetExistsError(RuntimeError):
    """OUT exists but is incomplete, was generated with other arguments, or is no demo dataset."""


class OutputDirError(RuntimeError):
    """OUT cannot be created where it is named: a file in its path, or a place that takes no folders."""


# --------------------------------------------------------------------------- classes


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


# --------------------------------------------------------------------------- colours


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


# --------------------------------------------------------------------------- geometry


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


# --------------------------------------------------------------------------- rendering


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


def image_rng(seed: int, split: str, class_idx: int, index: int) -> np.random.Generator:
    """Independent per-image stream: output does not depend on generation order."""
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, SPLITS.index(split), class_idx, index])))


def encode_jpeg(pixels: np.ndarray) -> bytes:
    """Fixed encoder settings, so encoding is reproducible."""
    buf = BytesIO()
    Image.fromarray(pixels, mode="RGB").save(buf, format="JPEG", quality=JPEG_QUALITY, optimize=False, progressive=False)
    return buf.getvalue()


# --------------------------------------------------------------------------- dataset


def _validate(num_classes: int, train_per_class: int, val_per_class: int, image_size: int, seed: int) -> None:
    """Raise ValueError naming the first bad argument, before any folder is touched (the command line
    checks the same ranges when it parses; this guards callers of `make_demo_dataset`)."""
    for name, value in (("train_per_class", train_per_class), ("val_per_class", val_per_class)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if not isinstance(num_classes, int) or not 2 <= num_classes <= MAX_CLASSES:
        raise ValueError(f"num_classes must be an integer in [2, {MAX_CLASSES}], got {num_classes!r}")
    if not isinstance(image_size, int) or not MIN_IMAGE_SIZE <= image_size <= MAX_IMAGE_SIZE:
        raise ValueError(f"image_size must be an integer in [{MIN_IMAGE_SIZE}, {MAX_IMAGE_SIZE}], got {image_size!r}")
    if not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")


def _arguments(num_classes: int, train_per_class: int, val_per_class: int, image_size: int,
               seed: int) -> dict[str, int]:
    """What the manifest records and a rerun compares: the same arguments and version mean the same bytes."""
    return {
        "num_classes": num_classes,
        "train_per_class": train_per_class,
        "val_per_class": val_per_class,
        "image_size": image_size,
        "seed": seed,
        "generator_version": GENERATOR_VERSION,
    }


def file_name(class_name: str, index: int) -> str:
    """An image's file name: zero-padded, so sorted order is generation order."""
    return f"{class_name}_{index:05d}.JPEG"


def content_hash(root: Path) -> str:
    """sha256 over (relative path, bytes) of every JPEG, in sorted path order."""
    digest = hashlib.sha256()
    for path in sorted(root.glob("*/*/*.JPEG")):
        digest.update(path.relative_to(root).as_posix().encode())
        digest.update(b"\0")
        digest.update(path.read_bytes())
    return digest.hexdigest()


def _read_manifest(out: Path) -> dict | None:
    """OUT's manifest when OUT is a dataset this generator wrote (complete or not), else None."""
    try:
        manifest = json.loads((out / MANIFEST_NAME).read_text())
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) and manifest.get("format") == "imagenet-folder" else None


def _is_complete(out: Path, manifest: dict) -> bool:
    """Cheap completeness check (file counts) for the do-nothing path."""
    counts = manifest.get("counts", {})
    return all(
        sum(1 for _ in (out / split).glob("*/*.JPEG")) == counts.get(split, -1) for split in SPLITS
    )


def _is_empty_dir(out: Path) -> bool:
    """An empty real folder counts as absent (people often ``mkdir`` first); a symlink never does."""
    return out.is_dir() and not out.is_symlink() and not any(out.iterdir())


def _check_replaceable(out: Path) -> None:
    """What --force may replace: nothing, an empty folder, or a demo dataset. Why: a mistyped OUT
    (`data` for `data/demo`) must never cost the user a folder of their own."""
    if out.exists() and not _is_empty_dir(out) and (out.is_symlink() or _read_manifest(out) is None):
        what = "a file" if not out.is_dir() else "a folder that is not a demo dataset (no valid " + MANIFEST_NAME + ")"
        raise DatasetExistsError(f"{out} is {what}; --force replaces only a demo dataset this tool wrote: "
                                 "name another folder (e.g. data/demo), or delete it yourself")


def _check_existing(out: Path, arguments: dict) -> dict | None:
    """Return the manifest if OUT already holds this dataset; raise if it holds another, or
    anything else.

    An empty directory counts as absent (people often ``mkdir`` first).
    """
    if not out.exists() or _is_empty_dir(out):
        return None
    _check_replaceable(out)
    manifest = _read_manifest(out)
    if not _is_complete(out, manifest):
        raise DatasetExistsError(f"{out} is an incomplete demo dataset (images missing); rebuild it with --force")
    if manifest.get("arguments") != arguments:
        raise DatasetExistsError(
            f"{out} was generated with different arguments {manifest.get('arguments')} "
            f"(requested {arguments}); rebuild it with --force, or name another folder"
        )
    return manifest


@dataclass(frozen=True)
class _Chunk:
    """A run of consecutive images of one class: the unit of (parallel) work."""

    folder: str
    split: str
    class_idx: int
    class_name: str
    shape: str
    texture: str
    start: int
    stop: int
    image_size: int
    seed: int


def _render_chunk(chunk: _Chunk) -> int:
    """Render and write one chunk; returns the number of images written.

    Each image has its own seed, so which process renders it, and in which
    order, cannot change its bytes.
    """
    folder = Path(chunk.folder)
    for index in range(chunk.start, chunk.stop):
        rng = image_rng(chunk.seed, chunk.split, chunk.class_idx, index)
        pixels = render_image(chunk.shape, chunk.texture, chunk.image_size, rng)
        (folder / file_name(chunk.class_name, index)).write_bytes(encode_jpeg(pixels))
    return chunk.stop - chunk.start


def _plan(root: Path, per_split: dict[str, int], num_classes: int, image_size: int, seed: int, chunk: int = 25) -> list[_Chunk]:
    """Create the class folders and cut the work into chunks."""
    names, specs = class_names(num_classes), class_specs(num_classes)
    chunks = []
    for split, per_class in per_split.items():
        for class_idx, (name, (shape, texture)) in enumerate(zip(names, specs)):
            folder = root / split / name
            folder.mkdir(parents=True)
            for start in range(0, per_class, chunk):
                stop = min(start + chunk, per_class)
                chunks.append(_Chunk(str(folder), split, class_idx, name, shape, texture, start, stop, image_size, seed))
    return chunks


def _default_workers() -> int:
    """The cores this process may use (not the machine's count: a container or a SLURM job gets
    fewer), at most 8."""
    return min(usable_cores(), 8)


def _run_chunks(chunks: list[_Chunk], workers: int, on_done: Callable[[int], None]) -> None:
    """Render all chunks, in-process or with a process pool.

    The pool pickles `_render_chunk` by reference to this module, which is why the
    generator lives in a package and not in the script that calls it."""
    if workers <= 1 or len(chunks) <= 1:
        for c in chunks:
            on_done(_render_chunk(c))
        return
    methods = multiprocessing.get_all_start_methods()
    ctx = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
    with ctx.Pool(min(workers, len(chunks))) as pool:
        for n in pool.imap_unordered(_render_chunk, chunks):
            on_done(n)


def _swap_into_place(tmp: Path, out: Path, force: bool) -> None:
    """Atomic rename; with force, move the old tree aside first, then delete it (put back if the
    new one cannot take its place)."""
    trash = None
    if force and (out.exists() or out.is_symlink()):
        trash = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, trash)
    try:
        os.replace(tmp, out)
    except OSError:
        if trash is not None:
            os.replace(trash, out)
        raise
    if trash is not None:
        if trash.is_dir() and not trash.is_symlink():
            shutil.rmtree(trash, ignore_errors=True)
        else:
            trash.unlink()


def _make_tmp_dir(out: Path, tmp: Path) -> None:
    """Create OUT's parents and the temporary folder beside OUT, or an OutputDirError naming why not:
    a bad OUT is the user's path, said in one line, not an OSError from deep inside the render."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp.mkdir()
    except OSError as err:
        blocker = next((p for p in out.parents if p.exists()), None)
        why = (f"{blocker} is a file, not a folder" if blocker is not None and not blocker.is_dir()
               else f"{out.parent} takes no new folders ({err.strerror})")
        raise OutputDirError(f"cannot create {out}: {why}; pass a folder path you can write to, "
                             "e.g. data/demo") from err


def make_demo_dataset(
    out_dir: str | os.PathLike,
    *,
    num_classes: int = DEFAULT_NUM_CLASSES,
    train_per_class: int = DEFAULT_TRAIN_PER_CLASS,
    val_per_class: int = DEFAULT_VAL_PER_CLASS,
    image_size: int = DEFAULT_IMAGE_SIZE,
    seed: int = DEFAULT_SEED,
    force: bool = False,
    progress: bool = True,
    workers: int | None = None,
) -> dict:
    """Write the dataset to ``out_dir`` (atomically) and return its manifest.

    If ``out_dir`` already holds a complete dataset made with the same
    arguments, nothing is written and the existing manifest is returned with
    ``status == "exists"`` (else ``"created"``; ``status`` is not stored on
    disk).  Raises :class:`DatasetExistsError` if ``out_dir`` exists but is
    incomplete or different, unless ``force``; and, ``force`` or not, if it is a
    file or a non-empty folder without this generator's manifest.  ``workers`` processes render
    in parallel (default: available cores, at most 8); the output does not
    depend on it.
    """
    _validate(num_classes, train_per_class, val_per_class, image_size, seed)
    out = Path(out_dir).resolve()
    arguments = _arguments(num_classes, train_per_class, val_per_class, image_size, seed)
    if not force:
        existing = _check_existing(out, arguments)
        if existing is not None:
            return {**existing, "status": "exists"}
    _check_replaceable(out)

    names, specs = class_names(num_classes), class_specs(num_classes)
    per_split = {"train": train_per_class, "val": val_per_class}
    total = num_classes * (train_per_class + val_per_class)
    workers = _default_workers() if workers is None else workers
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    _make_tmp_dir(out, tmp)
    bar = tqdm(total=total, desc=f"demo dataset -> {out.name}", unit="img", disable=not progress)
    start = time.perf_counter()
    try:
        chunks = _plan(tmp, per_split, num_classes, image_size, seed)
        _run_chunks(chunks, workers, bar.update)
        manifest = {
            "format": "imagenet-folder",
            "arguments": arguments,
            "counts": {split: num_classes * n for split, n in per_split.items()},
            "classes": names,
            "class_specs": [{"shape": s, "texture": t} for s, t in specs],
            "sha256": content_hash(tmp),
        }
        (tmp / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        try:
            _swap_into_place(tmp, out, force)
        except OSError as err:
            # Without force, another process (a parallel `make demo`) may have finished
            # first: accept its result if it is the same dataset, refuse it if it differs.
            # Else OUT cannot be replaced (a mount point, a protected folder): say so.
            existing = None if force else _check_existing(out, arguments)
            if existing is None:
                raise OutputDirError(f"cannot put the dataset at {out}: {err.strerror or err} (a mount point or "
                                     "a protected folder cannot be replaced); pass another path, e.g. for a "
                                     f"mount point a new folder inside it: {out / 'demo'}") from err
            shutil.rmtree(tmp, ignore_errors=True)
            return {**existing, "status": "exists"}
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        bar.close()
    return {**manifest, "status": "created", "seconds": round(time.perf_counter() - start, 2)}

"""The small, download-free demo dataset (ImageNet folder layout) on disk: manifest, parallel writing,
replacing a folder safely. What each image shows, and why: `pipelines/demo_images.py`.

`tools/make_demo_dataset.py` is its command line; this module is the generator, so
that it is importable by name: the process pool pickles `_render_chunk` by reference
to its module, which must be a package module every process (and every test) imports
the same way, not a script loaded by path.

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

import glob
import hashlib
import json
import multiprocessing
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from tqdm import tqdm

from pipelines.cores import usable_cores
from pipelines.demo_images import (GENERATOR_VERSION, MAX_CLASSES, class_names, class_specs, encode_jpeg,
                                    render_image)
from pipelines.processes import left_by_dead_processes, pool_worker_ignores_interrupts, stop_signals_held

DEFAULT_NUM_CLASSES = 10
DEFAULT_TRAIN_PER_CLASS = 250
DEFAULT_VAL_PER_CLASS = 50
DEFAULT_IMAGE_SIZE = 96
DEFAULT_SEED = 0
MIN_IMAGE_SIZE = 32
MAX_IMAGE_SIZE = 1024

SPLITS = ("train", "val")
MANIFEST_NAME = "manifest.json"


class DatasetExistsError(RuntimeError):
    """OUT exists but is incomplete, was generated with other arguments, or is no demo dataset."""


class OutputDirError(RuntimeError):
    """OUT cannot be created where it is named: a file in its path, or a place that takes no folders."""


def image_rng(seed: int, split: str, class_idx: int, index: int) -> np.random.Generator:
    """Independent per-image stream: output does not depend on generation order."""
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, SPLITS.index(split), class_idx, index])))


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
    with stop_signals_held():  # a Ctrl-C while the workers start waits until they ignore it
        pool = ctx.Pool(min(workers, len(chunks)), initializer=pool_worker_ignores_interrupts)
    with pool:
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


def _remove_stale_tmp_dirs(out: Path) -> None:
    """Delete the temporary folders beside OUT left by runs killed outright (kill -9, power loss):
    those whose PID no longer runs. A stop that Python sees (Ctrl-C, SIGTERM) removes its own."""
    for tmp, pid in left_by_dead_processes(out.parent.glob(f".{glob.escape(out.name)}.tmp-*"), ".tmp-"):
        if tmp.is_dir() and not tmp.is_symlink():
            shutil.rmtree(tmp, ignore_errors=True)
            print(f"removed {tmp}: left by an interrupted run (PID {pid} is gone)", file=sys.stderr)


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
    _remove_stale_tmp_dirs(out)
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

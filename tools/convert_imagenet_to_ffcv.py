#!/usr/bin/env python3
"""Convert an ImageNet-layout split into an FFCV `.beton` for `--data.backend ffcv`.

    python tools/convert_imagenet_to_ffcv.py /data/imagenet/train train.beton
    python tools/convert_imagenet_to_ffcv.py /data/imagenet/val val.beton              # class folders
    python tools/convert_imagenet_to_ffcv.py /data/imagenet/val val.beton \\
        --labels val_labels.txt --classes-from /data/imagenet/train                       # flat folder

What it guarantees:
* Labels are torchvision `ImageFolder`'s (sorted class-folder names), so a checkpoint's
  k-NN or linear probe means the same class on a folder and on a `.beton`. The class
  names, in label order, are written beside the output in `OUT.beton.json`.
* Bad input is skipped and reported, never fatal: non-image files, truncated or corrupt
  images, and empty class folders are listed with the reason in the summary;
  CMYK, grayscale, palette and PNG-named-.JPEG images are converted to RGB. The exit
  status is 0 whenever the `.beton` was produced (skips included) and 1 when it could
  not be (nothing readable, a missing source, a write error); 2 is a usage error.
* An interrupted run never leaves a file that looks whole: the `.beton` is written to a
  temporary name in the same folder and renamed only when complete.
* The same inputs give the same `.beton`: the JPEG-or-raw choice of `--write-mode
  proportion` is drawn from a per-image seed, not from worker timing.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from pipelines.beton import IMAGE_FIELD, LABEL_FIELD, summary_path  # noqa: E402
from pipelines.folder import is_image_file  # noqa: E402
from pipelines.sniff import problem  # noqa: E402
from pipelines.torchvision import UNREADABLE, load_rgb  # noqa: E402

WRITE_MODES = ("proportion", "jpg", "raw", "smart")


class ConversionError(RuntimeError):
    """The `.beton` cannot be produced (exit status 1)."""


@dataclass
class Inventory:
    """What the source holds: convertible (path, label) pairs, class names, and what was skipped."""

    samples: list[tuple[str, int]] = field(default_factory=list)
    classes: list[str] = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)

    def skip(self, path: str | Path, reason: str) -> None:
        self.skipped.append({"path": str(path), "reason": reason})


# --------------------------------------------------------------------------- scanning


def scan_class_folders(src: Path, subset_per_class: int = 0) -> Inventory:
    """ImageFolder's mapping: every sub-folder is a class (sorted), empty ones included."""
    inv = Inventory(classes=sorted(e.name for e in os.scandir(src) if e.is_dir() and not e.name.startswith(".")))
    for label, name in enumerate(inv.classes):
        files = sorted(str(p) for p in (src / name).rglob("*") if p.is_file())
        images = [f for f in files if is_image_file(f)]
        for f in files:
            if not is_image_file(f):
                inv.skip(f, "not an image file (extension); move it out of the class folder")
        if not images:
            inv.skip(src / name, "empty class folder: the class keeps its label but has no images")
        if subset_per_class:
            images = images[:subset_per_class]
        inv.samples.extend((f, label) for f in images)
    return inv


def read_labels_file(path: Path) -> list[tuple[str, str]]:
    """`<file name> <class name or label number>` per line (`#` comments, blank lines ok)."""
    pairs = []
    for lineno, raw in enumerate(path.read_text().splitlines(), start=1):
        line = raw.split("#", 1)[0].strip().replace(",", " ")
        if not line:
            continue
        parts = line.split()
        if len(parts) != 2:
            raise ConversionError(f"{path}:{lineno}: expected `<file name> <class>`, got {raw!r}")
        pairs.append((parts[0], parts[1]))
    return pairs


def scan_flat_folder(src: Path, labels_file: Path, classes_from: Path | None, subset_per_class: int = 0) -> Inventory:
    """Flat images + a labels file (ImageNet's val): classes from `classes_from` or the file."""
    pairs = read_labels_file(labels_file)
    if classes_from is not None:
        classes = sorted(e.name for e in os.scandir(classes_from) if e.is_dir() and not e.name.startswith("."))
    else:
        classes = sorted({c for _, c in pairs if not c.isdigit()})
    inv = Inventory(classes=classes)
    index = {c: i for i, c in enumerate(classes)}
    per_class: dict[int, int] = {}
    for name, cls in pairs:
        path = src / name
        if cls.isdigit() and cls not in index:
            label = int(cls)
            if classes and label >= len(classes):
                inv.skip(path, f"label {label} out of range for {len(classes)} classes")
                continue
        elif cls in index:
            label = index[cls]
        else:
            inv.skip(path, f"class {cls!r} is not among the {len(classes)} classes (see --classes-from)")
            continue
        if not path.is_file():
            inv.skip(path, "listed in the labels file but missing")
            continue
        if subset_per_class and per_class.get(label, 0) >= subset_per_class:
            continue
        per_class[label] = per_class.get(label, 0) + 1
        inv.samples.append((str(path), label))
    if not inv.classes:
        inv.classes = [str(i) for i in range(max((lab for _, lab in inv.samples), default=-1) + 1)]
    return inv


def scan(src: Path, labels: Path | None, classes_from: Path | None, subset_per_class: int) -> Inventory:
    if not src.exists():
        raise ConversionError(f"source {str(src)!r} does not exist; pass an ImageNet split folder "
                              "(train/ with one folder per class)")
    if not src.is_dir():
        raise ConversionError(f"source {str(src)!r} is not a folder")
    if labels is not None:
        if not labels.is_file():
            raise ConversionError(f"labels file {str(labels)!r} does not exist")
        return scan_flat_folder(src, labels, classes_from, subset_per_class)
    has_dirs = any(e.is_dir() for e in os.scandir(src))
    if not has_dirs:
        raise ConversionError(f"{str(src)!r} has no class folders; for a flat folder (ImageNet val) pass "
                              "--labels FILE (lines `<file name> <class>`) and --classes-from TRAIN_DIR")
    return scan_class_folders(src, subset_per_class)


# --------------------------------------------------------------------------- checking and loading


def check_file(path: str) -> str | None:
    """Why `path` cannot be converted, or None. Decodes at reduced scale (JPEG draft mode):
    every compressed byte is still read, so truncation is caught, at a fraction of the cost."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as err:
        return f"unreadable: {err}"
    reason = problem(data)
    if reason is not None:
        return reason
    try:
        with Image.open(path) as img:
            img.draft("RGB", (max(1, img.width // 8), max(1, img.height // 8)))
            img.load()
            if img.width < 1 or img.height < 1:
                return "zero-sized image"
    except UNREADABLE as err:
        return f"undecodable: {type(err).__name__}: {err}"
    return None


class ConvertDataset:
    """Indexable (image, label) pairs for FFCV's writer; seeds numpy per image so that the
    writer's random JPEG-or-raw choice ('proportion' mode) is reproducible."""

    def __init__(self, samples: list[tuple[str, int]]):
        self.samples = samples

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        path, label = self.samples[i]
        np.random.seed(i % (2**32))
        return np.asarray(load_rgb(path)), label  # full decode, CMYK / L / P / RGBA -> RGB


# --------------------------------------------------------------------------- writing


def convert(src: Path, out: Path, *, labels: Path | None = None, classes_from: Path | None = None,
            max_resolution: int = 500, jpeg_quality: int = 90, compress_probability: float = 0.5,
            write_mode: str = "proportion", num_workers: int = 0, subset_per_class: int = 0,
            force: bool = False, progress: bool = True) -> dict:
    """Write `out` (atomically) and `out.json`; returns the summary. Raises ConversionError."""
    from ffcv.fields import IntField, RGBImageField
    from ffcv.writer import DatasetWriter

    start = time.perf_counter()
    if out.exists() and not force:
        raise ConversionError(f"{str(out)!r} exists; pass --force to replace it")
    if not out.parent.is_dir():
        raise ConversionError(f"output folder {str(out.parent)!r} does not exist")
    inv = scan(src, labels, classes_from, subset_per_class)
    workers = num_workers or os.cpu_count() or 1

    paths = [p for p, _ in inv.samples]
    with multiprocessing.get_context("fork").Pool(workers) as pool:
        reasons = list(tqdm(pool.imap(check_file, paths, chunksize=16), total=len(paths), desc="checking",
                            unit="img", disable=not progress))
    good = []
    for (path, label), reason in zip(inv.samples, reasons):
        if reason is None:
            good.append((path, label))
        else:
            inv.skip(path, reason)
    if not good:
        raise ConversionError(f"no readable images under {str(src)!r} ({len(inv.skipped)} skipped); nothing to write")

    tmp = out.with_name(f".{out.name}.partial-{os.getpid()}")
    fields = {IMAGE_FIELD: RGBImageField(write_mode=write_mode, max_resolution=max_resolution,
                                         jpeg_quality=jpeg_quality, compress_probability=compress_probability),
              LABEL_FIELD: IntField()}
    try:
        writer = DatasetWriter(str(tmp), fields, num_workers=workers)
        writer.from_indexed_dataset(ConvertDataset(good), chunksize=32)
        os.replace(tmp, out)
    except BaseException as err:
        tmp.unlink(missing_ok=True)
        if isinstance(err, Exception):
            raise ConversionError(f"writing {str(out)!r} failed: {type(err).__name__}: {err}") from err
        raise
    seconds = time.perf_counter() - start
    summary = {
        "source": str(src), "output": str(out), "written": len(good), "skipped": inv.skipped,
        "classes": inv.classes, "num_classes": len(inv.classes), "bytes": out.stat().st_size,
        "seconds": round(seconds, 3), "images_per_s": round(len(good) / seconds, 1),
        "fields": {IMAGE_FIELD: "RGBImageField", LABEL_FIELD: "IntField"},
        "options": {"max_resolution": max_resolution, "jpeg_quality": jpeg_quality,
                    "compress_probability": compress_probability, "write_mode": write_mode,
                    "subset_per_class": subset_per_class},
    }
    tmp_json = summary_path(out).with_name(f".{summary_path(out).name}.partial")
    tmp_json.write_text(json.dumps(summary, indent=2))
    os.replace(tmp_json, summary_path(out))
    return summary


def print_summary(summary: dict) -> None:
    mb = summary["bytes"] / 2**20
    print(f"wrote {summary['output']}: {summary['written']} images, {summary['num_classes']} classes, "
          f"{mb:.1f} MiB in {summary['seconds']:.1f} s ({summary['images_per_s']:.0f} images/s)")
    if summary["skipped"]:
        print(f"skipped {len(summary['skipped'])}:")
        for item in summary["skipped"][:20]:
            print(f"  {item['path']}: {item['reason']}")
        if len(summary["skipped"]) > 20:
            print(f"  ... and {len(summary['skipped']) - 20} more (all listed in {summary_path(summary['output'])})")
    print(f"summary and class names: {summary_path(summary['output'])}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("src", type=Path, help="split folder: class sub-folders, or flat files with --labels")
    ap.add_argument("out", type=Path, help="output .beton (its summary goes to OUT.json)")
    ap.add_argument("--labels", type=Path, help="flat folders: file of `<file name> <class name or number>` lines")
    ap.add_argument("--classes-from", type=Path, help="take the class list (sorted folder names) from this split")
    ap.add_argument("--max-resolution", type=int, default=500, help="longest side after resizing (default 500)")
    ap.add_argument("--jpeg-quality", type=int, default=90, help="JPEG quality of stored images (default 90)")
    ap.add_argument("--compress-probability", type=float, default=0.5,
                    help="'proportion' mode: share of images stored as JPEG, the rest raw (default 0.5)")
    ap.add_argument("--write-mode", choices=WRITE_MODES, default="proportion",
                    help="FFCV's image storage mode (default proportion)")
    ap.add_argument("--num-workers", type=int, default=0, help="processes (default: all cores)")
    ap.add_argument("--subset-per-class", type=int, default=0, help="keep the first N images of each class (0 = all)")
    ap.add_argument("--force", action="store_true", help="replace an existing OUT")
    ap.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = ap.parse_args(argv)
    bad = []
    if args.max_resolution < 8:
        bad.append(f"--max-resolution must be at least 8, got {args.max_resolution}")
    if not 1 <= args.jpeg_quality <= 100:
        bad.append(f"--jpeg-quality must be in 1..100, got {args.jpeg_quality}")
    if not 0 <= args.compress_probability <= 1:
        bad.append(f"--compress-probability must be in [0, 1], got {args.compress_probability}")
    if args.num_workers < 0 or args.subset_per_class < 0:
        bad.append("--num-workers and --subset-per-class must be >= 0")
    if args.out.suffix != ".beton":
        bad.append(f"OUT should end in .beton, got {str(args.out)!r}")
    if bad:
        ap.error("; ".join(bad))
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        summary = convert(args.src, args.out, labels=args.labels, classes_from=args.classes_from,
                          max_resolution=args.max_resolution, jpeg_quality=args.jpeg_quality,
                          compress_probability=args.compress_probability, write_mode=args.write_mode,
                          num_workers=args.num_workers, subset_per_class=args.subset_per_class,
                          force=args.force, progress=not args.no_progress)
    except ConversionError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print_summary(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())

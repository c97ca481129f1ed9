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
  CMYK, grayscale, palette and PNG-named-.JPEG images are converted to RGB.
* Exit status: 0 whenever the `.beton` was produced (skips included); 1 when it could not
  be (nothing readable, a missing source, a write error such as a read-only output folder
  or a full disk, a worker that crashed); 2 for a usage error: bad options, or a source
  that holds splits (`train/`, `val/`) instead of class folders; the message names the
  split folder to pass.
* Nothing is left behind: the `.beton` is written to a hidden `.OUT.beton.partial-PID` in
  the same folder and renamed only when complete; on any error or signal the partial file
  is removed and the workers are stopped. Even after `kill -9` of the converter its
  workers exit (they die with their parent), and the next run into the same folder
  removes a partial file whose process is gone, saying so.
* It never hangs and is safe to call from a process that has run DALI or CUDA: the
  workers come from a fork server, never from a fork of the caller, and a worker that
  dies fails the conversion within a second (see `pipelines/beton_writer.py`, `worker_context`).
* The same inputs give the same `.beton`: the JPEG-or-raw choice of `--write-mode
  proportion` is drawn from a per-image seed, not from worker timing.
"""

from __future__ import annotations

import argparse
import errno
import glob
import json
import os
import signal
import sys
import time
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from pipelines.beton import IMAGE_FIELD, LABEL_FIELD, summary_path  # noqa: E402
from pipelines.beton_writer import ConvertDataset, WorkerError, check_files, worker_context, write_beton  # noqa: E402
from pipelines.folder import is_image_file  # noqa: E402

WRITE_MODES = ("proportion", "jpg", "raw", "smart")
# Folder names that mean "a split", not "a class": a source whose sub-folders are all among
# these is the dataset root (data/imagenet) given instead of one split (data/imagenet/train).
SPLIT_NAMES = frozenset({"train", "training", "val", "valid", "validation", "test", "testing"})


class ConversionError(RuntimeError):
    """The `.beton` cannot be produced (exit status 1)."""


class UsageError(ConversionError):
    """The command line names the wrong input, e.g. the parent of train/ and val/ (exit status 2)."""


@dataclass
class Inventory:
    """What the source holds: convertible (path, label) pairs, class names, and what was skipped."""

    samples: list[tuple[str, int]] = field(default_factory=list)
    classes: list[str] = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)

    def skip(self, path: str | Path, reason: str) -> None:
        self.skipped.append({"path": str(path), "reason": reason})


# --------------------------------------------------------------------------- scanning


def class_names(folder: Path) -> list[str]:
    """ImageFolder's classes: the sorted sub-folder names. Refuses a folder of splits (UsageError)."""
    names = sorted(e.name for e in os.scandir(folder) if e.is_dir() and not e.name.startswith("."))
    if names and {n.lower() for n in names} <= SPLIT_NAMES:
        pick = next((n for n in names if n.lower() in ("train", "training")), names[0])
        raise UsageError(f"{str(folder)!r} holds the splits {', '.join(names)}, not class folders; "
                         f"pass one split, e.g. {str(folder / pick)!r}")
    return names


def scan_class_folders(src: Path, subset_per_class: int = 0) -> Inventory:
    """ImageFolder's mapping: every sub-folder is a class (sorted), empty ones included."""
    inv = Inventory(classes=class_names(src))
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
        classes = class_names(classes_from)
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


# --------------------------------------------------------------------------- writing


PARTIAL = ".partial-"


def partial_path(out: Path, pid: int | None = None) -> Path:
    """The hidden name `out` is written under until it is complete; it carries the writer's PID."""
    return out.with_name(f".{out.name}{PARTIAL}{os.getpid() if pid is None else pid}")


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's live process
    return True


def remove_stale_partials(out: Path) -> list[Path]:
    """Delete partial files (the .beton's and its summary's) left by a converter that was
    killed (kill -9, power loss): those whose PID no longer runs. Says so on stderr."""
    removed = []
    for name in (out.name, summary_path(out).name):
        for path in out.parent.glob(f".{glob.escape(name)}{PARTIAL}*"):
            pid = path.name.rsplit(PARTIAL, 1)[1]
            if not pid.isdigit() or pid_alive(int(pid)):
                continue
            with suppress(FileNotFoundError):
                path.unlink()
                removed.append(path)
                print(f"removed {path}: left by an interrupted conversion (PID {pid} is gone)", file=sys.stderr)
    return removed


def os_error_message(err: OSError | WorkerError, out: Path) -> str:
    """One line naming the output folder and the real cause of a write failure."""
    folder = str(out.parent.resolve())
    if err.errno == errno.ENOSPC:
        return f"no space left on {folder}; free some space or write the .beton elsewhere (nothing was kept)"
    if err.errno in (errno.EACCES, errno.EPERM, errno.EROFS) and isinstance(err, OSError):  # not a worker's read
        cause = os.strerror(err.errno).lower()
        return f"cannot write in {folder}: {cause}; choose an output folder you can write to"
    detail = err.strerror if isinstance(err, OSError) and err.strerror else str(err)
    return f"writing {str(out)!r} failed: {detail}"


def convert(src: Path, out: Path, *, labels: Path | None = None, classes_from: Path | None = None,
            max_resolution: int = 500, jpeg_quality: int = 90, compress_probability: float = 0.5,
            write_mode: str = "proportion", num_workers: int = 0, subset_per_class: int = 0,
            force: bool = False, progress: bool = True) -> dict:
    """Write `out` (atomically) and `out.json`; returns the summary. Raises ConversionError
    (UsageError for a wrong source). Safe to call from a process that runs DALI or CUDA: the
    workers never fork from this process (pipelines/beton_writer.py, `worker_context`)."""
    start = time.perf_counter()
    src, out = Path(src), Path(out)
    if out.exists() and not force:
        raise ConversionError(f"{str(out)!r} exists; pass --force to replace it")
    if not out.parent.is_dir():
        raise ConversionError(f"output folder {str(out.parent)!r} does not exist")
    remove_stale_partials(out)
    tmp = partial_path(out)
    try:
        # Claim the partial file first: a folder we cannot write to fails now, with its real cause.
        os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
    except OSError as err:
        raise ConversionError(os_error_message(err, out)) from None
    try:
        inv = scan(src, labels, classes_from, subset_per_class)
        worker_context(start=True)  # the fork server imports FFCV (seconds) while this process does
        from ffcv.fields import IntField, RGBImageField

        workers = num_workers or os.cpu_count() or 1
        reasons = check_files([p for p, _ in inv.samples], workers, progress)
        good = []
        for (path, label), reason in zip(inv.samples, reasons):
            if reason is None:
                good.append((path, label))
            else:
                inv.skip(path, reason)
        if not good:
            raise ConversionError(f"no readable images under {str(src)!r} ({len(inv.skipped)} skipped); "
                                  "nothing to write")
        fields = {IMAGE_FIELD: RGBImageField(write_mode=write_mode, max_resolution=max_resolution,
                                             jpeg_quality=jpeg_quality, compress_probability=compress_probability),
                  LABEL_FIELD: IntField()}
        write_beton(tmp, fields, ConvertDataset(good), num_workers=min(workers, len(good)), progress=progress)
        os.replace(tmp, out)
    except BaseException as err:
        with suppress(OSError):  # a clean-up failure must not hide the real error
            tmp.unlink()
        if isinstance(err, ConversionError):
            raise
        if isinstance(err, (OSError, WorkerError)) and err.errno is not None:
            raise ConversionError(os_error_message(err, out)) from err
        if isinstance(err, Exception):
            raise ConversionError(f"writing {str(out)!r} failed: {err}") from err
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
    tmp_json = partial_path(summary_path(out))
    try:
        tmp_json.write_text(json.dumps(summary, indent=2))
        os.replace(tmp_json, summary_path(out))
    except OSError as err:
        with suppress(OSError):
            tmp_json.unlink()
        raise ConversionError(f"the .beton was written but its summary was not: {os_error_message(err, out)}") from err
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


def exit_on_signals() -> None:
    """SIGTERM / SIGHUP end the converter like Ctrl-C does: through its clean-up (partial file
    removed, workers stopped), with the shell's status for the signal."""
    def stop(signum: int, _frame) -> None:
        raise SystemExit(128 + signum)

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, stop)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    exit_on_signals()
    try:
        summary = convert(args.src, args.out, labels=args.labels, classes_from=args.classes_from,
                          max_resolution=args.max_resolution, jpeg_quality=args.jpeg_quality,
                          compress_probability=args.compress_probability, write_mode=args.write_mode,
                          num_workers=args.num_workers, subset_per_class=args.subset_per_class,
                          force=args.force, progress=not args.no_progress)
    except ConversionError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2 if isinstance(err, UsageError) else 1
    except KeyboardInterrupt:
        print("interrupted; nothing was written", file=sys.stderr)
        return 130
    print_summary(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())

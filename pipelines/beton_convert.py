"""An ImageNet-layout split (class folders, or a flat folder with a labels file) written as an FFCV `.beton`.

The conversion itself, shared by tools/convert_imagenet_to_ffcv.py (its command line),
tools/bench_loaders.py and tools/profile_throughput.py (a `.beton` of the benchmark
folder) and the tests: labels as torchvision's `ImageFolder`, bad files skipped and
listed, the output written in a hidden partial folder and moved into place only when
complete; a conversion that stops keeps its progress there and the same call continues it.
The guarantees are listed in the tool's help (`python tools/convert_imagenet_to_ffcv.py -h`).
"""

from __future__ import annotations

import errno
import glob
import json
import os
import shlex
import shutil
import sys
import time
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import NoReturn

from pipelines.beton import IMAGE_FIELD, LABEL_FIELD, summary_path
from pipelines.beton_size import SAMPLE_SIZE, estimate_beton_bytes, size_text
from pipelines.beton_resume import CHECKPOINT_EVERY_S, ConversionBusy, PartialConversion, job_fingerprint
from pipelines.beton_writer import (ConvertDataset, NothingToWrite, WorkerError, signals_deferred, worker_context,
                                    write_beton)
from pipelines.cores import torch_threads_kept, usable_cores
from pipelines.folder import DataLayoutError, class_folder_names, is_image_file, read_text_file, walk_files
from pipelines.processes import left_by_dead_processes

WRITE_MODES = ("proportion", "jpg", "raw", "smart")
DEFAULT_JPEG_QUALITY = 90  # of the images stored as JPEG
DEFAULT_COMPRESS_PROBABILITY = 0.5  # 'proportion' mode: the share stored as JPEG
# Folder names that mean "a split", not "a class": a source whose sub-folders are all among
# these is the dataset root (data/imagenet) given instead of one split (data/imagenet/train).
SPLIT_NAMES = frozenset({"train", "training", "val", "valid", "validation", "test", "testing"})


class ConversionError(RuntimeError):
    """The `.beton` cannot be produced (exit status 1)."""


class UsageError(ConversionError):
    """The command line names the wrong input: a missing source, labels file or output folder, an
    output that exists without --force, the parent of train/ and val/ (exit status 2)."""


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
    try:
        names = class_folder_names(folder)
    except DataLayoutError as err:  # a class folder's link points nowhere
        raise UsageError(str(err)) from None
    if names and {n.lower() for n in names} <= SPLIT_NAMES:
        pick = next((n for n in names if n.lower() in ("train", "training")), names[0])
        raise UsageError(f"{str(folder)!r} holds the splits {', '.join(names)}, not class folders; "
                         f"pass one split, e.g. {str(folder / pick)!r}")
    return names


def scan_class_folders(src: Path, subset_per_class: int = 0, classes: list[str] | None = None) -> Inventory:
    """ImageFolder's mapping: every sub-folder is a class (sorted), empty ones included; or, with
    `classes` (another split's, `--classes-from`), each folder's label is its place in that list, so
    a split holding only some of the classes keeps the training split's labels."""
    here = class_names(src)
    if classes is not None and (unknown := [n for n in here if n not in classes]):
        raise UsageError(f"{str(src)!r} has class folders that --classes-from does not: {', '.join(unknown[:5])}"
                         f"{' ...' if len(unknown) > 5 else ''}; pass the split that holds every class")
    inv = Inventory(classes=here if classes is None else list(classes))
    for name in here:
        label = inv.classes.index(name)
        files = sorted(walk_files(src / name))
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
    """`<file name> <class name or label number>` per line (`#` comments, blank lines ok), each file once:
    a file listed twice would be written twice, under one class or two."""
    pairs, first_line = [], {}
    for lineno, raw in enumerate(read_text_file(path, "labels file", UsageError).splitlines(), start=1):
        line = raw.split("#", 1)[0].strip().replace(",", " ")
        if not line:
            continue
        parts = line.split()
        if len(parts) != 2:
            raise UsageError(f"{path}:{lineno}: expected `<file name> <class>`, got {raw!r}")
        if parts[0] in first_line:
            raise UsageError(f"{path}:{lineno}: {parts[0]} is listed again (first on line {first_line[parts[0]]}); "
                             "list each image once, with its one class")
        first_line[parts[0]] = lineno
        pairs.append((parts[0], parts[1]))
    return pairs


def classes_of(split: Path) -> list[str]:
    """`--classes-from`: the classes of the split that gives the label order (its sorted class folders)."""
    if not split.is_dir():
        raise UsageError(f"--classes-from {str(split)!r} is not a folder; pass the train split whose "
                         "class folders give the label order")
    return class_names(split)


def scan_flat_folder(src: Path, labels_file: Path, classes_from: Path | None, subset_per_class: int = 0) -> Inventory:
    """Flat images + a labels file (ImageNet's val): classes from `classes_from` or the file."""
    pairs = read_labels_file(labels_file)
    if not pairs:
        raise UsageError(f"labels file {str(labels_file)!r} lists no images (lines `<file name> <class>`)")
    if classes_from is not None:
        classes = classes_of(classes_from)
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
        raise UsageError(f"source {str(src)!r} does not exist; pass an ImageNet split folder "
                         "(train/ with one folder per class)")
    if not src.is_dir():
        raise UsageError(f"source {str(src)!r} is not a folder")
    if labels is not None:
        if not labels.is_file():
            raise UsageError(f"labels file {str(labels)!r} {'is a folder' if labels.is_dir() else 'does not exist'}; "
                             "pass a file of lines `<file name> <class>`")
        return scan_flat_folder(src, labels, classes_from, subset_per_class)
    has_dirs = any(e.is_dir() for e in os.scandir(src))
    if not has_dirs:
        raise UsageError(f"{str(src)!r} has no class folders; for a flat folder (ImageNet val) pass "
                              "--labels FILE (lines `<file name> <class>`) and --classes-from TRAIN_DIR")
    return scan_class_folders(src, subset_per_class, None if classes_from is None else classes_of(classes_from))


# --------------------------------------------------------------------------- writing


PARTIAL = ".partial-"
# How a saved conversion numbers its images: by their place in the source's list (earlier versions
# numbered the images that passed a check pass run first, and saved no such entry).
SAMPLE_IDS = "source order"


def partial_path(out: Path, pid: int | None = None) -> Path:
    """The hidden name `out` is written under until it is complete; it carries the writer's PID."""
    return out.with_name(f".{out.name}{PARTIAL}{os.getpid() if pid is None else pid}")


def remove_stale_partials(out: Path) -> list[Path]:
    """Delete partial files (the .beton's and its summary's) left by a converter that was
    killed (kill -9, power loss): those whose PID no longer runs. Says so on stderr."""
    removed = []
    for name in (out.name, summary_path(out).name):
        for path, pid in left_by_dead_processes(out.parent.glob(f".{glob.escape(name)}{PARTIAL}*"), PARTIAL):
            with suppress(FileNotFoundError):
                path.unlink()
                removed.append(path)
                print(f"removed {path}: left by an interrupted conversion (PID {pid} is gone)", file=sys.stderr)
    return removed


def os_error_message(err: OSError | WorkerError, out: Path) -> str:
    """One line naming the output folder and the real cause of a write failure."""
    folder = str(out.parent.resolve())
    if err.errno == errno.ENOSPC:
        return f"no space left on {folder}; free some space or write the .beton elsewhere"
    if err.errno in (errno.EACCES, errno.EPERM, errno.EROFS) and isinstance(err, OSError):  # not a worker's read
        cause = os.strerror(err.errno).lower()
        return f"cannot write in {folder}: {cause}; choose an output folder you can write to"
    detail = err.strerror if isinstance(err, OSError) and err.strerror else str(err)
    return f"writing {str(out)!r} failed: {detail}"


def check_space(samples: list[tuple[str, int]], out: Path, *, max_resolution: int, write_mode: str,
                compress_probability: float, num_workers: int, already: int = 0) -> int:
    """The estimated size of the .beton (`pipelines.beton_size`); a ConversionError, before any
    image is written, when even 90 % of what is left to write (the estimate less the `already`
    written bytes of a resumed conversion) exceeds the free space where it goes."""
    need = estimate_beton_bytes([p for p, _ in samples], max_resolution=max_resolution, write_mode=write_mode,
                                compress_probability=compress_probability, num_workers=num_workers)
    free = shutil.disk_usage(out.parent).free
    if 0.9 * need - already > free:
        raise ConversionError(
            f"the .beton would take about {size_text(need)} (from {min(len(samples), SAMPLE_SIZE)} sampled "
            f"images) and {str(out.parent.resolve())!r} has {size_text(free)} free; free some space, write it "
            f"elsewhere, or store less: --max-resolution 256, or --write-mode jpg"
            + ("" if already else " (nothing was written)"))
    return need


def no_images_message(src: Path, skipped: list[dict]) -> str:
    """The error for a source without one convertible image, naming the first skipped file and why."""
    first = f", e.g. {skipped[0]['path']}: {skipped[0]['reason']}" if skipped else ""
    return f"no readable images under {str(src)!r} ({len(skipped)} skipped{first}); nothing to write"


def resumable_job(partial: PartialConversion, inv: Inventory, options: dict, restart: bool) -> dict | None:
    """The job saved in `partial` when it converts the same files with the same options
    (`write_beton` continues its progress); None for a new conversion. Says on stderr what it found."""
    saved, count = partial.saved_job(), partial.saved_count()
    if saved is None or not count:
        return None
    where = str(partial.dir)
    if saved.get("sample_ids") != SAMPLE_IDS:
        print(f"starting over: {where} holds a conversion interrupted under an earlier version of this converter, "
              f"which numbered its images differently ({count} images saved); they are discarded", file=sys.stderr)
        return None
    if restart:
        print(f"--restart: discarding the {count} images an interrupted conversion saved in {where}", file=sys.stderr)
        return None
    if saved.get("fingerprint") != job_fingerprint(inv.samples, inv.classes, options):
        print(f"starting over: {where} holds an interrupted conversion of other files or options "
              f"({count} images saved), which is discarded", file=sys.stderr)
        return None
    print(f"resuming the interrupted conversion in {where}: {count} of {saved.get('images', '?')} images "
          "already written", file=sys.stderr)
    return saved


def leave_alone(partial: PartialConversion) -> str:
    """After a failure before this run took the folder over: an earlier conversion's saved images
    stay for the command that made them; an empty folder goes. Returns "" (nothing to add)."""
    if partial.saved_count():
        partial.release()
    else:
        partial.discard()
    return ""


def keep_or_discard(partial: PartialConversion) -> str:
    """After a failure or a stop: keep `partial` when it holds saved images (returns the words that
    say so, to end the error message) and remove it otherwise (returns "")."""
    count = partial.saved_count()
    if not count:
        partial.discard()
        return ""
    partial.release()
    total = (partial.saved_job() or {}).get("images", "?")
    return (f"; the {count} of {total} images written so far are kept in {str(partial.dir)!r} "
            f"({size_text(partial.size_bytes())}): the same command continues from there, --restart starts over")


def check_output(out: Path, force: bool) -> None:
    """Refuse an output that cannot or must not be written, before any image is read."""
    if out.is_dir():  # --force replaces a file; a folder would fail only once every image is written
        raise UsageError(f"{str(out)!r} is a folder; name the .beton file to write, e.g. {str(out / 'train.beton')!r}")
    if out.exists() and not force:
        raise UsageError(f"{str(out)!r} exists; pass --force to replace it")
    if not out.parent.is_dir():
        what = ("is a file, not a folder: name the .beton inside a folder" if out.parent.exists() else
                f"does not exist; create it first (mkdir -p {shlex.quote(str(out.parent))}) or name another")
        raise UsageError(f"output folder {str(out.parent)!r} {what}")


def acquire_partial(out: Path) -> PartialConversion:
    """The partial folder of `out`, locked for this process; a folder we cannot write to fails
    now, with its real cause (a usage error when the permission is the user's to change)."""
    remove_stale_partials(out)
    partial = PartialConversion(out)
    try:
        partial.acquire()
    except ConversionBusy as err:
        raise ConversionError(str(err)) from None
    except OSError as err:
        unwritable = err.errno in (errno.EACCES, errno.EPERM, errno.EROFS)
        raise (UsageError if unwritable else ConversionError)(os_error_message(err, out)) from None
    return partial


def write_images(partial: PartialConversion, inv: Inventory, src: Path, out: Path, options: dict, *,
                 already: int, num_workers: int, progress: bool,
                 checkpoint_every_s: float) -> tuple[list[tuple[str, int]], int, int]:
    """Write `inv`'s images into `partial` after checking the disk has room for them. A bad image
    is skipped and listed in `inv`. Returns the samples written, the size estimate and how many
    images an interrupted run had saved."""
    with torch_threads_kept():  # FFCV's import sets torch's thread count to 1
        from ffcv.fields import IntField, RGBImageField

    num_workers = min(num_workers, len(inv.samples))
    estimate = check_space(inv.samples, out, already=already, num_workers=num_workers,
                           max_resolution=options["max_resolution"], write_mode=options["write_mode"],
                           compress_probability=options["compress_probability"])
    fields = {IMAGE_FIELD: RGBImageField(**options), LABEL_FIELD: IntField()}
    try:  # the images are checked as they are written: a bad one is skipped, and listed
        resumed, bad = write_beton(partial, fields, ConvertDataset(inv.samples, options["max_resolution"]),
                                   num_workers=num_workers, progress=progress, checkpoint_every_s=checkpoint_every_s)
    except NothingToWrite as err:
        for i, reason in sorted(err.skipped.items()):
            inv.skip(inv.samples[i][0], reason)
        raise ConversionError(no_images_message(src, inv.skipped)) from None
    for i, reason in sorted(bad.items()):
        inv.skip(inv.samples[i][0], reason)
    good = [sample for i, sample in enumerate(inv.samples) if i not in bad]
    return good, estimate, resumed


def raise_stopped(err: BaseException, partial: PartialConversion, owned: bool, out: Path) -> NoReturn:
    """Raise what stopped a conversion, as a ConversionError that says what was kept of it.
    Whether the partial folder is kept: see `keep_or_discard`; a conversion this run did not
    take over (`owned` false: stopped before its `start`) is left as it was, unmentioned, since
    the same command would not continue it. A stop (Ctrl-C, a signal) stays what it is."""
    kept = keep_or_discard(partial) if owned else leave_alone(partial)
    if isinstance(err, ConversionError):
        if not kept:
            raise err
        raise type(err)(f"{err}{kept}") from err.__cause__
    if isinstance(err, (OSError, WorkerError)) and err.errno is not None:
        raise ConversionError(os_error_message(err, out) + kept) from err
    if isinstance(err, Exception):
        raise ConversionError(f"writing {str(out)!r} failed: {err}{kept}") from err
    if kept:
        print(f"stopped{kept}", file=sys.stderr)
    raise err


def convert(src: Path, out: Path, *, labels: Path | None = None, classes_from: Path | None = None,
            max_resolution: int = 500, jpeg_quality: int = DEFAULT_JPEG_QUALITY,
            compress_probability: float = DEFAULT_COMPRESS_PROBABILITY,
            write_mode: str = "proportion", num_workers: int = 0, subset_per_class: int = 0,
            force: bool = False, restart: bool = False, progress: bool = True,
            checkpoint_every_s: float = CHECKPOINT_EVERY_S) -> dict:
    """Write `out` (atomically) and `out.json`; returns the summary. Raises ConversionError
    (UsageError for a wrong source). A conversion that stops (error, signal, kill) keeps what
    it wrote in `.OUT.partial/` and the same call continues it (`pipelines/beton_resume.py`);
    `restart` starts over. Safe to call from a process that runs DALI or CUDA: the workers
    never fork from this process (pipelines/beton_writer.py, `worker_context`)."""
    start = time.perf_counter()
    src, out = Path(src), Path(out)
    check_output(out, force)
    partial = acquire_partial(out)
    options = {"max_resolution": max_resolution, "jpeg_quality": jpeg_quality,
               "compress_probability": compress_probability, "write_mode": write_mode}
    owned = False  # whether the folder's content is this conversion's (resumed, or started here)
    try:
        inv = scan(src, labels, classes_from, subset_per_class)
        worker_context(start=True)  # the fork server imports FFCV (seconds) while this process does
        if not inv.samples:
            raise ConversionError(no_images_message(src, inv.skipped))
        job = resumable_job(partial, inv, options, restart)
        already = partial.size_bytes() if job is not None else 0
        if job is None:  # a new conversion
            partial.start({"fingerprint": job_fingerprint(inv.samples, inv.classes, options),
                           "images": len(inv.samples), "sample_ids": SAMPLE_IDS})
        owned = True
        good, estimate, resumed = write_images(partial, inv, src, out, options, already=already,
                                               num_workers=num_workers or usable_cores(), progress=progress,
                                               checkpoint_every_s=checkpoint_every_s)
    except BaseException as err:
        raise_stopped(err, partial, owned, out)
    with signals_deferred():  # a stop now would leave OUT without its summary: it waits for both
        try:
            partial.finish()
        except OSError as err:
            raise ConversionError(f"moving the finished .beton into place: {os_error_message(err, out)}") from err
        return write_summary(src, out, inv, good, estimate, resumed, start,
                             {**options, "subset_per_class": subset_per_class})


def write_summary(src: Path, out: Path, inv: Inventory, good: list, estimate: int, resumed: int, start: float,
                  options: dict) -> dict:
    """`OUT.json`: what was written and skipped, the class names, the options; returns it."""
    seconds = time.perf_counter() - start
    summary = {
        "source": str(src), "output": str(out), "written": len(good), "skipped": inv.skipped,
        "classes": inv.classes, "num_classes": len(inv.classes), "bytes": out.stat().st_size,
        "estimated_bytes": estimate, "resumed": resumed,  # images an interrupted run had saved
        "seconds": round(seconds, 3), "images_per_s": round((len(good) - resumed) / seconds, 1),
        "fields": {IMAGE_FIELD: "RGBImageField", LABEL_FIELD: "IntField"},
        "options": options,
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

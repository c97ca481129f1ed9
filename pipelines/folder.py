"""Scanning an ImageNet-layout folder (root/<class>/<image>), with errors that say what to fix.

The class-index mapping is torchvision `ImageFolder`'s: sorted folder names.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
LAYOUT_HINT = "expected ImageNet layout: ROOT/<class_name>/<image>.JPEG, one folder per class"


# Folder names of dataset splits: a data path whose only "classes" are these is the parent of the split to use.
SPLIT_NAMES = frozenset({"train", "training", "val", "valid", "validation", "test", "testing"})
EVAL_NEEDS_CLASSES = 2  # with one class every k-NN / linear prediction is right: the accuracy means nothing


class DataLayoutError(ValueError):
    """The data path does not hold images in the expected layout."""


_WARNED_SINGLE_CLASS: set[str] = set()  # training sources already warned about (once per process)
_REMEMBERED: dict[tuple[str, tuple[str, ...]], list[tuple[str, int]]] | None = None  # see remembered_scans


def is_image_file(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


# A labelled folder's images as `scan_image_folder` lists them: ([(path, class index)], class names).
Listing = tuple[list[tuple[str, int]], list[str]]


def scan_image_folder(root: str | os.PathLike, *, need_labels: bool = True) -> Listing:
    """All (path, class index) pairs under `root`, in a deterministic order, and the classes.

    Fails before any training work with a message naming the problem: a missing path,
    a file instead of a folder, no class folders, a class folder without images, or
    class folders that are split names (the parent of train/ given instead of train/).
    `need_labels` (evaluation data, the default): one class folder is refused, since the
    k-NN and linear accuracies are meaningless on it. Without (self-supervised training,
    which ignores labels): one class folder is allowed, with a warning.
    """
    root = Path(root).expanduser()
    if not root.exists():
        raise DataLayoutError(f"data path {str(root)!r} does not exist; {LAYOUT_HINT}")
    if not root.is_dir():
        raise DataLayoutError(f"data path {str(root)!r} is a file, not a folder; {LAYOUT_HINT}")
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    if not classes:
        loose = [e.name for e in os.scandir(root) if e.is_file() and is_image_file(e.name)]
        what = f"it holds {len(loose)} images but no class folders" if loose else "it is empty"
        raise DataLayoutError(f"data path {str(root)!r} has no class folders ({what}); {LAYOUT_HINT}")
    if {"train", "val"} <= set(classes) and len(classes) <= 3:
        raise DataLayoutError(f"data path {str(root)!r} holds train/ and val/ folders: point at "
                              f"{str(root / 'train')!r} (and {str(root / 'val')!r} for the k-NN)")
    check_not_splits(classes, f"data path {str(root)!r}", lambda split: f"point at {str(root / split)!r} instead "
                     "(the folder whose sub-folders are the classes)")
    samples = _list_class_folders(root, classes)
    if len(classes) == 1:
        nested = any(e.is_dir() for e in os.scandir(root / classes[0]))
        hint = (f"; if the class folders are inside {str(root / classes[0])!r}, point at the folder that holds "
                "them" if nested else "")
        check_class_count(classes, need_labels, f"data path {str(root)!r}",
                          f"has one class folder ({classes[0]!r}, {len(samples)} images)", hint)
    return samples, classes


def _list_class_folders(root: Path, classes: list[str]) -> list[tuple[str, int]]:
    """Every image of each class folder, as (path, class index); from the memo inside `remembered_scans`."""
    key = (os.path.realpath(root), tuple(classes))
    if _REMEMBERED is not None and key in _REMEMBERED:
        return list(_REMEMBERED[key])
    samples: list[tuple[str, int]] = []
    for idx, name in enumerate(classes):
        folder = root / name
        files = sorted(f for f in walk_files(folder) if is_image_file(f))
        if not files:
            raise DataLayoutError(f"class folder {str(folder)!r} has no images "
                                  f"(extensions {', '.join(IMAGE_EXTENSIONS)}); remove it or add images")
        samples.extend((f, idx) for f in files)
    if _REMEMBERED is not None:
        _REMEMBERED[key] = samples
        return list(samples)
    return samples


@contextmanager
def remembered_scans() -> Iterator[None]:
    """Within it, each folder's images are listed once; later scans of it reuse that listing.

    Why: a run's start lists the training folder for its loader and again for the online k-NN's
    memory bank (by default the same folder); on network storage ImageNet's 1.28M names take a
    minute or more each time, on every process. Outside it every scan lists anew: a long-lived
    process may see the folder change."""
    global _REMEMBERED
    outer = _REMEMBERED
    _REMEMBERED = {} if outer is None else outer
    try:
        yield
    finally:
        _REMEMBERED = outer


def check_not_splits(classes: Sequence[str], where: str, fix) -> None:
    """Refuse "classes" that are all split names (train/, val/, ...): the data path is the parent
    of the split to use, and training would learn from one class named "train".

    `where` names the source in the message; `fix(split)` says what to pass instead.
    """
    if not classes or not all(c.lower() in SPLIT_NAMES for c in classes):
        return
    pick = next((c for c in classes if c.lower() in ("train", "training")), classes[0])
    folders = ", ".join(f"{c}/" for c in classes)
    raise DataLayoutError(f"{where} holds only split folders ({folders}) where class folders belong; {fix(pick)}")


def check_class_count(classes: Sequence[str], need_labels: bool, where: str, found: str, hint: str = "") -> None:
    """One class: refused for evaluation data (`need_labels`), a one-time warning for training data.

    Self-supervised training ignores labels, so a single folder of unlabelled images is
    legitimate; but it is also what a wrong path looks like, and the labels matter to the
    k-NN / linear evaluations, which cannot score a single class.
    """
    if len(classes) >= EVAL_NEEDS_CLASSES:
        return
    if need_labels:
        raise DataLayoutError(f"{where} {found}: the k-NN and linear evaluations need labelled images in at "
                              f"least {EVAL_NEEDS_CLASSES} class folders (with one class every prediction is "
                              "right); pass a folder with one sub-folder per class (a recipe's online k-NN reads "
                              "--data.val and --data.knn_train, else --data.train; --eval.knn_every -1 turns it off)"
                              f"{hint}")
    if where in _WARNED_SINGLE_CLASS:
        return
    _WARNED_SINGLE_CLASS.add(where)
    warnings.warn(f"{where} {found}: training on it as unlabelled images (self-supervised training does not "
                  "use labels; only the k-NN and linear evaluations do, and they need their own labelled "
                  f"data with at least 2 classes){hint}", UserWarning, stacklevel=3)


def walk_files(folder: str | os.PathLike) -> list[str]:
    """Every file name under `folder`, links followed. From directory listings alone: no stat per
    file, which on a network filesystem is what makes an ImageNet-sized scan take minutes."""
    out = []
    for dirpath, _, names in os.walk(folder, followlinks=True):
        out.extend(os.path.join(dirpath, n) for n in names)
    return out


LIST_HINT = "expected one `relative/path/to/image.JPEG <label>` per line (paths relative to the list's folder)"


def scan_file_list(list_file: str | os.PathLike) -> tuple[list[tuple[str, int]], list[str]]:
    """(path, label) pairs from a text file list, as DALI's `file_list` format.

    Each non-empty line is `path label`; relative paths are resolved against the
    list's folder; `#` starts a comment. Class names are the label numbers, since a
    list carries no folder names. Missing files are reported before any training work.
    """
    list_file = Path(list_file).expanduser()
    base = list_file.parent
    samples: list[tuple[str, int]] = []
    missing: list[str] = []
    for lineno, raw in enumerate(list_file.read_text().splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        path, _, label = line.rpartition(" ")
        if not path or not label.strip().lstrip("-").isdigit() or int(label) < 0:
            raise DataLayoutError(f"{list_file}:{lineno}: cannot read {raw!r}; {LIST_HINT}")
        full = path.strip() if os.path.isabs(path.strip()) else str(base / path.strip())
        if not os.path.isfile(full):
            missing.append(full)
        samples.append((full, int(label)))
    if not samples:
        raise DataLayoutError(f"file list {str(list_file)!r} lists no images; {LIST_HINT}")
    if missing:
        raise DataLayoutError(f"file list {str(list_file)!r} names {len(missing)} missing files, e.g. "
                              f"{missing[0]!r}; fix the paths (relative to {str(base)!r}) or remove those lines")
    classes = [str(c) for c in range(max(label for _, label in samples) + 1)]
    used = sorted({label for _, label in samples})
    if len(used) == 1:
        check_class_count([str(used[0])], False, f"file list {str(list_file)!r}",
                          f"has one label ({used[0]}, {len(samples)} images)")
    return samples, classes


def scan_source(path: str | os.PathLike) -> tuple[list[tuple[str, int]], list[str]]:
    """Training data: an ImageNet-layout folder, or a text file list (`*.txt`): see the two
    scanners. One class is allowed (with a warning): self-supervised training ignores labels."""
    p = Path(path).expanduser()
    if p.is_file() and p.suffix.lower() == ".txt":
        return scan_file_list(p)
    return scan_image_folder(p, need_labels=False)

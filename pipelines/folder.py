"""Scanning an ImageNet-layout folder (root/<class>/<image>), with errors that say what to fix.

The class-index mapping is torchvision `ImageFolder`'s: sorted folder names.
"""

from __future__ import annotations

import os
from pathlib import Path

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
LAYOUT_HINT = "expected ImageNet layout: ROOT/<class_name>/<image>.JPEG, one folder per class"


class DataLayoutError(ValueError):
    """The data path does not hold images in the expected layout."""


def is_image_file(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def scan_image_folder(root: str | os.PathLike) -> tuple[list[tuple[str, int]], list[str]]:
    """All (path, class index) pairs under `root`, in a deterministic order, and the classes.

    Fails before any training work with a message naming the problem: a missing path,
    a file instead of a folder, no class folders, or a class folder without images.
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
    samples: list[tuple[str, int]] = []
    for idx, name in enumerate(classes):
        folder = root / name
        files = sorted(f for f in _walk_files(folder) if is_image_file(f))
        if not files:
            raise DataLayoutError(f"class folder {str(folder)!r} has no images "
                                  f"(extensions {', '.join(IMAGE_EXTENSIONS)}); remove it or add images")
        samples.extend((f, idx) for f in files)
    return samples, classes


def _walk_files(folder: Path) -> list[str]:
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
    return samples, classes


def scan_source(path: str | os.PathLike) -> tuple[list[tuple[str, int]], list[str]]:
    """An ImageNet-layout folder, or a text file list (`*.txt`): see the two scanners."""
    p = Path(path).expanduser()
    if p.is_file() and p.suffix.lower() == ".txt":
        return scan_file_list(p)
    return scan_image_folder(p)

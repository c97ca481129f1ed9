"""The `.beton` schema shared by the converter and the FFCV loader, and its checks.

One place names the fields, so a file written by `tools/convert_imagenet_to_ffcv.py` is
exactly what `pipelines.ffcv` reads, and a wrong or missing file fails with an error
that names the converter. The converter's worker processes are in `pipelines.beton_writer`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from pipelines.cores import torch_threads_kept

IMAGE_FIELD = "image"
LABEL_FIELD = "label"
CONVERTER = "tools/convert_imagenet_to_ffcv.py"
CONVERT_HINT = f"create it with `python {CONVERTER} /path/to/imagenet/train OUT.beton`"


class BetonError(ValueError):
    """The `.beton` file is missing or does not hold the fields fastssl writes."""


def summary_path(beton: str | Path) -> Path:
    """Where the converter writes its JSON summary (counts, skipped files, class names)."""
    return Path(f"{beton}.json")


def layout_damage(reader: Any, file_size: int) -> str:
    """What does not add up in a .beton's layout ("" when all does), from what FFCV's `Reader` read:
    its samples' metadata, and its allocation table, which runs from `alloc_table_ptr` to the end of
    the file and locates every sample's stored image, all before the table."""
    header, table = reader.header, reader.alloc_table
    table_bytes = file_size - int(header["alloc_table_ptr"])
    if table_bytes < 0 or table_bytes % table.dtype.itemsize:
        return f"its allocation table (the file's last {table_bytes} bytes) is not a whole number of entries"
    if len(reader.metadata) != reader.num_samples:
        return f"the header lists {reader.num_samples} images, the metadata holds {len(reader.metadata)}"
    if len(table) and int((table["ptr"] + table["size"]).max()) > int(header["alloc_table_ptr"]):
        return "an image's data runs past the start of the allocation table"
    ids = table["sample_id"]
    if len(ids) and int(ids.max()) >= reader.num_samples:
        return f"the allocation table locates image {int(ids.max())} of a file of {reader.num_samples}"
    located = np.zeros(reader.num_samples, dtype=bool)  # a mask, not np.unique: no sort of ImageNet's 1.28M ids
    located[ids] = True
    stored = int(located.sum())
    if stored != reader.num_samples:
        return f"the header lists {reader.num_samples} images, the allocation table locates {stored}"
    return ""


def check_beton(path: str | Path) -> list[str]:
    """Validate a `.beton` before training; returns its class names (label order) when known.

    Reads only the header, metadata and allocation table (FFCV's `Reader`), not the images, so it is
    cheap enough to run on every start; a file cut short is named here (`layout_damage`).
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise BetonError(f"{str(path)!r} does not exist; {CONVERT_HINT}")
    if path.is_dir():
        raise BetonError(f"{str(path)!r} is a folder; the ffcv backend reads one .beton file ({CONVERT_HINT}), "
                         "or use --data.backend dali / torchvision for a JPEG folder")
    with torch_threads_kept():  # FFCV's import sets torch's thread count to 1
        from ffcv.reader import Reader

    try:
        reader = Reader(str(path))
    except Exception as err:  # FFCV raises assorted errors on a file that is not a .beton
        raise BetonError(f"{str(path)!r} is not a readable .beton ({type(err).__name__}: {err}); {CONVERT_HINT}") from err
    fields = dict(reader.handlers)
    names = set(fields)
    if not {IMAGE_FIELD, LABEL_FIELD} <= names:
        raise BetonError(f"{str(path)!r} has fields {sorted(names)}, not {IMAGE_FIELD!r} and {LABEL_FIELD!r}; "
                         f"{CONVERT_HINT}")
    damage = layout_damage(reader, path.stat().st_size)
    if damage:  # FFCV's reader thread would die on it mid-epoch, and leave the training loop waiting
        raise BetonError(f"{str(path)!r} is damaged: {damage} (a copy or a download cut short?); copy it again, "
                         f"or {CONVERT_HINT}")
    classes: list[str] = []
    try:
        classes = list(json.loads(summary_path(path).read_text())["classes"])
    except (OSError, ValueError, KeyError):
        pass  # a .beton from elsewhere: labels still work, class names are unknown
    return classes

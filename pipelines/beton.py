"""The `.beton` schema shared by the converter and the FFCV loader, and its checks.

One place names the fields, so a file written by `tools/convert_imagenet_to_ffcv.py` is
exactly what `pipelines.ffcv` reads, and a wrong or missing file fails with an error
that names the converter. The converter's worker processes are in `pipelines.beton_writer`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from pipelines.cores import torch_threads_kept

IMAGE_FIELD = "image"
LABEL_FIELD = "label"
CONVERTER = "tools/convert_imagenet_to_ffcv.py"
CONVERT_HINT = f"create it with `python {CONVERTER} /path/to/imagenet/train OUT.beton`"


# How many stored JPEGs `image_damage` opens, spread over the file: 128 small reads, even on a network disk.
JPEG_SPOT_CHECKS = 64
JPEG_START, JPEG_END = b"\xff\xd8", b"\xff\xd9"  # the SOI and EOI markers every encoded JPEG has


class BetonError(ValueError):
    """The `.beton` file is missing or does not hold the fields fastssl writes."""


class BetonContents(NamedTuple):
    """What `check_beton` read, so the loader need not read the header and metadata again."""

    classes: list[str]  # class names in label order; empty when the file came from elsewhere
    num_images: int


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


def image_damage(reader: Any, path: Path, spot_checks: int = JPEG_SPOT_CHECKS) -> str:
    """What is wrong with the stored images ("" when nothing is found), without decoding them.

    Every image's data must be one allocation, and a raw one exactly height x width x 3 bytes; of the
    JPEGs, `spot_checks` spread over the file must start and end with JPEG's markers, which bytes zeroed
    or overwritten (a copy to a failing disk, a sparse file) lack. Only a decode would find all damage.
    """
    with torch_threads_kept():
        from ffcv.fields.rgb_image import IMAGE_MODES

    meta = reader.metadata[f"f{list(reader.handlers).index(IMAGE_FIELD)}"]
    table = reader.alloc_table
    # Each image's allocation, found by address. FFCV writes both arrays nearly sorted, so the sorts are
    # cheap, and sorted queries keep searchsorted's memory accesses sequential rather than random.
    by_ptr = np.argsort(table["ptr"], kind="stable")
    by_data = np.argsort(meta["data_ptr"], kind="stable")
    ptrs = table["ptr"][by_ptr]
    row = np.empty(len(meta), dtype=np.int64)
    row[by_data] = np.minimum(np.searchsorted(ptrs, meta["data_ptr"][by_data]), max(len(ptrs) - 1, 0))
    unallocated = np.flatnonzero(ptrs[row] != meta["data_ptr"]) if len(ptrs) else np.arange(len(meta))
    if len(unallocated):
        return f"image {int(unallocated[0])}'s data is not where the allocation table says"
    sizes = table["size"][by_ptr][row].astype(np.int64)
    raw = meta["mode"] == IMAGE_MODES["raw"]
    pixels = meta["height"].astype(np.int64) * meta["width"].astype(np.int64) * 3
    wrong = np.flatnonzero(raw & (sizes != pixels))
    if len(wrong):
        i = int(wrong[0])
        return (f"image {i} is stored raw as {int(sizes[i])} bytes, not {int(meta['height'][i])} x "
                f"{int(meta['width'][i])} x 3")
    jpegs = np.flatnonzero(~raw)
    with path.open("rb") as f:
        for i in jpegs[np.unique(np.linspace(0, len(jpegs) - 1, min(spot_checks, len(jpegs))).astype(np.int64))]:
            start, size = int(meta["data_ptr"][i]), int(sizes[i])
            f.seek(start)
            head = f.read(2)
            f.seek(start + size - 2)
            if size < 4 or head != JPEG_START or f.read(2) != JPEG_END:
                return (f"image {int(i)}'s stored JPEG lacks JPEG's start or end marker (its bytes zeroed or "
                        f"overwritten)")
    return ""


def check_beton(path: str | Path) -> BetonContents:
    """Validate a `.beton` before training; returns its class names (label order, when known) and size.

    Reads the header, metadata and allocation table (FFCV's `Reader`) and a few stored JPEGs' first and
    last bytes, not whole images, so it is cheap enough to run on every start; a file cut short is named
    here (`layout_damage`), and so are images zeroed or overwritten that a spot check meets (`image_damage`).
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
    if type(reader.handlers[IMAGE_FIELD]).__name__ != "RGBImageField":
        raise BetonError(f"{str(path)!r} stores its {IMAGE_FIELD!r} field as "
                         f"{type(reader.handlers[IMAGE_FIELD]).__name__}, not the RGBImageField fastssl reads; "
                         f"{CONVERT_HINT}")
    damage = layout_damage(reader, path.stat().st_size) or image_damage(reader, path)
    if damage:  # FFCV's reader thread would die on it mid-epoch, and leave the training loop waiting
        raise BetonError(f"{str(path)!r} is damaged: {damage} (a copy or a download cut short or gone wrong?); "
                         f"copy it again, or {CONVERT_HINT}")
    classes: list[str] = []
    try:
        classes = list(json.loads(summary_path(path).read_text())["classes"])
    except (OSError, ValueError, KeyError):
        pass  # a .beton from elsewhere: labels still work, class names are unknown
    return BetonContents(classes, int(reader.num_samples))

"""How large a .beton will be, estimated from a sample of the source's image headers.

Why: converting ImageNet takes an hour or more and writes about 2.4 times the JPEGs (about
340 GB at the defaults). A disk that fills near the end loses all of it, so the converter
checks the estimate against the free space first. Images stored raw (`write_mode` raw, or
the share of `proportion` that is not compressed) take exactly width x height x 3 bytes
after the resize to `max_resolution`; compressed ones are estimated at the source file's
bytes per pixel, which is the uncertain part.
"""

from __future__ import annotations

import os
import random
from collections.abc import Sequence

__all__ = ["stored_bytes", "estimate_beton_bytes", "size_text", "SAMPLE_SIZE", "PAGE_BYTES"]

SAMPLE_SIZE = 400  # headers read (a few ms each, even on a network filesystem)
PAGE_BYTES = 8 * 2**20  # FFCV DatasetWriter's default page: a sample never spans two
PAGE_WASTE = 1.05  # the unfilled end of each page (about half a sample per page)


def size_text(num_bytes: float) -> str:
    """A size as the converter's messages say it: GB from 1 GB, MB from 1 MB, then kB, then bytes (a
    small set's "0.0 GB" said nothing)."""
    for unit, scale, digits in (("GB", 1e9, 1), ("MB", 1e6, 0), ("kB", 1e3, 0)):
        if num_bytes >= scale:
            return f"{num_bytes / scale:.{digits}f} {unit}"
    return f"{num_bytes:.0f} bytes"


def stored_bytes(width: int, height: int, file_bytes: int, *, max_resolution: int, write_mode: str,
                 compress_probability: float) -> float:
    """Expected bytes FFCV's RGBImageField stores for one image of the source (its resize: the
    longest side down to `max_resolution`, never up)."""
    scale = min(1.0, max_resolution / max(width, height))
    w, h = max(1, round(width * scale)), max(1, round(height * scale))
    raw = w * h * 3
    compressed = file_bytes * (w * h) / (width * height)
    if write_mode == "raw":
        return float(raw)
    if write_mode in ("jpg", "smart"):
        return compressed
    return compress_probability * compressed + (1 - compress_probability) * raw  # "proportion"


def estimate_beton_bytes(paths: Sequence[str], *, max_resolution: int, write_mode: str,
                         compress_probability: float, num_workers: int, sample_size: int = SAMPLE_SIZE,
                         seed: int = 0) -> int:
    """The .beton's expected size for all `paths`: the mean of `stored_bytes` over a seeded
    sample of their headers, times their number, with FFCV's paging (the unfilled end of each
    page, and a page per writer process, plus one for the header and tables)."""
    from PIL import Image

    from pipelines.images import open_image_file

    pages = (num_workers + 1) * PAGE_BYTES
    if not paths:
        return pages
    picked = random.Random(seed).sample(list(paths), min(sample_size, len(paths)))
    sizes = []
    for path in picked:
        try:
            with open_image_file(path) as f, Image.open(f) as img:  # the header only
                width, height = img.size
            file_bytes = os.path.getsize(path)
        except (OSError, ValueError):  # gone or broken since it was checked: the writer reports it, by name
            continue
        sizes.append(stored_bytes(width, height, file_bytes, max_resolution=max_resolution, write_mode=write_mode,
                                  compress_probability=compress_probability))
    if not sizes:
        return pages
    return int(len(paths) * sum(sizes) / len(sizes) * PAGE_WASTE) + pages

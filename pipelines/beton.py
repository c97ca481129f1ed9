"""The `.beton` schema shared by the converter and the FFCV loader, and its checks.

One place names the fields, so a file written by `tools/convert_imagenet_to_ffcv.py` is
exactly what `pipelines.ffcv` reads, and a wrong or missing file fails with an error
that names the converter. The converter's worker processes are in `pipelines.beton_writer`.
"""

from __future__ import annotations

import json
from pathlib import Path

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


def check_beton(path: str | Path) -> list[str]:
    """Validate a `.beton` before training; returns its class names (label order) when known.

    Reads only the header (FFCV's `Reader`), so it is cheap enough to run on every start.
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
    classes: list[str] = []
    try:
        classes = list(json.loads(summary_path(path).read_text())["classes"])
    except (OSError, ValueError, KeyError):
        pass  # a .beton from elsewhere: labels still work, class names are unknown
    return classes

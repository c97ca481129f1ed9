#!/usr/bin/env python3
"""Generate the small, download-free demo dataset (ImageNet folder layout).

The command line of `pipelines/demo_data.py`, which writes the dataset and says how the
output stays byte-identical for the same arguments, whatever the number of workers;
`pipelines/demo_images.py` renders the images and says why they look as they do (classes
by shape and texture only, colours drawn from one distribution for every class).

Layout written::

    OUT/train/<class_name>/<class_name>_<i>.JPEG
    OUT/val/<class_name>/<class_name>_<i>.JPEG
    OUT/manifest.json          (written last; marks the dataset complete)

Exit status: 0 when OUT holds the dataset (written now, or already there); 2 for bad
options, an OUT that holds an incomplete or different demo dataset (without --force) or
anything that is not a demo dataset (--force or not), or an OUT that cannot be created or
filled (a full disk); 130 / 143 when stopped by Ctrl-C / SIGTERM (the unfinished dataset removed).

Usage::

    python tools/make_demo_dataset.py data/demo            # defaults
    python tools/make_demo_dataset.py data/demo --force    # rebuild
    python tools/make_demo_dataset.py --help               # sizes, seed, workers
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

from fastssl.arg_types import MAX_WORKERS, int_at_least, seed_number
from fastssl.cli import ToolArgumentParser, stop_in_one_line, write_fix
from pipelines.demo_data import (DEFAULT_IMAGE_SIZE, DEFAULT_NUM_CLASSES, DEFAULT_SEED, DEFAULT_TRAIN_PER_CLASS,
                                 DEFAULT_VAL_PER_CLASS, MAX_IMAGE_SIZE, MIN_IMAGE_SIZE, DatasetExistsError,
                                 OutputDirError, make_demo_dataset)
from pipelines.demo_images import MAX_CLASSES


def build_parser() -> argparse.ArgumentParser:
    """The flags; ranges are checked here, so a bad value exits 2 naming its flag before any work."""
    p = ToolArgumentParser(
        description="Generate the synthetic shape/texture demo dataset (ImageNet folder layout, no download).",
    )
    p.add_argument("out_dir", type=Path, help="output directory (e.g. data/demo)")
    p.add_argument("--num-classes", type=int_at_least(2, MAX_CLASSES), default=DEFAULT_NUM_CLASSES,
                   help=f"number of (shape, texture) classes, 2..{MAX_CLASSES} (default %(default)s)")
    p.add_argument("--train-per-class", type=int_at_least(1), default=DEFAULT_TRAIN_PER_CLASS,
                   help="training images per class (default %(default)s)")
    p.add_argument("--val-per-class", type=int_at_least(1), default=DEFAULT_VAL_PER_CLASS,
                   help="validation images per class (default %(default)s)")
    p.add_argument("--image-size", type=int_at_least(MIN_IMAGE_SIZE, MAX_IMAGE_SIZE), default=DEFAULT_IMAGE_SIZE,
                   help="side of the square images in pixels (default %(default)s)")
    p.add_argument("--seed", type=seed_number, default=DEFAULT_SEED, help="random seed (default %(default)s)")
    p.add_argument("--force", action="store_true",
                   help="rebuild even if OUT holds a demo dataset (incomplete or made with other arguments); "
                        "any other non-empty OUT is refused")
    p.add_argument("--workers", type=int_at_least(1, MAX_WORKERS), default=None,
                   help="parallel processes (default: available cores, at most 8); output does not depend on it")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Make the dataset and say what happened in one line; the refusals are one `error:` line and exit 2."""
    args = build_parser().parse_args(argv)
    try:
        result = make_demo_dataset(
            args.out_dir,
            num_classes=args.num_classes,
            train_per_class=args.train_per_class,
            val_per_class=args.val_per_class,
            image_size=args.image_size,
            seed=args.seed,
            force=args.force,
            progress=not args.no_progress,
            workers=args.workers,
        )
    except (DatasetExistsError, OutputDirError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # a disk that filled up, a folder made read-only, from a render worker or here
        print(f"error: the dataset could not be written under {args.out_dir} ({err.strerror or err}; the unfinished "
              f"one is removed); {write_fix(err, 'OUT')}", file=sys.stderr)
        return 2
    counts = result["counts"]
    if result["status"] == "exists":
        print(f"{args.out_dir}: already up to date ({counts['train']} train / {counts['val']} val images); nothing to do")
    else:
        print(f"{args.out_dir}: wrote {counts['train']} train / {counts['val']} val images, "
              f"{len(result['classes'])} classes in {result['seconds']} s")
    return 0


if __name__ == "__main__":
    with stop_in_one_line("the unfinished dataset is removed: run the command again"):
        sys.exit(main())

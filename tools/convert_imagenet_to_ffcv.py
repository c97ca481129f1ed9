#!/usr/bin/env python3
"""Convert an ImageNet-layout split into an FFCV `.beton` for `--data.backend ffcv`.

    python tools/convert_imagenet_to_ffcv.py /data/imagenet/train train.beton
    python tools/convert_imagenet_to_ffcv.py /data/imagenet/val val.beton              # class folders
    python tools/convert_imagenet_to_ffcv.py /data/imagenet/val val.beton \\
        --labels val_labels.txt --classes-from /data/imagenet/train                       # flat folder

What it guarantees:
* Labels are torchvision `ImageFolder`'s (sorted class-folder names), so a checkpoint's
  k-NN or linear probe means the same class on a folder and on a `.beton`. The class
  names, in label order, are written beside the output in `OUT.json` (e.g. `train.beton.json`).
* Bad input is skipped and reported, never fatal: non-image files, truncated or corrupt
  images, and empty class folders are listed with the reason in the summary;
  CMYK, grayscale, palette and PNG-named-.JPEG images are converted to RGB. Each image is
  read and decoded once, by the worker that writes it (no separate check pass).
* Exit status: 0 whenever the `.beton` was produced (skips included); 1 when it could not
  be (nothing readable, a write error such as a full disk, a worker that crashed, another
  converter writing the same output); 2 for a usage error: bad options, a missing source,
  --classes-from or output folder, a missing or malformed labels file, an output folder you
  cannot write to, an output that exists without --force, or a source that holds splits
  (`train/`, `val/`) instead of class folders (the message names the split folder to pass).
* A disk that cannot hold it is refused before any image is written: the size is estimated
  from a sample of the images' headers (raw storage exactly, compressed images at the
  source's bytes per pixel, which errs high; ImageNet at the defaults: about 2.4 times the
  JPEGs), and `--max-resolution 256` or `--write-mode jpg` make it smaller.
* A stopped conversion loses nothing: the `.beton` is written in a hidden folder beside it,
  `.OUT.partial/`, and moved into place only when complete. Progress is saved there every
  `--checkpoint-every` seconds (default 60) and when the converter is stopped (Ctrl-C,
  SIGTERM, a SLURM time limit) or fails (a full disk, a crashed worker); rerunning the same
  command continues from the saved images, and says so (skipped images are tried again).
  Other files or options start over (saying so), as does `--restart`. A failure before
  any image was saved removes the folder; two converters never write one output at once
  (where the filesystem supports `flock`). A resumed `.beton` reads the same, and may be
  a few pages per worker larger (pages written after the last save are written again).
  Even after `kill -9` of the converter its workers exit (they die with their parent).
* It never hangs and is safe to call from a process that has run DALI or CUDA: the
  workers come from a fork server, never from a fork of the caller, and a worker that
  dies fails the conversion within a second (see `pipelines/beton_writer.py`, `worker_context`).
* The same inputs give the same `.beton`: the JPEG-or-raw choice of `--write-mode
  proportion` is drawn from a per-image seed, not from worker timing.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from fastssl.arg_types import MAX_WORKERS, int_at_least, number_in
from fastssl.cli import ToolArgumentParser, interrupt_exit_status, interrupted_by, stop_signals_interrupt
from pipelines.beton import summary_path
from pipelines.beton_convert import (DEFAULT_COMPRESS_PROBABILITY, DEFAULT_JPEG_QUALITY, WRITE_MODES, ConversionError,
                                    UsageError, convert)
from pipelines.beton_resume import CHECKPOINT_EVERY_S


def print_summary(summary: dict) -> None:
    mb = summary["bytes"] / 2**20
    resumed = f", {summary['resumed']} of them by an earlier run" if summary["resumed"] else ""
    print(f"wrote {summary['output']}: {summary['written']} images{resumed}, {summary['num_classes']} classes, "
          f"{mb:.1f} MiB in {summary['seconds']:.1f} s ({summary['images_per_s']:.0f} images/s)")
    if summary["skipped"]:
        print(f"skipped {len(summary['skipped'])}:")
        for item in summary["skipped"][:20]:
            print(f"  {item['path']}: {item['reason']}")
        if len(summary["skipped"]) > 20:
            print(f"  ... and {len(summary['skipped']) - 20} more (all listed in {summary_path(summary['output'])})")
    print(f"summary and class names: {summary_path(summary['output'])}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = ToolArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("src", type=Path, help="split folder: class sub-folders, or flat files with --labels")
    ap.add_argument("out", type=Path, help="output .beton (its summary goes to OUT.json)")
    ap.add_argument("--labels", type=Path, help="flat folders: file of `<file name> <class name or number>` lines")
    ap.add_argument("--classes-from", type=Path, help="take the class list (sorted folder names) from this split")
    ap.add_argument("--max-resolution", type=int_at_least(8), default=500,
                    help="longest side after resizing (default 500)")
    ap.add_argument("--jpeg-quality", type=int_at_least(1, 100),
                    help=f"JPEG quality of stored images (default {DEFAULT_JPEG_QUALITY}; not with --write-mode raw)")
    ap.add_argument("--compress-probability", type=number_in(0, 1),
                    help="'proportion' mode: share of images stored as JPEG, the rest raw "
                    f"(default {DEFAULT_COMPRESS_PROBABILITY})")
    ap.add_argument("--write-mode", choices=WRITE_MODES, default="proportion",
                    help="FFCV's image storage mode (default proportion)")
    ap.add_argument("--num-workers", type=int_at_least(0, MAX_WORKERS), default=0,
                    help="processes (default: every core this process may use)")
    ap.add_argument("--subset-per-class", type=int_at_least(0), default=0,
                    help="keep the first N images of each class (0 = all)")
    ap.add_argument("--force", action="store_true", help="replace an existing OUT")
    ap.add_argument("--restart", action="store_true",
                    help="discard the progress an interrupted conversion saved in .OUT.partial/ and start over")
    ap.add_argument("--checkpoint-every", type=number_in(0, low_open=True), default=CHECKPOINT_EVERY_S,
                    metavar="SECONDS",
                    help=f"save progress this often while writing (default {CHECKPOINT_EVERY_S:g})")
    ap.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = ap.parse_args(argv)
    if args.out.suffix != ".beton":
        ap.error(f"OUT should end in .beton, got {str(args.out)!r}")
    # An option the storage mode does not read is said, not silently dropped: FFCV's RGBImageField
    # reads the quality in every mode that writes JPEGs, the probability in 'proportion' only.
    unused = [flag for flag, value, modes in (("--jpeg-quality", args.jpeg_quality, ("proportion", "jpg", "smart")),
                                              ("--compress-probability", args.compress_probability, ("proportion",)))
              if value is not None and args.write_mode not in modes]
    if unused:
        print(f"note: {' and '.join(unused)} {'has' if len(unused) == 1 else 'have'} no effect with --write-mode "
              f"{args.write_mode}", file=sys.stderr)
    if args.jpeg_quality is None:
        args.jpeg_quality = DEFAULT_JPEG_QUALITY
    if args.compress_probability is None:
        args.compress_probability = DEFAULT_COMPRESS_PROBABILITY
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        with stop_signals_interrupt():  # SIGTERM / SIGHUP go through the clean-up as Ctrl-C does
            summary = convert(args.src, args.out, labels=args.labels, classes_from=args.classes_from,
                              max_resolution=args.max_resolution, jpeg_quality=args.jpeg_quality,
                              compress_probability=args.compress_probability, write_mode=args.write_mode,
                              num_workers=args.num_workers, subset_per_class=args.subset_per_class,
                              force=args.force, restart=args.restart, progress=not args.no_progress,
                              checkpoint_every_s=args.checkpoint_every)
    except ConversionError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2 if isinstance(err, UsageError) else 1
    except KeyboardInterrupt as err:  # what was kept is said by the conversion's clean-up
        print(interrupted_by(err), file=sys.stderr)
        return interrupt_exit_status(err)
    print_summary(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())

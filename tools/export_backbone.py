#!/usr/bin/env python3
"""Detection-ready weights: a run's exported backbone for torchvision and detectron2 detectors.

The backbone is the one the run exported (`model.export`): the EMA teacher's by default, the student's
in the MoCo recipes.

    python tools/export_backbone.py runs/demo/<timestamp>                 # both formats, into the run
    python tools/export_backbone.py backbone_resnet50.pth --format detectron2 --out-dir exports/

Writes (beside the backbone by default):
- <stem>_tv_detection.pth: the state dict of torchvision's detection `backbone.body`
  (FrozenBatchNorm2d buffers, no fc); load it with
  `fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None).backbone.body.load_state_dict(torch.load(p))`;
- <stem>_detectron2.pkl: detectron2's checkpoint layout and key names (MODEL.WEIGHTS), with
  the config changes that torchvision-trained weights need (printed, and in README).
"""

from __future__ import annotations

import pickle
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

import torch

from fastssl.arg_types import comma_list, one_of
from fastssl.cli import ToolArgumentParser, exit_with, stop_in_one_line, write_fix
from fastssl.eval.backbone_io import load_backbone
from fastssl.eval.errors import EvalError
from fastssl.eval.targets import resolve_target
from fastssl.models.backbone import FEATURE_DIMS
from fastssl.models.detection_export import (ExportError, d2_config_note, detectron2_checkpoint,
                                             torchvision_detection_state)

FORMATS = ("torchvision", "detectron2")


def atomic_write(path: Path, write: Callable[[BinaryIO], object]) -> None:
    """Write through a temporary file: a failed export leaves no half file behind."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def main(argv: list[str] | None = None) -> dict[str, Path]:
    ap = ToolArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("target", help="a run directory, or an exported backbone_<arch>.pth")
    ap.add_argument("--arch", choices=sorted(FEATURE_DIMS), help="default: the run's, or inferred from the weights")
    ap.add_argument("--format", type=comma_list(one_of(FORMATS)), default=list(FORMATS),
                    help=f"comma-separated subset of {', '.join(FORMATS)} (default: both)")
    ap.add_argument("--out-dir", help="where to write (default: beside the backbone)")
    args = ap.parse_args(argv)
    formats = args.format
    try:
        found = resolve_target(args.target, tool="export", arch=args.arch)  # the weights alone: no data
        path = Path(found["checkpoint"])
        # The same checks as every tool (the right file, a known architecture); the loaded weights are the file's.
        backbone, arch = load_backbone(path, found["arch"])  # the arch inferred from the weights when not given
        state = backbone.state_dict()
        out_dir = Path(args.out_dir) if args.out_dir else path.parent
        if out_dir.exists() and not out_dir.is_dir():
            raise EvalError(f"--out-dir {str(out_dir)!r} is a file, not a directory; name a directory")
        body = torchvision_detection_state(state)
        d2 = detectron2_checkpoint(state) if "detectron2" in formats else None
        try:  # made only once the export is known to succeed
            out_dir.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise EvalError(f"--out-dir {str(out_dir)!r} cannot be created ({err.strerror}); name a writable directory")
    except (EvalError, ExportError) as err:
        exit_with(err)
    written, replaced = {}, set()
    try:  # a failed write (a full disk, a folder of that name) keeps the file it would have replaced
        if "torchvision" in formats:
            written["torchvision"] = out_dir / f"{path.stem}_tv_detection.pth"
            if written["torchvision"].exists():
                replaced.add("torchvision")
            atomic_write(written["torchvision"], lambda f: torch.save(body, f))
        if d2 is not None:
            written["detectron2"] = out_dir / f"{path.stem}_detectron2.pkl"
            if written["detectron2"].exists():
                replaced.add("detectron2")
            atomic_write(written["detectron2"], lambda f: pickle.dump(d2, f))
    except (OSError, RuntimeError) as err:  # torch.save's writer reports a full disk as a RuntimeError
        why = "the write stopped short: is the disk full?" if isinstance(err, RuntimeError) else err.strerror or err
        exit_with(f"{str(list(written.values())[-1])!r} could not be written ({why}); {write_fix(err, '--out-dir')}")
    for fmt, p in written.items():  # a shared --out-dir holds one file per backbone name: say when one was replaced
        print(f"wrote {p} ({fmt})" + (" (replacing the file there; pass --out-dir elsewhere to keep both)"
                                      if fmt in replaced else ""))
    if d2 is not None:
        print(f"detectron2 config: MODEL.WEIGHTS {written['detectron2']}, {d2_config_note(arch)}")
    return written


if __name__ == "__main__":
    with stop_in_one_line("a file written before is kept whole, an unfinished one removed: run the command again"):
        main()

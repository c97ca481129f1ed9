#!/usr/bin/env python3
"""Semi-supervised evaluation: fine-tune the whole backbone + a new linear head on a labelled subset.

    python tools/finetune_semi.py backbone_resnet50.pth --train /data/imagenet/train \\
        --val /data/imagenet/val --subset 1percent.txt        # SimCLR's ImageNet 1% list
    python tools/finetune_semi.py runs/demo/<timestamp> --subset demo_10percent.txt --batch-size 32

The subset is a text file with one image per line: a file name (`n01440764_10026.JPEG`,
as in SimCLR's `imagenet_subsets/1percent.txt` and `10percent.txt`) or a path relative to
the train root (`n01440764/n01440764_10026.JPEG`); blank lines and `#` comments are
ignored, repeated lines count once. A line that names no image of the train folder is an
error (with the count and a few examples), not a silent skip: a subset with missing images
is another benchmark.

Protocol. The paper (Sec. 4.2, Table 4) only says it follows SimCLR / BYOL: "add a linear
classifier on top of the trained backbone and fine-tune the model with ImageNet 1% and 10%
subsets"; its hyper-parameters are not in the text we have. So this tool uses SwAV's
published recipe (eval_semisup.py and its README; MIRA builds on SwAV's code base):
20 epochs, batch 256, SGD momentum 0.9, weight decay 0, lr 0.02 for the backbone and 5 for
the head with 1% of labels (0.01 and 0.2 with 10%), both multiplied by 0.2 at epochs 12
and 16; a new linear head with PyTorch's own nn.Linear initialisation (SwAV's: the
pretrained weights do not cover its head); random-resized crop (0.08-1) + flip for
training; BatchNorm in training mode while fine-tuning; val: resize size / 0.875 + centre
crop `size` (256 / 224 on ImageNet; the run's eval.crop_fraction or --crop-fraction
replaces 0.875).
Departures: the lrs are given for batch 256 and scaled linearly with --batch-size (the
paper's footnote 5: "we also use a linearly scaled learning rate for evaluation
training"), so a small set can use a small batch; SwAV reports the best val accuracy over
the epochs, this tool the accuracy after the last epoch (choosing on val overstates it);
a subset smaller than the batch is one batch, and the lrs scale with that size;
a last batch of a single image is dropped (BatchNorm cannot train on it). The 1% or 10%
preset is picked from the subset's share of the train folder unless --labels-perc says.
Writes JSON (default RUN_DIR/finetune_semi_<subset file's stem>.json, or
<stem>_finetune_semi_<subset stem>.json beside a backbone file) with the settings and the
result; the run's report picks each up. After every epoch the fine-tuning saves its progress
beside the report (`.<report name>.partial.pt`): stopped, the same command goes on from its
last epoch; other settings, weights or subsets start over, as does --restart.
"""

from __future__ import annotations

import argparse

from fastssl.cli import ToolArgumentParser, exit_with
from fastssl.eval.classifier import add_data_arguments, add_run_arguments, train_and_report
from fastssl.arg_types import comma_list, int_at_least, learning_rate, number_in, seed_number
from fastssl.eval.errors import EvalError
from fastssl.eval.finetune import PRESETS, finetune_on_subset, prepare
from pipelines.eval import EvalBackendError


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = ToolArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("target", help="a run directory, or an exported backbone_<arch>.pth")
    ap.add_argument("--subset", required=True, help="text file: the labelled images, one per line")
    add_data_arguments(ap, train_help="train folder the subset names images of (default: the run's data.train)")
    ap.add_argument("--labels-perc", choices=sorted(PRESETS), help="lr preset (default: from the subset's share)")
    ap.add_argument("--epochs", type=int_at_least(1), default=20)
    ap.add_argument("--batch-size", type=int_at_least(1), default=256)
    ap.add_argument("--lr", type=learning_rate, help="backbone lr at batch 256 (default: the preset's)")
    ap.add_argument("--lr-head", type=learning_rate, help="head lr at batch 256 (default: the preset's)")
    ap.add_argument("--milestones", type=comma_list(int_at_least(1), allow_empty=True), default=[12, 16],
                    help="comma-separated epochs at which both lrs are multiplied by --gamma (default 12,16; "
                    "'' for none)")
    ap.add_argument("--gamma", type=number_in(0, 1, low_open=True), default=0.2, help="lr factor at each milestone")
    ap.add_argument("--momentum", type=number_in(0, 1, high_open=True), default=0.9)
    ap.add_argument("--weight-decay", type=number_in(0), default=0.0)
    ap.add_argument("--seed", type=seed_number, default=31)
    ap.add_argument("--eval-batch-size", type=int_at_least(1), default=256)
    ap.add_argument("--restart", action="store_true",
                    help="start over, discarding an unfinished run's saved epochs (kept beside the report)")
    add_run_arguments(ap, loader_help="reader of the val images (resize + centre crop): torchvision or dali; "
                                      "the fine-tuning crops always use torchvision")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    try:
        inputs, subset = prepare(args)
    except (EvalError, EvalBackendError) as err:
        exit_with(err)
    try:
        return train_and_report(inputs, lambda: finetune_on_subset(inputs, subset, args), lambda report: (
            f"fine-tuned on {len(subset)} images ({100 * report['subset_share']:.1f}% of train): "
            f"top1 {report['top1']:.1f}  top5 {report['top5']:.1f}  ({report['seconds']['total']:.0f} s)"))
    except EvalError as err:  # a split whose every image is unreadable, a report that cannot be written
        exit_with(err)

if __name__ == "__main__":
    main()

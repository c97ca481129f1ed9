#!/usr/bin/env python3
"""Linear evaluation (MIRA's protocol) of a frozen backbone: an exported backbone or a run directory.

    python tools/eval_linear.py runs/demo/<timestamp> --cached-features   # demo: about 2 min on 2 CPU cores
    python tools/eval_linear.py backbone_resnet50.pth --train /data/imagenet/train --val /data/imagenet/val

The protocol (paper Sec. 4.2 and footnotes 5-6, the authors' eval_linear.py): a linear
classifier (init N(0, 0.01), zero bias) on the frozen EMA-teacher backbone (eval mode,
BatchNorm running statistics), cross-entropy, SGD momentum 0.9, weight decay 0, batch 1024
(or the whole training set when smaller), lr = 0.075 x batch / 256 (the paper's choice for
its 400-epoch multi-crop model, picked on a held-out part of ImageNet train; pick yours
with --base-lr), cosine annealing per epoch to 0, 100 epochs. Training images:
random-resized crop (scale 0.08-1) + horizontal flip; val: resize 256 + centre crop 224,
scaled to the run's crop size as tools/eval_knn.py does (resize size / 0.875, centre
crop `size`; the run's eval.crop_fraction or --crop-fraction replaces 0.875: 1.0 for CIFAR,
whose 32-px images are taken whole). Top-1 / top-5 on val, in percent.

`--protocol mlcpc-cifar` is ML-CPC's CIFAR linear evaluation instead (their
main_lincls_cifar.py as their README runs it: lr 3 at batch 256, x0.1 at epochs 60 and 80,
100 epochs, RandomCrop(32, padding=4) + flip, every batch kept); --epochs, --batch-size and
--base-lr override either protocol's values.

Two ways to feed the classifier:
- default (per-epoch augmentation, the paper's protocol): every epoch crops every image of
  its full batches afresh and runs the frozen backbone on it, i.e. one backbone forward per
  image per epoch (100 passes over the training set; hours on ImageNet even on a GPU, too slow
  on a CPU). Under MIRA's protocol, in both modes, a short last batch is dropped each epoch
  (a different one each time), as the authors' DataLoader(drop_last=True).
- --cached-features (fast, NOT the paper's protocol): the backbone runs once per cached
  copy. With --cached-views K (default 10) the cache holds K random-resized-crop + flip
  copies of every training image, drawn once; every epoch each image (of a full batch)
  contributes ONE of its K copies, picked at random, so the classifier sees at most K
  distinct augmentations of an image instead of a fresh one per epoch. --cached-views 0 caches the val transform
  (resize + centre crop, no augmentation) once per image. The cache takes K x N x D x 4
  bytes of memory (ImageNet, ResNet-50, K = 10: 105 GB; --cache-dtype float16 halves it) plus
  one copy's float32 features while it is built; the tool refuses before any work when the
  machine's available memory is short, and says what would fit.

Data order, head initialisation and the choice of cached copy come from --seed; given the
same cached features, the two modes see the same batches in the same order. After every epoch
the probe saves its progress beside the report (`.<report name>.partial.pt`): a stopped
probe (a time limit, Ctrl-C, kill) rerun with the same command goes on from its last epoch and
ends as an uninterrupted one would (the --cached-features cache is computed again); other
settings start over, as does --restart. Writes JSON
(default RUN_DIR/eval_linear.json, or <stem>_eval_linear.json beside a backbone file)
with the settings used, the per-epoch loss and the timings, and (for a run directory)
the run's own k-NN figure beside it.
"""

from __future__ import annotations

import argparse

from fastssl.cli import ToolArgumentParser, exit_with
from fastssl.eval.classifier import add_data_arguments, add_run_arguments, train_and_report
from fastssl.arg_types import int_at_least, learning_rate, number_in, seed_number
from fastssl.eval.errors import EvalError
from fastssl.eval.linear import PROTOCOLS, apply_protocol, linear_probe, prepare
from pipelines.eval import EvalBackendError


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = ToolArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("target", help="a run directory, or an exported backbone_<arch>.pth")
    add_data_arguments(ap, train_help="labelled training folder (default: the run's data.train)")
    ap.add_argument("--protocol", choices=sorted(PROTOCOLS), default="mira",
                    help="mira: the MIRA paper's (cosine, random-resized crops, batch 1024, base lr 0.075, a short "
                    "last batch dropped); mlcpc-cifar: ML-CPC's CIFAR main_lincls_cifar.py (lr 3 at batch 256, "
                    "x0.1 at epochs 60 and 80, RandomCrop(32, padding=4)); both 100 epochs, momentum 0.9, wd 0")
    ap.add_argument("--epochs", type=int_at_least(1), help="default: the protocol's (100)")
    ap.add_argument("--batch-size", type=int_at_least(1), help="default: the protocol's (1024 / 256)")
    ap.add_argument("--base-lr", type=learning_rate,
                    help="lr = base_lr x batch / 256 (default: the protocol's: 0.075 / 3)")
    ap.add_argument("--momentum", type=number_in(0, 1, high_open=True), default=0.9)
    ap.add_argument("--weight-decay", type=number_in(0), default=0.0)
    ap.add_argument("--cached-features", action="store_true",
                    help="run the backbone once per cached copy and train on the stored features (fast)")
    ap.add_argument("--cached-views", type=int_at_least(0), default=10,
                    help="augmented copies per training image in the cache; 0 = one centre crop each")
    ap.add_argument("--cache-dtype", choices=("float32", "float16"), default="float32")
    ap.add_argument("--seed", type=seed_number, default=0)
    ap.add_argument("--extract-batch-size", type=int_at_least(1), default=256,
                    help="batch for running the frozen backbone")
    ap.add_argument("--restart", action="store_true",
                    help="start over, discarding an unfinished probe's saved epochs (kept beside the report)")
    add_run_arguments(ap, loader_help="reader of the resize + centre-crop images (val, and the --cached-views 0 "
                                      "cache): torchvision or dali; the random-resized-crop training images always "
                                      "use torchvision")
    return apply_protocol(ap.parse_args(argv))


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    try:
        inputs = prepare(args)
    except (EvalError, EvalBackendError) as err:
        exit_with(err)
    try:
        return train_and_report(inputs, lambda: linear_probe(inputs, args), lambda report: (
            f"linear ({report['features']}): top1 {report['top1']:.1f}  top5 {report['top5']:.1f}  "
            f"({report['seconds']['total']:.0f} s)"))
    except EvalError as err:  # a split whose every image is unreadable, a report that cannot be written
        exit_with(err)

if __name__ == "__main__":
    main()

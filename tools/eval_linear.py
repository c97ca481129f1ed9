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
crop `size`). Top-1 / top-5 on val, in percent.

Two ways to feed the classifier:
- default (per-epoch augmentation, the paper's protocol): every epoch crops every image
  afresh and runs the frozen backbone on it, i.e. one backbone forward per image per epoch
  (100 passes over the training set; hours on ImageNet even on a GPU, too slow on a CPU).
- --cached-features (fast, NOT the paper's protocol): the backbone runs once per cached
  copy. With --cached-views K (default 10) the cache holds K random-resized-crop + flip
  copies of every training image, drawn once; every epoch each image contributes ONE of
  its K copies, picked at random, so the classifier sees at most K distinct augmentations
  of an image instead of a fresh one per epoch. --cached-views 0 caches the val transform
  (resize + centre crop, no augmentation) once per image. The cache takes K x N x D x 4
  bytes (--cache-dtype float16 halves it: about 26 GB for ImageNet at K = 10, ResNet-50).

Data order, head initialisation and the choice of cached copy come from --seed; given the
same cached features, the two modes see the same batches in the same order. Writes JSON
(default RUN_DIR/eval_linear.json, or <stem>_eval_linear.json beside a backbone file)
with the settings used, the per-epoch loss and the timings, and (for a run directory)
the run's own k-NN figure beside it.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
import torch.nn.functional as F

from fastssl.cli import exit_with
from fastssl.eval.backbone_io import load_backbone
from fastssl.eval.classifier import (LabelledImages, autocast, batches_loader, epoch_batches, evaluate_head,
                                     extract_eval, extract_samples, new_head, progress_bar, scan_splits, sgd_step,
                                     to_device, train_transform)
from fastssl.eval.errors import EvalError
from fastssl.eval.targets import resolve_target, run_knn_figure
from fastssl.models.backbone import FEATURE_DIMS
from fastssl.run_log import utc_now, write_json
from fastssl.runtime import pick_device
from fastssl.schedules import cosine, scaled_lr
from pipelines.eval import EVAL_BACKENDS, EvalBackendError, eval_loader_class

# (features, labels) for one batch of training-set indices, given the epoch.
FeatureSource = Callable[[int, list[list[int]]], Iterator[tuple[torch.Tensor, torch.Tensor]]]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("target", help="a run directory, or an exported backbone_<arch>.pth")
    ap.add_argument("--train", help="labelled training folder (default: the run's data.train)")
    ap.add_argument("--val", help="validation folder (default: the run's data.val)")
    ap.add_argument("--arch", choices=sorted(FEATURE_DIMS), help="default: the run's, or inferred from the weights")
    ap.add_argument("--image-size", type=int, help="crop size (default: the run's eval size or global crop, else 224)")
    ap.add_argument("--epochs", type=int, default=100)
    ap.add_argument("--batch-size", type=int, default=1024)
    ap.add_argument("--base-lr", type=float, default=0.075, help="lr = base_lr x batch / 256 (paper: 0.075)")
    ap.add_argument("--momentum", type=float, default=0.9)
    ap.add_argument("--weight-decay", type=float, default=0.0)
    ap.add_argument("--cached-features", action="store_true",
                    help="run the backbone once per cached copy and train on the stored features (fast)")
    ap.add_argument("--cached-views", type=int, default=10,
                    help="augmented copies per training image in the cache; 0 = one centre crop each")
    ap.add_argument("--cache-dtype", choices=("float32", "float16"), default="float32")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--extract-batch-size", type=int, default=256, help="batch for running the frozen backbone")
    ap.add_argument("--num-workers", type=int, default=0, help="DataLoader workers, or DALI threads (0: one per core)")
    ap.add_argument("--loader", choices=sorted(EVAL_BACKENDS), default="torchvision",
                    help="reader of the resize + centre-crop images (val, and the --cached-views 0 cache): "
                         "torchvision or dali; the random-resized-crop training images always use torchvision")
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda")
    ap.add_argument("--json", help="where to write the results")
    ap.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = ap.parse_args(argv)
    for name in ("epochs", "batch_size", "extract_batch_size"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.cached_views < 0 or args.base_lr <= 0:
        ap.error(f"--cached-views must be >= 0 and --base-lr > 0, got {args.cached_views}, {args.base_lr}")
    return args


def per_epoch_source(backbone: torch.nn.Module, dataset: LabelledImages, device: torch.device,
                     num_workers: int) -> FeatureSource:
    """The paper's protocol: fresh crops every epoch through the frozen backbone."""

    def source(epoch: int, batches: list[list[int]]):
        for images, labels, _ in batches_loader(dataset, batches, num_workers):
            with torch.no_grad(), autocast(device):
                feats = backbone(to_device(images, device)).float()
            yield feats, labels.to(device)

    return source


def cached_source(feats: torch.Tensor, labels: torch.Tensor, valid: torch.Tensor, device: torch.device,
                  seed: int) -> FeatureSource:
    """Stored features (views x N x D): each epoch every image uses one of its copies, drawn
    from a generator of its own so the batch order equals the per-epoch source's."""
    views = torch.Generator().manual_seed(seed + 1)

    def source(epoch: int, batches: list[list[int]]):
        pick = torch.randint(feats.shape[0], (feats.shape[1],), generator=views)
        for batch in batches:
            idx = torch.tensor(batch)
            idx = idx[valid[idx]]
            if len(idx):
                yield feats[pick[idx], idx].to(device).float(), labels[idx].to(device)

    return source


def fit_linear(head: torch.nn.Linear, source: FeatureSource, n: int, args: argparse.Namespace,
               bar=None) -> list[float]:
    """SGD on the head, lr cosine-annealed once per epoch (as the authors' script); the mean
    training loss of every epoch."""
    peak = scaled_lr(args.base_lr, args.batch_size)
    opt = torch.optim.SGD(head.parameters(), lr=peak, momentum=args.momentum, weight_decay=args.weight_decay)
    order = torch.Generator().manual_seed(args.seed)
    losses = []
    for epoch in range(args.epochs):
        for group in opt.param_groups:
            group["lr"] = cosine(epoch, args.epochs, peak, 0.0)
        total, count = 0.0, 0
        for feats, labels in source(epoch, epoch_batches(n, args.batch_size, order)):
            loss = sgd_step(opt, F.cross_entropy(head(feats), labels), bar, epoch)
            total, count = total + loss * len(labels), count + len(labels)
        losses.append(round(total / max(count, 1), 5))
    return losses


def cache_train_features(backbone, root: str, samples, size: int, args, device) -> tuple[torch.Tensor, ...]:
    """K augmented copies (or one centre crop, read by --loader) of every training image through
    the backbone, as one preallocated K x N x D tensor (no second copy of an ImageNet-sized cache)."""
    copies = max(args.cached_views, 1)
    bar = progress_bar(copies * len(samples), "caching train features", not args.no_progress, unit="img")
    cache, labels, valid = None, None, None
    for view in range(copies):
        if args.cached_views:
            feats, labels, valid = extract_samples(backbone, samples, train_transform(size), args.extract_batch_size,
                                                   args.num_workers, device, bar)
        else:
            feats, labels, valid = extract_eval(backbone, root, samples, size, args.loader, args.extract_batch_size,
                                                args.num_workers, device, bar)
        if cache is None:
            cache = torch.empty((copies, *feats.shape), dtype=getattr(torch, args.cache_dtype))
        cache[view] = feats
    if bar is not None:
        bar.close()
    return cache, labels, valid


def train_augmentation(args: argparse.Namespace, size: int) -> str:
    if args.cached_features and args.cached_views == 0:
        return f"none: one centre crop per image, cached (resize {round(size / 0.875)} + centre crop {size})"
    crops = f"RandomResizedCrop({size}, scale=(0.08, 1)) + horizontal flip"
    return f"{crops}, {args.cached_views} copies per image drawn once" if args.cached_features else \
        f"{crops}, fresh every epoch"


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    try:
        found = resolve_target(args.target, tool="eval_linear", train=args.train, val=args.val,
                               image_size=args.image_size, arch=args.arch, json_path=args.json)
        backbone, arch = load_backbone(found["checkpoint"], found["arch"])
        train_samples, val_samples, classes = scan_splits(found["train"], found["val"])
        eval_loader_class(args.loader)  # a missing DALI fails here, not after training
    except (EvalError, EvalBackendError) as err:
        exit_with(err)
    device, size = pick_device(args.device), found["size"]
    torch.manual_seed(args.seed)  # the random crops
    requested, args.batch_size = args.batch_size, min(args.batch_size, len(train_samples))  # the lr scales with it
    backbone = backbone.to(device).to(memory_format=torch.channels_last).eval().requires_grad_(False)
    head = new_head(FEATURE_DIMS[arch], len(classes), args.seed).to(device)
    start = time.perf_counter()
    if args.cached_features:
        feats, labels, valid = cache_train_features(backbone, found["train"], train_samples, size, args, device)
        source = cached_source(feats, labels, valid, device, args.seed)
    else:
        source = per_epoch_source(backbone, LabelledImages(train_samples, train_transform(size)), device,
                                  args.num_workers)
    features_s = time.perf_counter() - start
    steps = args.epochs * -(-len(train_samples) // args.batch_size)
    bar = progress_bar(steps, "linear classifier", not args.no_progress, unit="step")
    losses = fit_linear(head, source, len(train_samples), args, bar)
    if bar is not None:
        bar.close()
    train_s = time.perf_counter() - start - features_s
    acc = evaluate_head(backbone, head, found["val"], val_samples, size, args.loader, args.extract_batch_size,
                        args.num_workers, device, not args.no_progress, "val features")
    report = {
        "checkpoint": str(found["checkpoint"]), "arch": arch, "train": found["train"], "val": found["val"],
        "num_train": len(train_samples), "num_val": len(val_samples), "num_classes": len(classes),
        "image_size": size, "top1": acc["top1"], "top5": acc["top5"],
        "features": ("cached" if args.cached_features else "per-epoch augmentation"),
        "cached_views": args.cached_views if args.cached_features else None,
        "cache_dtype": args.cache_dtype if args.cached_features else None,
        "epochs": args.epochs, "batch_size": args.batch_size, "batch_size_requested": requested,
        "base_lr": args.base_lr,
        "lr": scaled_lr(args.base_lr, args.batch_size), "schedule": "cosine per epoch to 0",
        "optimizer": "sgd", "momentum": args.momentum, "weight_decay": args.weight_decay, "seed": args.seed,
        "train_augmentation": train_augmentation(args, size),
        "val_transform": f"resize {round(size / 0.875)} + centre crop {size}", "loader": args.loader,
        "loss_per_epoch": losses, "run_knn": run_knn_figure(Path(args.target)),
        "seconds": {"features": round(features_s, 2), "train": round(train_s, 2),
                    "total": round(time.perf_counter() - start, 2)},
        "device": str(device), "date": utc_now(),
    }
    write_json(found["out"], report, sort_keys=False)
    print(f"linear ({report['features']}): top1 {acc['top1']:.1f}  top5 {acc['top5']:.1f}  "
          f"({report['seconds']['total']:.0f} s)")
    print(f"wrote {found['out']}")
    return report


if __name__ == "__main__":
    main()

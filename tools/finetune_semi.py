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
and 16; random-resized crop (0.08-1) + flip for training; BatchNorm in training mode while
fine-tuning; val: resize size / 0.875 + centre crop `size` (256 / 224 on ImageNet).
Departures: the lrs are given for batch 256 and scaled linearly with --batch-size (the
paper's footnote 5: "we also use a linearly scaled learning rate for evaluation
training"), so a small set can use a small batch; SwAV reports the best val accuracy over
the epochs, this tool the accuracy after the last epoch (choosing on val overstates it);
a subset smaller than the batch is one batch, and the lrs scale with that size;
a last batch of a single image is dropped (BatchNorm cannot train on it). The 1% or 10%
preset is picked from the subset's share of the train folder unless --labels-perc says.
Writes JSON (default RUN_DIR/finetune_semi.json, or <stem>_finetune_semi.json beside a
backbone file) with the settings and the result.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from fastssl.cli import exit_with
from fastssl.eval.backbone_io import load_backbone
from fastssl.eval.classifier import (LabelledImages, autocast, batches_loader, epoch_batches, evaluate_head, new_head,
                                     progress_bar, scan_splits, sgd_step, step_decay, to_device, train_transform)
from fastssl.eval.errors import EvalError
from fastssl.eval.targets import resolve_target, run_knn_figure
from fastssl.models.backbone import FEATURE_DIMS
from fastssl.run_log import utc_now, write_json
from fastssl.runtime import pick_device
from fastssl.schedules import scaled_lr
from pipelines.eval import EVAL_BACKENDS, EvalBackendError, eval_loader_class

# SwAV's eval_semisup.py (README commands), at batch 256: (backbone lr, head lr).
PRESETS = {"1": (0.02, 5.0), "10": (0.01, 0.2)}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("target", help="a run directory, or an exported backbone_<arch>.pth")
    ap.add_argument("--subset", required=True, help="text file: the labelled images, one per line")
    ap.add_argument("--train", help="train folder the subset names images of (default: the run's data.train)")
    ap.add_argument("--val", help="validation folder (default: the run's data.val)")
    ap.add_argument("--arch", choices=sorted(FEATURE_DIMS), help="default: the run's, or inferred from the weights")
    ap.add_argument("--image-size", type=int, help="crop size (default: the run's eval size or global crop, else 224)")
    ap.add_argument("--labels-perc", choices=sorted(PRESETS), help="lr preset (default: from the subset's share)")
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--lr", type=float, help="backbone lr at batch 256 (default: the preset's)")
    ap.add_argument("--lr-head", type=float, help="head lr at batch 256 (default: the preset's)")
    ap.add_argument("--milestones", default="12,16", help="epochs at which both lrs are multiplied by --gamma")
    ap.add_argument("--gamma", type=float, default=0.2)
    ap.add_argument("--momentum", type=float, default=0.9)
    ap.add_argument("--weight-decay", type=float, default=0.0)
    ap.add_argument("--seed", type=int, default=31)
    ap.add_argument("--eval-batch-size", type=int, default=256)
    ap.add_argument("--num-workers", type=int, default=0, help="DataLoader workers, or DALI threads (0: one per core)")
    ap.add_argument("--loader", choices=sorted(EVAL_BACKENDS), default="torchvision",
                    help="reader of the val images (resize + centre crop): torchvision or dali; "
                         "the fine-tuning crops always use torchvision")
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda")
    ap.add_argument("--json", help="where to write the results")
    ap.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = ap.parse_args(argv)
    try:
        args.milestones = [int(m) for m in args.milestones.split(",") if m.strip()]
    except ValueError:
        ap.error(f"--milestones must be comma-separated epochs, got {args.milestones!r}")
    if args.epochs < 1 or args.batch_size < 1 or args.eval_batch_size < 1:
        ap.error("--epochs, --batch-size and --eval-batch-size must be >= 1")
    return args


def read_subset_lines(path: Path) -> list[str]:
    """The image names of a subset file, in order, without blanks, comments or repeats."""
    if not path.is_file():
        raise EvalError(f"subset file {str(path)!r} does not exist; pass a text file with one image "
                        "per line (e.g. SimCLR's 1percent.txt)")
    names = []
    for raw in path.read_text().splitlines():
        line = raw.split("#", 1)[0].strip().replace("\\", "/")
        if line:
            names.append(line[2:] if line.startswith("./") else line)
    names = list(dict.fromkeys(names))
    if not names:
        raise EvalError(f"subset file {str(path)!r} is empty: it names no image (one file name or "
                        "train-relative path per line)")
    return names


def match_subset(names: list[str], samples: list[tuple[str, int]], root: str) -> list[tuple[str, int]]:
    """The samples the subset names: a line with a '/' is a path relative to `root`, a bare
    file name matches that file in any class folder (ImageNet file names are unique)."""
    by_path = {Path(os.path.relpath(p, root)).as_posix(): (p, y) for p, y in samples}
    by_name: dict[str, list[tuple[str, int]]] = {}
    for p, y in samples:
        by_name.setdefault(os.path.basename(p), []).append((p, y))
    chosen, unmatched, ambiguous = [], [], []
    for name in names:
        hits = [by_path[name]] if name in by_path else ([] if "/" in name else by_name.get(name, []))
        if not hits:
            unmatched.append(name)
        elif len(hits) > 1:
            ambiguous.append(name)
        else:
            chosen.append(hits[0])
    if unmatched:
        raise EvalError(f"{len(unmatched)} of {len(names)} subset lines match no image under {root!r}, e.g. "
                        f"{unmatched[:3]}; lines are file names or paths relative to the train folder "
                        "(is --train the folder the list was made for?)")
    if ambiguous:
        raise EvalError(f"{len(ambiguous)} subset lines name a file found in several class folders, e.g. "
                        f"{ambiguous[:3]}; write them as <class>/<file>")
    return chosen


def load_data(found: dict, subset_file: str) -> tuple[list, list, list, list[str]]:
    """(subset samples, all train samples, val samples, classes), with clear errors."""
    train_samples, val_samples, classes = scan_splits(found["train"], found["val"])
    subset = match_subset(read_subset_lines(Path(subset_file)), train_samples, str(found["train"]))
    return subset, train_samples, val_samples, classes


def pick_rates(args: argparse.Namespace, share: float) -> tuple[str, float, float]:
    """The preset (1% / 10%) and the two lrs at batch 256, flags first."""
    perc = args.labels_perc or ("1" if share < 0.05 else "10")
    trunk, head = PRESETS[perc]
    return perc, args.lr if args.lr is not None else trunk, args.lr_head if args.lr_head is not None else head


def finetune(model: torch.nn.Sequential, dataset: LabelledImages, rates: tuple[float, float],
             args: argparse.Namespace, device: torch.device, bar=None) -> list[float]:
    """SGD on backbone and head together (two lrs), step decay per epoch; mean loss per epoch."""
    backbone, head = model[0], model[1]
    base = (scaled_lr(rates[0], args.batch_size), scaled_lr(rates[1], args.batch_size))
    opt = torch.optim.SGD([{"params": backbone.parameters(), "lr": base[0]},
                           {"params": head.parameters(), "lr": base[1]}],
                          lr=base[0], momentum=args.momentum, weight_decay=args.weight_decay)
    order = torch.Generator().manual_seed(args.seed)
    losses = []
    for epoch in range(args.epochs):
        for group, lr in zip(opt.param_groups, base):
            group["lr"] = step_decay(epoch, lr, args.milestones, args.gamma)
        model.train()
        total, count = 0.0, 0
        batches = epoch_batches(len(dataset), args.batch_size, order, drop_singleton=True)
        for images, labels, _ in batches_loader(dataset, batches, args.num_workers):
            with autocast(device):
                logits = model(to_device(images, device))
            loss = sgd_step(opt, F.cross_entropy(logits.float(), labels.to(device)), bar, epoch)
            total, count = total + loss * len(labels), count + len(labels)
        losses.append(round(total / max(count, 1), 5))
    return losses


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    try:
        found = resolve_target(args.target, tool="finetune_semi", train=args.train, val=args.val,
                               image_size=args.image_size, arch=args.arch, json_path=args.json)
        backbone, arch = load_backbone(found["checkpoint"], found["arch"])
        subset, train_samples, val_samples, classes = load_data(found, args.subset)
        eval_loader_class(args.loader)  # a missing DALI fails here, not after fine-tuning
    except (EvalError, EvalBackendError) as err:
        exit_with(err)
    device, size = pick_device(args.device), found["size"]
    torch.manual_seed(args.seed)  # the random crops
    perc, lr_trunk, lr_head = pick_rates(args, len(subset) / len(train_samples))
    requested, args.batch_size = args.batch_size, min(args.batch_size, len(subset))  # the batch the lrs scale with
    model = torch.nn.Sequential(backbone, new_head(FEATURE_DIMS[arch], len(classes), args.seed))
    model = model.to(device).to(memory_format=torch.channels_last)
    dataset = LabelledImages(subset, train_transform(size))
    steps = sum(len(epoch_batches(len(dataset), args.batch_size, torch.Generator(), True)) for _ in range(args.epochs))
    start = time.perf_counter()
    bar = progress_bar(steps, "fine-tuning", not args.no_progress, unit="step")
    losses = finetune(model, dataset, (lr_trunk, lr_head), args, device, bar)
    if bar is not None:
        bar.close()
    train_s = time.perf_counter() - start
    acc = evaluate_head(model[0], model[1], found["val"], val_samples, size, args.loader, args.eval_batch_size,
                        args.num_workers, device, not args.no_progress)
    report = {
        "checkpoint": str(found["checkpoint"]), "arch": arch, "train": found["train"], "val": found["val"],
        "subset": str(args.subset), "num_subset": len(subset), "num_train": len(train_samples),
        "subset_share": round(len(subset) / len(train_samples), 5), "num_val": len(val_samples),
        "num_classes": len(classes), "image_size": size, "top1": acc["top1"], "top5": acc["top5"],
        "protocol": "SwAV eval_semisup (the paper gives no fine-tuning hyper-parameters); final epoch, not best",
        "labels_perc_preset": perc, "epochs": args.epochs, "batch_size": args.batch_size,
        "batch_size_requested": requested,
        "lr_backbone_at_256": lr_trunk, "lr_head_at_256": lr_head,
        "lr_backbone": scaled_lr(lr_trunk, args.batch_size), "lr_head": scaled_lr(lr_head, args.batch_size),
        "schedule": f"x{args.gamma} at epochs {args.milestones}", "optimizer": "sgd", "momentum": args.momentum,
        "weight_decay": args.weight_decay, "seed": args.seed,
        "train_augmentation": f"RandomResizedCrop({size}, scale=(0.08, 1)) + horizontal flip",
        "val_transform": f"resize {round(size / 0.875)} + centre crop {size}", "loader": args.loader,
        "loss_per_epoch": losses, "run_knn": run_knn_figure(args.target),
        "seconds": {"train": round(train_s, 2), "total": round(time.perf_counter() - start, 2)},
        "device": str(device), "date": utc_now(),
    }
    write_json(found["out"], report, sort_keys=False)
    print(f"fine-tuned on {len(subset)} images ({100 * report['subset_share']:.1f}% of train): "
          f"top1 {acc['top1']:.1f}  top5 {acc['top5']:.1f}  ({report['seconds']['total']:.0f} s)")
    print(f"wrote {found['out']}")
    return report


if __name__ == "__main__":
    main()

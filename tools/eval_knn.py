#!/usr/bin/env python3
"""Weighted k-NN evaluation (DINO protocol) of an exported backbone or a run directory.

    python tools/eval_knn.py runs/demo/20261122-065421                 # paths and arch from the run
    python tools/eval_knn.py backbone_resnet50.pth --train /data/imagenet/train --val /data/imagenet/val
    accelerate launch --multi_gpu --num_processes 8 tools/eval_knn.py RUN_DIR   # each GPU embeds 1/8

L2-normalised features of the exported backbone (`backbone_<arch>.pth`: the EMA teacher's unless the
run set `model.export student`),
cosine similarity, votes weighted by exp(sim / T) with T = 0.07, for k in {10, 20, 100,
200}; top-1 and top-5 in percent. Images: resize to size / 0.875 with the run's
eval.interpolation (bilinear by default, as the MIRA authors' ImageNet val transform;
DINO's own k-NN script resizes bicubic: `--interpolation bicubic`) and centre crop `size`;
the run's eval.crop_fraction (or `--crop-fraction`) replaces 0.875: 1.0 takes CIFAR's
32-px images whole; normalised with the run's training mean/std (aug.mean / aug.std, or
`--mean` / `--std`; ImageNet's for a bare backbone file). The loop's own k-NN uses the same
transform, so on the same checkpoint this tool gives the same k = 20 figure; `--loader dali`
reads them through DALI with the same geometry, within about one grey level (0.2 on average).

`--subset 1percent.txt` keeps in the memory bank only the train images a subset file names:
the paper's 1 % / 10 % k-NN (Table 3) uses the semi-supervised benchmark's subsets, the
files tools/finetune_semi.py reads. Writes JSON (default: RUN_DIR/eval_knn.json, or
eval_knn_<subset file's stem>.json; beside a bare checkpoint, <stem>_eval_knn.json) that
the run's report picks up.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from fastssl.cli import ToolArgumentParser, exit_with, leave_process_group, stop_in_one_line
from fastssl.eval.backbone_io import load_backbone
from fastssl.eval.classifier import add_data_arguments, add_run_arguments, effective_precision
from fastssl.arg_types import int_at_least, number_in
from fastssl.eval.errors import EvalError
from fastssl.eval.online import knn_loaders, knn_scores
from fastssl.eval.subsets import subset_samples
from fastssl.eval.targets import require_data, resolve_target, write_report
from fastssl.run_log import utc_now
from fastssl.runtime import end_process_group, pick_device
from pipelines.eval import EvalBackendError, eval_loader_class
from pipelines.folder import DataLayoutError, Listing, scan_image_folder

DEFAULT_KS = (10, 20, 100, 200)


def resolve(args: argparse.Namespace) -> dict:
    """Checkpoint, arch, data paths and image size from the run directory and the flags."""
    tool = f"eval_knn_{Path(args.subset).stem}" if args.subset else "eval_knn"  # one report per memory bank
    return resolve_target(args.target, tool=tool, train=args.train, val=args.val, image_size=args.image_size,
                          arch=args.arch, json_path=args.json, train_keys=("knn_train", "train"),
                          interpolation=args.interpolation, crop_fraction=args.crop_fraction, mean=args.mean,
                          std=args.std)


def subset_listing(subset: Path, train_root: str) -> Listing:
    """The train folder's listing cut to the images of a subset file (EvalError on a line that names none)."""
    samples, classes = scan_image_folder(train_root)
    return subset_samples(subset, samples, train_root), classes


def main(argv: list[str] | None = None) -> dict:
    ap = ToolArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("target", help="a run directory, or an exported backbone_<arch>.pth")
    add_data_arguments(ap, "memory bank folder (default: the run's data.knn_train or data.train)")
    ap.add_argument("--ks", default=",".join(map(str, DEFAULT_KS)), help="comma-separated k values")
    ap.add_argument("--temperature", type=number_in(0, low_open=True), default=0.07)
    ap.add_argument("--subset", help="memory bank: only the train images this text file names (one file name or "
                    "train-relative path per line), e.g. SimCLR's 1percent.txt / 10percent.txt for the paper's "
                    "1 %% / 10 %% k-NN (Table 3); default: the whole train folder")
    ap.add_argument("--batch-size", type=int_at_least(1), default=128)
    add_run_arguments(ap, "image reader: torchvision (PIL in workers) or dali (nvJPEG + GPU resize; same transform)")
    args = ap.parse_args(argv)
    try:
        ks = [int(k) for k in args.ks.split(",")]
        if any(k < 1 for k in ks):
            raise ValueError
    except ValueError:
        ap.error(f"--ks must be comma-separated positive integers, got {args.ks!r}")
    from accelerate import Accelerator

    try:
        found = resolve(args)
        net, arch = load_backbone(found["checkpoint"], found["arch"])  # a wrong file is named before no data
        require_data(found)
        eval_loader_class(args.loader)  # a missing DALI fails here, before any work
        bank_listing = subset_listing(Path(args.subset), found["train"]) if args.subset else None
        device = pick_device(args.device)
        precision = effective_precision(device, args.precision)
        accelerator = Accelerator(cpu=device.type == "cpu", mixed_precision="bf16" if precision == "bf16" else "no")
        # Scans both folders: a bad layout, one class or different classes fail here, before any work.
        # Under `accelerate launch` each process embeds its share of each split; the queries are gathered,
        # the memory bank stays sharded (fastssl.eval.online.knn_scores).
        bank_loader, query_loader = knn_loaders(args.loader, found["train"], found["val"], view=found["view"],
                                                batch_size=args.batch_size, num_workers=args.num_workers,
                                                device=accelerator.device, rank=accelerator.process_index,
                                                world_size=accelerator.num_processes, bank_listing=bank_listing)
    except (EvalError, EvalBackendError, DataLayoutError) as err:
        exit_with(err)
    net = net.to(accelerator.device).to(memory_format=torch.channels_last)
    start = time.perf_counter()
    try:
        scores, bank_size, query_size = knn_scores(net, bank_loader, query_loader, accelerator, ks, args.temperature,
                                                   not args.no_progress, what="")
    except DataLayoutError as err:  # a split whose every image is unreadable: agreed on by every process
        leave_process_group(finished=False)  # together, as after a result (below); a failed release hides nothing
        exit_with(err)
    # a k past the memory bank votes with the whole bank: said, and recorded as the neighbours it had
    results = {str(k): {**r, "neighbours": min(k, bank_size)} for k, r in scores.items()}
    report = {"checkpoint": str(found["checkpoint"]), "arch": arch, "train": found["train"], "subset": args.subset,
              "val": found["val"], "image_size": found["view"].size, "interpolation": found["view"].interpolation,
              "crop_fraction": found["view"].crop_fraction, "mean": list(found["view"].mean),
              "std": list(found["view"].std), "loader": args.loader,
              "temperature": args.temperature, "precision": precision,
              "k": results,
              "images": {"bank": bank_size, "queries": query_size},
              "seconds": round(time.perf_counter() - start, 2),
              "date": utc_now()}
    end_process_group()  # a rank leaving right after the last all-gather can abort a peer still in it
    if accelerator.is_main_process:  # every process holds the same scores
        for k, r in results.items():
            whole = f"  (k > the bank: all {bank_size} images vote)" if int(k) > bank_size else ""
            print(f"k={k:>4s}  top1 {r['top1']:.1f}  top5 {r['top5']:.1f}{whole}")
        try:
            write_report(found["out"], report)
        except EvalError as err:
            exit_with(err)
    return report


if __name__ == "__main__":
    with stop_in_one_line("nothing is written before the k-NN ends: run the command again"):
        main()

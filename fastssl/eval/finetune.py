"""Semi-supervised evaluation: fine-tune the whole backbone + a new linear head on a labelled
subset (tools/finetune_semi.py is its command line).

The paper gives no fine-tuning hyper-parameters, so this follows SwAV's published recipe
(eval_semisup.py; MIRA builds on SwAV's code base): two lrs (backbone, head) per preset,
step decay, BatchNorm in training mode while fine-tuning. The subset is named by a text file
(SimCLR's 1percent.txt / 10percent.txt format); a line that names no image is an error,
not a silent skip, because a subset with missing images is another benchmark.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from fastssl.eval.classifier import (EvalInputs, LabelledImages, autocast, batches_loader, check_converging,
                                     classifier_report, epoch_batches, evaluate_head, load_eval_inputs, new_head,
                                     progress_bar, sgd_step, step_decay, to_device, train_crop_words, train_transform)
from fastssl.eval.progress_file import (epoch_state, fingerprint, load_state, restore_epoch_state, save_state,
                                        state_path, weights_digest)
from fastssl.eval.subsets import subset_samples
from fastssl.models.backbone import FEATURE_DIMS
from fastssl.runtime import pick_device
from fastssl.schedules import scaled_lr
from pipelines.eval import eval_loader_class

if TYPE_CHECKING:
    from tqdm import tqdm

__all__ = ["PRESETS", "prepare", "finetune_on_subset", "finetune", "pick_rates"]

# SwAV's eval_semisup.py (README commands), at batch 256: (backbone lr, head lr).
PRESETS = {"1": (0.02, 5.0), "10": (0.01, 0.2)}


def prepare(args: argparse.Namespace) -> tuple[EvalInputs, list[tuple[str, int]]]:
    """Everything the command line names, loaded and checked (EvalError / EvalBackendError),
    and the subset's samples: a bad subset or a missing DALI fails here, not after fine-tuning."""
    # one report per subset, as eval_knn's per memory bank: a 10 % run does not overwrite the 1 % one
    inputs = load_eval_inputs(args, "finetune_semi", report=f"finetune_semi_{Path(args.subset).stem}")
    subset = subset_samples(Path(args.subset), inputs.train_samples, str(inputs.found["train"]))
    eval_loader_class(args.loader)
    return inputs, subset


def pick_rates(args: argparse.Namespace, share: float) -> tuple[str, float, float]:
    """The preset (1% / 10%) and the two lrs at batch 256, flags first."""
    perc = args.labels_perc or ("1" if share < 0.05 else "10")
    trunk, head = PRESETS[perc]
    return perc, args.lr if args.lr is not None else trunk, args.lr_head if args.lr_head is not None else head


def finetune(model: torch.nn.Sequential, dataset: LabelledImages, rates: tuple[float, float],
             args: argparse.Namespace, device: torch.device, bar: tqdm | None = None, resume: dict | None = None,
             save: Callable[[dict], object] | None = None) -> list[float]:
    """SGD on backbone and head together (two lrs), step decay per epoch; mean loss per epoch.
    `resume`: a state `save` was given after an epoch (`fastssl.eval.progress_file`), to go on
    from; `save(state)` is called after every epoch."""
    backbone, head = model[0], model[1]
    base = (scaled_lr(rates[0], args.batch_size), scaled_lr(rates[1], args.batch_size))
    opt = torch.optim.SGD([{"params": backbone.parameters(), "lr": base[0]},
                           {"params": head.parameters(), "lr": base[1]}],
                          lr=base[0], momentum=args.momentum, weight_decay=args.weight_decay)
    order = torch.Generator().manual_seed(args.seed)
    losses, first = restore_epoch_state(resume, model, opt, order) if resume is not None else ([], 0)
    for epoch in range(first, args.epochs):
        for group, lr in zip(opt.param_groups, base):
            group["lr"] = step_decay(epoch, lr, args.milestones, args.gamma)
        model.train()
        total, count = 0.0, 0
        batches = epoch_batches(len(dataset), args.batch_size, order, drop_singleton=True)
        for images, labels, _ in batches_loader(dataset, batches, args.num_workers, epoch):
            with autocast(device, args.precision):
                logits = model(to_device(images, device))
            loss = sgd_step(opt, F.cross_entropy(logits.float(), labels.to(device)), bar, epoch)
            total, count = total + loss * len(labels), count + len(labels)
        losses.append(round(total / max(count, 1), 5))
        check_converging(losses[-1], epoch, f"lower --lr / --lr-head (now {rates[0]:g} / {rates[1]:g})")
        if save is not None:
            save(epoch_state(epoch + 1, model, opt, order, losses))
    return losses


def finetune_on_subset(inputs: EvalInputs, subset: list[tuple[str, int]], args: argparse.Namespace) -> dict:
    """Fine-tune as the command line says and test on val; the report (not written).

    A subset smaller than the batch is one batch, and the lrs scale with the batch used;
    the report keeps the requested one beside it."""
    found, train_samples = inputs.found, inputs.train_samples
    device, view = pick_device(args.device), found["view"]
    perc, lr_trunk, lr_head = pick_rates(args, len(subset) / len(train_samples))
    requested = args.batch_size
    args = argparse.Namespace(**{**vars(args), "batch_size": min(args.batch_size, len(subset))})
    model = torch.nn.Sequential(inputs.backbone, new_head(FEATURE_DIMS[inputs.arch], len(inputs.classes), args.seed,
                                                            init="default"))
    model = model.to(device).to(memory_format=torch.channels_last)
    dataset = LabelledImages(subset, train_transform(view), seed=args.seed)  # crops of (seed, epoch, image)
    per_epoch = len(epoch_batches(len(dataset), args.batch_size, torch.Generator(), True))
    computed = {k: getattr(args, k) for k in ("epochs", "batch_size", "milestones", "gamma", "momentum",
                                              "weight_decay", "seed", "precision")}
    progress_file = state_path(found["out"])
    key = fingerprint({**computed, "rates": [lr_trunk, lr_head], "arch": inputs.arch, "view": view.describe(),
                       "weights": weights_digest(inputs.backbone)}, subset)  # the weights before fine-tuning
    resume = load_state(progress_file, key, getattr(args, "restart", False), "the fine-tuning",
                        lambda state: f"{state['epoch']} epochs done")
    start = time.perf_counter()
    bar = progress_bar(per_epoch * args.epochs, "fine-tuning", not args.no_progress, unit="step")
    if bar is not None and resume is not None:
        bar.update(resume["epoch"] * per_epoch)
    losses = finetune(model, dataset, (lr_trunk, lr_head), args, device, bar, resume,
                      save=lambda state: save_state(progress_file, state, key))
    if bar is not None:
        bar.close()
    train_s = time.perf_counter() - start
    acc = evaluate_head(model[0], model[1], found["val"], inputs.val_samples, view, args.loader, args.eval_batch_size,
                        args.num_workers, device, not args.no_progress, precision=args.precision)
    counts = {"subset": str(args.subset), "num_subset": len(subset), "num_train": len(train_samples),
              "subset_share": round(len(subset) / len(train_samples), 5), "num_val": len(inputs.val_samples),
              "num_classes": len(inputs.classes)}
    settings = {
        "protocol": "SwAV eval_semisup (the paper gives no fine-tuning hyper-parameters); final epoch, not best",
        "labels_perc_preset": perc, "epochs": args.epochs, "batch_size": args.batch_size,
        "batch_size_requested": requested,
        "lr_backbone_at_256": lr_trunk, "lr_head_at_256": lr_head,
        "lr_backbone": scaled_lr(lr_trunk, args.batch_size), "lr_head": scaled_lr(lr_head, args.batch_size),
        "schedule": f"x{args.gamma} at epochs {args.milestones}", "optimizer": "sgd", "momentum": args.momentum,
        "weight_decay": args.weight_decay, "seed": args.seed,
    }
    seconds = {"train": round(train_s, 2), "total": round(time.perf_counter() - start, 2)}
    return classifier_report(inputs, args.target, counts, acc, settings,
                             train_crop_words(view), args.loader, losses,
                             seconds, device, args.precision)

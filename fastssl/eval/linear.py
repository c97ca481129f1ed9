"""Linear evaluation on a frozen backbone (tools/eval_linear.py is its command line).

MIRA's protocol (paper Sec. 4.2 and footnotes 5-6, the authors' eval_linear.py), the default:
a linear classifier on the frozen backbone in eval mode, cross-entropy, SGD with the lr scaled
by batch / 256 and cosine-annealed once per epoch to 0, random-resized crops, a short last batch
dropped. `PROTOCOLS` also holds ML-CPC's CIFAR protocol (their main_lincls_cifar.py). The
classifier is fed either fresh crops every epoch (the protocol) or features cached once
(`cached_source`, fast); given the same features both see the same batches in the same order,
which is what lets the fast mode be checked against the slow one.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from fastssl.eval.classifier import (EvalInputs, LabelledImages, autocast, batches_loader, check_converging,
                                     classifier_report, epoch_batches, evaluate_head, extract_eval, extract_samples,
                                     load_eval_inputs, new_head, progress_bar, sgd_step, step_decay, to_device,
                                     train_crop_words, train_transform)
from fastssl.eval.errors import EvalError
from fastssl.eval.progress_file import (epoch_state, fingerprint, load_state, restore_epoch_state, save_state,
                                        state_path, weights_digest)
from fastssl.models.backbone import FEATURE_DIMS
from fastssl.runtime import pick_device
from fastssl.schedules import cosine, scaled_lr
from pipelines.augment import EvalView
from pipelines.eval import eval_loader_class
from pipelines.sampler import batch_seed

if TYPE_CHECKING:
    from tqdm import tqdm

__all__ = ["Protocol", "PROTOCOLS", "apply_protocol", "FeatureSource", "prepare", "linear_probe", "fit_linear",
           "per_epoch_source", "cached_source", "cache_train_features", "cache_bytes", "check_cache_fits",
           "train_augmentation"]


@dataclass(frozen=True)
class Protocol:
    """A linear evaluation's settings; the command line's flags override the first three."""

    epochs: int
    batch_size: int
    base_lr: float  # lr = base_lr x batch / 256
    milestones: tuple[int, ...]  # epochs where the lr is multiplied by `gamma`; () = cosine per epoch to 0
    gamma: float
    crop: str  # the training crop, `train_transform`'s: "random-resized" (scale 0.08-1) | "pad-4"
    drop_last: bool  # a short last batch sits out each epoch


PROTOCOLS = {
    # MIRA: paper Sec. 4.2 (lr 0.075 x batch / 256, batch 1024, 100 epochs), the authors' eval_linear.py
    "mira": Protocol(100, 1024, 0.075, (), 1.0, "random-resized", True),
    # ML-CPC on CIFAR: main_lincls_cifar.py as their README runs it (--lr 3 at batch 256, x0.1 at
    # epochs 60 and 80, RandomCrop(32, padding=4) + flip, every batch kept)
    "mlcpc-cifar": Protocol(100, 256, 3.0, (60, 80), 0.1, "pad-4", False),
}


def apply_protocol(args: argparse.Namespace) -> argparse.Namespace:
    """`args` with the protocol's epochs / batch size / base lr wherever the command line left them out."""
    protocol = PROTOCOLS[args.protocol]
    for name in ("epochs", "batch_size", "base_lr"):
        if getattr(args, name) is None:
            setattr(args, name, getattr(protocol, name))
    return args


# (features, labels) for one batch of training-set indices, given the epoch.
FeatureSource = Callable[[int, list[list[int]]], Iterator[tuple[torch.Tensor, torch.Tensor]]]


def prepare(args: argparse.Namespace) -> EvalInputs:
    """Everything the command line names, loaded and checked (EvalError / EvalBackendError):
    a missing DALI fails here, not after training."""
    inputs = load_eval_inputs(args, "eval_linear")
    eval_loader_class(args.loader)
    if args.cached_features:
        check_cache_fits(len(inputs.train_samples), FEATURE_DIMS[inputs.arch], args, available_memory_bytes())
    return inputs


def cache_bytes(num_images: int, feature_dim: int, views: int, dtype: str) -> int:
    """Host memory `cache_train_features` needs at its peak: the views x N x D cache, plus one
    view's float32 features while they are copied in (ImageNet, ResNet-50, 10 views: 115 GB
    in float32, 63 GB in float16)."""
    return num_images * feature_dim * (max(views, 1) * torch.finfo(getattr(torch, dtype)).bits // 8 + 4)


def available_memory_bytes() -> int | None:
    """The kernel's MemAvailable (Linux), or None where it cannot be read."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def check_cache_fits(num_images: int, feature_dim: int, args: argparse.Namespace, available: int | None) -> None:
    """An EvalError before any extraction when the feature cache cannot fit in memory: on ImageNet it
    is built for about an hour before the kernel would kill the process."""
    need = cache_bytes(num_images, feature_dim, args.cached_views, args.cache_dtype)
    if available is None or need <= available:
        return
    half = cache_bytes(num_images, feature_dim, args.cached_views, "float16")
    fixes = ([f"--cache-dtype float16 ({half / 1e9:.1f} GB)"] if args.cache_dtype != "float16" and half <= available
             else []) + ["fewer --cached-views", "no --cached-features (fresh crops every epoch, the paper's protocol)"]
    raise EvalError(f"--cached-features needs about {need / 1e9:.1f} GB of memory for {num_images} images x "
                    f"{max(args.cached_views, 1)} views x {feature_dim} features, and {available / 1e9:.1f} GB is "
                    f"available; use {' or '.join(fixes)}")


def per_epoch_source(backbone: torch.nn.Module, dataset: LabelledImages, device: torch.device,
                     num_workers: int, precision: str) -> FeatureSource:
    """The paper's protocol: fresh crops every epoch through the frozen backbone."""

    def source(epoch: int, batches: list[list[int]]) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for images, labels, _ in batches_loader(dataset, batches, num_workers, epoch):
            with torch.no_grad(), autocast(device, precision):
                feats = backbone(to_device(images, device)).float()
            yield feats, labels.to(device)

    return source


def cached_source(feats: torch.Tensor, labels: torch.Tensor, valid: torch.Tensor, device: torch.device,
                  seed: int) -> FeatureSource:
    """Stored features (views x N x D): each epoch every image uses one of its copies, drawn
    from a generator of the epoch's own (`batch_seed(seed, epoch, 0, 0)`), so the batch order
    equals the per-epoch source's and a resumed probe draws what an uninterrupted one does."""

    def source(epoch: int, batches: list[list[int]]) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        views = torch.Generator().manual_seed(batch_seed(seed, epoch, 0, 0))
        pick = torch.randint(feats.shape[0], (feats.shape[1],), generator=views)
        for batch in batches:
            idx = torch.tensor(batch)
            idx = idx[valid[idx]]
            if len(idx):
                yield feats[pick[idx], idx].to(device).float(), labels[idx].to(device)

    return source


def fit_linear(head: torch.nn.Linear, source: FeatureSource, n: int, args: argparse.Namespace,
               bar: tqdm | None = None, resume: dict | None = None,
               save: Callable[[dict], object] | None = None) -> list[float]:
    """SGD on the head, the lr set once per epoch by `args.protocol` (cosine to 0, or steps at its
    milestones); the mean training loss of every epoch. `resume`: a state `save` was given after
    an epoch (`fastssl.eval.progress_file`), to go on from; `save(state)` is called after every epoch."""
    protocol = PROTOCOLS[args.protocol]
    peak = scaled_lr(args.base_lr, args.batch_size)
    opt = torch.optim.SGD(head.parameters(), lr=peak, momentum=args.momentum, weight_decay=args.weight_decay)
    order = torch.Generator().manual_seed(args.seed)
    losses, first = restore_epoch_state(resume, head, opt, order) if resume is not None else ([], 0)
    for epoch in range(first, args.epochs):
        for group in opt.param_groups:
            group["lr"] = (step_decay(epoch, peak, protocol.milestones, protocol.gamma) if protocol.milestones
                           else cosine(epoch, args.epochs, peak, 0.0))
        total, count = 0.0, 0
        batches = epoch_batches(n, args.batch_size, order, drop_short=protocol.drop_last)
        for feats, labels in source(epoch, batches):
            loss = sgd_step(opt, F.cross_entropy(head(feats), labels), bar, epoch)
            total, count = total + loss * len(labels), count + len(labels)
        losses.append(round(total / max(count, 1), 5))
        check_converging(losses[-1], epoch, f"lower --base-lr (now {args.base_lr:g})")
        if save is not None:
            save(epoch_state(epoch + 1, head, opt, order, losses))
    return losses


def cache_train_features(backbone: torch.nn.Module, root: str, samples: list[tuple[str, int]], view: EvalView,
                         args: argparse.Namespace, device: torch.device) -> tuple[torch.Tensor, ...]:
    """K augmented copies (or one centre crop, read by --loader) of every training image through
    the backbone, as one preallocated K x N x D tensor (no second copy of an ImageNet-sized cache)."""
    copies, crop = max(args.cached_views, 1), PROTOCOLS[args.protocol].crop
    bar = progress_bar(copies * len(samples), "caching train features", not args.no_progress, unit="img")
    cache, labels, valid = None, None, None
    for copy in range(copies):
        if args.cached_views:
            feats, labels, valid = extract_samples(backbone, samples, train_transform(view, crop),
                                                   args.extract_batch_size, args.num_workers, device, bar,
                                                   args.precision, seed=args.seed, epoch=copy)
        else:
            feats, labels, valid = extract_eval(backbone, root, samples, view, args.loader, args.extract_batch_size,
                                                args.num_workers, device, bar, args.precision)
        if cache is None:
            cache = torch.empty((copies, *feats.shape), dtype=getattr(torch, args.cache_dtype))
        cache[copy] = feats
    if bar is not None:
        bar.close()
    return cache, labels, valid


def train_augmentation(args: argparse.Namespace, view: EvalView) -> str:
    """What the classifier was trained on, in words, for the report."""
    if args.cached_features and args.cached_views == 0:
        return f"none: one centre crop per image, cached ({view.describe()})"
    crops = train_crop_words(view, PROTOCOLS[args.protocol].crop)
    return f"{crops}, {args.cached_views} copies per image drawn once" if args.cached_features else \
        f"{crops}, fresh every epoch"


def probe_settings(inputs: EvalInputs, args: argparse.Namespace) -> dict:
    """Everything an epoch of the probe depends on, for its saved progress' fingerprint."""
    keys = ("protocol", "epochs", "batch_size", "base_lr", "momentum", "weight_decay", "cached_features",
            "cached_views", "cache_dtype", "seed", "precision")
    return {**{k: getattr(args, k) for k in keys}, "arch": inputs.arch, "weights": weights_digest(inputs.backbone),
            "view": inputs.found["view"].describe()}


def linear_probe(inputs: EvalInputs, args: argparse.Namespace) -> dict:
    """Train the linear head as the command line says and test it on val; the report (not written).

    The batch is capped at the training set's size and the lr scales with the batch used;
    the report keeps the requested one beside it. Progress is saved after every epoch beside
    the report and picked up by the same command (`fastssl.eval.progress_file`)."""
    found, train_samples = inputs.found, inputs.train_samples
    device, view, protocol = pick_device(args.device), found["view"], PROTOCOLS[args.protocol]
    requested = args.batch_size
    args = argparse.Namespace(**{**vars(args), "batch_size": min(args.batch_size, len(train_samples))})
    backbone = inputs.backbone.to(device).to(memory_format=torch.channels_last).eval().requires_grad_(False)
    head = new_head(FEATURE_DIMS[inputs.arch], len(inputs.classes), args.seed).to(device)
    progress_file, key = state_path(inputs.found["out"]), fingerprint(probe_settings(inputs, args), train_samples)
    resume = load_state(progress_file, key, getattr(args, "restart", False), "the linear probe",
                        lambda state: f"{state['epoch']} epochs done")
    start = time.perf_counter()
    if args.cached_features:
        feats, labels, valid = cache_train_features(backbone, found["train"], train_samples, view, args, device)
        source = cached_source(feats, labels, valid, device, args.seed)
    else:
        crops = LabelledImages(train_samples, train_transform(view, protocol.crop), seed=args.seed)
        source = per_epoch_source(backbone, crops, device, args.num_workers, args.precision)
    features_s = time.perf_counter() - start
    batches = (len(train_samples) // args.batch_size if protocol.drop_last
               else -(-len(train_samples) // args.batch_size))
    steps = args.epochs * batches
    bar = progress_bar(steps, "linear classifier", not args.no_progress, unit="step")
    if bar is not None and resume is not None:
        bar.update(resume["epoch"] * batches)
    losses = fit_linear(head, source, len(train_samples), args, bar, resume,
                        save=lambda state: save_state(progress_file, state, key))
    if bar is not None:
        bar.close()
    train_s = time.perf_counter() - start - features_s
    acc = evaluate_head(backbone, head, found["val"], inputs.val_samples, view, args.loader, args.extract_batch_size,
                        args.num_workers, device, not args.no_progress, "val features", args.precision)
    counts = {"num_train": len(train_samples), "num_val": len(inputs.val_samples), "num_classes": len(inputs.classes)}
    settings = {
        "protocol": args.protocol,
        "features": ("cached" if args.cached_features else "per-epoch augmentation"),
        "cached_views": args.cached_views if args.cached_features else None,
        "cache_dtype": args.cache_dtype if args.cached_features else None,
        "epochs": args.epochs, "batch_size": args.batch_size, "batch_size_requested": requested,
        "base_lr": args.base_lr,
        "lr": scaled_lr(args.base_lr, args.batch_size),
        "schedule": (f"x{protocol.gamma} at epochs {list(protocol.milestones)}" if protocol.milestones
                     else "cosine per epoch to 0"), "drop_last": protocol.drop_last,
        "optimizer": "sgd", "momentum": args.momentum, "weight_decay": args.weight_decay, "seed": args.seed,
    }
    seconds = {"features": round(features_s, 2), "train": round(train_s, 2),
               "total": round(time.perf_counter() - start, 2)}
    return classifier_report(inputs, args.target, counts, acc, settings, train_augmentation(args, view),
                             args.loader, losses, seconds, device, args.precision)

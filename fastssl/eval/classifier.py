"""Pieces shared by the linear probe (fastssl/eval/linear.py) and semi-supervised fine-tuning
(fastssl/eval/finetune.py): loading what a tool is pointed at, the training augmentation, a
labelled image list, seeded epoch orders, the new linear head, feature extraction, top-k
accuracy and the report fields both write.

Both protocols (MIRA's appendix follows SimCLR/BYOL/SwAV) train on random-resized crops
+ horizontal flips and test on the resize / centre-crop transform of `pipelines.eval`,
so the two tools must agree on these details; keeping them in one place makes sure.
"""

from __future__ import annotations

import argparse
import copy
import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms as T

from fastssl.eval.backbone_io import load_backbone
from fastssl.arg_types import MAX_IMAGE_SIZE, int_at_least, loader_workers, number_in
from fastssl.cli import stop_signals_interrupt
from fastssl.eval.errors import EvalError
from fastssl.eval.progress_file import forget_state, interrupted, state_path
from fastssl.eval.targets import require_data, resolve_target, run_knn_figure, write_report
from fastssl.relaunch import one_process_refusal
from fastssl.run_log import utc_now
from fastssl.runtime import device_arg
from pipelines.augment import EVAL_CROP_FRACTION, EVAL_INTERPOLATION, INTERPOLATIONS, EvalView
from fastssl.models.backbone import FEATURE_DIMS
from pipelines.eval import EVAL_BACKENDS, LabelledImages, build_eval_loader, collate, eval_transform
from pipelines.folder import DataLayoutError, scan_image_folder
from pipelines.processes import loader_workers_context

if TYPE_CHECKING:
    from tqdm import tqdm

# torchvision's RandomResizedCrop default, as the authors' eval_linear.py and SwAV's eval_semisup.py.
TRAIN_SCALE = (0.08, 1.0)


def train_transform(view: EvalView, crop: str = "random-resized") -> T.Compose:
    """A random crop of the view's size + horizontal flip, normalised as the view. `crop`:
    "random-resized" (scale TRAIN_SCALE, bilinear, as MIRA's and SwAV's scripts) or "pad-4"
    (RandomCrop with 4 px of zero padding, ML-CPC's CIFAR linear evaluation)."""
    return T.Compose([
        T.RandomResizedCrop(view.size, scale=TRAIN_SCALE) if crop == "random-resized"
        else T.RandomCrop(view.size, padding=4),
        T.RandomHorizontalFlip(),
        T.ToTensor(),
        T.Normalize(view.mean, view.std),
    ])


def train_crop_words(view: EvalView, crop: str = "random-resized") -> str:
    """`train_transform`'s crop + flip, in words, for reports."""
    what = (f"RandomResizedCrop({view.size}, scale={TRAIN_SCALE})" if crop == "random-resized"
            else f"RandomCrop({view.size}, padding=4)")
    return f"{what} + horizontal flip"


def scan_splits(train: str, val: str) -> tuple[list, list, list[str]]:
    """(train samples, val samples, classes) of both folders, which must have the same classes
    (the head's outputs are the train classes)."""
    try:
        train_samples, classes = scan_image_folder(train)
        val_samples, val_classes = scan_image_folder(val)
    except DataLayoutError as err:
        raise EvalError(str(err)) from err
    if classes != val_classes:
        raise EvalError(f"train and val have different class folders ({len(classes)} vs {len(val_classes)}, "
                        f"e.g. {sorted(set(classes) ^ set(val_classes))[:3]})")
    return train_samples, val_samples, classes


def sgd_step(opt: torch.optim.Optimizer, loss: torch.Tensor, bar: tqdm | None = None, epoch: int = 0) -> float:
    """One optimiser step on `loss`; advances the progress bar; the loss as a float."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    value = loss.item()
    if bar is not None:
        bar.update(1)
        bar.set_postfix(epoch=epoch + 1, loss=f"{value:.3f}")
    return value


def check_converging(mean_loss: float, epoch: int, lower: str) -> None:
    """An EvalError when an epoch's mean training loss is NaN or infinite (an lr far too large, or
    features that are not numbers): every later epoch and the accuracy would be meaningless, and the
    report would carry NaN with exit status 0. `lower` says which lr to lower, and its value."""
    if not math.isfinite(mean_loss):
        raise EvalError(f"training diverged: the mean loss of epoch {epoch + 1} is {mean_loss}; {lower}, "
                        "or check that the backbone's features are finite")


def batches_loader(dataset: Dataset, batches: list[list[int]], num_workers: int = 0, epoch: int = 0) -> Iterator:
    """(images, labels, index) for exactly these batches of indices, in this order, skipping
    batches whose images were all unreadable. A seeded `LabelledImages` is asked for (epoch, index):
    its random crops are a function of them, not of the workers."""
    keyed = batches if getattr(dataset, "seed", None) is None else [[(epoch, i) for i in b] for b in batches]
    loader = DataLoader(dataset, batch_sampler=keyed, num_workers=num_workers, collate_fn=collate,
                        multiprocessing_context=loader_workers_context(num_workers))
    return (batch for batch in loader if batch is not None)


def epoch_batches(n: int, batch_size: int, generator: torch.Generator, drop_singleton: bool = False,
                  drop_short: bool = False) -> list[list[int]]:
    """A seeded random order of range(n) cut into batches (the last may be short).

    Drawn from its own generator so that the cached-feature and per-epoch linear probes see
    the same order. `drop_singleton` drops a last batch of one image, which BatchNorm in
    training mode cannot normalise; `drop_short` any short last batch (DataLoader's drop_last,
    as the authors' linear probe), unless it is the only one.
    """
    order = torch.randperm(n, generator=generator).tolist()
    batches = [order[i : i + batch_size] for i in range(0, n, batch_size)]
    short = len(batches) > 1 and len(batches[-1]) < batch_size
    if short and (drop_short or (drop_singleton and len(batches[-1]) == 1)):
        batches.pop()
    return batches


def step_decay(epoch: int, base: float, milestones: Sequence[int], gamma: float) -> float:
    """`base * gamma ** (number of milestones <= epoch)`: SwAV's semi-supervised schedule
    (MultiStepLR at epochs 12 and 16, gamma 0.2), as a pure function of the epoch."""
    return base * gamma ** sum(1 for m in milestones if epoch >= m)


HEAD_INITS = ("normal", "default")


def new_head(feature_dim: int, num_classes: int, seed: int, init: str = "normal") -> nn.Linear:
    """A linear classifier from its own seed, so that two runs of the same settings start from the same head.

    `init` "normal": N(0, 0.01) weights, zero bias (the MIRA authors' eval_linear.py); "default":
    PyTorch's own nn.Linear initialisation (SwAV's eval_semisup.py, whose head is a new nn.Linear
    the pretrained weights do not cover), drawn as nn.Linear draws it, from `seed`."""
    if init not in HEAD_INITS:
        raise ValueError(f"unknown head init {init!r}; choose one of {', '.join(HEAD_INITS)}")
    head = nn.Linear(feature_dim, num_classes)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        if init == "normal":
            head.weight.copy_(torch.randn(head.weight.shape, generator=gen) * 0.01)
            head.bias.zero_()
        else:  # nn.Linear.reset_parameters, with this generator
            nn.init.kaiming_uniform_(head.weight, a=math.sqrt(5), generator=gen)
            bound = 1 / math.sqrt(feature_dim)
            nn.init.uniform_(head.bias, -bound, bound, generator=gen)
    return head


PRECISIONS = ("bf16", "fp32")


def effective_precision(device: torch.device, precision: str) -> str:
    """The arithmetic `autocast` runs for `precision` on `device`, as the reports record it."""
    return "bf16" if device.type == "cuda" and precision == "bf16" else "fp32"


def autocast(device: torch.device, precision: str = "bf16") -> AbstractContextManager:
    """`precision` "bf16": bf16 autocast on CUDA (as the training loop; the reference evaluation
    scripts of DINO, SwAV and the MIRA authors run fp32: --precision fp32); full precision on
    CPU whatever it says, as the loop's default there (`runtime.resolve_precision`: CPU bf16
    gave a NaN loss in one of two identical runs)."""
    if effective_precision(device, precision) == "bf16":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


def to_device(images: torch.Tensor, device: torch.device) -> torch.Tensor:
    return images.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)


@torch.no_grad()
def extract(backbone: nn.Module, batches: Iterator, n: int, device: torch.device,
            bar: tqdm | None = None, precision: str = "bf16") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(features N x D float32 on CPU, labels N, readable mask N) in dataset order.

    The backbone runs in eval mode (BatchNorm running statistics), as in every frozen-feature
    protocol; rows of unreadable images stay zero and are masked out.
    """
    was_training = backbone.training
    backbone.eval()
    feats: torch.Tensor | None = None
    labels = torch.full((n,), -1, dtype=torch.long)
    for images, y, index in batches:
        with autocast(device, precision):
            out = backbone(to_device(images, device)).float().cpu()
        if feats is None:
            feats = torch.zeros(n, out.shape[1])
        feats[index], labels[index] = out, y
        if bar is not None:
            bar.update(len(index))
    backbone.train(was_training)
    if feats is None:
        raise EvalError(f"none of the {n} images to embed is readable: each was skipped with a warning above; "
                        "replace those files, or pass another folder")
    return feats, labels, labels >= 0


def extract_samples(backbone: nn.Module, samples: Sequence[tuple[str, int]],
                    transform: Callable[[Any], torch.Tensor], batch_size: int,
                    num_workers: int, device: torch.device, bar: tqdm | None = None, precision: str = "bf16",
                    seed: int | None = None, epoch: int = 0) -> tuple[torch.Tensor, ...]:
    """`extract` over a list of (path, label) in order, `batch_size` images per forward; a random
    `transform` draws from (seed, epoch, index) when `seed` is given (`LabelledImages`)."""
    dataset = LabelledImages(samples, transform, seed)
    batches = [list(range(i, min(i + batch_size, len(dataset)))) for i in range(0, len(dataset), batch_size)]
    return extract(backbone, batches_loader(dataset, batches, num_workers, epoch), len(dataset), device, bar,
                   precision)


def extract_eval(backbone: nn.Module, root: str, samples: Sequence[tuple[str, int]], view: EvalView, loader: str,
                 batch_size: int, num_workers: int, device: torch.device, bar: tqdm | None = None,
                 precision: str = "bf16") -> tuple[torch.Tensor, ...]:
    """`extract` of the eval transform (`view`) of the whole folder `root`, whose scan is `samples`, read
    by `loader` ("torchvision" or "dali", as tools' --loader).

    Why a root and not only samples: the DALI loader scans the folder itself, and its
    dataset indices are positions in that same scan, so they index `samples` directly.
    """
    if loader == "torchvision":
        return extract_samples(backbone, samples, eval_transform(view), batch_size, num_workers, device, bar,
                               precision)
    batches = build_eval_loader(loader, root, view, batch_size, num_workers=num_workers, device=device)
    return extract(backbone, iter(batches), len(samples), device, bar, precision)


def evaluate_head(backbone: nn.Module, head: nn.Module, root: str, samples: Sequence[tuple[str, int]],
                  view: EvalView, loader: str, batch_size: int, num_workers: int, device: torch.device,
                  progress: bool, desc: str = "val", precision: str = "bf16") -> dict[str, float]:
    """Top-1 / top-5 of `head` on `backbone`'s features (eval mode, see `extract`) of the val transform."""
    bar = progress_bar(len(samples), desc, progress, unit="img")
    feats, labels, valid = extract_eval(backbone, root, samples, view, loader, batch_size, num_workers, device, bar,
                                        precision)
    if bar is not None:
        bar.close()
    with torch.no_grad():  # beside the features, on the host; a copy, so the caller's head stays on its device
        return topk_accuracy(copy.deepcopy(head).cpu()(feats[valid]), labels[valid])


def topk_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Top-1 / top-5 in percent (top-5 over all classes when there are fewer than 5)."""
    if logits.shape[0] == 0:
        raise ValueError("no images to evaluate")
    ranked = logits.topk(min(5, logits.shape[1]), dim=1).indices
    correct = ranked == labels.to(ranked.device)[:, None]
    n = float(labels.shape[0])
    return {"top1": round(100.0 * correct[:, :1].any(dim=1).sum().item() / n, 3),
            "top5": round(100.0 * correct.any(dim=1).sum().item() / n, 3)}


def progress_bar(total: int, desc: str, enabled: bool, unit: str = "it") -> tqdm | None:
    """A tqdm bar (a dependency of the project; the training loop uses one), or None."""
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, dynamic_ncols=True)


def add_data_arguments(ap: argparse.ArgumentParser, train_help: str) -> None:
    """--train/--val/--arch/--image-size/--interpolation/--crop-fraction/--mean/--std, as `resolve_target` reads
    them: the evaluation tools accept the same overrides of what the run's config says."""
    ap.add_argument("--train", help=train_help)
    ap.add_argument("--val", help="validation folder (default: the run's data.val)")
    ap.add_argument("--arch", choices=sorted(FEATURE_DIMS), help="default: the run's, or inferred from the weights")
    ap.add_argument("--image-size", type=int_at_least(1, MAX_IMAGE_SIZE),
                    help="crop size (default: the run's eval size or global crop, else 224)")
    ap.add_argument("--interpolation", choices=INTERPOLATIONS,
                    help=f"evaluation resize filter (default: the run's eval.interpolation, else {EVAL_INTERPOLATION})")
    ap.add_argument("--crop-fraction", type=number_in(0, 1, low_open=True),
                    help="centre crop / resized shorter side (default: the run's eval.crop_fraction, else "
                    f"{EVAL_CROP_FRACTION}: 224 of 256); 1.0 keeps the whole image (CIFAR's 32 px)")
    for name, what, low_open in (("mean", "subtracted", False), ("std", "divided by", True)):
        ap.add_argument(f"--{name}", type=number_in(0, 1, low_open=low_open), nargs=3, metavar=("R", "G", "B"),
                        help=f"per-channel {name} {what} (0..1; default: the run's aug.{name}, else ImageNet's): "
                        "the backbone's training normalisation")


def add_precision_argument(ap: argparse.ArgumentParser) -> None:
    """--precision: the evaluation tools' one departure switch for arithmetic (see `autocast`)."""
    ap.add_argument("--precision", choices=PRECISIONS, default="bf16",
                    help="on a GPU: bf16 autocast, as training (default; faster), or fp32, as the reference "
                    "evaluation scripts (DINO, SwAV, the MIRA authors'); a CPU always computes in fp32")


def add_run_arguments(ap: argparse.ArgumentParser, loader_help: str) -> None:
    """--num-workers/--loader/--device/--precision/--json/--no-progress: how the tool runs and where it writes."""
    ap.add_argument("--num-workers", type=loader_workers, default="-1",
                    help="torchvision: DataLoader workers (-1: this process's share of the cores, the default; "
                    "0: load in the main process); DALI: its CPU threads (-1 or 0: this process's share)")
    ap.add_argument("--loader", choices=sorted(EVAL_BACKENDS), default="torchvision", help=loader_help)
    ap.add_argument("--device", default="auto", type=device_arg, help="auto | cpu | cuda")
    add_precision_argument(ap)
    ap.add_argument("--json", help="where to write the results (default: in the run directory, or beside the "
                    "backbone file, named after the tool; an earlier report there is replaced)")
    ap.add_argument("--no-progress", action="store_true", help="no progress bars")


@dataclass
class EvalInputs:
    """What an evaluation tool was pointed at, loaded: `found` is `resolve_target`'s answer."""

    found: dict
    backbone: nn.Module
    arch: str
    train_samples: list
    val_samples: list
    classes: list[str]


def load_eval_inputs(args: argparse.Namespace, tool: str, report: str | None = None) -> EvalInputs:
    """The backbone and both splits from the command line's target/--train/--val/--arch/
    --image-size/--json, so that every bad input is an EvalError before any training starts.
    `report` names the JSON report (`resolve_target`'s tool name; default: the tool's)."""
    refusal = one_process_refusal(f"tools/{tool}.py", f"tools/{tool}.py")
    if refusal:
        raise EvalError(refusal)
    found = resolve_target(args.target, tool=report or tool, train=args.train, val=args.val,
                           image_size=args.image_size, arch=args.arch, json_path=args.json,
                           interpolation=args.interpolation, crop_fraction=args.crop_fraction, mean=args.mean,
                           std=args.std)
    backbone, arch = load_backbone(found["checkpoint"], found["arch"])  # a wrong file is named before no data
    require_data(found)
    train_samples, val_samples, classes = scan_splits(found["train"], found["val"])
    return EvalInputs(found, backbone, arch, train_samples, val_samples, classes)


def train_and_report(inputs: EvalInputs, train: Callable[[], dict], summary: Callable[[dict], str]) -> dict:
    """The classifier tools' end: `train` (Ctrl-C, SIGTERM or SIGHUP exits with one line saying which
    epochs are kept, not a traceback or silence), the `summary` line, the report, then the saved
    progress forgotten (it would resume a finished evaluation). An EvalError (a split whose every
    image is unreadable, a report that cannot be written) is the tool's to print."""
    progress = state_path(inputs.found["out"])
    try:
        with stop_signals_interrupt():
            report = train()
    except KeyboardInterrupt as err:
        interrupted(progress, "the epochs done", err)
    print(summary(report))
    write_report(inputs.found["out"], report)
    forget_state(progress)
    return report


def classifier_report(inputs: EvalInputs, target: str | Path, counts: dict, acc: dict[str, float], settings: dict,
                      train_augmentation: str, loader: str, losses: list[float], seconds: dict, device: torch.device,
                      precision: str) -> dict:
    """The JSON report of a trained classifier, in the key order both tools write: what was
    evaluated, `counts` (the image counts), the accuracy, the protocol's `settings`, the
    transforms, the loss curve, the run's own k-NN figure beside it, timings and provenance.
    One builder keeps the two reports' shared fields the same for the run report that reads them."""
    found = inputs.found
    return {
        "checkpoint": str(found["checkpoint"]), "arch": inputs.arch, "train": found["train"], "val": found["val"],
        **counts, "image_size": found["view"].size, "top1": acc["top1"], "top5": acc["top5"], **settings,
        "train_augmentation": train_augmentation,
        "val_transform": found["view"].describe(),
        "loader": loader,
        "loss_per_epoch": losses, "run_knn": run_knn_figure(target), "seconds": seconds,
        "device": str(device), "precision": effective_precision(device, precision), "date": utc_now(),
    }

#!/usr/bin/env python3
"""Linear transfer (MIRA Table 5, Ericsson et al.'s protocol) of a run's exported backbone
(`model.export`: the EMA teacher by default).

    python tools/eval_transfer.py runs/demo/<timestamp> --data-root /data/torchvision --datasets all
    python tools/eval_transfer.py backbone_resnet50.pth --data-root /data --datasets cifar10,cifar100,pets
    python tools/eval_transfer.py runs/demo/<timestamp> --folder pets=/data/pets_imagenet_layout

Frozen backbone (eval mode), pooled features of 224-px centre crops, multinomial logistic
regression with an L2 penalty searched over wd = logspace(-6, 5, 45) on a validation split,
refit on train + val, scored on test, with each dataset's metric (fastssl/eval/transfer.py
has the protocol and its differences from Ericsson's code). Datasets come from
torchvision's classes (download=False) under --data-root, in their own layout and official
splits, or from ImageNet-layout folders (--folder NAME=DIR with DIR/train, DIR/test and
optionally DIR/val). Writes one JSON (default RUN_DIR/eval_transfer.json, or
<stem>_eval_transfer.json beside a backbone file) and a Markdown table beside it (.md) in
the paper's column order. Each dataset's result is saved beside the report as it is done
(`.<report name>.partial.pt`): a stopped run, rerun with the same command, reuses them
and goes on with the next dataset; other weights or settings start over, as does --restart.
"""

from __future__ import annotations

import argparse
import importlib
import json
import re
import time

import torch

from fastssl.cli import ToolArgumentParser, exit_with, stop_signals_interrupt
from fastssl.eval.backbone_io import load_backbone
from fastssl.eval.classifier import add_precision_argument, effective_precision
from fastssl.arg_types import MAX_IMAGE_SIZE, int_at_least, loader_workers, number_in, seed_number
from fastssl.eval.errors import EvalError
from fastssl.eval.progress_file import (fingerprint, forget_state, interrupted, load_state, save_state, state_path,
                                        weights_digest)
from fastssl.eval.targets import markdown_twin, resolve_target, write_report
from fastssl.eval.transfer import (DATASETS, DEFAULT_WD_VALUES, MAX_WD_VALUES, METRICS, markdown_table, metric_note,
                                   parse_dataset_names, penalty_grid, search_and_test, spec_of)
from fastssl.eval.transfer_data import extract_split, folder_splits, torchvision_splits, transfer_transform
from fastssl.models.backbone import FEATURE_DIMS
from fastssl.run_log import utc_now
from fastssl.runtime import device_arg, pick_device


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = ToolArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("target", help="a run directory, or an exported backbone_<arch>.pth")
    ap.add_argument("--data-root", help="the root given to every torchvision dataset class (their own layouts)")
    ap.add_argument("--datasets", default="",
                    help=f"comma-separated subset of {','.join(DATASETS)}, or all (read under --data-root)")
    ap.add_argument("--folder", action="append", default=[], metavar="NAME=DIR",
                    help="read dataset NAME from ImageNet-layout DIR/train, DIR/test (and DIR/val if present); "
                         "a NAME outside the 11 is your own dataset, scored by top-1 in a column after avg.")
    ap.add_argument("--arch", choices=sorted(FEATURE_DIMS), help="default: the run's, or inferred from the weights")
    ap.add_argument("--image-size", type=int_at_least(1, MAX_IMAGE_SIZE), default=224,
                    help="resize (bicubic) + centre crop size (paper: 224)")
    ap.add_argument("--solver", choices=("auto", "sklearn", "lbfgs"), default="auto",
                    help="scikit-learn (the reference) or the batched PyTorch L-BFGS; "
                         "auto: lbfgs on CUDA, else sklearn")
    ap.add_argument("--wd-values", type=int_at_least(1, MAX_WD_VALUES), default=DEFAULT_WD_VALUES,
                    help="size of the penalty grid logspace(-6, 5, n) (paper: 45)")
    ap.add_argument("--max-iter", type=int_at_least(1), default=1000, help="solver iterations per fit")
    ap.add_argument("--tol", type=number_in(0), default=1e-4, help="solver tolerance (max |gradient|, scikit-learn's)")
    ap.add_argument("--seed", type=seed_number, default=0, help="held-out validation split (Ericsson: 0)")
    ap.add_argument("--batch-size", type=int_at_least(1), default=64, help="images per backbone forward")
    ap.add_argument("--num-workers", type=loader_workers, default="-1",
                    help="DataLoader workers (-1: this process's share of the cores, the default; 0: the main process)")
    ap.add_argument("--device", default="auto", type=device_arg, help="auto | cpu | cuda")
    add_precision_argument(ap)
    ap.add_argument("--json", help="where to write the results (the Markdown table goes beside it, .md)")
    ap.add_argument("--no-progress", action="store_true", help="no progress bars")
    ap.add_argument("--restart", action="store_true",
                    help="start over, discarding the datasets an unfinished run saved (beside the report)")
    return ap.parse_args(argv)


def plan(args: argparse.Namespace) -> dict[str, tuple[str, str]]:
    """{dataset: ("torchvision" | "folder", root)} in the paper's order; bad names fail here."""
    folders = {}
    for item in args.folder:
        name, sep, root = item.partition("=")
        if not sep or not root:
            raise EvalError(f"--folder takes NAME=DIR, got {item!r}")
        name = name.strip().lower()
        if not re.fullmatch(r"[a-z0-9][a-z0-9_-]*", name) or name == "all":
            raise EvalError(f"--folder NAME must be a plain name (letters, digits, _ -), got {name!r}")
        if name in folders:  # the last one would win without a word
            raise EvalError(f"--folder names {name!r} twice ({folders[name]} and {root}); give each dataset once")
        folders[name] = root  # one of the 11 takes its metric; another name is the user's own (top-1)
    names = parse_dataset_names(args.datasets) if args.datasets else []
    if names and not args.data_root:
        raise EvalError("--datasets reads torchvision's copies: pass --data-root (or --folder NAME=DIR instead)")
    if not names and not folders:
        raise EvalError("no dataset to evaluate: pass --data-root DIR --datasets all (or a subset), "
                        "or --folder NAME=DIR")
    order = [n for n in DATASETS if n in folders or n in names] + sorted(set(folders) - set(DATASETS))
    return {n: (("folder", folders[n]) if n in folders else ("torchvision", args.data_root)) for n in order}


def evaluate_dataset(name: str, splits: dict, num_classes: int, val_from: str, source: tuple[str, str],
                     backbone: torch.nn.Module, args: argparse.Namespace, device: torch.device, solver: str,
                     wds: list[float]) -> dict:
    """One dataset's column: its splits' features, the penalty search on val, the refit and the
    test score; printed in one line, returned for the report."""
    start = time.perf_counter()
    feats, targets = {}, {}
    for split, data in splits.items():
        try:
            feats[split], targets[split] = extract_split(backbone, data, args.batch_size, args.num_workers,
                                                         device, not args.no_progress, f"{name} {split}",
                                                         args.precision)
        except EvalError as err:  # a split whose every image is unreadable
            exit_with(f"{name} {split}: {err}")
    extract_s = time.perf_counter() - start
    spec = spec_of(name)
    fit = search_and_test(feats, targets, spec.metric, num_classes, solver, wds, device=device,
                          max_iter=args.max_iter, tol=args.tol, progress=not args.no_progress, desc=name)
    fit["seconds"]["features"] = round(extract_s, 2)
    print(f"{spec.title}: {METRICS[spec.metric]} {fit['score']:.2f} (wd {fit['best_wd']:.3g}, "
          f"val {fit['val_score']:.2f})", flush=True)
    return {"title": spec.title, "metric": spec.metric, "metric_name": METRICS[spec.metric], "source": source[0],
            "root": source[1], "val_split": val_from, "num_classes": num_classes,
            **{f"num_{s}": len(t) for s, t in targets.items()}, **fit}


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    device = pick_device(args.device)
    solver = args.solver if args.solver != "auto" else ("lbfgs" if device.type == "cuda" else "sklearn")
    transform = transfer_transform(args.image_size)
    try:
        todo = plan(args)
        # Not a linear probe on a training folder: the data come per dataset (no `require_data`).
        found = resolve_target(args.target, tool="eval_transfer", arch=args.arch, json_path=args.json)
        markdown_twin(found["out"])  # a --json ending in .md is refused before any work
        backbone, arch = load_backbone(found["checkpoint"], found["arch"])
        if solver == "sklearn":  # a missing scikit-learn is said now, before any feature extraction
            importlib.import_module("sklearn")
        # Every dataset is opened (and its splits and targets read) before any work.
        opened = {n: (folder_splits if kind == "folder" else torchvision_splits)(n, root, transform, args.seed)
                  for n, (kind, root) in todo.items()}
    except ImportError:
        exit_with("scikit-learn is not installed; pip install scikit-learn (the [all] extra) or pass --solver lbfgs")
    except EvalError as err:
        exit_with(err)
    backbone = backbone.to(device).to(memory_format=torch.channels_last).eval().requires_grad_(False)
    wds = penalty_grid(args.wd_values)
    progress_file = state_path(found["out"])
    key = fingerprint({"weights": weights_digest(backbone), "arch": arch, "image_size": args.image_size,
                       "solver": solver, "wd_grid": wds, "max_iter": args.max_iter, "tol": args.tol, "seed": args.seed,
                       "precision": effective_precision(device, args.precision)})
    saved = load_state(progress_file, key, args.restart, "the transfer evaluation",
                       lambda state: f"{', '.join(state['datasets'])} done") or {"datasets": {}}
    results = {}
    try:
        with stop_signals_interrupt():
            for name, (splits, num_classes, val_from) in opened.items():
                earlier = saved["datasets"].get(name)
                if earlier is not None and (earlier["source"], earlier["root"]) == todo[name]:  # the same data
                    results[name] = earlier
                    print(f"{earlier['title']}: {earlier['metric_name']} {earlier['score']:.2f} (saved by the "
                          "earlier run)", flush=True)
                    continue
                results[name] = evaluate_dataset(name, splits, num_classes, val_from, todo[name], backbone, args,
                                                 device, solver, wds)
                # plain JSON types (numpy's floats are not among what a weights-only load reads back)
                done = json.loads(json.dumps({**saved["datasets"], **results}))
                save_state(progress_file, {"datasets": done}, key)
    except KeyboardInterrupt as err:  # Ctrl-C, SIGTERM, SIGHUP: one line saying what is kept, not a traceback
        interrupted(progress_file, "the datasets done", err)
    model = str(found["checkpoint"])
    table = markdown_table({model: {n: r["score"] for n, r in results.items()}})
    report = {"checkpoint": model, "arch": arch, "feature_dim": FEATURE_DIMS[arch], "image_size": args.image_size,
              "transform": f"resize {args.image_size} (bicubic) + centre crop {args.image_size}, "
                           "ImageNet normalisation",
              "solver": solver, "wd_grid": wds, "max_iter": args.max_iter, "tol": args.tol, "seed": args.seed,
              "datasets": results, "table": table, "metrics": metric_note(), "device": str(device),
              "precision": effective_precision(device, args.precision), "date": utc_now()}
    print(table, end="")
    try:
        write_report(found["out"], report, f"Linear transfer (MIRA Table 5 protocol) of `{model}`\n\n{table}\n"
                                           f"{metric_note()}\n")
    except EvalError as err:
        exit_with(err)
    forget_state(progress_file)
    return report


if __name__ == "__main__":
    main()

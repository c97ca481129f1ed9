#!/usr/bin/env python3
"""Loader-only throughput of every available backend, in SOURCE images/s (each with all its crops).

    python tools/bench_loaders.py                                  # embedded demo data, full 8-crop recipe
    python tools/bench_loaders.py --data /imagenet/train --beton train.beton --json out.json

Same images, same recipe, same batch size for every backend; the backends are
interleaved within each repetition (torchvision, dali, ffcv, synthetic, then again), so
that a noisy shared machine slows them alike, and the median over repetitions is
reported with its spread. Each repetition is a fresh epoch: its first `--warmup`
batches (pipeline start-up, worker spawn) are not timed in the rate; the seconds from the
epoch's start to its first batch are reported on their own ('start s', median): a
training run pays them once per epoch. On a GPU the views are
delivered to it and the clock stops after a synchronise, and two device-memory columns
are added (every allocator, DALI's and nvJPEG's pools included): what each loader's first
batch added, and what the process held at the end of its timed passes (the readings
accumulate over the loaders of one run).

torchvision runs with one worker per core (the reference); DALI and FFCV get the same
thread count. FFCV reads a `.beton` converted from the same folder (made on the fly
under data/bench/ when `--beton` is not given).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import os
import platform
import statistics
from pathlib import Path

import torch

from fastssl.arg_types import MAX_WORKERS, comma_list, int_at_least, one_of
from fastssl.bench import loaders as loader_bench
from fastssl.checkpoint import out_of_room
from fastssl.cli import ToolArgumentParser, exit_with, output_file, stop_in_one_line, write_output_json
from fastssl.run_log import utc_now
from fastssl.runtime import device_arg, pick_device
from pipelines import DataConfig, LoaderSpec, MultiCropRecipe, build_train_loader
from pipelines.augment import MIN_CROP
from pipelines.beton import BetonError
from pipelines.beton_convert import ConversionError, convert
from pipelines.cores import usable_cores
from pipelines.folder import DataLayoutError

ALL_BACKENDS = loader_bench.BACKEND_ORDER
# Opt-in ablations (name -> backend, DataConfig overrides and MultiCropRecipe overrides), measured only
# when named in --backends.
VARIANTS = {"dali-gpu-graph": ("dali", {"dali_cpu_fast": False}, {}),  # the GPU's DALI graph run on the CPU
            # torchvision workers / DALI only crop; the photometric steps run batched on the device
            "torchvision-device-augment": ("torchvision", {"device_augment": True}, {}),
            "dali-device-augment": ("dali", {"device_augment": True}, {}),
            # the share of JPEGs nvJPEG's hardware decoder takes on a GPU ("dali" itself: 0.65)
            "dali-hw0": ("dali", {"dali_hw_decoder_load": 0.0}, {}),
            "dali-hw1": ("dali", {"dali_hw_decoder_load": 1.0}, {}),
            # every file read one by one in the training thread (the default: 8 at once, two batches ahead)
            "dali-read1": ("dali", {"dali_read_threads": 1}, {}),
            # the jitter's steps always in one order (the default draws one per view, as torchvision)
            "dali-fixed-order": ("dali", {}, {"jitter_order": "fixed"}),
            "dali-gpu-graph-fixed-order": ("dali", {"dali_cpu_fast": False}, {"jitter_order": "fixed"}),
            "ffcv-fixed-order": ("ffcv", {}, {"jitter_order": "fixed"}),
            "torchvision-device-augment-fixed-order": ("torchvision", {"device_augment": True},
                                                       {"jitter_order": "fixed"})}
DEFAULT_DATA = "data/demo/train"


def available(backend: str) -> bool:
    """Whether the backend (or the backend of a variant) is installed."""
    return loader_bench.available(variant(backend)[0])


def variant(name: str) -> tuple[str, dict, dict]:
    """A backend or variant name -> (backend, DataConfig overrides, MultiCropRecipe overrides)."""
    return VARIANTS.get(name, (name, {}, {}))


def bench_folder_fix(err: OSError) -> str:
    """What to do when data/bench/ (under the working folder) could not be written."""
    return ("free space there" if out_of_room(err) else "run from a folder you can write to")


def beton_for(folder: Path) -> Path:
    """A .beton of `folder` under data/bench/, converted once (JPEG storage, as ImageNet's would be).

    Named by a fingerprint of the folder's files (their paths, sizes and modification times): a folder
    regenerated in place (`make_demo_dataset.py --force`, other images) gets a .beton of its own, not
    the one of the images it had before."""
    files = sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith("."))
    fingerprint = hashlib.sha1(str(folder.resolve()).encode())
    for path in files:
        stat = path.stat()
        fingerprint.update(f"{path.relative_to(folder)}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    name = f"{folder.resolve().parent.name}_{folder.name}_{len(files)}_{fingerprint.hexdigest()[:12]}.beton"
    out = Path("data/bench") / name
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        print(f"converting {folder} -> {out} for the ffcv backend")
        convert(folder, out, write_mode="jpg", progress=False)
    return out


def photo_like_folder(count: int, parent: Path = Path("data/bench")) -> Path:
    """`count` ImageNet-like JPEGs (about 400 x 350, quality 90, 1/f colour noise, so the
    entropy and file size are photographic: ~100 KB), in 10 class folders; made once per count."""
    import numpy as np
    from PIL import Image

    root = parent / f"photo-{count}"
    done = root / ".complete"
    if done.exists():
        return root
    print(f"writing {count} photo-like JPEGs to {root} (once)")
    rng = np.random.default_rng(0)
    for i in range(count):
        h, w = int(rng.integers(300, 400)), int(rng.integers(350, 500))
        fy, fx = np.fft.fftfreq(h)[:, None], np.fft.rfftfreq(w)[None, :]
        amplitude = 1.0 / np.maximum(np.hypot(fy, fx), 1.0 / max(h, w))  # 1/f spectrum, like natural images
        phase = rng.uniform(0, 2 * np.pi, (3, h, w // 2 + 1))
        img = np.fft.irfft2(amplitude * np.exp(1j * phase), s=(h, w))
        img = (img - img.mean(axis=(1, 2), keepdims=True)) / img.std(axis=(1, 2), keepdims=True)
        pixels = np.clip(128 + 45 * img.transpose(1, 2, 0), 0, 255).astype(np.uint8)
        folder = root / f"class_{i % 10:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(folder / f"img_{i:05d}.JPEG", quality=90)
    done.touch()
    return root


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = ToolArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default=DEFAULT_DATA, help=f"JPEG folder in ImageNet layout (default {DEFAULT_DATA})")
    ap.add_argument("--photo-like", type=int_at_least(1), metavar="N",
                    help="instead of --data, use N generated ImageNet-like JPEGs (~400 x 350, photographic entropy)")
    ap.add_argument("--beton", help="the same data as a .beton for ffcv (default: converted under data/bench/)")
    ap.add_argument("--backends", type=comma_list(one_of([*ALL_BACKENDS, *VARIANTS])), default=list(ALL_BACKENDS),
                    help="comma-separated subset of " + ", ".join(ALL_BACKENDS) + "; opt-in ablation: "
                    "dali-gpu-graph (DALI with --data.dali_cpu_fast off: bicubic crops, accurate IDCT, "
                    "DALI operators under conditionals, as on a GPU); opt-in variants: "
                    "torchvision-device-augment and dali-device-augment (--data.device_augment on: the "
                    "loader only crops, the rest runs batched on the device), dali-hw0 and dali-hw1 "
                    "(--data.dali_hw_decoder_load 0 and 1; dali itself uses 0.65), dali-read1 "
                    "(--data.dali_read_threads 1: files read one by one; dali itself reads 8 at once), "
                    "dali-fixed-order, dali-gpu-graph-fixed-order, ffcv-fixed-order and "
                    "torchvision-device-augment-fixed-order "
                    "(--aug.jitter_order fixed: the jitter's steps in one order; the default draws one per view)")
    ap.add_argument("--batch-size", type=int_at_least(1), default=64)
    ap.add_argument("--batches", type=int_at_least(1), default=8, help="timed batches per repetition")
    ap.add_argument("--warmup", type=int_at_least(0), default=2, help="untimed batches at the start of each repetition")
    ap.add_argument("--repeats", type=int_at_least(1), default=3)
    ap.add_argument("--workers", type=int_at_least(1, MAX_WORKERS), default=usable_cores(),
                    help="workers / threads per backend (default: the cores this process may use)")
    ap.add_argument("--global-size", type=int_at_least(MIN_CROP), default=224)
    ap.add_argument("--local-size", type=int_at_least(MIN_CROP), default=96)
    ap.add_argument("--num-local", type=int_at_least(0), default=6)
    ap.add_argument("--device", default="auto", type=device_arg, help="auto (cuda when present) | cpu | cuda")
    ap.add_argument("--json", type=output_file, help="write the results here")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    device = pick_device(args.device)
    try:
        data = photo_like_folder(args.photo_like) if args.photo_like else Path(args.data)
    except OSError as err:
        exit_with(f"the photo-like images could not be written under data/bench/ ({err.strerror or err}); "
                  f"{bench_folder_fix(err)}")
    if data.is_file():
        exit_with(f"--data takes a JPEG folder in ImageNet layout; {data} is a file"
                  + (" (give a .beton with --beton, beside its JPEG folder)" if data.suffix == ".beton" else ""))
    if not data.is_dir():
        hint = " (run `make demo` once to generate it)" if args.data == DEFAULT_DATA else ""
        exit_with(f"data folder {data} does not exist{hint}")
    recipe = MultiCropRecipe(global_size=args.global_size, local_size=args.local_size, num_local=args.num_local)
    names = [b for b in args.backends if available(b)]
    skipped = [b for b in args.backends if b not in names]
    loaders = {}
    for name in names:
        backend, overrides, recipe_overrides = variant(name)
        try:
            path = str(args.beton or beton_for(data)) if backend == "ffcv" else str(data)
        except ConversionError as err:  # no readable image, a folder of splits: the converter's words
            exit_with(f"{name}: {data} could not be converted for it: {err}")
        except OSError as err:
            exit_with(f"{name}: the .beton of {data} could not be written under data/bench/ ({err.strerror or err}); "
                      f"{bench_folder_fix(err)}, or pass one with --beton")
        spec = LoaderSpec(data=DataConfig(backend=backend, train=path, synthetic_size=100_000, **overrides),
                          recipe=dataclasses.replace(recipe, **recipe_overrides), batch_size=args.batch_size,
                          num_workers=args.workers, device=device, seed=0)
        try:
            loaders[name] = build_train_loader(spec)
        except (BetonError, DataLayoutError) as err:  # --beton names a foreign file; fewer images than a batch
            exit_with(err)
        need = args.warmup + args.batches
        if len(loaders[name]) < need:
            exit_with(f"{name}: {len(loaders[name])} batches per epoch, need {need}; "
                      "use more data or fewer --batches/--warmup")
    print(f"warming up {', '.join(names)} (first batches compile/spawn) ...", flush=True)

    width = max([14, *map(len, names)])  # the name column

    def progress(rep: int, name: str, rate: float) -> None:
        print(f"  repeat {rep + 1}/{args.repeats} {name:{width}s} {rate:9.1f} images/s", flush=True)

    memory: dict[str, dict] = {}
    starts: dict[str, list[float]] = {}
    try:
        runs = loader_bench.interleaved_rates(loaders, args.repeats, args.warmup, args.batches, device, progress,
                                              memory, starts)
    except DataLayoutError as err:  # a folder of unreadable images: said by the loader, in a worker maybe
        exit_with(err)
    results = {name: {**loader_bench.summarize(runs[name]),
                      "epoch_start_s": statistics.median(starts[name]) if name in starts else None,
                      "epoch_start_runs": starts.get(name, []),
                      "device_added_mb": memory[name]["added_mb"], "device_used_mb": memory[name]["used_mb"]}
               for name in names}
    ref = results["torchvision"]["images_per_s"] if "torchvision" in results else None
    cuda = device.type == "cuda"
    print(f"\n{'backend':{width}s} {'images/s':>10s} {'min':>9s} {'max':>9s} {'x torchvision':>14s} {'start s':>8s}"
          + (f" {'added MiB':>10s} {'in use MiB':>11s}" if cuda else ""))
    for name, r in results.items():
        med = r["images_per_s"]
        r["vs_torchvision"] = med / ref if ref else None
        ratio = f"{med / ref:14.2f}" if ref else f"{'-':>14s}"
        start = f"{r['epoch_start_s']:8.2f}" if r["epoch_start_s"] is not None else f"{'-':>8s}"
        mib = f" {r['device_added_mb']:10.0f} {r['device_used_mb']:11.0f}" if cuda else ""
        print(f"{name:{width}s} {med:10.1f} {r['min']:9.1f} {r['max']:9.1f} {ratio} {start}{mib}")
    if skipped:
        print(f"not installed, skipped: {', '.join(skipped)}")
    report = {
        "backends": results,
        "config": {"data": str(data), "batch_size": args.batch_size, "batches": args.batches, "warmup": args.warmup,
                   "repeats": args.repeats, "workers": args.workers, "views": recipe.num_views,
                   "global_size": args.global_size, "local_size": args.local_size, "device": str(device)},
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__,
                    "gpu": torch.cuda.get_device_name(0) if device.type == "cuda" else None},
        "date": utc_now(),
    }
    if args.json:
        write_output_json(args.json, report, sort_keys=False)
        print(f"wrote {args.json}")
    return report


if __name__ == "__main__":
    with stop_in_one_line("nothing is written before the benchmark ends: run it again"):
        main()

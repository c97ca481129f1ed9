#!/usr/bin/env python3
"""Student step time with per-view BatchNorm against its two alternatives, side by side.

    python tools/bench_bn_stats.py --json bn_stats.json                       # ResNet-50, 2x224 + 6x96
    python tools/bench_bn_stats.py --arch resnet18 --batch 16 --global-size 64 --local-size 32   # CPU-sized

Three ways to give every view of a multi-crop step to the student (forward, swapped
prediction loss, backward), timed in interleaved rounds so that machine noise hits
them alike:
* `per_view`: one forward per resolution, each view normalised with its own statistics
  (`--model.bn_stats per_view`, the default; the authors' semantics);
* `per_forward`: one forward per resolution, views of a forward normalised together
  (`--model.bn_stats per_forward`; not the authors' semantics);
* `separate`: one forward per view (the authors' code; same semantics as per_view).
Prints a table and writes JSON with the median step time of each and the ratios to
`per_forward`.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from fastssl.arg_types import int_at_least
from fastssl.cli import ToolArgumentParser, output_file, sizes_that_fit, stop_in_one_line, write_output_json
from fastssl.losses import swapped_prediction_loss
from fastssl.models import MiraNetwork
from fastssl.runtime import device_arg, pick_device
from pipelines.augment import MIN_CROP

MODES = ("per_view", "per_forward", "separate")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = ToolArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", default="resnet50", choices=("resnet18", "resnet50"))
    # --batch >= 2: the student trains, and its BatchNorm layers normalise each view over its images.
    ap.add_argument("--batch", type=int_at_least(2), default=64, help="images per view (Table 8: 64 per GPU)")
    ap.add_argument("--global-size", type=int_at_least(MIN_CROP), default=224)
    ap.add_argument("--local-size", type=int_at_least(MIN_CROP), default=96)
    ap.add_argument("--num-local", type=int_at_least(0), default=6)
    ap.add_argument("--prototypes", type=int_at_least(1), default=3000)
    ap.add_argument("--steps", type=int_at_least(1), default=5, help="timed steps per mode and round")
    ap.add_argument("--rounds", type=int_at_least(1), default=3,
                    help="interleaved rounds (the median step is reported)")
    ap.add_argument("--precision", choices=("auto", "bf16", "no"), default="auto",
                    help="auto: bf16 autocast on CUDA, fp32 on CPU")
    ap.add_argument("--device", default="auto", type=device_arg, help="auto | cpu | cuda")
    ap.add_argument("--json", type=output_file, help="write the results here")
    return ap.parse_args(argv)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def student_step(net: MiraNetwork, views: list[torch.Tensor], targets: list[torch.Tensor], mode: str,
                 dtype: torch.dtype | None) -> None:
    """Forward all views, swapped-prediction loss, backward (gradients are left to accumulate)."""
    with torch.autocast(views[0].device.type, dtype=dtype, enabled=dtype is not None):
        logits = [net([v])[0] for v in views] if mode == "separate" else net(views)
    swapped_prediction_loss(logits, targets, 0.1).backward()


def run(args: argparse.Namespace) -> dict:
    device = pick_device(args.device)
    dtype = torch.bfloat16 if (args.precision == "bf16" or (args.precision == "auto" and device.type == "cuda")) \
        else None
    torch.manual_seed(0)
    nets = {mode: MiraNetwork(args.arch, num_prototypes=args.prototypes,
                              bn_stats="per_view" if mode == "per_view" else "per_forward")
            .to(device).to(memory_format=torch.channels_last) for mode in MODES}
    sizes = [args.global_size] * 2 + [args.local_size] * args.num_local
    views = [torch.randn(args.batch, 3, s, s, device=device).contiguous(memory_format=torch.channels_last)
             for s in sizes]
    targets = [torch.softmax(torch.randn(args.batch, args.prototypes, device=device), 1) for _ in range(2)]
    for mode in MODES:  # warm-up: allocator, cuDNN autotuning
        student_step(nets[mode], views, targets, mode, dtype)
    times: dict[str, list[float]] = {mode: [] for mode in MODES}
    for _ in range(args.rounds):
        for mode in MODES:
            synchronize(device)
            start = time.perf_counter()
            for _ in range(args.steps):
                student_step(nets[mode], views, targets, mode, dtype)
            synchronize(device)
            times[mode].append((time.perf_counter() - start) / args.steps)
    median = {mode: statistics.median(t) for mode, t in times.items()}
    return {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "arch": args.arch, "batch_per_view": args.batch, "views": f"2x{args.global_size} + "
            f"{args.num_local}x{args.local_size}", "precision": "bf16" if dtype else "fp32",
            "torch": torch.__version__, "date": time.strftime("%Y-%m-%d %H:%M %Z"),
            "step_ms": {m: round(1000 * v, 2) for m, v in median.items()},
            "ratio_to_per_forward": {m: round(v / median["per_forward"], 3) for m, v in median.items()},
            "rounds_ms": {m: [round(1000 * v, 2) for v in t] for m, t in times.items()}}


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    with sizes_that_fit("--batch, --prototypes, --global-size, --local-size or --num-local"):
        result = run(args)
    print(f"student step, {result['arch']}, {result['views']}, {result['batch_per_view']} per view, "
          f"{result['precision']}, {result['device']}")
    print(f"{'mode':<12} {'ms/step':>9} {'x per_forward':>14}")
    for mode in MODES:
        print(f"{mode:<12} {result['step_ms'][mode]:>9.1f} {result['ratio_to_per_forward'][mode]:>14.3f}")
    if args.json:
        write_output_json(args.json, result, sort_keys=False)
        print(f"wrote {args.json}")
    return result


if __name__ == "__main__":
    with stop_in_one_line("nothing is written before the benchmark ends: run it again"):
        main()

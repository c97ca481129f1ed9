#!/usr/bin/env python3
"""Time the pseudo-label assignments: MIRA reference (eager), the custom-op path, Sinkhorn.

    python tools/bench_mira.py                          # GPU: the issue's grid; CPU: small sizes
    python tools/bench_mira.py --sizes 512x3000 --json out.json

For each (B, K): 2 teacher views, 30 MIRA iterations (Sinkhorn: 3), the median of
`--repeats` timed calls after `--warmup` untimed ones; on CUDA with device events. The
implementations, interleaved within each size:
  reference  `mira_assign` per view (log space, one reduction per iteration)
  views      `mira_assign_views` (both views in the `fastssl::mira_assign_views` op: on CUDA
             the fused kernel of fastssl/ops/csrc when it builds, else the batched reference;
             the table says which ran)
  sinkhorn   `sinkhorn_assign` per view, 3 iterations
Prints a table and, with --json, writes one record per (implementation, B, K, device)
with its median microseconds. On CUDA it also lists, from the torch profiler, the kernels
one `views` call launches (how many, and whether any is Triton).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from fastssl.ops import _cuda_ext, mira_assign, mira_assign_views, sinkhorn_assign  # noqa: E402

GPU_SIZES = ("64x3000", "512x3000", "4096x3000", "64x16384", "512x16384", "4096x16384")
CPU_SIZES = ("64x3000", "512x3000")


def implementations(num_iters: int) -> dict:
    return {
        "reference": lambda v: [mira_assign(x, tau=0.225, beta=0.7, num_iters=num_iters) for x in v],
        "views": lambda v: mira_assign_views(v, tau=0.225, beta=0.7, num_iters=num_iters),
        "sinkhorn": lambda v: [sinkhorn_assign(x, eps=0.05, num_iters=3) for x in v],
    }


def time_call(fn, views, device: torch.device, warmup: int, repeats: int) -> float:
    """Median microseconds of fn(views)."""
    for _ in range(warmup):
        fn(views)
    samples = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn(views)
            end.record()
            torch.cuda.synchronize()
            samples.append(start.elapsed_time(end) * 1e3)
        else:
            t = time.perf_counter()
            fn(views)
            samples.append((time.perf_counter() - t) * 1e6)
    return statistics.median(samples)


def kernel_census(fn, views) -> dict:
    """CUDA kernels launched by one call (names and count) from the torch profiler."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn(views)
        torch.cuda.synchronize()
    names = [e.name for e in prof.events() if e.device_type.name == "CUDA"]
    return {"count": len(names), "distinct": sorted(set(names)), "triton": any("triton" in n.lower() for n in names)}


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", help="comma-separated BxK (default: the issue's grid on GPU, small sizes on CPU)")
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda")
    ap.add_argument("--iters", type=int, default=30, help="MIRA fixed-point iterations")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--json", help="write the records here")
    args = ap.parse_args(argv)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    sizes = args.sizes.split(",") if args.sizes else list(GPU_SIZES if device.type == "cuda" else CPU_SIZES)
    records = []
    print(f"{'B':>6s} {'K':>6s} " + " ".join(f"{n:>12s}" for n in implementations(args.iters)) + "   ref/views")
    for size in sizes:
        b, k = (int(s) for s in size.lower().split("x"))
        g = torch.Generator(device=device).manual_seed(0)
        views = [torch.randn(b, k, generator=g, device=device) for _ in range(2)]
        row = {}
        for name, fn in implementations(args.iters).items():
            us = time_call(fn, views, device, args.warmup, args.repeats)
            row[name] = us
            records.append({"implementation": name, "B": b, "K": k, "device": str(device), "views": 2,
                            "iters": args.iters if name != "sinkhorn" else 3, "median_us": us})
        print(f"{b:6d} {k:6d} " + " ".join(f"{row[n]:12.0f}" for n in row) + f"   {row['reference'] / row['views']:8.2f}")
        if device.type == "cuda":
            census = kernel_census(implementations(args.iters)["views"], views)
            print(f"        views: {census['count']} kernels, triton: {census['triton']}, {census['distinct'][:6]}")
            records[-2]["kernels"] = census
            records[-2]["fused"] = _cuda_ext.status()["fused_calls"] > 0
    if device.type == "cuda":
        st = _cuda_ext.status()
        print(f"views ran the fused CUDA kernel: {'yes' if st['fused_calls'] else 'no'}"
              + (f" ({st['reason']})" if st["reason"] else ""))
    if args.json:
        Path(args.json).write_text(json.dumps({"date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                                               "torch": torch.__version__, "records": records}, indent=2))
        print(f"wrote {args.json}")
    return records


if __name__ == "__main__":
    main()

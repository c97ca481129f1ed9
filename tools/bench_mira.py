#!/usr/bin/env python3
"""Time the pseudo-label assignments: MIRA reference (eager), the custom-op path, Sinkhorn.

    python tools/bench_mira.py                          # GPU: B 64-4096 x K 3000-16384; CPU: small sizes
    python tools/bench_mira.py --sizes 512x3000 --json out.json

For each (B, K): 2 teacher views, 30 MIRA iterations (Sinkhorn: 3), the median of
`--repeats` timed calls after `--warmup` untimed ones; on CUDA with device events. The
implementations, interleaved within each size:
  reference  `mira_assign` per view (log space, one reduction per iteration)
  views      `mira_assign_views` (both views in the `fastssl::mira_assign_views` op: on CUDA
             the fused kernel of fastssl/ops/csrc when it builds, else the batched reference;
             the table says which ran)
  sinkhorn   `sinkhorn_assign` per view, 3 iterations
Opt-in with --impls (a comma-separated list of these and the above):
  solve_views   the batched log-space reference (`solve_views`) on the stacked views: what the
                custom op runs when the fused kernel is off
  fused         the fused kernel's own entry (`mira_assign_views_cuda`) on pre-stacked logits,
                without the op's dispatch (CUDA only)
  fused_graph   that call captured once in a CUDA graph, timed as graph replays (CUDA only)
Prints a table and, with --json, writes one record per (implementation, B, K, device)
with its median microseconds (an implementation that cannot run records its "error"). On
CUDA it also lists, from the torch profiler, the kernels one call of each implementation
launches (how many, and whether any is Triton). --views and --dtype set the logits' shape
and type (default: 2 views, float32).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from types import ModuleType

import torch

from fastssl.arg_types import comma_list, int_at_least, one_of
from fastssl.bench.assignment import BETA, TAU, implementations, time_call
from fastssl.cli import ToolArgumentParser, output_file, sizes_that_fit, stop_in_one_line, write_output_json
from fastssl.ops import _cuda_ext
from fastssl.ops.mira_fused import solve_views
from fastssl.profiling import device_trace
from fastssl.run_log import utc_now
from fastssl.runtime import device_arg, pick_device

GPU_SIZES = ("64x3000", "512x3000", "4096x3000", "64x16384", "512x16384", "4096x16384")
CPU_SIZES = ("64x3000", "512x3000")
DEFAULT_IMPLS = ("reference", "views", "sinkhorn")
EXTRA_IMPLS = ("solve_views", "fused", "fused_graph")
CUDA_ONLY = ("fused", "fused_graph")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def fused_module(device: torch.device) -> ModuleType:
    """The fused extension (built and self-checked on `device`), or RuntimeError saying why not."""
    if device.type != "cuda":
        raise RuntimeError("the fused kernel needs a CUDA device")
    ext = _cuda_ext.fused_for(device)
    if ext is None:
        raise RuntimeError(f"the fused kernel is not available: {_cuda_ext.status()['reason']}")
    return ext


def extra_implementation(name: str, views: list[torch.Tensor], num_iters: int
                         ) -> Callable[[list[torch.Tensor]], object]:
    """fn(views) for an opt-in implementation, prepared for these `views` (inputs pre-stacked).

    Why prepared: `fused` and `fused_graph` time the kernel without the op's stack and
    dispatch; a CUDA graph must be captured once on fixed buffers and then only replayed.
    """
    stacked = torch.stack(views).contiguous()
    if name == "solve_views":
        return lambda v: solve_views(torch.stack(v), TAU, BETA, num_iters)
    ext = fused_module(stacked.device)
    out = torch.empty(stacked.shape, dtype=torch.float32, device=stacked.device)
    if name == "fused":
        return lambda v: ext.mira_assign_views_cuda(stacked, TAU, BETA, num_iters, out=out)
    side = torch.cuda.Stream(device=stacked.device)  # warm up off the default stream, as capture wants
    side.wait_stream(torch.cuda.current_stream(stacked.device))
    with torch.cuda.stream(side):
        for _ in range(2):
            ext.mira_assign_views_cuda(stacked, TAU, BETA, num_iters, out=out)
    torch.cuda.current_stream(stacked.device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        ext.mira_assign_views_cuda(stacked, TAU, BETA, num_iters, out=out)
    return lambda v: graph.replay()


def kernel_census(fn: Callable[[list[torch.Tensor]], object], views: list[torch.Tensor]) -> dict:
    """CUDA kernels launched by one call (names and count) from the torch profiler."""
    names = [name for name, _, _ in device_trace(lambda: fn(views))]
    return {"count": len(names), "distinct": sorted(set(names)), "triton": any("triton" in n.lower() for n in names)}


def size_list(text: str) -> list[tuple[int, int]]:
    """argparse `type` of --sizes: comma-separated BxK as (B, K) pairs, each at least 1. A bad one is a usage
    error at parse time, not a ValueError (or a math domain error, for B = 0) after the first timings."""
    sizes = []
    for item in text.split(","):
        b, sep, k = item.strip().lower().partition("x")
        if not (sep and b.isdigit() and k.isdigit() and int(b) >= 1 and int(k) >= 1):
            raise argparse.ArgumentTypeError(f"{item!r} is not BxK with B, K >= 1 (rows x prototypes, e.g. 512x3000)")
        sizes.append((int(b), int(k)))
    return sizes


def main(argv: list[str] | None = None) -> list[dict]:
    ap = ToolArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=size_list,
                    help="comma-separated BxK (default: B 64-4096 x K 3000-16384 on GPU, small sizes on CPU)")
    ap.add_argument("--device", default="auto", type=device_arg, help="auto | cpu | cuda")
    ap.add_argument("--iters", type=int_at_least(0), default=30, help="MIRA fixed-point iterations")
    ap.add_argument("--warmup", type=int_at_least(0), default=3)
    ap.add_argument("--repeats", type=int_at_least(1), default=20, help="timed calls (the median is reported)")
    ap.add_argument("--json", type=output_file, help="write the records here")
    ap.add_argument("--impls", type=comma_list(one_of(DEFAULT_IMPLS + EXTRA_IMPLS)), default=list(DEFAULT_IMPLS),
                    help="comma-separated implementations: " + ", ".join(DEFAULT_IMPLS + EXTRA_IMPLS)
                    + f" (default {','.join(DEFAULT_IMPLS)}; {', '.join(CUDA_ONLY)}: CUDA only)")
    ap.add_argument("--views", type=int_at_least(1), default=2, help="teacher views per call (default 2)")
    ap.add_argument("--dtype", default="fp32", choices=sorted(DTYPES), help="logits dtype (default fp32)")
    args = ap.parse_args(argv)
    impls = args.impls
    device = pick_device(args.device)
    sizes = args.sizes or size_list(",".join(GPU_SIZES if device.type == "cuda" else CPU_SIZES))
    records = []
    ratio = "reference" in impls and "views" in impls
    print(f"microseconds per call (median of {args.repeats}), {args.views} view(s), {args.dtype} logits")
    print(f"{'B':>6s} {'K':>6s} " + " ".join(f"{n:>12s}" for n in impls) + ("   ref/views" if ratio else ""))
    for b, k in sizes:
        g = torch.Generator(device=device).manual_seed(0)
        with sizes_that_fit("--sizes or --views"):
            views = [torch.randn(b, k, generator=g, device=device).to(DTYPES[args.dtype]) for _ in range(args.views)]
        row = {}
        for name in impls:
            record = {"implementation": name, "B": b, "K": k, "device": str(device), "views": args.views,
                      "dtype": args.dtype, "iters": args.iters if name != "sinkhorn" else 3}
            records.append(record)
            try:
                fn = implementations(args.iters)[name] if name in DEFAULT_IMPLS else \
                    extra_implementation(name, views, args.iters)
                us = time_call(fn, views, device, args.warmup, args.repeats)
            except RuntimeError as exc:  # e.g. no fused kernel here, or a CUDA graph that cannot be captured
                record["error"], row[name] = f"{type(exc).__name__}: {exc}", float("nan")
                continue
            row[name] = record["median_us"] = us
            if device.type == "cuda":
                census = kernel_census(fn, views)
                print(f"        {name}: {census['count']} kernels, triton: {census['triton']}, "
                      f"{census['distinct'][:6]}")
                record["kernels"] = census
                if name == "views":
                    record["fused"] = _cuda_ext.status()["fused_calls"] > 0
        print(f"{b:6d} {k:6d} " + " ".join(f"{row[n]:12.0f}" for n in row)
              + (f"   {row['reference'] / row['views']:8.2f}" if ratio else ""))
        for r in records[-len(impls):]:
            if "error" in r:
                print(f"        {r['implementation']}: {r['error']}")
        if args.json:  # after every size: a run stopped at a deadline keeps the sizes it finished
            write_output_json(args.json, {"date": utc_now(), "torch": torch.__version__,
                                          "fused_status": _cuda_ext.status(), "records": records,
                                          "complete": (b, k) == sizes[-1]}, sort_keys=False)
    if device.type == "cuda":
        st = _cuda_ext.status()
        print(f"views ran the fused CUDA kernel: {'yes' if st['fused_calls'] else 'no'}"
              + (f" ({st['reason']})" if st["reason"] else ""))
    if args.json:
        print(f"wrote {args.json}")
    return records


if __name__ == "__main__":
    with stop_in_one_line("nothing is written before the benchmark ends: run it again"):
        main()

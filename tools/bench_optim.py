#!/usr/bin/env python3
"""LARS step time: the multi-tensor (foreach) step against the per-parameter loop it replaced.

    python tools/bench_optim.py                                  # ResNet-50's parameters, CPU
    python tools/bench_optim.py --tiny                           # the host's per-op cost alone
    python tools/bench_optim.py --device cuda --json optim.json  # where the launch count matters

Both optimisers get their own copy of the same parameters (fastssl's two groups: decayed and
LARS-adapted weights, excluded BN and bias) and the same fixed gradients. Also counts the aten
ops that one step dispatches (on a GPU, about one kernel launch each). Steps are timed
in interleaved rounds (old, new, old, new, ...) so that machine noise hits both alike; prints the
median step time of each, their ratio old / new, and the median of the per-round ratios (each
round's two steps ran back to back: the figure least moved by a load that comes and goes).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torchvision
from torch.utils._python_dispatch import TorchDispatchMode

from fastssl.arg_types import int_at_least
from fastssl.cli import ToolArgumentParser, output_file, stop_in_one_line, write_output_json
from fastssl.optim import LARS, param_groups
from fastssl.runtime import device_arg, pick_device


class PerParameterLARS(LARS):
    """LARS with each group updated one parameter at a time, the loop the foreach step replaced: the
    baseline here and the tests' reference definition (~7 small ops per parameter)."""

    def _step_group(self, group: dict) -> None:
        for p in group["params"]:
            if p.grad is None:
                continue
            d = p.grad
            if group["weight_decay"]:
                d = d.add(p, alpha=group["weight_decay"])
            if not group["lars_exclude"]:
                w_norm, d_norm = torch.linalg.vector_norm(p), torch.linalg.vector_norm(d)
                ok = (w_norm > 0) & (d_norm > 0)
                trust = torch.where(ok, group["eta"] * w_norm / d_norm.clamp_min(1e-30), torch.ones_like(w_norm))
                d = d * trust
            state = self.state[p]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = d.detach().clone()
            else:
                state["momentum_buffer"].mul_(group["momentum"]).add_(d)
            p.add_(state["momentum_buffer"], alpha=-group["lr"])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = ToolArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", default="resnet50", choices=("resnet18", "resnet50"))
    ap.add_argument("--device", default="cpu", type=device_arg, help="cpu | cuda | auto")
    ap.add_argument("--rounds", type=int_at_least(1), default=30, help="timed steps of each optimiser, interleaved")
    ap.add_argument("--warmup", type=int_at_least(1), default=3,
                    help="untimed steps of each first, at least 1: the first makes the momentum buffers")
    ap.add_argument("--tiny", action="store_true",
                    help="every parameter one element (same names, ndim, groups): the arithmetic vanishes and the "
                         "step time is the host's cost per op, which a GPU step pays per kernel launch")
    ap.add_argument("--threads", type=int_at_least(1, 1024),
                    help="torch CPU threads (default: torch's); 1 is steadier on a busy machine")
    ap.add_argument("--json", type=output_file, help="also write the medians and the ratio here")
    return ap.parse_args(argv)


class OpCounter(TorchDispatchMode):
    """Records the name of every aten op dispatched under it (each one a kernel launch, or a few, on a GPU)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func: torch._ops.OpOverload, types: tuple[type, ...], args: tuple = (),
                           kwargs: dict | None = None) -> object:
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def make_optimizer(cls: type[LARS], weights: dict[str, torch.Tensor], grads: dict[str, torch.Tensor]) -> LARS:
    """`cls` over a copy of `weights`, each given its fixed gradient."""
    named = [(n, torch.nn.Parameter(w.clone())) for n, w in weights.items()]
    for n, p in named:
        p.grad = grads[n]
    return cls(param_groups(named, weight_decay=1e-6), lr=0.01, momentum=0.9, eta=0.001)


def ops_per_step(opt: LARS) -> int:
    with OpCounter() as counter:
        opt.step()
    return len(counter.ops)


def timed_step(opt: LARS, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    opt.step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    device = pick_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = getattr(torchvision.models, args.arch)()
    weights = {n: (p.detach()[(0,) * p.ndim].reshape((1,) * p.ndim) if args.tiny else p.detach()).to(device)
               for n, p in model.named_parameters()}
    grads = {n: torch.randn_like(w) for n, w in weights.items()}
    opts = {"per_parameter": make_optimizer(PerParameterLARS, weights, grads),
            "foreach": make_optimizer(LARS, weights, grads)}
    times: dict[str, list[float]] = {name: [] for name in opts}
    for r in range(args.warmup + args.rounds):
        for name, opt in opts.items():
            t = timed_step(opt, device)
            if r >= args.warmup:
                times[name].append(t)
    ops = {name: ops_per_step(opt) for name, opt in opts.items()}
    med = {name: statistics.median(ts) for name, ts in times.items()}
    paired = statistics.median(o / n for o, n in zip(times["per_parameter"], times["foreach"]))
    result = {"arch": args.arch, "tiny": args.tiny, "device": str(device), "params": len(weights),
              "rounds": args.rounds, "torch_threads": torch.get_num_threads(), "aten_ops_per_step": ops,
              "median_ms": {name: 1e3 * m for name, m in med.items()},
              "ratio_per_parameter_over_foreach": med["per_parameter"] / med["foreach"],
              "median_per_round_ratio": paired}
    print(f"{args.arch}{' (tiny)' if args.tiny else ''}, {len(weights)} parameters, on {device}, "
          f"{torch.get_num_threads()} threads, {args.rounds} interleaved rounds, median:")
    for name, m in med.items():
        print(f"  {name:14s} {1e3 * m:9.3f} ms/step, {ops[name]:5d} aten ops/step")
    print(f"  per_parameter / foreach = {result['ratio_per_parameter_over_foreach']:.3f} "
          f"(median of the per-round ratios {paired:.3f})")
    if args.json:
        write_output_json(args.json, result, sort_keys=False)
    return result


if __name__ == "__main__":
    with stop_in_one_line("nothing is written before the benchmark ends: run it again"):
        main()

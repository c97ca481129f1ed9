"""Stage 2, fused: the fused MIRA kernel. JIT build time and the route taken, equality with the
float64 reference over a grid of shapes, dtypes and hard inputs (logits x50, +-1e4, empty clusters),
the NVRTC route on its own, then microseconds and kernels per call from tools/bench_mira.py.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fastssl.gpu_check.goals import GOAL_FUSED_ERR, GOAL_FUSED_SPEEDUP, GOAL_FUSED_US, goal
from fastssl.gpu_check.report import fmt, table
from fastssl.gpu_check.runner import PY, Context, read_json, save_json

if TYPE_CHECKING:
    import torch

FUSED_GRID_GPU = {"B": [64, 512, 4096], "K": [100, 3000, 16384], "views": [1, 2], "dtypes": ["fp32", "bf16", "fp16"],
                  "inputs": ["randn", "x50", "pm1e4", "empty"], "iters": 30}
FUSED_GRID_DRY = {"B": [8], "K": [10, 50], "views": [1, 2], "dtypes": ["fp32", "bf16", "fp16"],
                  "inputs": ["randn", "x50", "pm1e4", "empty"], "iters": 5}
BENCH_SIZES_GPU = "512x3000,64x3000,4096x3000,512x16384,4096x16384"


def hard_logits(kind: str, v: int, b: int, k: int, seed: int, device: Any = "cpu") -> torch.Tensor:
    """V x B x K float32 logits of one kind, made on `device`: randn, x50 (randn * 50), pm1e4
    (+-1e4 extremes with ties) or empty (clusters nobody takes: -inf columns and hugely negative ones)."""
    import torch

    x = torch.randn(v, b, k, generator=torch.Generator(device=device).manual_seed(seed), device=device)
    if kind == "x50":
        x = 50.0 * x
    elif kind == "pm1e4":
        x = 1e4 * x.clamp(-1, 1)
        x[:, :, 0] = 1e4
        x[:, : max(1, b // 4), min(1, k - 1)] = -1e4
    elif kind == "empty":
        x[:, :, k // 2:] -= 1e4  # half the clusters: nobody likes them
        x[:, :, 0] = float("-inf")  # P = 0 exactly
    return x


def worker_fused_equality(args: dict, dry_run: bool) -> dict:
    """JIT build time of the fused kernel, then kernel vs the float64 reference over the grid.

    Writes its results after each case, so a timeout keeps the cases that finished.
    """
    import torch

    from fastssl.ops import _cuda_ext, mira_assign_views
    from fastssl.ops.mira_fused import solve_views

    out_path = Path(args["json"])
    grid = FUSED_GRID_DRY if dry_run else FUSED_GRID_GPU
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    res: dict[str, Any] = {"device": str(device), "grid": grid, "cases": []}
    ext = None
    if cuda:
        from fastssl.ops import _nvrtc

        # Each route's cache: the nvcc extension's build folders, NVRTC's compiled images.
        caches = {"nvcc": lambda: list(_cuda_ext.cache_root().glob("fastssl_mira_fused_*")),
                  "nvrtc": lambda: list(_nvrtc.cache_dir().glob("*")) if _nvrtc.cache_dir().is_dir() else []}
        cached_before = {route: bool(find()) for route, find in caches.items()}
        t = time.perf_counter()
        module = _cuda_ext.load_fused()
        res["build_s"] = time.perf_counter() - t
        route = _cuda_ext.status().get("route")
        res["build_cached"] = cached_before.get(route, False)  # the route that loaded found its cache: a warm rerun
        ext = _cuda_ext.fused_for(device)
        res["fused_status"] = _cuda_ext.status()
        res["loaded"] = module is not None and ext is not None
        # the custom op (what training calls) dispatches to the kernel
        before = _cuda_ext.status()["fused_calls"]
        mira_assign_views([torch.randn(64, 300, device=device) for _ in range(2)], tau=0.225, beta=0.7, num_iters=30)
        res["op_dispatches_to_fused"] = _cuda_ext.status()["fused_calls"] == before + 1
        res["routes"] = fused_routes_check(device)
    res["path"] = "fused kernel (mira_assign_views_cuda)" if ext is not None else \
        "custom op mira_assign_views (the fused kernel is not available here: solve_views)"
    save_json(out_path, res)
    worst = 0.0
    for b in grid["B"]:
        for k in grid["K"]:
            for v in grid["views"]:
                for kind in grid["inputs"]:
                    base = hard_logits(kind, v, b, k, seed=b * 7 + k * 3 + v, device=device)
                    for dname in grid["dtypes"]:
                        x = base.to(dtypes[dname])
                        ref = solve_views(x.double(), 0.225, 0.7, grid["iters"])
                        if ext is not None:
                            got = ext.mira_assign_views_cuda(x.contiguous(), 0.225, 0.7, grid["iters"])
                        else:
                            got = torch.stack(mira_assign_views(list(x.unbind(0)), tau=0.225, beta=0.7,
                                                                num_iters=grid["iters"]))
                        err = (got.double() - ref).abs().max().item()
                        finite = bool(torch.isfinite(got).all().item())
                        err = err if finite and math.isfinite(err) else float("inf")
                        worst = max(worst, err)
                        res["cases"].append({"B": b, "K": k, "views": v, "input": kind, "dtype": dname,
                                             "max_abs_err": err})
                        del ref, got, x
                    res["max_abs_err"], res["cases_done"] = worst, len(res["cases"])
                    save_json(out_path, res)
    if cuda:
        torch.cuda.synchronize()
    res["complete"] = True
    save_json(out_path, res)
    return res


def fused_routes_check(device: Any, routes: tuple[str, ...] = ("nvrtc",)) -> dict:
    """Routes of the fused kernel on their own (default: NVRTC, launched from Python; the nvcc
    extension's cold build would eat the grid's time, and the GPU tests run it): load time and
    max abs error vs float64 on 2 x 512 x 3000 (three dtypes, randn and empty clusters), so the
    run proves the NVRTC route even where the chain picked another."""
    import torch

    from fastssl.ops import _cuda_ext, _nvrtc
    from fastssl.ops.mira_fused import solve_views

    out: dict[str, dict] = {}
    for route in routes:
        rec: dict[str, Any] = {}
        try:
            t = time.perf_counter()
            kernel = _nvrtc.load() if route == "nvrtc" else _cuda_ext.build()
            rec["load_s"] = time.perf_counter() - t
            worst = 0.0
            for kind in ("randn", "empty"):
                x = hard_logits(kind, 2, 512, 3000, seed=11, device=device)
                ref = solve_views(x.double(), 0.225, 0.7, 30)
                for dtype in (torch.float32, torch.bfloat16, torch.float16):
                    got = kernel.mira_assign_views_cuda(x.to(dtype).contiguous(), 0.225, 0.7, 30)
                    err = (got.double() - ref).abs().max().item()
                    worst = max(worst, err if math.isfinite(err) else float("inf"))
            rec["max_abs_err"] = worst
        except Exception as exc:  # recorded, not raised: the other route and the grid still run
            rec["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
        out[route] = rec
    return out


def bench_mira_argv(ctx: Context, views: int, json_path: Path, iters: int = 30) -> list[str]:
    """bench_mira for `views` teacher views; at 0 iterations only the goal's size and the fused paths
    (what a call costs besides its iterations)."""
    argv = [PY, "tools/bench_mira.py", "--views", str(views), "--json", str(json_path), "--iters", str(iters)]
    impls = "reference,views,solve_views,fused,fused_graph" if iters else "views,fused,fused_graph"
    if ctx.dry_run:
        return argv + ["--device", "cpu", "--sizes", "8x10", "--impls", impls, "--warmup", "1", "--repeats", "2"]
    sizes = BENCH_SIZES_GPU if views == 2 and iters else "512x3000"
    return argv + ["--device", "cuda", "--sizes", sizes, "--impls", impls, "--warmup", "5", "--repeats", "30"]


def per_iteration_us(timings: dict[str, list[dict]], b: int, k: int, iters: int = 30) -> dict[str, float]:
    """Microseconds one fixed-point iteration adds, per implementation: (t(iters) - t(0)) / iters at
    B x K, 2 views. Why: it tells the kernel's per-iteration work (column partials, grid barriers)
    from its fixed cost (launch, log P, the output) when the goal is missed."""
    at = {name: {r["implementation"]: r.get("median_us") for r in timings.get(name, []) if (r["B"], r["K"]) == (b, k)}
          for name in ("2views", "2views-iters0")}
    return {impl: (t - at["2views-iters0"][impl]) / iters for impl, t in at["2views"].items()
            if t is not None and at["2views-iters0"].get(impl) is not None}


def stage_fused(ctx: Context) -> dict:
    eq, cmd = ctx.worker("fused_equality", timeout=0.7 * ctx.left())  # includes the JIT build (~30-60 s cold)
    if cmd.rc != 0:
        ctx.errors.append(f"equality worker: {'timed out' if cmd.timed_out else f'rc {cmd.rc}'} after "
                          f"{eq.get('cases_done', 0)} cases")
    timings: dict[str, list[dict]] = {}
    for views in (2,) if ctx.dry_run else (2, 1):
        path = ctx.out / "fused" / f"bench_mira_{views}views.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        c = ctx.run(f"bench_mira-{views}views", bench_mira_argv(ctx, views, path),
                    timeout=0.75 * ctx.left() if views == 2 else None)
        data = read_json(path)
        timings[f"{views}views"] = data.get("records", [])
        if c.rc != 0:
            ctx.errors.append(f"bench_mira --views {views}: {'timed out' if c.timed_out else f'rc {c.rc}'}")
    path = ctx.out / "fused" / "bench_mira_2views_iters0.json"
    c = ctx.run("bench_mira-2views-iters0", bench_mira_argv(ctx, 2, path, iters=0), timeout=0.5 * ctx.left())
    timings["2views-iters0"] = read_json(path).get("records", [])
    if c.rc != 0:
        ctx.errors.append(f"bench_mira --iters 0: {'timed out' if c.timed_out else f'rc {c.rc}'}")
    # goal: 2 views x 512 x 3000 on the op training calls (views), vs the per-view reference
    b, k = (8, 10) if ctx.dry_run else (512, 3000)
    per_iter = per_iteration_us(timings, b, k)
    rec = {r["implementation"]: r for r in timings.get("2views", []) if (r["B"], r["K"]) == (b, k)}
    views_us = rec.get("views", {}).get("median_us")
    ref_us = rec.get("reference", {}).get("median_us")
    speedup = ref_us / views_us if views_us and ref_us else None
    fused_ran = rec.get("views", {}).get("fused")
    note = f"B={b} K={k}; the op ran the fused kernel: {fmt(fused_ran)}"
    goals = [goal("fused assignment, 2 views x 512 x 3000 x 30 iters", views_us, GOAL_FUSED_US, "us", False, note),
             goal("speed-up vs per-view mira_assign", speedup, GOAL_FUSED_SPEEDUP, "x", True, note),
             goal("max abs error vs float64, whole grid", eq.get("max_abs_err"), GOAL_FUSED_ERR, "", False,
                  f"{eq.get('cases_done', 0)} cases, {eq.get('path', '?')}"
                  + ("" if eq.get("complete") else " (grid INCOMPLETE)"))]
    if not ctx.dry_run:  # the NVRTC route (no nvcc), launched on its own
        nv = eq.get("routes", {}).get("nvrtc", {})
        goals.append(goal("NVRTC route: max abs error vs float64, 2 x 512 x 3000", nv.get("max_abs_err"),
                          GOAL_FUSED_ERR, "", False, nv.get("error", f"load {fmt(nv.get('load_s'))} s")))
    rows = []
    for key, recs in timings.items():
        for r in recs:
            kern = r.get("kernels", {})
            rows.append([key, r["implementation"], r["B"], r["K"], r.get("median_us"), kern.get("count"),
                         kern.get("triton"), r.get("error", "")[:80]])
    summary = [f"JIT build: {fmt(eq.get('build_s'))} s (cache present before: {fmt(eq.get('build_cached'))}); "
               f"fused loaded: {fmt(eq.get('loaded'))}; "
               f"op dispatches to it: {fmt(eq.get('op_dispatches_to_fused'))}; "
               f"status: {eq.get('fused_status', {}).get('reason') or '-'}; "
               f"route taken: {fmt(eq.get('fused_status', {}).get('route'))}; "
               f"routes alone: {json.dumps(eq.get('routes', {}), default=str)}", "",
               f"Equality ({eq.get('path', '?')}): {eq.get('cases_done', 0)} cases, worst max abs error "
               f"{fmt(eq.get('max_abs_err'))}" + ("" if eq.get("complete") else " (INCOMPLETE)"), ""]
    worst = sorted(eq.get("cases", []), key=lambda c: -c["max_abs_err"])[:5]
    summary += table(["B", "K", "views", "input", "dtype", "max abs err"],
                     [[c["B"], c["K"], c["views"], c["input"], c["dtype"], c["max_abs_err"]] for c in worst])
    summary += table(["views", "impl", "B", "K", "us/call", "kernels/call", "triton", "error"], rows)
    summary += ["", f"Per fixed-point iteration at 2 x {b} x {k} ((30 iterations - 0) / 30, us): "
                + (", ".join(f"{impl} {fmt(us)}" for impl, us in per_iter.items()) or "-")]
    return {"results": {"equality": {k: v for k, v in eq.items() if k != "cases"}, "worst_cases": worst,
                        "timings": timings, "per_iteration_us": per_iter}, "goals": goals, "summary": summary}

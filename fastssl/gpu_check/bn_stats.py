"""Stage 5, bn_stats: per-view BatchNorm's cost in a student step, per_view vs per_forward vs
8 separate forwards (tools/bench_bn_stats.py).
"""

from __future__ import annotations


from fastssl.gpu_check.goals import goal
from fastssl.gpu_check.report import table
from fastssl.gpu_check.runner import PY, Context, read_json


def stage_bn_stats(ctx: Context) -> dict:
    """Per-view BatchNorm's cost: student step per_view vs per_forward vs 8 separate forwards (bench_bn_stats)."""
    path = ctx.out / "bn_stats.json"
    argv = [PY, "tools/bench_bn_stats.py", "--json", str(path)]
    argv += (["--arch", "resnet18", "--batch", "4", "--global-size", "32", "--local-size", "16", "--num-local", "2",
              "--prototypes", "20", "--steps", "1", "--rounds", "1"] if ctx.dry_run else ["--steps", "3", "--rounds", "3"])
    c = ctx.run("bench-bn-stats", argv)
    rep = read_json(path)
    if c.rc != 0 or not rep:
        raise RuntimeError(f"bench_bn_stats: {'timed out' if c.timed_out else f'rc {c.rc}'} (see {c.log})")
    ratio = rep["ratio_to_per_forward"]["per_view"]
    goals = [goal("per_view student step / per_forward", ratio, 1.05, "x", False, rep["views"] + ", " + rep["precision"])]
    rows = [[m, rep["step_ms"][m], rep["ratio_to_per_forward"][m]] for m in rep["step_ms"]]
    return {"results": rep, "goals": goals, "summary": table(["mode", "student step ms", "x per_forward"], rows)}

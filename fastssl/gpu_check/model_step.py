"""Stage 4, model_step: the model step alone (ResNet-50, 64 images, 2x224 + 6x96, bf16,
channels_last), eager and compiled, from tools/profile_throughput.py's model stage.
"""

from __future__ import annotations

import math

from fastssl.gpu_check.goals import GOAL_PEAK_MB, goal
from fastssl.gpu_check.report import table
from fastssl.gpu_check.runner import PY, Context, read_json

DRY_MODEL = ["--model.arch", "resnet18", "--model.num_prototypes", "20", "--model.proj_hidden_dim", "32",
             "--model.proj_dim", "16", "--aug.global_size", "16", "--aug.local_size", "8", "--aug.num_local", "2"]


def stage_model_step(ctx: Context) -> dict:
    results, rows = {}, []
    # Dry runs skip the compiled mode: inductor on a CPU takes minutes, and the flag is all that differs.
    modes = [("eager", "false")] + ([] if ctx.dry_run else [("compiled", "true")])
    for i, (mode, flag) in enumerate(modes):
        out = ctx.out / "model_step" / mode
        argv = [PY, "tools/profile_throughput.py", "--recipe", "recipes/mira_bs512.py", "--out", str(out),
                "--backends", "synthetic", "--data.backend", "synthetic", "--no-cross-check", "--repeats", "1",
                "--train.compile", flag]
        if ctx.dry_run:
            argv += ["--gpus", "128", "--steps", "1", "--warmup-steps", "1", "--loader-batches", "1",
                     "--warmup-batches", "0", "--assign-repeats", "1", "--assign-warmup", "0"] + DRY_MODEL
        else:  # 512 / 8 = 64 images per GPU, 2x224 + 6x96 (the recipe), bf16 (auto), channels_last
            argv += ["--gpus", "8", "--steps", "20", "--warmup-steps", "5", "--loader-batches", "3",
                     "--warmup-batches", "1", "--assign-repeats", "20"]
        cap = 45 if (mode == "eager" and not ctx.dry_run) else math.inf
        for name in ("report.json", "report.partial.json"):  # a rerun into the same --out must not read the last one's
            (out / name).unlink(missing_ok=True)
        c = ctx.run(f"profile-{mode}", argv, timeout=ctx.share(len(modes) - i, cap))
        # after a timeout: the model step's figures, written before the profile's stage 3
        rep = read_json(out / "report.json") or read_json(out / "report.partial.json")
        if c.rc != 0:
            ctx.errors.append(f"profile_throughput ({mode}): {'timed out' if c.timed_out else f'rc {c.rc}'}"
                              + (" after the model step" if rep.get("partial") else ""))
        if "model_step" not in rep.get("stages", {}):
            continue
        ms = rep["stages"]["model_step"]
        results[mode] = {"images_per_s": ms["images_per_s"], "step_ms": ms["step_ms"],
                         "device_busy_share": ms.get("device_busy_share"),
                         "device_ops_per_step": ms.get("device_ops_per_step"),
                         "partial": bool(rep.get("partial")),
                         "breakdown_ms": rep.get("breakdown_ms", {}),
                         "peak_device_mb": rep.get("memory", {}).get("peak_device_mb"),
                         "assignment": rep["stages"].get("assignment"), "recipe": rep.get("recipe"),
                         "report": str((out / "report.md").relative_to(ctx.out))}
        bd = results[mode]["breakdown_ms"]
        rows.append([mode, ms["images_per_s"], ms["step_ms"], ms.get("device_busy_share"), ms.get("device_ops_per_step"),
                     bd.get("teacher_forward"), bd.get("assignment"), bd.get("student_forward_backward"),
                     bd.get("update"), results[mode]["peak_device_mb"]])
    peak = max((r["peak_device_mb"] for r in results.values() if r.get("peak_device_mb") is not None), default=None)
    goals = [goal("peak device memory, model step at 64 per GPU", peak, GOAL_PEAK_MB, "MiB", False,
                  "max over eager and compiled" + ("" if ctx.cuda and not ctx.dry_run else "; CPU: not measured"))]
    if "eager" in results and "compiled" in results:
        results["compiled_vs_eager"] = results["compiled"]["images_per_s"] / results["eager"]["images_per_s"]
    summary = table(["mode", "source images/s", "step ms", "GPU busy share", "GPU ops per step", "teacher ms",
                     "assignment ms", "student f+b ms", "update ms", "peak MiB"], rows)
    if "compiled_vs_eager" in results:
        summary.append(f"compiled / eager: {results['compiled_vs_eager']:.2f}x")
    return {"results": results, "goals": goals, "summary": summary}

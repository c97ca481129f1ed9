"""Stage 7, end_to_end: recipes/mira_bs512.py at 64 images per process with each loader and on
synthetic data; images/s, data-wait share and peak memory read from the run's own logs.
"""

from __future__ import annotations

import csv
import shutil
from pathlib import Path
from typing import Any, Optional

from fastssl.gpu_check.data import ensure_dataset, importable
from fastssl.gpu_check.goals import GOAL_E2E_IPS, GOAL_E2E_VS_SYNTHETIC, GOAL_PEAK_MB, goal
from fastssl.gpu_check.model_step import DRY_MODEL
from fastssl.gpu_check.report import fmt, table
from fastssl.gpu_check.runner import PY, Context

E2E_RUNS = [("synthetic", "synthetic", []), ("torchvision", "torchvision", ["--data.device_augment", "true"]),
            ("dali", "dali", []), ("ffcv", "ffcv", [])]


def read_run_logs(run_dir: Path, skip_epochs: int = 1) -> dict:
    """Images/s, data-wait share and peak memory from the run's own epochs.csv / train_log.csv,
    over the epochs after the first `skip_epochs` (start-up, cuDNN autotuning, first batches)."""
    def rows(name: str) -> list[dict]:
        p = run_dir / name
        if not p.exists():
            return []
        with p.open() as f:
            return list(csv.DictReader(f))

    def num(r: dict, k: str) -> Optional[float]:
        try:
            return float(r[k])
        except (KeyError, TypeError, ValueError):
            return None

    epochs, steps = rows("epochs.csv"), rows("train_log.csv")
    steady = epochs[skip_epochs:] or epochs
    out: dict[str, Any] = {"epochs": len(epochs), "steps_logged": len(steps),
                           "steps": int(num(epochs[-1], "step") or 0) if epochs else 0}
    if steady:
        ips = [num(r, "images_per_s") for r in steady]
        wait = [num(r, "data_wait_share") for r in steady]
        out["images_per_s"] = sum(x for x in ips if x is not None) / len(steady)
        out["data_wait_share"] = sum(x for x in wait if x is not None) / len(steady)
        out["per_epoch_images_per_s"] = ips
    peaks = [num(r, "peak_memory_mb") for r in epochs]
    peaks = [p for p in peaks if p is not None and p > 0]
    out["peak_memory_mb"] = max(peaks) if peaks else None
    used = [u for u in (num(r, "device_used_mb") for r in epochs) if u is not None and u > 0]
    out["device_used_mb"] = max(used) if used else None  # DALI's pools, the cache and the context too
    # Growth from the first epoch's end to the last's: DALI builds a pipeline (nvJPEG state, pools) per
    # epoch, so memory that a dropped pipeline keeps would show here, epoch after epoch.
    out["per_epoch_device_used_mb"] = used
    out["device_used_growth_mb"] = used[-1] - used[0] if len(used) > 1 else None
    out["log_images_per_s"] = [num(r, "images_per_s") for r in steps]
    # Within epochs: the logged windows after the first of each epoch (where DALI builds its
    # pipeline and torchvision starts its workers) and after the first `skip_epochs` epochs. Short
    # epochs pay that start per epoch; an ImageNet epoch (2,500 steps at 512) does not.
    counted = set(sorted({e for e in (num(r, "epoch") for r in steps) if e is not None})[skip_epochs:])
    seen: set = set()
    inner = []
    for r in steps:
        e = num(r, "epoch")
        if e in counted and e in seen:
            inner.append(r)
        seen.add(e)
    ips = [x for x in (num(r, "images_per_s") for r in inner) if x is not None]
    wait = [x for x in (num(r, "data_wait_share") for r in inner) if x is not None]
    out["within_epochs_images_per_s"] = sum(ips) / len(ips) if ips else None
    out["within_epochs_data_wait_share"] = sum(wait) / len(wait) if wait else None
    return out


def stage_end_to_end(ctx: Context) -> dict:
    data = ensure_dataset(ctx)
    if ctx.dry_run:
        epochs, per_epoch, batch = 2, 1, 4
        size = ["--data.synthetic_size", str(per_epoch * batch)] + DRY_MODEL + ["--data.num_workers", "2"]
    else:
        epochs, per_epoch, batch = 3, 20, 64  # 60 steps; 1,500 images give 23 batches of 64 per epoch
        size = ["--data.synthetic_size", str(per_epoch * batch), "--data.num_workers", "-1"]
    results, rows = {}, []
    for i, (name, backend, extra) in enumerate(E2E_RUNS):
        module = {"dali": "nvidia.dali", "ffcv": "ffcv"}.get(backend)
        if (module and not importable(module)) or (backend == "ffcv" and not data.get("beton_exists")):
            results[name] = {"skipped": f"{module} is not importable (or no .beton)", "config": ""}
            rows.append([name, "-", None, None, None, None, None, None, None, None, "skipped: not installed"])
            continue
        run_dir = ctx.scratch / "e2e" / name
        shutil.rmtree(run_dir, ignore_errors=True)
        train = data["beton"] if backend == "ffcv" else data["train"]
        argv = [PY, "recipes/mira_bs512.py", "--data.backend", backend, "--data.train", train,
                "--train.global_batch_size", str(batch), "--train.epochs", str(epochs),
                "--train.steps_per_epoch", str(per_epoch), "--optim.warmup_epochs", "0", "--train.log_every", "5",
                "--train.progress", "false", "--eval.knn_every", "-1", "--train.run_dir", str(run_dir),
                "--train.checkpoint_every", str(epochs + 1),  # none mid-run: a checkpoint is not a step
                *size, *extra]
        c = ctx.run(f"e2e-{name}", argv, timeout=ctx.share(len(E2E_RUNS) - i))
        logs = read_run_logs(run_dir)
        logs["config"] = " ".join(extra) or "recipe defaults"
        results[name] = logs
        if c.rc != 0:
            ctx.errors.append(f"{name}: {'timed out' if c.timed_out else f'rc {c.rc}'}")
        rows.append([name, logs["config"], logs.get("steps"), logs.get("images_per_s"), logs.get("data_wait_share"),
                     logs.get("within_epochs_images_per_s"), logs.get("within_epochs_data_wait_share"),
                     logs.get("peak_memory_mb"), logs.get("device_used_mb"), logs.get("device_used_growth_mb"),
                     f"rc {c.rc}" + (" (timed out)" if c.timed_out else "")])
    synthetic = results.get("synthetic", {}).get("images_per_s")
    goals = []
    for name, r in results.items():
        if name == "synthetic" or "skipped" in r:
            continue
        ips = r.get("images_per_s")
        r["vs_synthetic"] = ips / synthetic if ips and synthetic else None
        goals.append(goal(f"{name} end to end images/s", ips, GOAL_E2E_IPS, "img/s", True))
        goals.append(goal(f"{name} vs synthetic", r["vs_synthetic"], GOAL_E2E_VS_SYNTHETIC, "x", True,
                          f"synthetic: {fmt(synthetic)} img/s"))
    peak = max((r["peak_memory_mb"] for r in results.values() if r.get("peak_memory_mb")), default=None)
    goals.append(goal("peak memory, end to end at 64 per GPU", peak, GOAL_PEAK_MB, "MiB", False,
                      "max over the runs" + ("" if ctx.cuda and not ctx.dry_run else "; CPU: not measured")))
    used = max((r["device_used_mb"] for r in results.values() if r.get("device_used_mb")), default=None)
    goals.append(goal("device memory in use, end to end at 64 per GPU", used, GOAL_PEAK_MB, "MiB", False,
                      "max over the runs, at epoch ends: PyTorch's cache, the CUDA context and DALI's nvJPEG "
                      "pools included" + ("" if ctx.cuda and not ctx.dry_run else "; CPU: not measured")))
    summary = [f"{epochs} epochs x {per_epoch} steps x {batch} images per run; figures are the mean of epochs "
               f"2..{epochs} from each run's epochs.csv (epoch 1: start-up); 'within epochs': the mean of "
               f"train_log.csv's windows of those epochs without each epoch's first (the loader's epoch start).", ""]
    summary += table(["loader", "config", "steps", "images/s", "data wait", "images/s within epochs",
                      "data wait within epochs", "peak MiB (PyTorch)", "MiB in use on the device",
                      "MiB in use, last epoch - first", "exit"], rows)
    return {"results": results, "goals": goals, "summary": summary}

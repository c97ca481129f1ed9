"""Stage 6, loaders: every GPU loader's source images/s with all 8 crops (tools/bench_loaders.py),
DALI `mixed` at three hardware-decoder shares, FFCV with its device ops, torchvision.
"""

from __future__ import annotations


from pipelines.cores import usable_cores
from fastssl.gpu_check.data import ensure_dataset
from fastssl.gpu_check.goals import GOAL_LOADER_IPS, goal
from fastssl.gpu_check.report import fmt, table
from fastssl.gpu_check.runner import PY, Context, read_json

# One bench_loaders process per group (each writes its JSON when it ends, so a timeout loses one
# group, not all); within a group the backends are interleaved. Goal-bearing loaders first; the
# fixed-order variants price the jitter order drawn per view (`--aug.jitter_order`).
LOADER_GROUPS = [("dali", ["dali-hw0", "dali", "dali-hw1", "dali-fixed-order", "dali-device-augment"]),
                 ("ffcv", ["ffcv", "ffcv-fixed-order"]), ("torchvision", ["torchvision", "torchvision-device-augment"])]
LOADER_VARIANTS = [v for _, group in LOADER_GROUPS for v in group]
# Variants that only set nvJPEG's hardware-decoder share: a CPU has no such decoder, so in a dry run
# they would be the `dali` loader again, timed twice more; it leaves them out.
HW_DECODER_VARIANTS = ("dali-hw0", "dali-hw1")
GPU_LOADERS = {"dali-hw0": "DALI mixed, hw decoder 0", "dali": "DALI mixed, hw decoder 0.65",
               "dali-hw1": "DALI mixed, hw decoder 1.0", "dali-device-augment": "DALI mixed crops + device ops",
               "ffcv": "FFCV + device ops"}
LOADER_TIMED_BATCHES = 18  # after 2 warm-up batches: 20 of an epoch's 23 batches of 64 (1,500 generated JPEGs)


def stage_loaders(ctx: Context) -> dict:
    data = ensure_dataset(ctx)
    workers = 2 if ctx.dry_run else min(16, usable_cores())
    backends: dict[str, dict] = {}
    runs, rows = {}, []
    for i, (group, variants) in enumerate(LOADER_GROUPS):
        if ctx.dry_run:
            variants = [v for v in variants if v not in HW_DECODER_VARIANTS]
        path = ctx.out / "loaders" / f"bench_loaders_{group}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        argv = [PY, "tools/bench_loaders.py", "--data", data["train"], "--beton", data["beton"], "--backends",
                ",".join(variants), "--workers", str(workers), "--json", str(path)]
        if ctx.dry_run:
            argv += ["--device", "cpu", "--batch-size", "4", "--batches", "1", "--warmup", "0", "--repeats", "1",
                     "--global-size", "16", "--local-size", "8", "--num-local", "2"]
        else:  # the recipe's 8 crops (2x224 + 6x96), 64 per batch
            argv += ["--device", "cuda", "--batch-size", "64", "--batches", str(LOADER_TIMED_BATCHES), "--warmup",
                     "2", "--repeats", "2"]
        c = ctx.run(f"bench_loaders-{group}", argv, timeout=ctx.share(len(LOADER_GROUPS) - i))
        rep = read_json(path)
        if c.rc != 0:
            ctx.errors.append(f"bench_loaders {group}: {'timed out' if c.timed_out else f'rc {c.rc}'}")
        busy = c.cpu_seconds / c.seconds if c.seconds else None
        runs[group] = {"seconds": c.seconds, "cpu_cores_busy_avg": busy, "config": rep.get("config")}
        for name, r in rep.get("backends", {}).items():
            backends[name] = r
            rows.append([name, r["images_per_s"], r["min"], r["max"], r.get("epoch_start_s"), r.get("device_added_mb"),
                         r.get("device_used_mb"), busy])
    goals = [goal(f"{label} source images/s", backends.get(n, {}).get("images_per_s"), GOAL_LOADER_IPS, "img/s",
                  True, "" if n in backends else "not measured (not installed, or its bench failed)")
             for n, label in GPU_LOADERS.items()]
    summary = [f"Data: {data['count']} JPEGs ~{data['width']}x{data['height']} q{data['quality']} "
               f"(mean {fmt(data.get('mean_file_kb'))} KB) in {data['train']}; .beton {data['beton']}", "",
               f"Workers / threads per backend: {workers}. 'cores busy': CPU time of the bench process and its "
               f"workers over its wall time (start-up included), per group.",
               f"Each rate times {LOADER_TIMED_BATCHES} batches after 2 untimed ones; batches a loader had "
               f"queued before the clock started (DALI 2, FFCV 3, torchvision up to workers x 4) come free, so a "
               f"rate is an upper bound, by at most 3/{LOADER_TIMED_BATCHES} for DALI and FFCV.", ""]
    summary += ["Device memory (every allocator: DALI's and nvJPEG's pools too). 'added': what a loader's first "
                "batch added, i.e. its decoder's buffers and pools (nvJPEG's preallocation included); each group "
                "is one process, so the first loader of a group shows its backend's whole cost and a later one "
                "only what it did not reuse. 'in use': all the group's process held at the end of the loader's "
                "timed passes (the readings accumulate within a group).", ""]
    summary += ["'epoch start s': seconds from an epoch's start to its first batch on the GPU (median), which "
                "training pays once per epoch: DALI builds its pipeline per epoch, torchvision spawns its workers. "
                "Compare with an ImageNet epoch at the goal rate (1.28 M images / 8 GPUs / 2,000 per s: ~80 s).", ""]
    summary += table(["backend", "source images/s", "min", "max", "epoch start s", "added MiB", "in use MiB",
                      "cores busy (group)"], rows)
    return {"results": {"data": data, "workers": workers, "groups": runs, "backends": backends},
            "goals": goals, "summary": summary}

"""Pure arithmetic of the reports: epoch projections, the bottleneck verdict, comparisons.

Kept apart from measuring and rendering so that each rule is a small function a test can
check against a hand computation.
"""

from __future__ import annotations

IMAGENET_TRAIN_IMAGES = 1_281_167
PHASES = ("teacher_forward", "assignment", "student_forward_backward", "update")


def epoch_projection(images_per_s_per_process: float, gpus: tuple[int, ...] = (1, 8),
                     dataset_images: int = IMAGENET_TRAIN_IMAGES) -> dict[str, dict]:
    """Hours for one pass over `dataset_images` on 1 and 8 devices at the measured per-device rate.

    The multi-device figure assumes ideal linear scaling (no communication cost), so it is a
    lower bound on the time; the report says so.
    """
    out = {}
    for n in gpus:
        rate = images_per_s_per_process * n
        out[str(n)] = {"images_per_s": rate, "hours": dataset_images / rate / 3600 if rate > 0 else float("inf")}
    return out


def data_wait_share(wait_s: list[float], step_s: list[float]) -> float:
    """Share of wall time spent waiting for batches: sum(wait) / sum(wait + step)."""
    total = sum(wait_s) + sum(step_s)
    return sum(wait_s) / total if total > 0 else 0.0


def images_per_s(images: int, seconds: float) -> float:
    return images / seconds if seconds > 0 else 0.0


LAUNCH_BOUND_SHARE = 0.85  # of the model step with a kernel running on the GPU; below: launch-bound


def verdict(loader_ips: float | None, step_ips: float, e2e_ips: float, wait_share: float,
            breakdown_ms: dict[str, float], backend: str, e2e_step_ms: float | None = None,
            synthetic_step_ms: float | None = None, device_busy_share: float | None = None,
            compiled: bool = False) -> str:
    """One paragraph naming the bottleneck, from the stage figures.

    The loader is the bottleneck when it alone is slower than the model step alone; when it is
    faster alone but the loop still waits for data more than 10% of the time, the hand-over
    (prefetch depth, shared cores) is; otherwise the model step is. The largest phase of the
    step is named. When the step itself is more than 15% slower with the
    loader running than on synthetic data, the two compete for the same cores or device
    (typical on a CPU machine, where loader workers and the model share the cores): said too.
    So is a GPU busy for less than LAUNCH_BOUND_SHARE of the model step: then the host limits the step.
    """
    ceiling = e2e_ips / step_ips if step_ips > 0 else 0.0
    parts = [f"End-to-end: {e2e_ips:.1f} images/s, {100 * ceiling:.0f}% of the synthetic-data ceiling "
             f"({step_ips:.1f} images/s); the loop waited for data {100 * wait_share:.0f}% of the time."]
    if loader_ips is not None and loader_ips < step_ips:
        parts.append(f"The bottleneck is the {backend} loader ({loader_ips:.1f} images/s alone, "
                     f"{loader_ips / step_ips:.2f}x the model step): a faster backend or more loader "
                     "workers/threads would speed this run up.")
    elif wait_share > 0.10:
        alone = f" although it alone delivers {loader_ips / step_ips:.1f}x the step's rate" if loader_ips else ""
        parts.append(f"The bottleneck is feeding the {backend} loader's batches to the step{alone}: it does not "
                     "prefetch far enough ahead, or it competes with the step for cores; raise its workers or "
                     "prefetch depth.")
    else:
        parts.append("The bottleneck is the model step: the loader keeps up.")
    if e2e_step_ms and synthetic_step_ms and e2e_step_ms > 1.15 * synthetic_step_ms:
        parts.append(f"But the step took {e2e_step_ms:.0f} ms with the loader running against {synthetic_step_ms:.0f} "
                     f"ms on synthetic data: the {backend} loader's workers compete with the model step for the same "
                     "cores or device, so fewer loader workers, or a loader that decodes on the device, would help.")
    if device_busy_share is not None and device_busy_share < LAUNCH_BOUND_SHARE:
        remedy = ("the step is compiled already: more images per GPU, or the step captured in CUDA graphs, would help"
                  if compiled else "`--train.compile true` (fewer, fused kernels) would help")
        parts.append(f"The GPU ran kernels or copies only {100 * device_busy_share:.0f}% of the model step: the host "
                     f"(Python, dispatch, kernel launches) limits the step, not the GPU; {remedy}.")
    if breakdown_ms:
        total = sum(breakdown_ms.values())
        name, ms = max(breakdown_ms.items(), key=lambda kv: kv[1])
        parts.append(f"Within the step, {name.replace('_', ' ')} takes the largest share "
                     f"({ms:.1f} of {total:.1f} ms, {100 * ms / total:.0f}%); the assignment takes "
                     f"{100 * breakdown_ms.get('assignment', 0.0) / total:.1f}%.")
    return " ".join(parts)


def flatten_figures(report: dict) -> dict[str, float]:
    """The comparable scalar figures of a profile report, by a readable name."""
    s = report["stages"]
    out: dict[str, float] = {}
    for name, rec in s.get("loader", {}).items():
        out[f"loader {name} (images/s)"] = rec["images_per_s"]
    out["model step (images/s)"] = s["model_step"]["images_per_s"]
    out["end-to-end (images/s)"] = s["end_to_end"]["images_per_s"]
    out["data wait share"] = s["end_to_end"]["data_wait_share"]
    for name, ms in report["breakdown_ms"].items():
        out[f"{name} (ms/step)"] = ms
    for name, rec in s.get("assignment", {}).items():
        out[f"assignment {name} (us)"] = rec["median_us"]
    mem = report["memory"].get("peak_device_mb") or report["memory"].get("peak_host_rss_mb")
    if mem is not None:
        out["peak memory (MB)"] = mem
    return out


def compare(a: dict, b: dict) -> list[tuple[str, float | None, float | None, float | None]]:
    """Rows (figure, A, B, B / A) over the union of both reports' figures, in A's order."""
    fa, fb = flatten_figures(a), flatten_figures(b)
    names = list(fa) + [n for n in fb if n not in fa]
    rows = []
    for n in names:
        va, vb = fa.get(n), fb.get(n)
        rows.append((n, va, vb, vb / va if va and vb is not None else None))
    return rows

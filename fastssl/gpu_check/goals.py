"""The issue's goals (docs/gpu_check.md) and one goal row: measured against the target, met,
missed, or not measured. Every stage reports its goals through `goal`; the report lists them all.
"""

from __future__ import annotations

import math
from typing import Optional

# Goals (issue targets), measured vs goal in the report.
GOAL_FUSED_US = 100.0  # 2 views x 512 x 3000, 30 iterations, per call
GOAL_FUSED_SPEEDUP = 20.0  # vs the per-view reference `mira_assign`
GOAL_FUSED_ERR = 1e-5  # max abs vs the float64 reference
GOAL_LOADER_IPS = 2000.0  # source images/s, each GPU loader
GOAL_E2E_IPS = 1300.0  # source images/s, each loader end to end
GOAL_E2E_VS_SYNTHETIC = 0.95  # within 5 % of synthetic data
GOAL_PEAK_MB = 8192.0  # 8 GiB at 64 images per GPU


def goal(name: str, measured: Optional[float], target: float, unit: str, higher_is_better: bool,
         note: str = "") -> dict:
    """One goal row: measured vs goal, met / missed (None when nothing was measured)."""
    met = None
    if measured is not None and math.isfinite(measured):
        met = measured >= target if higher_is_better else measured <= target
    return {"goal": name, "measured": measured, "target": target, "unit": unit,
            "comparison": ">=" if higher_is_better else "<=", "met": met, "note": note}


def all_goals(report: dict) -> list[dict]:
    return [{"stage": s["name"], **g} for s in report["stages"] for g in s.get("goals", [])]

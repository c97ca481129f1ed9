"""gpu_check.md: the human half of the report (stages, goals, each stage's summary, the tails of
failed commands), and the tables the stages put in their summaries.
"""

from __future__ import annotations

import math
from typing import Any

from fastssl.gpu_check.goals import all_goals
from fastssl.gpu_check.runner import DEFAULT_BUDGET_S

# A stage in one of these ran out of time or was cut short: the same command, rerun on the still warm
# machine (caches built), may finish it. "running": the whole run was killed during that stage.
CUT_SHORT = ("timeout", "interrupted", "running")


def fmt(x: Any) -> str:
    if x is None:
        return "-"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, float):
        if not math.isfinite(x):
            return str(x)
        if x != 0 and (abs(x) < 1e-2 or abs(x) >= 1e6):
            return f"{x:.3g}"
        return f"{x:,.1f}" if abs(x) >= 100 else f"{x:.3g}"
    return str(x)


def next_steps(report: dict, caps: dict[str, float]) -> list[str]:
    """What to do once the run has ended, first what cannot wait: a lent machine stays warm only
    about 30 s after a call, so the stages that ran out of time or never ran come with the command
    that reruns them there and then (`caps`: each selected stage's own time, in the run's order).
    Then the stages that failed, which need a fix on CPU before a rerun."""
    status = {s["name"]: s for s in report["stages"]}

    def cut_short(name: str) -> bool:
        s = status.get(name)
        return s is None or s["status"] in CUT_SHORT or (s["status"] == "skipped" and "out of time" in s["reason"])

    rerun = [name for name in caps if cut_short(name)]
    failed = [name for name in caps if name in status and status[name]["status"] in ("failed", "partial")]
    lines = []
    if rerun:
        budget = min(DEFAULT_BUDGET_S, sum(caps[name] for name in rerun))
        setup, dry = ("", " --dry-run") if report["dry_run"] else ("source .gpudeps/setup.sh && ", "")
        lines.append(f"ran out of time or never ran: {', '.join(rerun)}; rerun them at once, on the warm machine: "
                     f"`{setup}python3 tools/gpu_check.py --out $OUT --stages {','.join(rerun)} --budget {budget:.0f}"
                     f"{dry}`")
    if failed:
        lines.append(f"failed: {', '.join(failed)}; read their errors below, fix them on CPU (with a test where one "
                     f"can catch it), then rerun them: --stages {','.join(failed)}")
    return lines or ["every stage ran to its end: nothing to rerun"]


def render_markdown(report: dict) -> str:
    """The human half of the report: stages, goals, then each stage's summary and errors."""
    mode = "DRY RUN on CPU (tiny sizes; figures are NOT the goals' sizes)" if report["dry_run"] else "GPU run"
    lines = [f"# gpu_check: {mode}", "",
             f"Started {report['started']}, updated {report['updated']}, {fmt(report.get('elapsed_s'))} s of a "
             f"{fmt(report['budget_s'])} s budget. Device: {report.get('device') or '-'}.", "",
             f"Command: `{report['command']}`", "",
             "| # | stage | status | seconds | note |", "|---|---|---|---|---|"]
    for i, s in enumerate(report["stages"], 1):
        note = s.get("reason") or s.get("error") or "; ".join(s.get("errors", []))
        lines.append(f"| {i} | {s['name']} | {s['status']} | {fmt(s['seconds'])} | {note.replace('|', '/')[:200]} |")
    if report.get("next"):
        lines += ["", "## Next", ""] + [f"- {line}" for line in report["next"]]
    goals = all_goals(report)
    if goals:
        lines += ["", "## Goals", "", "| stage | goal | measured | target | verdict | note |",
                  "|---|---|---|---|---|---|"]
        for g in goals:
            verdict = {True: "met", False: "MISSED", None: "not measured"}[g["met"]]
            measured = f"{fmt(g['measured'])} {g['unit']}".strip()
            target = f"{g['comparison']} {fmt(g['target'])} {g['unit']}".strip()
            lines.append(f"| {g['stage']} | {g['goal']} | {measured} | {target} | {verdict} | {g['note']} |")
    for s in report["stages"]:
        lines += ["", f"## {s['name']}: {s['title']} ({s['status']})", ""]
        lines += s.get("summary", []) or ([s["reason"]] if s.get("reason") else [])
        for c in s.get("commands", []):
            state = "timed out" if c["timed_out"] else f"rc {c['rc']}"
            lines.append(f"- `{c['label']}` ({state}, {fmt(c['seconds'])} s, log `{c['log']}`)")
            if c.get("tail") and (c["rc"] != 0):
                lines += ["", "```", c["tail"][-1500:], "```"]
        if s.get("traceback"):
            lines += ["", "```", s["traceback"][-3000:], "```"]
    return "\n".join(lines) + "\n"


def table(header: list[str], rows: list[list[Any]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(fmt(c) for c in row) + " |" for row in rows]
    return out + [""]

"""The report JSON schema: a name, a version and the keys every report must have.

Why versioned: reports are compared across commits (`--compare A B`); a report written
by an older version with other keys must fail with a message that says so, not with a
KeyError halfway through a table. Bump SCHEMA_VERSION whenever a required key changes
meaning, and update docs/report_schema.md.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

SCHEMA_NAME = "fastssl.report"
SCHEMA_VERSION = 1
KINDS = ("profile", "run")
# Required keys per kind (beside schema, schema_version, kind, date, environment, recipe).
REQUIRED = {
    "profile": ("stages", "breakdown_ms", "memory", "projection", "checks", "verdict", "charts"),
    "run": ("epochs", "steps", "evaluations", "verdict", "charts"),
}
COMMON = ("schema", "schema_version", "kind", "date", "environment", "recipe")


class ReportError(ValueError):
    """A report file that cannot be read: say what is wrong and how to get a good one."""


def check_report(data: Any, source: str = "report") -> dict:
    """`data` if it is a report of this schema version, else a ReportError naming the problem."""
    if not isinstance(data, dict) or data.get("schema") != SCHEMA_NAME:
        raise ReportError(f"{source} is not a fastssl report (no \"schema\": \"{SCHEMA_NAME}\"); pass the "
                          "report.json written by tools/profile_throughput.py or tools/report.py")
    version = data.get("schema_version")
    if version != SCHEMA_VERSION:
        raise ReportError(f"{source} has report schema version {version!r}, this fastssl reads version "
                          f"{SCHEMA_VERSION}; regenerate it with this version's tools/profile_throughput.py or "
                          "tools/report.py (docs/report_schema.md lists the changes)")
    kind = data.get("kind")
    if kind not in KINDS:
        raise ReportError(f"{source}: unknown report kind {kind!r}; expected one of {', '.join(KINDS)}")
    missing = [k for k in COMMON + REQUIRED[kind] if k not in data]
    if missing:
        raise ReportError(f"{source} lacks the keys {', '.join(missing)} of a version-{SCHEMA_VERSION} "
                          f"{kind} report; it was truncated or edited: regenerate it")
    return data


def load_report(path: str | Path) -> dict:
    """Read a report.json (or the report.json inside a report directory) and check its schema."""
    p = Path(path)
    if p.is_dir():
        p = p / "report.json"
    if not p.is_file():
        raise ReportError(f"no report at {str(p)!r}; write one with tools/profile_throughput.py --out DIR "
                          "or tools/report.py RUN_DIR")
    try:
        data = json.loads(p.read_text())
    except json.JSONDecodeError as err:
        raise ReportError(f"{str(p)!r} is not valid JSON ({err}); regenerate it") from err
    return check_report(data, repr(str(p)))


def new_report(kind: str, environment: dict, recipe: dict, date: str) -> dict:
    """The common head of a report of `kind`; the caller fills in the kind's keys."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    return {"schema": SCHEMA_NAME, "schema_version": SCHEMA_VERSION, "kind": kind, "date": date,
            "environment": environment, "recipe": recipe}

"""Throughput and run reports: one JSON schema, Markdown tables, PNG charts.

`tools/profile_throughput.py` (a recipe measured stage by stage) and `tools/report.py`
(any run directory) both write `report.json` in the schema of `schema.py`
(documented in docs/report_schema.md), a `report.md` and PNG charts.
"""

from .schema import SCHEMA_NAME, SCHEMA_VERSION, ReportError, load_report

__all__ = ["SCHEMA_NAME", "SCHEMA_VERSION", "ReportError", "load_report"]

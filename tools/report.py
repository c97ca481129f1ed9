#!/usr/bin/env python3
"""The report of a run directory, finished or still running: tables, verdict and PNG charts.

    python tools/report.py runs/demo/20261122-055055                 # writes RUN_DIR/report/
    python tools/report.py runs/mira_bs512 --out docs/reports/bs512_run

From the loop's own meters (per epoch: images/s, data-wait share, step time, peak memory;
per logged step: loss, images/s, the ML-CPC estimate), the online k-NN and any evaluation
JSON in the run directory (eval_knn.json, eval_linear.json, finetune_semi*.json). Writes
report.md, report.json (schema: docs/report_schema.md) and PNGs (loss, images/s over
steps, k-NN, MI, step-time split).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from fastssl.reports.markdown import run_markdown
from fastssl.reports.run_report import build_run_report
from fastssl.reports.schema import ReportError
from fastssl.run_log import utc_now, write_json


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run_dir", type=Path, help="a run directory (holds config.json, train_log.csv, ...)")
    ap.add_argument("--out", type=Path, help="report directory (default: RUN_DIR/report)")
    args = ap.parse_args(argv)
    out = args.out or args.run_dir / "report"
    try:
        report = build_run_report(args.run_dir, out, utc_now())
    except ReportError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    write_json(out / "report.json", report)
    (out / "report.md").write_text(run_markdown(report))
    print(report["verdict"])
    print(f"wrote {out / 'report.md'}, report.json and {len(report['charts'])} charts")
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""The report of a run directory, finished or still running: tables, verdict and PNG charts.

    python tools/report.py runs/demo/20261122-055055                 # writes RUN_DIR/report/
    python tools/report.py runs/mira_bs512 --out docs/reports/bs512_run

From the loop's own meters (per epoch: images/s, data-wait share, step time, peak memory;
per logged step: loss, images/s, the ML-CPC estimate), the online k-NN and any evaluation
JSON in the run directory (eval_knn.json and eval_knn_<subset>.json, eval_linear.json,
finetune_semi*.json; not eval_transfer.json, whose 11 datasets are a table of their own). Writes
report.md, report.json (schema: docs/report_schema.md) and PNGs (loss, images/s over
steps, k-NN, MI, step-time split).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from fastssl.cli import ToolArgumentParser, stop_in_one_line, write_fix
from fastssl.eval.errors import EvalError, check_output_dir
from fastssl.eval.targets import DISTILL_RECIPE, distillation_run
from fastssl.reports.markdown import run_markdown
from fastssl.reports.run_report import build_run_report
from fastssl.reports.schema import ReportError
from fastssl.run_log import utc_now, write_json, write_text_atomic


def check_run_dir(run_dir: Path) -> None:
    """What the run report cannot read, said as what it is (a ReportError): a file inside a run for the
    run itself, or a distillation run, whose config and logs are another trainer's (its own figures are
    in its epochs.csv and results.json), rather than as a missing or unreadable run."""
    if run_dir.is_file():
        hint = f": pass {str(run_dir.parent)!r}" if run_dir.name == "config.json" else ""
        raise ReportError(f"{str(run_dir)!r} is a file; tools/report.py takes the run directory (the folder "
                          f"holding config.json){hint}")
    try:
        cfg = json.loads((run_dir / "config.json").read_text())
    except (OSError, ValueError):  # no run, or an unreadable config: build_run_report says which
        return
    if distillation_run(cfg):
        raise ReportError(f"{str(run_dir)!r} holds a distillation run ({DISTILL_RECIPE}), which tools/report.py "
                          "does not read: its per-epoch loss, mi_nats and top-1 are in epochs.csv, the final top-1 "
                          "in results.json")


def main(argv: list[str] | None = None) -> int:
    ap = ToolArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run_dir", type=Path, help="a run directory (holds config.json, train_log.csv, ...)")
    ap.add_argument("--out", type=Path, help="report directory (default: RUN_DIR/report)")
    args = ap.parse_args(argv)
    out = args.out or args.run_dir / "report"
    try:
        check_run_dir(args.run_dir)
        check_output_dir(out, "--out")
        report = build_run_report(args.run_dir, out, utc_now())  # writes the charts into `out`
        write_json(out / "report.json", report)
        write_text_atomic(out / "report.md", run_markdown(report))
    except (ReportError, EvalError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # a full disk, a folder that cannot be made: the run directory is only read
        print(f"error: the report could not be written in {str(out)!r} ({err.strerror or err}); "
              f"{write_fix(err, '--out')}", file=sys.stderr)
        return 2
    print(report["verdict"])
    print(f"wrote {out / 'report.md'}, report.json and {len(report['charts'])} charts")
    return 0


if __name__ == "__main__":
    with stop_in_one_line("the run directory is only read: run the command again"):
        sys.exit(main())

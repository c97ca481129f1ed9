"""Per-run logs: CSV files (easy to read anywhere) and TensorBoard, main process only; and the atomic
JSON writer and UTC date stamp that runs, reports and benchmark results share.

A run's files that cannot be written (a full or read-only disk) raise `checkpoint.CheckpointError`
naming the file, the cause and the fix (`checkpoint.writing`), which the trainers print as one line."""

from __future__ import annotations

import csv
import json
from datetime import datetime, timezone
from pathlib import Path

from fastssl.checkpoint import writing

STEP_FIELDS = ["epoch", "step", "loss", "lr", "beta", "ema_momentum", "images_per_s", "data_wait_share",
               "step_time_s", "skipped_images", "label_mi_nats",  # MIRA runs
               "alpha", "mi_nats", "mi_ceiling_nats"]  # the last 3: critic runs
EPOCH_FIELDS = ["epoch", "step", "loss", "images_per_s", "data_wait_share", "step_time_s", "peak_memory_mb",
                "device_used_mb", "skipped_images", "knn_top1", "knn_top5", "seconds"]


class CsvLog:
    """Append-only CSV with a fixed header; rows past `keep_until_step` are dropped when it is given
    (a resume keeps the rows up to its checkpoint's step, a fresh start passes 0 and keeps none)."""

    def __init__(self, path: Path, fields: list[str], keep_until_step: int | None = None):
        self.path, self.fields = path, fields
        if keep_until_step is not None and path.exists():
            # A row cut by a kill has no whole step: dropped too; so are bytes a crash left undecodable.
            with path.open(newline="", errors="replace") as f:
                rows = [r for r in csv.DictReader(f) if (r.get("step") or "").isdigit()
                        and int(r["step"]) <= keep_until_step]
            self._rewrite(rows)
        elif not path.exists():
            self._rewrite([])

    def _rewrite(self, rows: list[dict]) -> None:
        """Header and rows through a temporary file: a kill or a full disk keeps the old rows."""
        tmp = self.path.with_name(self.path.name + ".tmp")
        with writing(self.path):
            try:
                with tmp.open("w", newline="") as f:
                    writer = csv.DictWriter(f, fieldnames=self.fields, extrasaction="ignore")
                    writer.writeheader()
                    writer.writerows(rows)
                tmp.replace(self.path)
            finally:
                tmp.unlink(missing_ok=True)

    def append(self, row: dict) -> None:
        with writing(self.path), self.path.open("a", newline="") as f:
            csv.DictWriter(f, fieldnames=self.fields).writerow({k: _fmt(row.get(k, "")) for k in self.fields})


def _fmt(value: object) -> object:
    return f"{value:.6g}" if isinstance(value, float) else value


class RunLog:
    """train_log.csv (every few steps), epochs.csv (every epoch) and TensorBoard events.

    `resume_step`: the step the run continues from (0 for a fresh start); rows and events past it,
    left by an attempt killed after its last checkpoint, are dropped, so each step is logged once.
    None appends to whatever is there.
    """

    def __init__(self, run_dir: Path, enabled: bool, resume_step: int | None = None):
        self.enabled = enabled
        if not enabled:
            return
        self.steps = CsvLog(run_dir / "train_log.csv", STEP_FIELDS, resume_step)
        self.epochs = CsvLog(run_dir / "epochs.csv", EPOCH_FIELDS, resume_step)
        from torch.utils.tensorboard import SummaryWriter  # imported late: slow import

        # TensorBoard hides earlier events at steps >= purge_step; the checkpoint's own step stays
        with writing(run_dir / "tensorboard"):
            self.tb = SummaryWriter(str(run_dir / "tensorboard"),
                                    purge_step=None if resume_step is None else resume_step + 1)

    def step(self, row: dict) -> None:
        if self.enabled:
            self._write(self.steps, row, "train")

    def epoch(self, row: dict) -> None:
        if self.enabled:
            self._write(self.epochs, row, "epoch")

    def _write(self, log: CsvLog, row: dict, prefix: str) -> None:
        log.append(row)
        for key, value in row.items():
            if key not in ("epoch", "step") and isinstance(value, (int, float)) and value != "":
                self.tb.add_scalar(f"{prefix}/{key}", value, row["step"])

    def close(self) -> None:
        if self.enabled:
            self.tb.close()


def write_json(path: Path, data: dict, sort_keys: bool = True) -> None:
    """Write JSON atomically (`write_text_atomic`)."""
    write_text_atomic(path, json.dumps(data, indent=2, sort_keys=sort_keys) + "\n")


def write_text_atomic(path: Path, text: str) -> None:
    """Write a text file atomically: a reader (a run report, --compare) never sees a half-written file,
    and a failed write (a full disk) keeps the old file and leaves no temporary one. The folder is
    made when missing (a tool's `--json out/run.json`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_text(text)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def write_run_json(path: Path, data: dict) -> None:
    """A run's JSON record (config.json, results.json, run_info.json): `write_json`, with a failure
    raised as the CheckpointError that says which file, why and what to do."""
    with writing(path):
        write_json(path, data)


def utc_now() -> str:
    """The date stamp of runs, reports and benchmark results (UTC, to the second)."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")

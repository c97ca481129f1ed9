"""Per-run logs: CSV files (easy to read anywhere) and TensorBoard, main process only."""

from __future__ import annotations

import csv
import json
from pathlib import Path

STEP_FIELDS = ["epoch", "step", "loss", "lr", "beta", "ema_momentum", "images_per_s", "data_wait_share",
               "step_time_s", "skipped_images", "alpha", "mi_nats", "mi_ceiling_nats"]  # the last 3: critic runs
EPOCH_FIELDS = ["epoch", "step", "loss", "images_per_s", "data_wait_share", "step_time_s", "peak_memory_mb",
                "skipped_images", "knn_top1", "knn_top5", "seconds"]


class CsvLog:
    """Append-only CSV with a fixed header; rows past `keep_until_step` are dropped on resume."""

    def __init__(self, path: Path, fields: list[str], keep_until_step: int | None = None):
        self.path, self.fields = path, fields
        if keep_until_step is not None and path.exists():
            with path.open(newline="") as f:
                rows = [r for r in csv.DictReader(f) if int(r["step"]) <= keep_until_step]
            self._write(rows, "w")
        elif not path.exists():
            self._write([], "w")

    def _write(self, rows: list[dict], mode: str) -> None:
        with self.path.open(mode, newline="") as f:
            writer = csv.DictWriter(f, fieldnames=self.fields)
            if mode == "w":
                writer.writeheader()
            writer.writerows(rows)

    def append(self, row: dict) -> None:
        self._write([{k: _fmt(row.get(k, "")) for k in self.fields}], "a")


def _fmt(value):
    return f"{value:.6g}" if isinstance(value, float) else value


class RunLog:
    """train_log.csv (every few steps), epochs.csv (every epoch) and TensorBoard events."""

    def __init__(self, run_dir: Path, enabled: bool, resume_step: int | None = None):
        self.enabled = enabled
        if not enabled:
            return
        self.steps = CsvLog(run_dir / "train_log.csv", STEP_FIELDS, resume_step)
        self.epochs = CsvLog(run_dir / "epochs.csv", EPOCH_FIELDS, resume_step)
        from torch.utils.tensorboard import SummaryWriter  # imported late: slow import

        self.tb = SummaryWriter(str(run_dir / "tensorboard"), purge_step=resume_step)

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


def write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    tmp.replace(path)

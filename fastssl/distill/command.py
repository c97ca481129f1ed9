"""The distillation recipes' command line: `fastssl.cli`'s flags (--resume [auto], --print-config,
--help, --section.field VALUE), bad input exiting 2 with one `error:` line.

Light on purpose: torch and the trainer are imported only to train, so `--help` and a misspelt
field answer at once, and a Ctrl-C while torch is being imported is answered in one line.
"""

from __future__ import annotations

import dataclasses
import json

from fastssl.cli import command_line
from fastssl.distill.config import DistillConfig, validate
from pipelines.folder import DataLayoutError


def run(cfg: DistillConfig, argv: list[str] | None = None, prog: str | None = None) -> dict:
    """Parse the command line into `cfg` and distil; prints the final top-1 and returns the results."""

    def start(c: DistillConfig, resume: bool | str, command: list[str]) -> dict:
        from fastssl.distill.trainer import train

        return train(c, resume=resume, command=command)

    def user_errors() -> tuple[type[Exception], ...]:
        from fastssl.checkpoint import CheckpointError
        from fastssl.recovery import TrainingDiverged

        return DataLayoutError, FileNotFoundError, CheckpointError, TrainingDiverged

    results = command_line(cfg, argv, prog, check=validate,
                           dump=lambda c: json.dumps(dataclasses.asdict(c), indent=2, sort_keys=True),
                           start=start, user_errors=user_errors)
    top1 = results.get("final_top1")
    print(f"done: top-1 {'n/a' if top1 is None else f'{top1:.2f}%'} ({cfg.train.run_dir}/results.json)")
    return results

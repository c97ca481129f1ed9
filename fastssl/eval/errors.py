"""The evaluation tools' user error: bad input, said with what to pass instead; and the argument
checks that find it before any work (so that a bad value is one line, not a traceback halfway in)."""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Callable
from pathlib import Path

__all__ = ["EvalError", "int_at_least", "loader_workers", "number_in", "check_output_dir", "check_output_file"]


class EvalError(ValueError):
    """Bad input: say what was wrong and how to fix it."""


def int_at_least(minimum: int, maximum: int | None = None) -> Callable[[str], int]:
    """argparse `type` of an integer flag with bounds: a value out of them is a usage error at parse time
    (`argument --batch-size: must be >= 1, got 0`, exit 2), where torch or a DataLoader would fail later
    with a traceback. One definition for every tool, so that they word it alike."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum or (maximum is not None and value > maximum):
            bound = f"between {minimum} and {maximum}" if maximum is not None else f">= {minimum}"
            raise argparse.ArgumentTypeError(f"must be {bound}, got {value}")
        return value

    return parse


def loader_workers(text: str) -> int:
    """argparse `type` of --num-workers: -1 is this process's share of the machine's cores (the default:
    on ImageNet, decoding in the main process alone would keep the GPU waiting), 0 loads in the main
    process, N > 0 as given. The share divides the cores among a launcher's processes on the node."""
    from pipelines.cores import default_num_workers

    return default_num_workers(int_at_least(-1)(text), 1)


def number_in(low: float, high: float = math.inf, *, low_open: bool = False, high_open: bool = False
              ) -> Callable[[str], float]:
    """argparse `type` of a finite float flag in [low, high] (either end open when asked): NaN, inf or a
    value out of range is a usage error at parse time (`argument --momentum: must lie in [0, 1), got nan`),
    not torch's traceback after the features were extracted, nor a NaN written into the JSON."""
    left, right = "(" if low_open else "[", ")" if high_open or high == math.inf else "]"
    span = f"{left}{low:g}, {'inf' if high == math.inf else f'{high:g}'}{right}"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        inside = (math.isfinite(value) and (value > low if low_open else value >= low)
                  and (value < high if high_open else value <= high))
        if not inside:
            raise argparse.ArgumentTypeError(f"must be a finite number in {span}, got {text}")
        return value

    return parse


def check_output_dir(path: Path, flag: str) -> None:
    """An EvalError when `path` cannot become a directory: it, or the nearest of its parents that exists,
    is a file. Checked without creating anything, so a tool can refuse before any work and still create
    the directory only once it has something to put there."""
    existing = next((p for p in (path, *path.parents) if p.exists()), None)
    if existing is None:
        return
    if existing.is_dir():
        if not os.access(existing, os.W_OK):  # a read-only mount or folder: refused now, not after the work
            raise EvalError(f"{flag} {str(path)!r} cannot be written: {str(existing)!r} is read-only for this "
                            f"user; name a writable place")
        return
    what = "is a file" if existing == path else f"is under {str(existing)!r}, which is a file"
    raise EvalError(f"{flag} {str(path)!r} {what}, not a directory; name a directory (it is created if missing)")


def check_output_file(path: Path, flag: str) -> None:
    """An EvalError when a report cannot be written at `path` (a directory there, or a parent that is a
    file), checked before any work: a failed write after hours of evaluation would lose the figures."""
    if path.is_dir():
        raise EvalError(f"{flag} {str(path)!r} is a directory; name a file (e.g. {str(path / 'report.json')!r})")
    check_output_dir(path.parent, f"{flag}'s folder")

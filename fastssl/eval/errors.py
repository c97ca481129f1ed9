"""The evaluation tools' user error: bad input, said with what to pass instead; and the output checks
that find it before any work (so that a bad path is one line, not a traceback after hours of work).
The flags' value types are `fastssl.arg_types`'."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["EvalError", "check_output_dir", "check_output_file"]


class EvalError(ValueError):
    """Bad input: say what was wrong and how to fix it."""


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

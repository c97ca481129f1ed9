"""How a child process ended, in words: shared by everything that runs workers or checks in children."""

from __future__ import annotations

import signal

__all__ = ["describe_exit"]


def describe_exit(code: int) -> str:
    """A process's exit code as a person reads it: "exit status 1", "killed by SIGKILL" (negative codes)."""
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit status {code}"

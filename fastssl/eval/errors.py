"""The evaluation tools' user error: bad input, said with what to pass instead."""

from __future__ import annotations

__all__ = ["EvalError"]


class EvalError(ValueError):
    """Bad input: say what was wrong and how to fix it."""

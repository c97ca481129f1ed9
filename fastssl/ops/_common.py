"""Argument checks and dtype policy shared by the assignment ops.

Why: both ops are called every training step with teacher logits that may arrive in bf16/fp16
under autocast; the targets must be computed in float32 or better (the log-space iteration
sums exponentials that bf16's 8-bit mantissa would round away), and a
bad hyper-parameter should fail at once with the argument's name rather than as NaN targets.
"""

from __future__ import annotations

import math
import operator
from typing import Any

import torch
from torch import Tensor


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; everything else (bf16, fp16, fp32, ints) is computed in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_logits(logits: Any) -> Tensor:
    """Validate ``logits`` (a 2-D real tensor, B x K with K >= 1) and return it detached."""
    if not isinstance(logits, Tensor):
        raise ValueError(f"logits must be a torch.Tensor, got {type(logits).__name__}")
    if logits.dim() != 2:
        raise ValueError(f"logits must be 2-D (B x K), got shape {tuple(logits.shape)}")
    if logits.is_complex():
        raise ValueError(f"logits must be real, got dtype {logits.dtype}")
    if logits.shape[1] < 1:
        raise ValueError(f"logits must have at least one column (K >= 1), got shape {tuple(logits.shape)}")
    return logits.detach()


def check_positive(name: str, value: Any) -> float:
    """A finite, strictly positive float (temperatures)."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a positive number, got {value!r}") from None
    if not (math.isfinite(v) and v > 0.0):
        raise ValueError(f"{name} must be finite and > 0, got {value!r}")
    return v


def check_iters(name: str, value: Any, minimum: int) -> int:
    """An integer >= ``minimum`` (bools and floats are rejected: 2.5 iterations is a bug)."""
    if isinstance(value, bool):
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    try:
        v = operator.index(value)
    except TypeError:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}") from None
    if v < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return v

"""argparse `type`s every tool shares: a bad value is a usage error at parse time (one line, exit 2),
where torch, NumPy or a DataLoader would fail later with a traceback, or a NaN would reach the JSON.
One definition for every tool, so that they word it alike. No torch import: a bad flag fails at once."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable, Sequence
from typing import TypeVar

__all__ = ["MAX_IMAGE_SIZE", "MAX_SEED", "MAX_WORKERS", "int_at_least", "number_in", "seed_number", "learning_rate",
           "loader_workers", "one_of", "comma_list"]

T = TypeVar("T")

# The largest seed every generator of the project takes: NumPy's RandomState wants one below 2**32
# (torch's manual_seed one below 2**64). The configs' train.seed has the same bound.
MAX_SEED = 2**32 - 1


def int_at_least(minimum: int, maximum: int | None = None) -> Callable[[str], int]:
    """An integer flag with bounds (`argument --batch-size: must be >= 1, got 0`)."""

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


def number_in(low: float, high: float = math.inf, *, low_open: bool = False, high_open: bool = False
              ) -> Callable[[str], float]:
    """A finite float flag in [low, high] (either end open when asked): NaN, inf or a value out of range
    is refused (`argument --momentum: must be a finite number in [0, 1), got nan`)."""
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


# A --seed flag: 0 to MAX_SEED.
seed_number = int_at_least(0, MAX_SEED)
# A learning rate: > 0 and at most 1e6. torch's SGD turns it into the parameters' float32, and a far
# larger one overflows there (a RuntimeError at the first step); any lr near the bound diverges at
# once, which the tools then report (`fastssl.eval.classifier.check_converging`).
learning_rate = number_in(0, 1e6, low_open=True)


# Worker processes a tool's --num-workers may start: more than any machine has cores (a typo's 100000
# spent minutes starting processes, then left some behind when it was killed).
MAX_WORKERS = 512
# The evaluation tools' largest crop: 4.6x ImageNet's 224 per side; 100000 ran the host out of memory
# (killed without a word) before the first batch.
MAX_IMAGE_SIZE = 1024


def loader_workers(text: str) -> int:
    """--num-workers: -1 is this process's share of the machine's cores (the default: on ImageNet,
    decoding in the main process alone would keep the GPU waiting), 0 loads in the main process,
    N > 0 as given, up to MAX_WORKERS. The share divides the cores among a launcher's processes on the node."""
    from pipelines.cores import default_num_workers

    return default_num_workers(int_at_least(-1, MAX_WORKERS)(text), 1)


def one_of(choices: Sequence[str]) -> Callable[[str], str]:
    """A name among `choices` (an item of `comma_list`; a single name has argparse's `choices`)."""

    def parse(text: str) -> str:
        if text not in choices:
            raise argparse.ArgumentTypeError(f"unknown {text!r}; choose from {', '.join(choices)}")
        return text

    return parse


def comma_list(item: Callable[[str], T], *, allow_empty: bool = False) -> Callable[[str], list[T]]:
    """A comma-separated list of `item`s (each read by `item`, itself an argparse type). An empty item
    or one given twice is refused: `--milestones 1,,1` would otherwise apply a decay twice, and a
    repeated name would be run twice or mislabel a table's columns. `allow_empty`: "" is the empty list."""

    def parse(text: str) -> list[T]:
        if allow_empty and not text.strip():
            return []
        parts = [part.strip() for part in text.split(",")]
        if "" in parts:
            raise argparse.ArgumentTypeError(f"an empty item in {text!r}; separate the items by single commas")
        values = [item(part) for part in parts]
        twice = next((part for i, part in enumerate(parts) if values[i] in values[:i]), None)
        if twice is not None:
            raise argparse.ArgumentTypeError(f"{twice!r} is given twice in {text!r}; name each once")
        return values

    return parse

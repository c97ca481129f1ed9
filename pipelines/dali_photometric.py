"""DALI's CPU mode: every photometric step of a view as ONE compiled numba function per sample.

Why: on a CPU, DALI's colour arithmetic and blur operators are slow, and every conditional
splits and merges the batch around its branch. Here the numba uint8 steps of
`pipelines.cpu_augment` (torchvision's definitions; FFCV's CPU decoder runs the same
ones) run per sample in DALI's threads through `numba_function`. A step a sample did
not draw is an `if` in compiled code, so it costs nothing, and no batch is split or
merged (docs/benchmarks.md compares it with the GPU's graph run on the CPU,
`--data.dali_cpu_fast false`).

The draws (coins, factors, sigma) are DALI random ops, so a run stays repeatable from
the pipeline seed. The operator is built once per process and shared by every view
and pipeline; its compiled callbacks come from numba's disk cache (`available()`). On a
GPU, `pipelines.dali` keeps its conditional graph of DALI operators.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING

from nvidia.dali import fn, types
from nvidia.dali.plugin.numba import NumbaFunction

from pipelines.augment import MultiCropRecipe, ViewSpec
from pipelines.cpu_augment import NUM_DRAWN, apply_drawn_u8

if TYPE_CHECKING:
    import numpy as np
    from nvidia.dali.pipeline import DataNode

_OPERATOR: NumbaFunction | None = None
_UNAVAILABLE: str | None = None  # why the operator could not be built (warned once)


def _same_shape(outs: Sequence[Sequence[np.ndarray]], ins: Sequence[Sequence[np.ndarray]]) -> None:
    """DALI setup function: the output crop has its input's shape."""
    for i in range(len(outs[0])):
        for d in range(3):
            outs[0][i][d] = ins[0][i][d]


def _augment_sample(out0: np.ndarray, in0: np.ndarray, in1: np.ndarray) -> None:
    """DALI run function (one sample): copy the crop, then run the steps it drew (`in1`)."""
    out0[:] = in0
    apply_drawn_u8(out0, in1)


def available() -> bool:
    """Build the shared operator on first use; False, with one warning naming why, when
    neither route can build it (the caller then runs DALI's own operators under
    conditionals: slower on a CPU, the same augmentations). First route: our callbacks from
    numba's disk cache (`pipelines.dali_numba_op`, 0.3 s); second: DALI's own
    `NumbaFunction` of the functions below, compiled in this process (7-9 s on 2 cores)."""
    global _OPERATOR, _UNAVAILABLE
    if _OPERATOR is None and _UNAVAILABLE is None:
        try:
            from pipelines.dali_numba_op import PhotometricOperator

            _OPERATOR = PhotometricOperator()
        except Exception:  # a DALI whose numba operator changed its internals: let DALI compile its own
            try:
                _OPERATOR = NumbaFunction(run_fn=_augment_sample, setup_fn=_same_shape,
                                          in_types=[types.UINT8, types.FLOAT], ins_ndim=[3, 1],
                                          out_types=[types.UINT8], outs_ndim=[3], device="cpu")
            except Exception as err:  # a numba/DALI version mismatch surfaces as anything
                _UNAVAILABLE = f"{type(err).__name__}: {err}"
                warnings.warn("DALI CPU mode: the numba photometric steps could not be built "
                              f"({_UNAVAILABLE.splitlines()[0]}); using DALI's operators under conditionals "
                              "instead (slower on a CPU, same augmentations)", stacklevel=2)
    return _OPERATOR is not None


def uniform(lo: float, hi: float) -> DataNode:
    """Per-sample U(lo, hi) as float32; the constant lo when the range is empty (DALI refuses it)."""
    if hi <= lo:
        return fn.cast(types.Constant(float(lo)), dtype=types.FLOAT)
    return fn.random.uniform(range=[lo, hi])


def coin(p: float) -> DataNode:
    """Per-sample 0/1 float32, 1 with probability p (a coin of probability 0 or 1 is constant)."""
    return fn.cast(fn.random.coin_flip(probability=min(max(p, 0.0), 1.0)), dtype=types.FLOAT)


def jitter_order(recipe: MultiCropRecipe, dtype: types.DALIDataType = types.FLOAT) -> DataNode:
    """Per sample, an index into `JITTER_ORDERS` drawn uniformly from the recipe's orders (0 when fixed)."""
    n = recipe.num_jitter_orders
    if n <= 1:
        return fn.cast(types.Constant(0), dtype=dtype)
    return fn.random.uniform(values=list(range(n)), dtype=dtype)


def draws(recipe: MultiCropRecipe, view: ViewSpec) -> DataNode:
    """Per sample, the row `apply_drawn_u8` reads (layout `cpu_augment.DRAWN_*`), drawn by DALI."""
    b, c, s, h = recipe.jitter
    row = [coin(recipe.jitter_p), uniform(max(0.0, 1 - b), 1 + b), uniform(max(0.0, 1 - c), 1 + c),
           uniform(max(0.0, 1 - s), 1 + s), uniform(-h, h), coin(recipe.grayscale_p), coin(view.blur_p),
           uniform(*recipe.blur_sigma), coin(view.solarize_p), jitter_order(recipe)]
    assert len(row) == NUM_DRAWN
    return fn.stack(*row)


def photometric(crops: DataNode, recipe: MultiCropRecipe, view: ViewSpec) -> DataNode:
    """Jitter, grayscale, blur and solarize of one view (uint8 HWC crops in and out); needs `available()`."""
    if not available():
        raise RuntimeError(f"the numba photometric operator is unavailable: {_UNAVAILABLE}")
    return _OPERATOR(crops, draws(recipe, view))

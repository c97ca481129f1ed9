"""DALI's numba operator for the CPU photometric steps, compiled once per machine, not per process.

Why: DALI's `NumbaFunction` compiles its C callbacks (a generic wrapper around the run and
setup functions: pointer unpacking, six optional outputs and inputs, error strings) in
every process that builds it, uncached: 7-9 s on 2 cores, paid by every training process,
loader benchmark and test process in DALI's CPU mode. Here the two callbacks are
written for our one signature (one uint8 HWC crop and its float32 row of draws in, the
crop out) and compiled with numba's disk cache (`cache=True`): 0.3 s to load after the
first process on a machine, which compiles them in 5 s (docs/benchmarks.md).

The callbacks follow DALI's C interface for CPU numba operators (`nvidia.dali.plugin.numba`,
DALI 2.x): per sample, `run(out_ptrs, out_shape_ptrs, out_ndims, num_outs, in_ptrs,
in_shape_ptrs, in_ndims, num_ins)`, where each `*_ptrs` argument addresses a table of
int64 addresses (of data, or of an int64 shape array), one per output or input; and per
batch `setup(out_shape_ptrs, out_ndims, num_outs, in_shape_ptrs, in_ndims, num_ins,
num_samples)`, where each table holds one shape address per (output or input, sample),
row by output or input. tests/test_pipelines.py runs the operator in a DALI pipeline against
`apply_drawn_u8` called directly. Imported only when DALI's CPU mode builds it: the
import compiles (or loads) the callbacks.
"""

from __future__ import annotations

import numpy as np
from numba import carray, cfunc
from numba import types as nbt
from nvidia.dali import types
from nvidia.dali.plugin.numba import NumbaFunction

from pipelines.cpu_augment import apply_drawn_u8
from pipelines.numba_pointer import void_pointer

SETUP_SIGNATURE = nbt.void(nbt.uint64, nbt.uint64, nbt.int32, nbt.uint64, nbt.uint64, nbt.int32, nbt.int32)
RUN_SIGNATURE = nbt.void(nbt.uint64, nbt.uint64, nbt.uint64, nbt.int32, nbt.uint64, nbt.uint64, nbt.uint64, nbt.int32)


@cfunc(SETUP_SIGNATURE, nopython=True, cache=True)
def _setup(out_shapes: int, out_ndims: int, num_outs: int, in_shapes: int, in_ndims: int, num_ins: int,
           num_samples: int) -> None:
    """Each sample's output crop has its input crop's shape (H, W, 3)."""
    outs = carray(void_pointer(out_shapes), (num_outs, num_samples), dtype=np.int64)
    ins = carray(void_pointer(in_shapes), (num_ins, num_samples), dtype=np.int64)
    for i in range(num_samples):
        dst = carray(void_pointer(outs[0, i]), 3, dtype=np.int64)
        src = carray(void_pointer(ins[0, i]), 3, dtype=np.int64)
        for d in range(3):
            dst[d] = src[d]


@cfunc(RUN_SIGNATURE, nopython=True, cache=True)
def _run(out_data: int, out_shapes: int, out_ndims: int, num_outs: int, in_data: int, in_shapes: int, in_ndims: int,
         num_ins: int) -> None:
    """One sample: copy the crop, then run the steps it drew (`apply_drawn_u8`)."""
    out_shape = carray(void_pointer(carray(void_pointer(out_shapes), 1, dtype=np.int64)[0]), 3, dtype=np.int64)
    in_shape_table = carray(void_pointer(in_shapes), 2, dtype=np.int64)
    crop_shape = carray(void_pointer(in_shape_table[0]), 3, dtype=np.int64)
    drawn_shape = carray(void_pointer(in_shape_table[1]), 1, dtype=np.int64)
    in_table = carray(void_pointer(in_data), 2, dtype=np.int64)
    out = carray(void_pointer(carray(void_pointer(out_data), 1, dtype=np.int64)[0]),
                 (out_shape[0], out_shape[1], out_shape[2]), dtype=np.uint8)
    crop = carray(void_pointer(in_table[0]), (crop_shape[0], crop_shape[1], crop_shape[2]), dtype=np.uint8)
    drawn = carray(void_pointer(in_table[1]), drawn_shape[0], dtype=np.float32)
    out[:] = crop
    apply_drawn_u8(out, drawn)


class PhotometricOperator(NumbaFunction):
    """DALI's CPU `NumbaFunction` with the cached callbacks above: inputs (uint8 HWC crops,
    float32 draw rows), output the augmented crops. It skips `NumbaFunction.__init__`
    (which would compile its own callbacks) and sets what `NumbaFunction.__call__` reads."""

    def __init__(self) -> None:
        super(NumbaFunction, self).__init__(device="cpu")
        self.run_fn, self.setup_fn = _run.address, _setup.address
        self.out_types, self.in_types = [types.UINT8], [types.UINT8, types.FLOAT]
        self.outs_ndim, self.ins_ndim = [3], [3, 1]
        self.num_outputs, self.batch_processing, self._preserve = 1, False, True
        self.blocks = self.threads_per_block = None

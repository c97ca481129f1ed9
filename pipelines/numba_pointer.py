"""An integer address as a pointer inside numba-compiled code: the one intrinsic both loaders need.

Why: FFCV's decoder reads a value that Python rewrites each epoch (numba freezes a closed-over array
as a constant, so it must be reached through its address), and DALI's numba operator receives its
tables of data and shape pointers as plain integers. `carray(void_pointer(address), shape, dtype)`
views the memory there.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from numba import types as nbt
from numba.core import cgutils
from numba.extending import intrinsic

if TYPE_CHECKING:
    from llvmlite import ir
    from numba.core.base import BaseContext
    from numba.core.typing.context import BaseContext as TypingContext
    from numba.core.typing.templates import Signature


@intrinsic
def void_pointer(typingctx: TypingContext, address: nbt.Type) -> tuple[Signature, Callable[..., Any]]:
    """`address` (an integer) as a void*, for `numba.carray` (numba's recipe for memory Python owns)."""
    def codegen(context: BaseContext, builder: ir.IRBuilder, signature: Signature, args: Sequence[ir.Value]
                ) -> ir.Value:
        return builder.inttoptr(args[0], cgutils.voidptr_t)

    return nbt.voidptr(address), codegen

"""Compiled inner loops of the exact accumulator and of the update norm (numba).

Why compiled: the exact method needs about ten float64 operations per value. As numpy
passes each of them reads and writes memory, and aggregation ran 3-4x slower than
Flower's float sum. In one loop that LLVM vectorises, the state stays in registers and
the L1 cache, so the work is bound by reading the updates once.

Every function here works on *blocks*: at most `BLOCK` consecutive C-order values of
one tensor, grouped in superblocks of `SUPER` blocks. Superblocks are independent, so
the caller may run them on several threads without changing a single bit of the result.
The arithmetic is documented in `exact_sum`. No function uses fast-math flags: LLVM
vectorises these element-wise loops without reassociating anything, so the results are
those of the scalar IEEE code.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast

import numba
import numpy as np
from llvmlite import ir
from numba import types
from numba.extending import intrinsic

from consortium.aggregation.layout import (
    BLOCK,
    HI_BITS,
    LO_BITS,
    LO_PER_HI,
    SUPER,
    SUPERBLOCK,
    VALUE_EXP,
    VALUE_LIMIT,
)

__all__ = [
    "BLOCK",
    "HI_BITS",
    "LO_BITS",
    "LO_PER_HI",
    "SUPER",
    "SUPERBLOCK",
    "VALUE_EXP",
    "VALUE_LIMIT",
    "add_blocks",
    "mean_blocks",
    "tensor_stats",
]
_FINITE_MAX = float(np.finfo(np.float64).max)
# (x + _QUANTIZE) - _QUANTIZE rounds |x| < 2**9 to a multiple of 2**-43 and leaves larger
# float32 values (and float64 parts of at most 27 bits) unchanged.
_QUANTIZE = 1.5 * 2.0 ** (52 - LO_BITS)
# y + _MAGIC lies in [2**41, 2**42), where doubles are 2**-11 apart: its bit pattern is
# that of _MAGIC plus round(y * 2**11) (round half to even).
_MAGIC = 1.5 * 2.0 ** (52 - HI_BITS)
_MAGIC_BITS = int(np.float64(_MAGIC).view(np.int64))
_LO_SCALE = 2.0**LO_BITS
_LO_UNIT = 2.0**-LO_BITS
_HALF_HI = float(LO_PER_HI // 2)
# Keeps the sign, exponent and 25 explicit mantissa bits of a float64 (26 significant
# bits); the remainder x - high has at most 27, so both parts behave like float32 values.
_F64_HIGH_MASK = ~((1 << 27) - 1)

_jit = numba.njit(nogil=True, cache=True, boundscheck=False, error_model="numpy")
_inline = numba.njit(nogil=True, cache=True, boundscheck=False, inline="always")


def _float_bits_typing(typingctx: Any, value: Any) -> Any:
    def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        return builder.bitcast(args[0], ir.IntType(64))

    return types.int64(types.float64), codegen


def _bits_float_typing(typingctx: Any, value: Any) -> Any:
    def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        return builder.bitcast(args[0], ir.DoubleType())

    return types.float64(types.int64), codegen


# The IEEE bit pattern of a float64 as an int64 and back: register moves, no arithmetic.
_float_bits = cast(Callable[[float], int], intrinsic(_float_bits_typing))
_bits_float = cast(Callable[[int], float], intrinsic(_bits_float_typing))


@_jit
def _tree_sum(squares: Any, used: int) -> float:
    """Sum of ``squares[:used]`` in a fixed pairwise order.

    The block is padded with zeros to the next power of two and halved repeatedly; each
    halving is an element-wise add that vectorises, and the order is a function of
    ``used`` alone.
    """
    width = 1
    while width < used:
        width *= 2
    for i in range(used, width):
        squares[i] = 0.0
    half = width // 2
    while half >= 1:
        for i in range(half):
            squares[i] += squares[i + half]
        half //= 2
    return float(squares[0]) if used else 0.0


@_inline
def _add_part(v: float, weight: float, hi: Any, lo: Any, i: int) -> None:
    """Add ``weight * v`` to element ``i`` of the limbs (steps 1-4 in `exact_sum`)."""
    y = ((v + _QUANTIZE) - _QUANTIZE) * weight  # exact: <= 27 + 24 significant bits
    t = y + _MAGIC
    hi[i] += _float_bits(t) - _MAGIC_BITS  # round(y * 2**11)
    lo[i] += y - (t - _MAGIC)  # the exact remainder, a multiple of 2**-43


@_inline
def _add_f64(v: float, weight: float, hi: Any, lo: Any, i: int) -> None:
    """A float64 value in two parts of at most 27 significant bits each."""
    high = _bits_float(_float_bits(v) & _F64_HIGH_MASK)
    _add_part(high, weight, hi, lo, i)
    _add_part(v - high, weight, hi, lo, i)  # v - high is exact


@_inline
def _in_range(v: float) -> float:
    return v if abs(v) < VALUE_LIMIT else 0.0


@_inline
def _finite(v: float) -> float:
    return v if abs(v) <= _FINITE_MAX else 0.0


@_jit
def _add_block(
    values: Any, weight: float, hi: Any, lo: Any, squares: Any, is_f64: bool
) -> tuple[float, int]:
    """Add one block of an update; return (its sum of squares, values outside the range).

    A value is outside when it is not below `VALUE_LIMIT` in magnitude (so NaN and
    infinities too); it is added and squared as zero, since the caller rejects the
    update and subtracts it again, which must be exact. The squares of a full float32
    block are summed as four interleaved quarters, so that the loop stores one float per
    four values; `_block_sumsq` follows the same order. (The loops are written out per
    case: a branch inside them would stop LLVM from vectorising. Taking the statistics
    from `_block_sumsq` in a pass of its own removes the near-copy but measured 10-20%
    slower with two threads.)
    """
    outside = 0
    n = values.size
    if n == BLOCK and not is_f64:
        q = BLOCK // 4
        for i in range(q):
            a = float(values[i])
            b = float(values[i + q])
            c = float(values[i + 2 * q])
            d = float(values[i + 3 * q])
            outside += (
                (0 if abs(a) < VALUE_LIMIT else 1)
                + (0 if abs(b) < VALUE_LIMIT else 1)
                + (0 if abs(c) < VALUE_LIMIT else 1)
                + (0 if abs(d) < VALUE_LIMIT else 1)
            )
            a, b, c, d = _in_range(a), _in_range(b), _in_range(c), _in_range(d)
            squares[i] = (a * a + c * c) + (b * b + d * d)
            _add_part(a, weight, hi, lo, i)
            _add_part(b, weight, hi, lo, i + q)
            _add_part(c, weight, hi, lo, i + 2 * q)
            _add_part(d, weight, hi, lo, i + 3 * q)
        return _tree_sum(squares, q), outside
    if is_f64:
        for i in range(n):
            v = float(values[i])
            outside += 0 if abs(v) < VALUE_LIMIT else 1
            v = _in_range(v)
            squares[i] = v * v
            _add_f64(v, weight, hi, lo, i)
    else:  # the last, partial block of a float32 tensor
        for i in range(n):
            v = float(values[i])
            outside += 0 if abs(v) < VALUE_LIMIT else 1
            v = _in_range(v)
            squares[i] = v * v
            _add_part(v, weight, hi, lo, i)
    return _tree_sum(squares, n), outside


@_jit
def _block_sumsq(values: Any, squares: Any, is_f64: bool) -> tuple[float, int]:
    """`_add_block`'s statistics without adding, for finite values of any size.

    Non-finite values square as zero; finite values beyond `VALUE_LIMIT` are counted as
    outside but still squared. When no value is outside, the sum equals
    `_add_block`'s bit for bit.
    """
    outside = 0
    n = values.size
    if n == BLOCK and not is_f64:
        q = BLOCK // 4
        for i in range(q):
            a = float(values[i])
            b = float(values[i + q])
            c = float(values[i + 2 * q])
            d = float(values[i + 3 * q])
            outside += (
                (0 if abs(a) < VALUE_LIMIT else 1)
                + (0 if abs(b) < VALUE_LIMIT else 1)
                + (0 if abs(c) < VALUE_LIMIT else 1)
                + (0 if abs(d) < VALUE_LIMIT else 1)
            )
            a, b, c, d = _finite(a), _finite(b), _finite(c), _finite(d)
            squares[i] = (a * a + c * c) + (b * b + d * d)
        return _tree_sum(squares, q), outside
    for i in range(n):
        v = float(values[i])
        outside += 0 if abs(v) < VALUE_LIMIT else 1
        v = _finite(v)
        squares[i] = v * v
    return _tree_sum(squares, n), outside


@_jit
def tensor_stats(values: Any, sumsq: Any, is_f64: bool) -> int:
    """Per superblock, the sum of squares of the finite values (into ``sumsq``); returns
    the count of values not below `VALUE_LIMIT` in magnitude (non-finite ones included).

    When that count is zero the sums equal those `add_blocks` reports, bit for bit.
    """
    squares = np.empty(BLOCK, np.float64)
    partial = np.empty(SUPER, np.float64)
    outside = 0
    blocks = (values.size + BLOCK - 1) // BLOCK
    for block in range(blocks):
        start = block * BLOCK
        block_sum, block_outside = _block_sumsq(
            values[start : min(start + BLOCK, values.size)], squares, is_f64
        )
        partial[block % SUPER] = block_sum
        outside += block_outside
        if block % SUPER == SUPER - 1 or block == blocks - 1:
            sumsq[block // SUPER] = _tree_sum(partial, block % SUPER + 1)
    return outside


@_jit
def add_blocks(
    updates: Any,
    weights: Any,
    hi: Any,
    lo: Any,
    first_super: int,
    end_super: int,
    sumsq: Any,
    outside: Any,
    is_f64: bool,
) -> None:
    """Add ``weights[j] * updates[j]`` to superblocks ``[first_super, end_super)`` of a tensor.

    ``hi`` (int64) and ``lo`` (int32) are the tensor's canonical limbs. Each block's low
    limb is widened to a float64 scratch block once, receives every update of the batch
    (sums of multiples of 2**-43 stay exact far beyond any batch size), and is carried
    back into canonical form. Per update ``j`` and superblock ``s`` the sum of squares
    goes to ``sumsq[j, s]``, and ``outside[j]`` counts the values not below
    `VALUE_LIMIT` in magnitude (see `_add_block`). ``is_f64`` says that the updates are
    float64, which are added in two parts.
    """
    size = hi.size
    wide = np.empty(BLOCK, np.float64)
    squares = np.empty(BLOCK, np.float64)
    partial = np.empty((len(updates), SUPER), np.float64)
    end_block = min(end_super * SUPER, (size + BLOCK - 1) // BLOCK)
    for block in range(first_super * SUPER, end_block):
        start = block * BLOCK
        stop = min(start + BLOCK, size)
        n = stop - start
        for i in range(n):
            wide[i] = lo[start + i] * _LO_UNIT
        for j in range(len(updates)):
            values = updates[j][start:stop]
            block_sum, block_outside = _add_block(
                values, weights[j], hi[start:stop], wide[:n], squares, is_f64
            )
            partial[j, block % SUPER] = block_sum
            outside[j] += block_outside
        for i in range(n):
            units = wide[i] * _LO_SCALE  # an integer, exactly
            carry = np.floor((units + _HALF_HI) / LO_PER_HI)
            hi[start + i] += np.int64(carry)
            lo[start + i] = np.int32(units - carry * LO_PER_HI)
        if block % SUPER == SUPER - 1 or block == end_block - 1:
            for j in range(len(updates)):
                sumsq[j, block // SUPER] = _tree_sum(partial[j], block % SUPER + 1)


@_jit
def mean_blocks(hi: Any, lo: Any, divisor: float, out: Any) -> None:
    """``out = (hi + lo * 2**-32) / divisor`` in float64, rounded once to out's dtype.

    ``out`` may share memory with ``hi`` or ``lo`` (element i is read before it is
    written), which is how `ExactSum.finish` returns the mean without a new buffer.
    """
    for i in range(hi.size):
        value = (np.float64(hi[i]) + np.float64(lo[i]) * (1.0 / LO_PER_HI)) / divisor
        out[i] = value

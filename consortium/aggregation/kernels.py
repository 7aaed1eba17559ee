"""Compiled inner loops of the exact accumulator and of the update norm (numba).

Why compiled: the exact method needs several float64 operations per value. As numpy
passes each of them reads and writes memory, and aggregation ran 3-4x slower than
Flower's float sum. In one loop that LLVM vectorises, the state stays in the cache, so
the work is bound by arithmetic, not by memory.

Every function here works on *blocks*: at most `BLOCK` consecutive C-order values of
one tensor, grouped in superblocks of `SUPER` blocks. Superblocks are independent, so
the caller may run them on several threads without changing a single bit of the result.
The arithmetic is documented in `exact_sum`. No function uses fast-math flags: LLVM
vectorises these element-wise loops without reassociating anything, so the results are
those of the scalar IEEE code. Fused multiply-adds are explicit (`_fma`); LLVM emits the
FMA instruction, or a correctly rounded library call on a CPU without one.

Updates arrive as their IEEE bit patterns (int32 for float32 tensors, int64 for
float64): the range check is then an integer comparison and a value outside the range
is replaced by +0.0 with an AND, which is much cheaper than float compares and blends.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast

import numba
import numpy as np
from llvmlite import ir
from numba import types
from numba.extending import intrinsic
from numba.np.numpy_support import carray

from consortium.aggregation.layout import BLOCK, HI_BITS, LO_BITS, LO_PER_HI, SUPER, VALUE_LIMIT

__all__ = ["add_blocks", "mean_blocks", "tensor_stats"]

# fma(x, w, _MAGIC) lies in [2**41, 2**42), where doubles are 2**-11 apart: its bit
# pattern is that of _MAGIC plus round(x * w * 2**11) (round half to even).
_MAGIC = 1.5 * 2.0 ** (52 - HI_BITS)
# The same trick in [2**9, 2**10), where doubles are 2**-43 apart, for the remainder.
_LO_MAGIC = 1.5 * 2.0 ** (52 - LO_BITS)
_BOTH_MAGICS = _MAGIC + _LO_MAGIC  # exact: both are multiples of 2**-11 below 2**42
_MAGIC_BITS = np.uint64(np.float64(_MAGIC).view(np.uint64))
_LO_MAGIC_BITS = np.uint64(np.float64(_LO_MAGIC).view(np.uint64))
_HALF_HI = LO_PER_HI // 2
# Added to a low-limb sum S (|S| < 2**62) before a logical shift, so that the shift
# computes the signed carry floor((S + 2**31) / 2**32), offset by 2**31.
_CARRY_BIAS = np.uint64(_HALF_HI + (1 << 63))
_SHIFT = np.uint64(LO_BITS - HI_BITS)

_jit = numba.njit(nogil=True, cache=True, boundscheck=False, error_model="numpy")
_inline = numba.njit(nogil=True, cache=True, boundscheck=False, inline="always")


def _float_type(bits: Any) -> Any:
    if bits == types.int32:
        return types.float32, ir.FloatType()
    if bits == types.int64:
        return types.float64, ir.DoubleType()
    return None, None


def _as_float_typing(typingctx: Any, bits: Any) -> Any:
    float_type, llvm_type = _float_type(bits)
    if float_type is None:
        return None

    def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        return builder.bitcast(args[0], llvm_type)

    return float_type(bits), codegen


def _limit_check(builder: Any, value: Any, width: int) -> Any:
    """``|float(value)| < VALUE_LIMIT`` on the bit pattern: the magnitude's bits order
    like the magnitude itself, and NaN and infinities lie above every finite value."""
    limit = np.array(VALUE_LIMIT, f"f{width // 8}").view(f"i{width // 8}")
    int_type = ir.IntType(width)
    magnitude = builder.and_(value, int_type((1 << (width - 1)) - 1))
    return builder.icmp_signed("<", magnitude, int_type(int(limit)))


def _in_range_typing(typingctx: Any, bits: Any) -> Any:
    if _float_type(bits)[0] is None:
        return None

    def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        return _limit_check(builder, args[0], bits.bitwidth)

    return types.boolean(bits), codegen


def _zero_if_outside_typing(typingctx: Any, bits: Any) -> Any:
    if _float_type(bits)[0] is None:
        return None

    def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        inside = _limit_check(builder, args[0], bits.bitwidth)
        return builder.select(inside, args[0], ir.IntType(bits.bitwidth)(0))

    return bits(bits), codegen


def _float_bits_typing(typingctx: Any, value: Any) -> Any:
    def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        return builder.bitcast(args[0], ir.IntType(64))

    return types.uint64(types.float64), codegen


def _pointer_like_typing(typingctx: Any, address: Any, like: Any) -> Any:
    if not isinstance(address, types.Integer) or not isinstance(like, types.Array):
        return None
    pointer = cast(Any, types.CPointer)(like.dtype)

    def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        return builder.inttoptr(args[0], context.get_value_type(pointer))

    return pointer(address, like), codegen


def _fma_typing(typingctx: Any, a: Any, b: Any, c: Any) -> Any:
    def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        return builder.fma(*args)

    return types.float64(types.float64, types.float64, types.float64), codegen


# Register moves, no arithmetic: a float's bit pattern (of the same width) as a float,
# and a float64's bit pattern as a uint64.
_as_float = cast(Callable[[int], float], intrinsic(_as_float_typing))
_float_bits = cast(Callable[[float], int], intrinsic(_float_bits_typing))
# Whether a bit pattern's value is below VALUE_LIMIT in magnitude (False for NaN), and
# the pattern with +0.0 in place of a value that is not.
_in_range = cast(Callable[[int], bool], intrinsic(_in_range_typing))
_zero_if_outside = cast(Callable[[int], int], intrinsic(_zero_if_outside_typing))
# x * y + z with one rounding.
_fma = cast(Callable[[float, float, float], float], intrinsic(_fma_typing))
# A memory address as a pointer to elements of ``like``'s dtype.
_pointer_like = cast(Callable[[int, Any], Any], intrinsic(_pointer_like_typing))


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
def _checked(bits: int) -> tuple[float, bool]:
    """The value of one bit pattern as float64 (+0.0 when outside the range) and
    whether it was outside."""
    return np.float64(_as_float(_zero_if_outside(bits))), not _in_range(bits)


@_inline
def _counts(value: float, weight: float) -> tuple[int, int]:
    """The counts of ``weight * value`` for the two limbs (steps 1-2 in `exact_sum`), each
    as a float64 bit pattern that is one magic constant's pattern too high."""
    t = _fma(value, weight, _MAGIC)  # _MAGIC + round(value * weight), grid 2**-11
    # value * weight - (t - _MAGIC) is the exact remainder r, |r| <= 2**-12; adding
    # _LO_MAGIC in the same fused operation rounds it once, to the 2**-43 grid.
    return _float_bits(t), _float_bits(_fma(value, weight, _BOTH_MAGICS - t))


@_inline
def _add_value(value: float, weight: float, hi: Any, lo: Any, i: int) -> None:
    """Add the counts of ``weight * value`` to element ``i`` of both limbs.

    Both limbs are uint64 here and wrap: ``hi`` gains ``_MAGIC_BITS`` and ``lo`` gains
    ``_LO_MAGIC_BITS`` too much per value, which `add_blocks` takes off once per batch.
    """
    high, low = _counts(value, weight)
    hi[i] += high
    lo[i] += low


@_inline
def _add_two_values(
    value: float, weight: float, value2: float, weight2: float, hi: Any, lo: Any, i: int
) -> None:
    """`_add_value` for two updates at once: element ``i`` is read and written once."""
    high, low = _counts(value, weight)
    high2, low2 = _counts(value2, weight2)
    hi[i] += high + high2
    lo[i] += low + low2


@_inline
def _quarter_squares(values: Any, i: int, q: int) -> tuple[float, float, float, float, float, bool]:
    """Values ``i + k*q`` (k = 0..3) of a full block, checked, and their sum of squares.

    A full block's squares are summed as four interleaved quarters, so that the loop
    stores one float per four values.
    """
    a, a_out = _checked(values[i])
    b, b_out = _checked(values[i + q])
    c, c_out = _checked(values[i + 2 * q])
    d, d_out = _checked(values[i + 3 * q])
    squares = _fma(a, a, c * c) + _fma(b, b, d * d)
    return a, b, c, d, squares, (a_out | b_out) | (c_out | d_out)


@_jit
def _add_block(values: Any, weight: float, hi: Any, lo: Any, squares: Any) -> tuple[float, bool]:
    """Add one block of an update; return (its sum of squares, whether a value is outside).

    A value is outside when it is not below `VALUE_LIMIT` in magnitude (so NaN and
    infinities too); it is added and squared as zero, since the caller rejects the
    update and subtracts it again, which must be exact. `_block_sumsq` computes the same
    sum.
    """
    outside = False
    n = values.size
    if n == BLOCK:
        q = BLOCK // 4
        for i in range(q):
            a, b, c, d, squares[i], out = _quarter_squares(values, i, q)
            outside |= out
            _add_value(a, weight, hi, lo, i)
            _add_value(b, weight, hi, lo, i + q)
            _add_value(c, weight, hi, lo, i + 2 * q)
            _add_value(d, weight, hi, lo, i + 3 * q)
        return _tree_sum(squares, q), outside
    for i in range(n):  # the last, partial block of a tensor
        v, out = _checked(values[i])
        outside |= out
        squares[i] = v * v
        _add_value(v, weight, hi, lo, i)
    return _tree_sum(squares, n), outside


@_jit
def _add_full_block_pair(
    values: Any,
    weight: float,
    values2: Any,
    weight2: float,
    hi: Any,
    lo: Any,
    squares: Any,
    squares2: Any,
) -> tuple[float, bool, float, bool]:
    """`_add_block` of two updates' full blocks in one pass over the state block.

    Reading and writing the state once for two updates instead of once for each saved
    about 10% of the aggregation time (four at once spill registers and lose it again).
    """
    outside = outside2 = False
    q = BLOCK // 4
    for i in range(q):
        a, b, c, d, squares[i], out = _quarter_squares(values, i, q)
        a2, b2, c2, d2, squares2[i], out2 = _quarter_squares(values2, i, q)
        outside |= out
        outside2 |= out2
        _add_two_values(a, weight, a2, weight2, hi, lo, i)
        _add_two_values(b, weight, b2, weight2, hi, lo, i + q)
        _add_two_values(c, weight, c2, weight2, hi, lo, i + 2 * q)
        _add_two_values(d, weight, d2, weight2, hi, lo, i + 3 * q)
    return _tree_sum(squares, q), outside, _tree_sum(squares2, q), outside2


@_jit
def _block_sumsq(values: Any, squares: Any) -> tuple[float, bool]:
    """`_add_block`'s statistics without adding: the same sum, bit for bit."""
    outside = False
    n = values.size
    if n == BLOCK:
        q = BLOCK // 4
        for i in range(q):
            _, _, _, _, squares[i], out = _quarter_squares(values, i, q)
            outside |= out
        return _tree_sum(squares, q), outside
    for i in range(n):
        v, out = _checked(values[i])
        outside |= out
        squares[i] = v * v
    return _tree_sum(squares, n), outside


@_jit
def tensor_stats(values: Any, sumsq: Any) -> int:
    """Per superblock, the sum of squares of the in-range values (into ``sumsq``); returns
    the number of blocks holding a value not below `VALUE_LIMIT` in magnitude.

    ``values`` are a tensor's bit patterns (see the module docstring). The sums equal
    those `add_blocks` reports, bit for bit.
    """
    squares = np.empty(BLOCK, np.float64)
    partial = np.empty(SUPER, np.float64)
    outside = 0
    blocks = (values.size + BLOCK - 1) // BLOCK
    for block in range(blocks):
        start = block * BLOCK
        block_sum, block_outside = _block_sumsq(
            values[start : min(start + BLOCK, values.size)], squares
        )
        partial[block % SUPER] = block_sum
        outside += block_outside
        if block % SUPER == SUPER - 1 or block == blocks - 1:
            sumsq[block // SUPER] = _tree_sum(partial, block % SUPER + 1)
    return outside


@_jit
def add_blocks(
    addresses: Any,
    like: Any,
    weights: Any,
    hi: Any,
    lo: Any,
    first_super: int,
    end_super: int,
    sumsq: Any,
    outside: Any,
) -> None:
    """Add ``weights[j] * updates[j]`` to superblocks ``[first_super, end_super)`` of a tensor.

    The updates are C-contiguous arrays of the tensor's bit patterns (int32 or int64,
    see the module docstring), of the size and dtype of ``like``, at ``addresses``; the
    caller keeps them alive. (A numba typed list of arrays costs more to build than
    aggregating a small model does.)
    ``hi`` is the tensor's int64 high limb viewed as uint64, ``lo`` its int32 low limb.
    Each block's low limb is widened to a 64-bit scratch block once, receives every
    update of the batch (two at a time), and is carried back into canonical form. Per
    update ``j`` and superblock ``s`` the sum of squares goes to ``sumsq[j, s]``, and
    ``outside[j]`` counts the blocks holding a value not below `VALUE_LIMIT` in magnitude
    (see `_add_block`).
    """
    size = hi.size
    updates = [carray(_pointer_like(address, like), size) for address in addresses]
    wide = np.empty(BLOCK, np.uint64)
    squares = np.empty(BLOCK, np.float64)
    squares2 = np.empty(BLOCK, np.float64)
    partial = np.empty((len(updates), SUPER), np.float64)
    count = np.uint64(len(updates))
    # What every _add_value of the batch added too much (modulo 2**64), and the carry's
    # offset: subtracted once per block.
    lo_excess = count * _LO_MAGIC_BITS
    hi_excess = count * _MAGIC_BITS + np.uint64(_HALF_HI)
    end_block = min(end_super * SUPER, (size + BLOCK - 1) // BLOCK)
    for block in range(first_super * SUPER, end_block):
        start = block * BLOCK
        stop = min(start + BLOCK, size)
        n = stop - start
        block_hi, block_lo, block_wide = hi[start:stop], lo[start:stop], wide[:n]
        for i in range(n):
            block_wide[i] = np.uint64(np.int64(block_lo[i]))  # sign-extended
        j = 0
        while n == BLOCK and j + 1 < len(updates):
            sum1, out1, sum2, out2 = _add_full_block_pair(
                updates[j][start:stop],
                weights[j],
                updates[j + 1][start:stop],
                weights[j + 1],
                block_hi,
                block_wide,
                squares,
                squares2,
            )
            partial[j, block % SUPER], partial[j + 1, block % SUPER] = sum1, sum2
            outside[j] += out1
            outside[j + 1] += out2
            j += 2
        for k in range(j, len(updates)):  # an odd one out, or a partial block
            block_sum, block_outside = _add_block(
                updates[k][start:stop], weights[k], block_hi, block_wide, squares
            )
            partial[k, block % SUPER] = block_sum
            outside[k] += block_outside
        for i in range(n):
            # units: the block's low limb plus this batch's counts of 2**-43, exactly.
            units = block_wide[i] - lo_excess
            block_hi[i] += ((units + _CARRY_BIAS) >> _SHIFT) - hi_excess
            block_lo[i] = np.int32(units)  # units - carry * 2**32: its low 32 bits
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

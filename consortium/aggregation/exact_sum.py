"""Exact, order-independent weighted sums of float tensors in 128-bit fixed point.

Why: a float sum depends on the order of its terms, so two coordinators (or one
coordinator on two days) receiving the same updates in a different order would publish
different models. Integer addition is associative and commutative, so every weighted
value becomes an exact count of a fixed quantum ``2**-59`` and counts are added. The
state after any sequence of ``add`` calls is a function of the multiset of
(update, weight) pairs only, and the one rounding to float happens at the end.

Method, per value ``x`` (``|x| < 2**16``) and integer weight ``w`` (``1 <= w <= 2**24``),
all steps vectorised numpy passes over cache-sized chunks:

1. ``xq = (x + C) - C`` in float64 with ``C = 1.5 * 2**-7`` rounds ``x`` to a multiple
   of ``2**-59`` (round-half-even). It changes only values below ``2**-36`` in magnitude;
   larger float32 values are already multiples of ``2**-59`` and pass through exactly.
   Rounding ``x`` rather than ``w * x`` makes weight 3 identical, bit for bit, to three
   adds with weight 1. (A float64 value is first split into two parts of at most 27
   significant bits, each handled like a float32 value.)
2. ``y = w * xq`` is exact in float64 (at most 27 + 24 significant bits).
3. ``t = y + M`` with ``M = 1.5 * 2**41`` rounds ``y`` to a multiple of ``2**-11`` (the
   float64 "magic number" trick: ``t`` lies in ``[2**41, 2**42)``, where doubles are
   spaced ``2**-11`` apart). The bit pattern of ``t`` is the bit pattern of ``M`` plus
   ``round(y * 2**11)``, so adding ``t.view(int64)`` to the int64 high limb adds that
   integer; the offsets are subtracted when the state is read (wrap-around arithmetic
   mod 2**64; the true limb value provably fits in 63 bits).
4. ``r = y - (t - M)`` is exact, a multiple of ``2**-59`` and at most ``2**-12``; it is
   added to a float64 low limb. Sums of multiples of ``2**-59`` below ``2**-6`` are exact
   in float64, so at least every 62 additions the low limb is carried into the high one.

Error bound: the only rounding before the final division is step 1, at most ``2**-60``
per value, so the mean of the represented values is within ``2**-60`` of the exact
weighted mean (zero error for float32 inputs with all ``|x| >= 2**-36`` or zero). The
mean is formed from the limbs in float64 with relative error below ``2**-50`` and
rounded once to the output dtype: for float32 outputs
``|result - sum(w*x)/sum(w)| <= (1/2 + 2**-26) * ulp(mean) + 2**-60``; for float64
outputs ``<= 2**-50 * |mean| + 2**-60``. No step creates a subnormal, so the result does
not depend on the CPU's flush-to-zero / denormals-are-zero modes.

Memory: an int64 and a float64 limb per parameter (16 bytes: four float32 model sizes)
plus chunk-sized scratch, independent of the number of updates.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from consortium.aggregation.validate import ModelSpec, TensorSpec

# Elements per chunk. Each add touches 5 chunk-sized arrays (input, two scratch, two
# limbs); 2**15 keeps them around the L2 size while amortising numpy's per-call cost.
CHUNK = 1 << 15
VALUE_EXP = 16  # accepted values satisfy |x| < 2**VALUE_EXP
WEIGHT_EXP = 24  # accepted weights satisfy 1 <= w <= 2**WEIGHT_EXP
VALUE_LIMIT = float(2**VALUE_EXP)
MAX_WEIGHT = 2**WEIGHT_EXP
HI_BITS = 51 - VALUE_EXP - WEIGHT_EXP  # 11: |w * x| * 2**HI_BITS < 2**51 for the magic add
QUANTUM = 2.0**-59
# The high limb counts units of 2**-HI_BITS: at most MAX_TOTAL_WEIGHT * 2**(16 + 11) = 2**62.
MAX_TOTAL_WEIGHT = 2 ** (62 - VALUE_EXP - HI_BITS)  # 2**35
# After a carry |lo| <= 2**-12 and each addition adds at most 2**-12; float64 sums of
# multiples of 2**-59 are exact below 2**53 * 2**-59 = 2**-6, so (k + 1) * 2**-12 < 2**-6
# allows k = 62 additions between carries.
LO_CAPACITY = 62

_QUANTIZE = np.float64(1.5 * 2.0**52 * QUANTUM)  # 1.5 * 2**-7
_MAGIC = np.float64(1.5 * 2.0 ** (52 - HI_BITS))  # 1.5 * 2**41
_MAGIC_BITS = int(_MAGIC.view(np.int64))
# Keeps the sign, exponent and 25 explicit mantissa bits of a float64 (26 significant
# bits); the remainder x - high has at most 27, so both parts behave like float32 values.
_F64_HIGH_MASK = np.int64(~(2**27 - 1))

IntArray = npt.NDArray[np.int64]
FloatArray = npt.NDArray[np.floating[Any]]
F64Array = npt.NDArray[np.float64]


def _wrap(value: int) -> np.int64:
    """``value`` mod 2**64 as a signed int64, for offsets removed with wrapping arithmetic."""
    return np.int64((value + 2**63) % 2**64 - 2**63)


class ExactSum:
    """Sum of ``weight * update`` over many updates, exact up to the 2**-59 quantum.

    This class trusts its input: call `validate_update` with ``value_limit=VALUE_LIMIT``
    and check the weights first (`StreamingMean` does both).
    """

    def __init__(self, spec: ModelSpec) -> None:
        self.spec: dict[str, TensorSpec] = dict(sorted(spec.items()))
        self._ranges: dict[str, tuple[int, int]] = {}
        total = 0
        for name, tensor in self.spec.items():
            self._ranges[name] = (total, total + tensor.size)
            total += tensor.size
        # One flat buffer per limb for the whole model: one allocation, views per tensor.
        self._hi: IntArray = np.zeros(total, np.int64)
        self._lo: F64Array = np.zeros(total, np.float64)
        # Additions into each tensor's limbs since its last carry; each left one offset.
        self._pending = dict.fromkeys(self.spec, 0)
        scratch = min(CHUNK, max(total, 1))
        self._y: F64Array = np.empty(scratch, np.float64)
        self._t: F64Array = np.empty(scratch, np.float64)
        self._t_bits: IntArray = self._t.view(np.int64)  # made once: views cost a call each
        self._part: F64Array = np.empty(scratch, np.float64)

    @property
    def nbytes(self) -> int:
        """Bytes held by this accumulator (state plus scratch); constant after construction."""
        return sum(a.nbytes for a in (self._hi, self._lo, self._y, self._t, self._part))

    def add_prevalidated(self, update: Mapping[str, FloatArray], weight: int) -> None:
        """Add ``weight * update``; see `add_many_prevalidated` for the preconditions."""
        self.add_many_prevalidated([(update, weight)])

    def add_many_prevalidated(self, pairs: Sequence[tuple[Mapping[str, FloatArray], int]]) -> None:
        """Add ``weight * update`` for every pair, reading the state once per batch.

        Preconditions, not checked here: every value is finite with |x| < VALUE_LIMIT,
        1 <= weight <= MAX_WEIGHT, and the total weight stays <= MAX_TOTAL_WEIGHT.

        Work is chunk-major: a chunk of both limbs stays in cache while every update of
        the batch is added to it, so the 16 bytes/parameter of state travel to and from
        memory once per batch rather than once per update.
        """
        batch = max(1, LO_CAPACITY // 2)  # a float64 tensor takes two additions per update
        for first in range(0, len(pairs), batch):
            self._add_batch(pairs[first : first + batch])

    def _add_batch(self, pairs: Sequence[tuple[Mapping[str, FloatArray], int]]) -> None:
        weights = [np.float64(weight) for _, weight in pairs]
        for name, tensor in self.spec.items():
            parts = 2 if tensor.dtype == np.float64 else 1
            if self._pending[name] + parts * len(pairs) > LO_CAPACITY:
                self._carry(name)
            begin, end = self._ranges[name]
            # C-order views; a non-contiguous tensor is copied, one tensor at a time.
            flats = [np.ravel(update[name], order="C") for update, _ in pairs]
            for start in range(0, end - begin, CHUNK):
                stop = min(start + CHUNK, end - begin)
                hi, lo = (
                    self._hi[begin + start : begin + stop],
                    self._lo[begin + start : begin + stop],
                )
                for flat, w in zip(flats, weights, strict=True):
                    chunk = flat[start:stop]
                    if parts == 1:
                        self._add_chunk(chunk, w, hi, lo)
                        continue
                    part = self._part[: chunk.size]
                    np.bitwise_and(chunk.view(np.int64), _F64_HIGH_MASK, out=part.view(np.int64))
                    self._add_chunk(part, w, hi, lo)
                    np.subtract(chunk, part, out=part)  # exact: the bits the mask dropped
                    self._add_chunk(part, w, hi, lo)
            self._pending[name] += parts * len(pairs)

    def _add_chunk(self, x: FloatArray, w: np.float64, hi: IntArray, lo: F64Array) -> None:
        n = x.size
        y, t = self._y[:n], self._t[:n]
        np.add(x, _QUANTIZE, out=y)  # float32 -> float64 and step 1 in one pass
        np.subtract(y, _QUANTIZE, out=y)  # xq: x rounded to a multiple of 2**-59
        np.multiply(y, w, out=y)  # exact
        np.add(y, _MAGIC, out=t)  # bits of t = bits of M + round(y * 2**11)
        np.add(hi, self._t_bits[:n], out=hi)
        np.subtract(t, _MAGIC, out=t)  # round(y * 2**11) * 2**-11, exactly
        np.subtract(y, t, out=y)  # the remainder r, exactly
        np.add(lo, y, out=lo)  # exact: see LO_CAPACITY

    def _canonical(self, name: str) -> Iterator[tuple[int, IntArray, F64Array]]:
        """Chunks of (start, hi, lo): offsets removed, lo carried so |lo| <= 2**-12.

        This form is a function of the represented value only (hi is the round-half-even
        of value * 2**11), so digests and results read it; the raw limbs can differ
        between arrival orders because carries happen at different points.
        """
        begin, end = self._ranges[name]
        offset = _wrap(self._pending[name] * _MAGIC_BITS)
        size = min(CHUNK, max(end - begin, 1))
        hi_buf, lo_buf, t_buf = np.empty(size, np.int64), np.empty(size), np.empty(size)
        for start in range(begin, end, CHUNK):
            stop = min(start + CHUNK, end)
            hi, lo, t = hi_buf[: stop - start], lo_buf[: stop - start], t_buf[: stop - start]
            np.subtract(self._hi[start:stop], offset, out=hi)
            np.add(self._lo[start:stop], _MAGIC, out=t)
            np.add(hi, t.view(np.int64), out=hi)
            np.subtract(hi, _MAGIC_BITS, out=hi)
            np.subtract(t, _MAGIC, out=t)
            np.subtract(self._lo[start:stop], t, out=lo)
            yield start - begin, hi, lo

    def _carry(self, name: str) -> None:
        begin, _ = self._ranges[name]
        for start, hi, lo in self._canonical(name):
            self._hi[begin + start : begin + start + hi.size] = hi
            self._lo[begin + start : begin + start + lo.size] = lo
        self._pending[name] = 0

    def digest(self) -> str:
        """SHA-256 of the represented value (tensor names in sorted order)."""
        sha = hashlib.sha256()
        for name in self.spec:
            sha.update(name.encode() + b"\0")
            for _, hi, lo in self._canonical(name):
                sha.update(hi.astype("<i8", copy=False).tobytes())
                sha.update(lo.astype("<f8", copy=False).tobytes())
        return sha.hexdigest()

    def mean(self, total_weight: int) -> dict[str, FloatArray]:
        """The represented sum divided by ``total_weight``, rounded once per value."""
        return {name: self._mean_tensor(name, total_weight) for name in self.spec}

    def _mean_tensor(self, name: str, total_weight: int) -> FloatArray:
        tensor = self.spec[name]
        out = np.empty(tensor.size, tensor.dtype)
        # value / W = (hi + lo * 2**11) / (W * 2**11); the divisor is exact in float64.
        divisor = np.float64(total_weight) * 2.0**HI_BITS
        value = np.empty(min(CHUNK, max(tensor.size, 1)), np.float64)
        for start, hi, lo in self._canonical(name):
            v = value[: hi.size]
            # float64(hi) rounds by at most 2**-53 relative; |lo * 2**11| <= 1/2 <= |hi|/2
            # unless hi == 0 (then the sum is exact), so the sum and the division add at
            # most 2**-52 and 2**-53: a relative error below 2**-50 before the cast.
            np.copyto(v, hi, casting="unsafe")
            np.multiply(lo, 2.0**HI_BITS, out=lo)  # exact
            np.add(v, lo, out=v)
            np.divide(v, divisor, out=v)
            out[start : start + hi.size] = v  # the single rounding to float32 (none for float64)
        return out.reshape(tensor.shape)

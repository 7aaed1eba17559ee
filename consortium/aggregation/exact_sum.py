"""Exact, order-independent weighted sums of float tensors in 96-bit fixed point.

Why: a float sum depends on the order of its terms, so two coordinators (or one
coordinator on two days) receiving the same updates in a different order would publish
different models. Integer addition is associative and commutative, so every weighted
value becomes a count of a fixed quantum ``2**-43`` (rounded once, and exact for most
float32 values) and counts are added. The state after any sequence of additions is a
function of the multiset of (update, weight) pairs only, and the one rounding to float
happens at the end.

Method, per value ``x`` (``|x| < 2**16``, float32 or float64) and integer weight ``w``
(``1 <= w <= 2**24``), in compiled loops (`kernels`), each step one fused multiply-add
(FMA: ``a * b + c`` computed exactly, then rounded once):

1. ``t = fma(x, w, M)`` with ``M = 1.5 * 2**41`` lies in ``[2**41, 2**42)``, where doubles
   are spaced ``2**-11`` apart, so ``t = M + round(w*x)`` on the grid of ``2**-11`` (round
   half to even): the float64 "magic number" trick. The bit pattern of ``t`` minus that
   of ``M`` is ``round(w*x * 2**11)``, an integer added to the **int64 high limb**.
2. The remainder ``r = w*x - (t - M)`` is exact as a real number and ``|r| <= 2**-12``;
   ``u = fma(x, w, (M + M2) - t)`` with ``M2 = 1.5 * 2**9`` (the bracket is exact) equals
   ``M2 + r`` rounded once to the grid of ``2**-43``. The bit pattern of ``u`` minus that of
   ``M2`` is ``round(r * 2**43)``, added to the **int32 low limb**, which counts units of
   ``2**-43``. While a batch of updates is added to a block of values, the block's low
   limb is held in 64 bits, then carried so that the stored low limb lies in
   ``[-2**31, 2**31)``.

So each weighted term ``w*x`` is rounded once, to a multiple of ``2**-43``, and nothing
else is ever rounded before the final division. Whenever ``w*x`` already is such a
multiple (a float32 ``x`` that is zero or has ``|x| >= 2**-20``, with any integer
weight), no step rounds at all; then adding an update once with weight 3 and three times
with weight 1 give the same bits. The stored form (high, low) is unique for each
represented value, so digests and results read it directly and are identical for every
arrival order. Subtracting an update (weight ``-w``) is also exact, because round half
to even is symmetric and both magic constants lie on their grids' even points; a
rejected update is taken out again bit for bit. The loops add the magic constants' bit
patterns along with the counts, in wrapping 64-bit arithmetic, and take them off once
per batch.

Error bound: at most ``2**-44`` per weighted term, so the represented sum is within
``N * 2**-44`` of the exact weighted sum and, since every weight is at least 1, the mean
of the represented values within ``2**-44`` of the exact weighted mean (zero error in
the float32 case above). The mean is formed from the limbs in float64 with relative
error below ``2**-50`` and rounded once to the output dtype: for float32 outputs
``|result - sum(w*x)/sum(w)| <= (1/2 + 2**-26) * ulp(mean) + 2**-44``; for float64
outputs ``<= 2**-50 * |mean| + 2**-44``. No step creates a subnormal, so the result does
not depend on the CPU's flush-to-zero modes.

Memory: an int64 and an int32 limb per parameter (12 bytes: three float32 model sizes)
plus block-sized scratch per thread, independent of the number of updates. `finish`
writes the mean over the limbs' own memory, so the whole aggregation needs no more.
"""

from __future__ import annotations

import hashlib
import math
import os
import threading
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np
import numpy.typing as npt

from consortium.aggregation.layout import HI_BITS, LO_BITS, SUPERBLOCK, VALUE_EXP, VALUE_LIMIT
from consortium.aggregation.validate import ModelSpec, TensorSpec, TensorStats, bit_patterns

WEIGHT_EXP = 24  # accepted weights satisfy 1 <= w <= 2**WEIGHT_EXP
MAX_WEIGHT = 2**WEIGHT_EXP
QUANTUM = 2.0**-LO_BITS
# The high limb counts units of 2**-HI_BITS: at most MAX_TOTAL_WEIGHT * 2**(16 + 11) = 2**62.
MAX_TOTAL_WEIGHT = 2 ** (62 - VALUE_EXP - HI_BITS)  # 2**35

__all__ = ["MAX_TOTAL_WEIGHT", "MAX_WEIGHT", "QUANTUM", "VALUE_LIMIT", "ExactSum"]

FloatArray = npt.NDArray[np.floating[Any]]
Pair = tuple[Mapping[str, FloatArray], int]

_pool_lock = threading.Lock()
_pool: tuple[int, ThreadPoolExecutor] | None = None


def _threads() -> int:
    return max(1, min(8, len(os.sched_getaffinity(0))))


def _executor() -> ThreadPoolExecutor:
    """One pool per process (a pool inherited through fork has no threads)."""
    global _pool
    with _pool_lock:
        if _pool is None or _pool[0] != os.getpid():
            _pool = (os.getpid(), ThreadPoolExecutor(_threads(), "exact-sum"))
        return _pool[1]


def _run(tasks: list[Callable[[], None]]) -> None:
    """Run independent tasks, on the pool when there are several and several threads."""
    if len(tasks) == 1 or _threads() == 1:
        for task in tasks:
            task()
        return
    futures: list[Future[None]] = [_executor().submit(task) for task in tasks]
    for future in futures:
        future.result()


# Values per thread below which handing work to another thread costs more than it saves.
_MIN_SHARE = SUPERBLOCK // 4
# A thread's share of a model: runs (tensor name, first superblock, end superblock).
Share = list[tuple[str, int, int]]


def _shares(spec: Mapping[str, TensorSpec]) -> list[Share]:
    """The model's superblocks cut into one contiguous run per thread, of about equal size.

    Cuts fall between superblocks only (a superblock is one unit of work whose result
    does not depend on who computes it), so the thread count changes no bit.
    """
    units = [
        (name, s, min(SUPERBLOCK, tensor.size - s * SUPERBLOCK))
        for name, tensor in spec.items()
        for s in range(math.ceil(tensor.size / SUPERBLOCK))
    ]
    total = sum(size for *_, size in units)
    parts = min(len(units), _threads(), max(1, total // _MIN_SHARE))
    shares: list[Share] = [[] for _ in range(parts)]
    done = 0
    for name, s, size in units:
        # The share in which this superblock's midpoint falls.
        share = shares[min(parts - 1, (2 * done + size) * parts // (2 * total))]
        if share and share[-1][0] == name:
            share[-1] = (name, share[-1][1], s + 1)
        else:
            share.append((name, s, s + 1))
        done += size
    return [share for share in shares if share]


Call = tuple[Callable[..., None], tuple[Any, ...]]


def _calls(calls: list[Call]) -> Callable[[], None]:
    """One task that makes the given calls in order."""

    def run() -> None:
        for function, args in calls:
            function(*args)

    return run


class ExactSum:
    """Sum of ``weight * update`` over many updates, each term rounded once to 2**-43.

    Layout and weights are the caller's to check (`StreamingMean` does). Values are
    checked here, in the same pass that adds them: non-finite and out-of-range values are
    added as zero and counted, and the statistics returned let the caller reject the
    update and `subtract` it again.
    """

    def __init__(self, spec: ModelSpec) -> None:
        self.spec: dict[str, TensorSpec] = dict(sorted(spec.items()))
        self._ranges: dict[str, tuple[int, int]] = {}
        total = 0
        for name, tensor in self.spec.items():
            self._ranges[name] = (total, total + tensor.size)
            total += tensor.size
        # One flat buffer per limb for the whole model: one allocation, views per tensor.
        self._hi = np.zeros(total, np.int64)
        self._lo = np.zeros(total, np.int32)
        self._finished = False

    @property
    def nbytes(self) -> int:
        """Bytes of state (constant); each running thread adds about 110 KiB of block scratch."""
        return self._hi.nbytes + self._lo.nbytes

    def add_many(self, pairs: Sequence[Pair]) -> list[dict[str, TensorStats]]:
        """Add ``weight * update`` for every pair; return each update's value statistics.

        Work is block-major: a block of both limbs stays in cache while every update of
        the batch is added to it, so the state travels to and from memory once per
        batch, and superblocks run in parallel on a thread pool.
        """
        return self._apply(pairs, sign=1.0)

    def subtract(self, pairs: Sequence[Pair]) -> None:
        """Exactly undo `add_many` of the same pairs (used for rejected updates)."""
        self._apply(pairs, sign=-1.0)

    def _apply(self, pairs: Sequence[Pair], sign: float) -> list[dict[str, TensorStats]]:
        if self._finished:
            raise RuntimeError("this sum was finished; its memory now holds the mean")
        if not pairs:
            return []
        from consortium.aggregation import kernels  # numba: loaded on first use, see `layout`

        weights = np.array([sign * weight for _, weight in pairs], np.float64)
        outputs: dict[str, tuple[npt.NDArray[np.float64], npt.NDArray[np.int64]]] = {}
        arguments: dict[str, tuple[Any, ...]] = {}
        alive = []  # the kernels read the updates by address
        for name, tensor in self.spec.items():
            begin, end = self._ranges[name]
            # C-order bit patterns; a non-contiguous tensor is copied, one at a time.
            bits = [bit_patterns(update[name]) for update, _ in pairs]
            if any(
                array.size != tensor.size or array.itemsize != tensor.dtype.itemsize
                for array in bits
            ):
                # The kernels trust sizes; `StreamingMean` has checked the layout already.
                raise ValueError(f"tensor {name!r} does not match the layout {tensor}")
            alive.append(bits)
            addresses = np.array([array.ctypes.data for array in bits], np.int64)
            supers = math.ceil(tensor.size / SUPERBLOCK)
            outputs[name] = (np.zeros((len(pairs), supers)), np.zeros(len(pairs), np.int64))
            hi, lo = self._hi[begin:end].view(np.uint64), self._lo[begin:end]
            arguments[name] = (addresses, bits[0], weights, hi, lo)
        _run(
            [
                _calls(
                    [
                        (kernels.add_blocks, (*arguments[name], first, stop, *outputs[name]))
                        for name, first, stop in share
                    ]
                )
                for share in _shares(self.spec)
            ]
        )
        return [
            {
                name: TensorStats(sumsq[j], int(outside[j]))
                for name, (sumsq, outside) in outputs.items()
            }
            for j in range(len(pairs))
        ]

    def digest(self) -> str:
        """SHA-256 of the represented value (tensor names in sorted order)."""
        self._check_not_finished()
        sha = hashlib.sha256()
        for name, (begin, end) in self._ranges.items():
            sha.update(name.encode() + b"\0")
            sha.update(self._hi[begin:end].astype("<i8", copy=False).tobytes())
            sha.update(self._lo[begin:end].astype("<i4", copy=False).tobytes())
        return sha.hexdigest()

    def mean(self, total_weight: int) -> dict[str, FloatArray]:
        """The represented sum divided by ``total_weight``, rounded once per value."""
        self._check_not_finished()
        outs = {name: np.empty(t.size, t.dtype) for name, t in self.spec.items()}
        self._divide(total_weight, outs)
        return {name: out.reshape(self.spec[name].shape) for name, out in outs.items()}

    def finish(self, total_weight: int) -> dict[str, FloatArray]:
        """Like `mean`, but written over the limbs' memory: no new model-sized buffer.

        The sum is consumed; only the returned arrays remain valid.
        """
        self._check_not_finished()
        outs: dict[str, FloatArray] = {}
        for name, tensor in self.spec.items():
            begin, end = self._ranges[name]
            # Same element size: a float32 mean reuses the int32 limb, float64 the int64.
            limb = self._lo if tensor.dtype == np.float32 else self._hi
            outs[name] = limb[begin:end].view(tensor.dtype)
        self._divide(total_weight, outs)
        self._finished = True
        return {name: out.reshape(self.spec[name].shape) for name, out in outs.items()}

    def _divide(self, total_weight: int, outs: Mapping[str, FloatArray]) -> None:
        # value / W = (hi + lo * 2**-32) * 2**-11 / W; the divisor is exact in float64.
        # float64(hi) rounds by at most 2**-53 relative; |lo * 2**-32| <= 1/2 <= |hi|/2
        # unless hi == 0 (then the sum is exact), so the sum and the division add at most
        # 2**-52 and 2**-53: a relative error below 2**-50 before the one cast.
        from consortium.aggregation import kernels

        divisor = float(total_weight) * 2.0**HI_BITS
        tasks = []
        for share in _shares(self.spec):
            calls: list[Call] = []
            for name, first, stop in share:
                begin, end = self._ranges[name]
                a, b = begin + first * SUPERBLOCK, min(begin + stop * SUPERBLOCK, end)
                out = outs[name][a - begin : b - begin]
                calls.append((kernels.mean_blocks, (self._hi[a:b], self._lo[a:b], divisor, out)))
            tasks.append(_calls(calls))
        if tasks:
            _run(tasks)

    def _check_not_finished(self) -> None:
        if self._finished:
            raise RuntimeError("this sum was finished; its memory now holds the mean")

"""Exact, order-independent weighted sums of float tensors in 96-bit fixed point.

Why: a float sum depends on the order of its terms, so two coordinators (or one
coordinator on two days) receiving the same updates in a different order would publish
different models. Integer addition is associative and commutative, so every weighted
value becomes an exact count of a fixed quantum ``2**-43`` and counts are added. The
state after any sequence of additions is a function of the multiset of (update, weight)
pairs only, and the one rounding to float happens at the end.

Method, per value ``x`` (``|x| < 2**16``) and integer weight ``w`` (``1 <= w <= 2**24``),
in compiled loops (`kernels`):

1. ``xq = (x + C) - C`` in float64 with ``C = 1.5 * 2**9`` rounds ``x`` to a multiple of
   ``2**-43`` (round half to even). It changes only values below ``2**-20`` in
   magnitude; larger float32 values are already multiples of ``2**-43`` and pass through
   exactly. Rounding ``x`` rather than ``w * x`` makes weight 3 identical, bit for bit,
   to three additions with weight 1. (A float64 value is first split exactly into two
   parts of at most 27 significant bits, each handled like a float32 value.)
2. ``y = w * xq`` is exact in float64 (at most 27 + 24 significant bits).
3. ``t = y + M`` with ``M = 1.5 * 2**41`` rounds ``y`` to a multiple of ``2**-11`` (the
   float64 "magic number" trick: ``t`` lies in ``[2**41, 2**42)``, where doubles are
   spaced ``2**-11`` apart). The bit pattern of ``t`` minus that of ``M`` is
   ``round(y * 2**11)``, an integer added to the **int64 high limb**.
4. ``r = y - (t - M)`` is exact, a multiple of ``2**-43`` and at most ``2**-12``. It
   goes to the **int32 low limb**, which counts units of ``2**-43``: while a batch of
   updates is added to a block of values, the block's low limb is held in float64
   (sums of multiples of ``2**-43`` are exact below ``2**10``), then carried so that the
   stored low limb lies in ``[-2**31, 2**31)``.

That stored form (high, low) is unique for each represented value, so digests and results
read it directly and are identical for every arrival order. Subtracting an update (weight
``-w``) is also exact, because round-half-to-even is symmetric; a rejected update is
taken out again bit for bit.

Error bound: the only rounding before the final division is step 1, at most ``2**-44``
per value (``2**-43`` for a float64 value, whose two parts round separately), so the
mean of the represented values is within ``2**-44`` of the exact weighted mean (zero
error for float32 inputs with all ``|x| >= 2**-20`` or zero). The mean is formed from
the limbs in float64 with relative error below ``2**-50`` and rounded once to the output
dtype: for float32 outputs ``|result - sum(w*x)/sum(w)| <= (1/2 + 2**-26) * ulp(mean)
+ 2**-44``; for float64 outputs ``<= 2**-50 * |mean| + 2**-43``. No step creates a
subnormal, so the result does not depend on the CPU's flush-to-zero modes.

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
from consortium.aggregation.validate import ModelSpec, TensorSpec, TensorStats

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


def _split(count: int) -> list[tuple[int, int]]:
    """``[0, count)`` in at most one contiguous range per thread."""
    parts = min(count, _threads())
    return [(count * k // parts, count * (k + 1) // parts) for k in range(parts)]


class ExactSum:
    """Sum of ``weight * update`` over many updates, exact up to the 2**-43 quantum.

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
        """Bytes of state (constant); each running thread adds 128 KiB of block scratch."""
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
        weights = np.array([sign * weight for _, weight in pairs], np.float64)
        tasks: list[Callable[[], None]] = []
        outputs: dict[str, tuple[npt.NDArray[np.float64], npt.NDArray[np.int64]]] = {}
        for name, tensor in self.spec.items():
            supers = math.ceil(tensor.size / SUPERBLOCK)
            if supers == 0:
                continue
            begin, end = self._ranges[name]
            # C-order views; a non-contiguous tensor is copied, one tensor at a time.
            updates = _typed_list([np.ravel(update[name], order="C") for update, _ in pairs])
            out = (np.zeros((len(pairs), supers)), np.zeros(len(pairs), np.int64))
            outputs[name] = out
            hi, lo = self._hi[begin:end], self._lo[begin:end]
            f64 = tensor.dtype == np.float64
            for first, stop in _split(supers):
                tasks.append(_adder(updates, weights, hi, lo, first, stop, out, f64))
        _run(tasks)
        empty = TensorStats(np.zeros(0), 0)
        return [
            {
                name: TensorStats(outputs[name][0][j], int(outputs[name][1][j]))
                if name in outputs
                else empty
                for name in self.spec
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
        divisor = float(total_weight) * 2.0**HI_BITS
        tasks: list[Callable[[], None]] = []
        for name, (begin, end) in self._ranges.items():
            for first, stop in _split(math.ceil((end - begin) / SUPERBLOCK)):
                a, b = begin + first * SUPERBLOCK, min(begin + stop * SUPERBLOCK, end)
                out = outs[name][a - begin : b - begin]
                tasks.append(_divider(self._hi[a:b], self._lo[a:b], divisor, out))
        if tasks:
            _run(tasks)

    def _check_not_finished(self) -> None:
        if self._finished:
            raise RuntimeError("this sum was finished; its memory now holds the mean")


def _typed_list(arrays: list[npt.NDArray[Any]]) -> Any:
    """The compiled loops take a batch's arrays as a numba typed list. (numba, and the
    loops, load on first use: see `layout`.)"""
    from numba.typed import List

    return List(arrays)


def _adder(
    updates: Any,
    weights: npt.NDArray[np.float64],
    hi: npt.NDArray[np.int64],
    lo: npt.NDArray[np.int32],
    first: int,
    stop: int,
    out: tuple[npt.NDArray[np.float64], npt.NDArray[np.int64]],
    is_f64: bool,
) -> Callable[[], None]:
    from consortium.aggregation import kernels

    return lambda: kernels.add_blocks(updates, weights, hi, lo, first, stop, *out, is_f64)


def _divider(
    hi: npt.NDArray[np.int64], lo: npt.NDArray[np.int32], divisor: float, out: FloatArray
) -> Callable[[], None]:
    from consortium.aggregation import kernels

    return lambda: kernels.mean_blocks(hi, lo, divisor, out)

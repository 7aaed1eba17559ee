"""Validation of one model update against the global model's tensor layout.

An update is a mapping ``tensor name -> numpy array`` with exactly the reference's
names, shapes and dtypes (float32 or float64), only finite values and, when a bound is
configured, a global L2 norm at most ``max_norm``.

The norm is computed deterministically: each tensor is read in C order in fixed-size
chunks, every chunk is squared in float64 and summed with numpy's pairwise ``add.reduce``
(a fixed reduction tree that depends only on the chunk length), and the chunk sums are
added in sorted tensor-name order. So the accept/reject decision for a given update
never depends on memory layout, arrival order or thread scheduling. The same pass also
detects non-finite values (a float64 sum of squares of finite float32 values cannot
overflow) and, when ``value_limit`` is given, proves ``|x| < value_limit`` for all
values of a tensor whose norm is small, so that common case costs no extra pass.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from consortium.aggregation.errors import RejectReason, UpdateRejected

# Elements per chunk: big enough to amortise the per-call overhead of numpy ufuncs,
# small enough that the float64 scratch buffer stays in the L2/L3 cache.
CHUNK = 1 << 16

SUPPORTED_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


@dataclass(frozen=True)
class TensorSpec:
    """Shape and dtype of one tensor of the global model (no values are kept)."""

    shape: tuple[int, ...]
    dtype: np.dtype[Any]

    @property
    def size(self) -> int:
        return math.prod(self.shape)


ModelSpec = Mapping[str, TensorSpec]
Update = Mapping[str, npt.NDArray[Any]]


def spec_of(model: Mapping[str, npt.NDArray[Any] | TensorSpec]) -> dict[str, TensorSpec]:
    """The layout of a model (arrays or specs); only float32/float64 tensors are accepted."""
    specs: dict[str, TensorSpec] = {}
    for name in sorted(model):
        tensor = model[name]
        dtype = np.dtype(tensor.dtype)
        if dtype not in SUPPORTED_DTYPES:
            raise TypeError(
                f"reference tensor {name!r} has dtype {dtype}; only float32 and float64 "
                "tensors can be averaged"
            )
        specs[name] = TensorSpec(tuple(int(d) for d in tensor.shape), dtype)
    return specs


def flat_chunks(array: npt.NDArray[Any]) -> Iterator[npt.NDArray[Any]]:
    """C-order 1-D chunks of ``array``; views when it is C-contiguous (the usual case)."""
    flat = np.ravel(array, order="C")  # copies only a non-contiguous tensor
    for start in range(0, flat.size, CHUNK):
        yield flat[start : start + CHUNK]


def tensor_sumsq(array: npt.NDArray[Any], scratch: npt.NDArray[np.float64]) -> float:
    """Sum of squares in float64 with a fixed reduction order (see the module docstring)."""
    total = 0.0
    for chunk in flat_chunks(array):
        square = scratch[: chunk.size]
        np.copyto(square, chunk)  # exact widening for float32
        np.multiply(square, square, out=square)
        total += float(np.add.reduce(square))
    return total


def validate_update(
    update: Update,
    reference: Mapping[str, npt.NDArray[Any] | TensorSpec],
    *,
    max_norm: float | None,
    value_limit: float | None = None,
) -> None:
    """Raise `UpdateRejected` unless ``update`` is a well-formed update for ``reference``.

    ``value_limit`` (exclusive) is the largest magnitude the caller can represent; the
    exact accumulator passes its own limit. Checks run cheapest first, so a malformed
    update is refused before any value is read.
    """
    spec = spec_of(reference)
    _check_layout(update, spec)
    scratch = np.empty(min(CHUNK, max((s.size for s in spec.values()), default=1)), np.float64)
    total = 0.0
    for name in sorted(spec):
        tensor = update[name]
        sumsq = tensor_sumsq(tensor, scratch)
        if not math.isfinite(sumsq):
            _check_finite(name, tensor)
            sumsq = math.inf  # finite float64 values whose squares overflow
        # |x| <= sqrt(sumsq); the factor 1/2 is a wide margin for the rounding of sumsq.
        if value_limit is not None and not sumsq <= (0.5 * value_limit) ** 2:
            _check_range(name, tensor, value_limit)
        total += sumsq
    if max_norm is not None:
        norm = math.sqrt(total)
        if not norm <= max_norm:
            raise UpdateRejected(
                RejectReason.NORM,
                f"update rejected (norm): global L2 norm {norm:.6g} exceeds "
                f"max_norm {max_norm:.6g}",
            )


def _check_layout(update: Update, spec: ModelSpec) -> None:
    names, expected = set(update), set(spec)
    if names != expected:
        missing, extra = sorted(expected - names), sorted(names - expected)
        raise UpdateRejected(
            RejectReason.NAMES,
            f"update rejected (names): missing tensors {missing}, unexpected tensors {extra}",
            tensor=(missing or extra)[0],
        )
    for name in sorted(spec):
        tensor, want = update[name], spec[name]
        if not isinstance(tensor, np.ndarray):
            raise UpdateRejected(
                RejectReason.DTYPE,
                f"update rejected (dtype): tensor {name!r} is a {type(tensor).__name__}, "
                "not a numpy array",
                tensor=name,
            )
        if tensor.shape != want.shape:
            raise UpdateRejected(
                RejectReason.SHAPE,
                f"update rejected (shape): tensor {name!r} has shape {tensor.shape}, "
                f"expected {want.shape}",
                tensor=name,
            )
        if tensor.dtype != want.dtype:
            raise UpdateRejected(
                RejectReason.DTYPE,
                f"update rejected (dtype): tensor {name!r} has dtype {tensor.dtype}, "
                f"expected {want.dtype}",
                tensor=name,
            )


def _check_finite(name: str, tensor: npt.NDArray[Any]) -> None:
    bad = np.flatnonzero(~np.isfinite(tensor))
    if bad.size:
        index = tuple(int(i) for i in np.unravel_index(int(bad[0]), tensor.shape))
        raise UpdateRejected(
            RejectReason.NON_FINITE,
            f"update rejected (non_finite): tensor {name!r} has {bad.size} non-finite "
            f"value(s), the first at index {index}: {tensor[index]!r}",
            tensor=name,
        )


def _check_range(name: str, tensor: npt.NDArray[Any], limit: float) -> None:
    if tensor.size == 0:
        return
    largest = max(abs(float(np.max(tensor))), abs(float(np.min(tensor))))
    if not largest < limit:
        raise UpdateRejected(
            RejectReason.RANGE,
            f"update rejected (range): tensor {name!r} holds a value of magnitude "
            f"{largest:.6g}; the exact accumulator represents magnitudes below {limit:.6g}",
            tensor=name,
        )

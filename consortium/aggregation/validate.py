"""Validation of one model update against the global model's tensor layout.

An update is a mapping ``tensor name -> numpy array`` with exactly the reference's
names, shapes and dtypes (float32 or float64), only finite values and, when a bound is
configured, a global L2 norm at most ``max_norm``.

The norm is computed deterministically: each tensor is read in C order in blocks of
`layout.BLOCK` values; a block's squares (in float64) are summed in a fixed pairwise
tree, the block sums of each superblock (`layout.SUPER` blocks) in another, and all
superblock sums of all tensors are added with `math.fsum`, which is exactly rounded and
so independent of their order. The accept/reject decision for a given update
therefore never depends on memory layout, arrival order or thread scheduling, and the
exact accumulator, which computes the same block sums while it adds an update, reaches
the same decision as `validate_update`.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from consortium.aggregation import layout
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


@dataclass(frozen=True)
class TensorStats:
    """What validation needs to know about one tensor of an update, from one pass."""

    superblock_sumsq: npt.NDArray[np.float64]  # see the module docstring
    # Nonzero when a value is not below layout.VALUE_LIMIT in magnitude (NaN and
    # infinities included): the number of blocks holding one.
    outside: int


def bit_patterns(array: npt.NDArray[Any]) -> npt.NDArray[np.int32 | np.int64]:
    """A float32 or float64 tensor's values in C order, as int32 or int64 bit patterns
    (what the compiled loops read); a view unless the tensor is not C-contiguous."""
    flat = np.ravel(array, order="C")
    return flat.view(np.int64 if flat.dtype == np.float64 else np.int32)


def tensor_stats(array: npt.NDArray[Any]) -> TensorStats:
    bits = bit_patterns(array)
    sumsq = np.zeros(-(-bits.size // layout.SUPERBLOCK), np.float64)
    from consortium.aggregation import kernels  # numba: loaded on first use

    outside = kernels.tensor_stats(bits, sumsq) if bits.size else 0
    return TensorStats(sumsq, int(outside))


def validate_update(
    update: Update,
    reference: Mapping[str, npt.NDArray[Any] | TensorSpec],
    *,
    max_norm: float | None,
    value_limit: float | None = None,
) -> None:
    """Raise `UpdateRejected` unless ``update`` is a well-formed update for ``reference``.

    ``value_limit`` (exclusive) is the largest magnitude the caller can represent; only
    `layout.VALUE_LIMIT` (the exact accumulator's) or None is supported. Checks run
    cheapest first, so a malformed update is refused before any value is read.
    """
    spec = spec_of(reference)
    check_layout(update, spec)
    stats = {name: tensor_stats(update[name]) for name in spec}
    check_values(update, stats, max_norm=max_norm, value_limit=value_limit)


def check_values(
    update: Update,
    stats: Mapping[str, TensorStats],
    *,
    max_norm: float | None,
    value_limit: float | None,
) -> None:
    """Reject on non-finite values, values beyond ``value_limit`` or a norm over the bound.

    Tensors are judged in sorted name order and the norm last, so the reason reported for
    an update with several faults does not depend on how its statistics were gathered.
    """
    if value_limit not in (None, layout.VALUE_LIMIT):
        raise ValueError(f"value_limit must be None or {layout.VALUE_LIMIT}, not {value_limit}")
    for name in sorted(stats):
        if stats[name].outside:  # rare: find out which kind, with a message to act on
            _check_finite(name, update[name])
            if value_limit is not None:
                _check_range(name, update[name], value_limit)
    if max_norm is not None:
        sums = (s for name in sorted(stats) for s in stats[name].superblock_sumsq)
        norm = math.sqrt(math.fsum(sums))
        if not norm <= max_norm:
            raise UpdateRejected(
                RejectReason.NORM,
                f"update rejected (norm): global L2 norm {norm:.6g} exceeds "
                f"max_norm {max_norm:.6g}",
            )


def check_layout(update: Update, spec: ModelSpec) -> None:
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

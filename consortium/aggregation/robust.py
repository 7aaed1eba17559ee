"""Byzantine-robust aggregation rules: coordinate-wise trimmed mean and median, Krum.

Unlike `StreamingMean`, these rules need every update at once (a coordinate's median
depends on all of its values), so memory grows with the number of updates: the inputs
themselves plus, for one tensor at a time, an ``N x tensor`` float array that is sorted
in place. They are unweighted, as robust rules usually are: a client that reports a
large example count must not gain more influence over the outcome.

Order independence: the coordinate-wise rules first sort each coordinate's N values, so
any input permutation produces bitwise identical sorted arrays, and all later arithmetic
runs on those. Two values that sort as equal are bitwise equal, except +0.0 and -0.0,
which are turned into +0.0 first. Krum scores whole updates with symmetric distances and
breaks ties by content, never by position.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from consortium.aggregation.errors import UpdateRejected
from consortium.aggregation.validate import (
    CHUNK,
    TensorSpec,
    Update,
    flat_chunks,
    spec_of,
    validate_update,
)

Model = dict[str, npt.NDArray[Any]]
Reference = Mapping[str, npt.NDArray[Any] | TensorSpec]


def trimmed_mean(
    updates: Sequence[Update],
    trim_fraction: float,
    *,
    reference: Reference | None = None,
    max_norm: float | None = None,
) -> Model:
    """Per coordinate, drop the ``floor(trim_fraction * N)`` smallest and largest values
    and average the rest (summed in float64, rounded once to the tensor's dtype)."""
    if not 0.0 <= trim_fraction < 0.5:
        raise ValueError(f"trim_fraction must be in [0, 0.5), not {trim_fraction}")
    spec = _validated(updates, reference, max_norm)
    trim = math.floor(trim_fraction * len(updates))
    kept = len(updates) - 2 * trim
    result: Model = {}
    for name, tensor in spec.items():
        ordered = _sorted_stack(updates, name)
        middle = ordered[trim : trim + kept]
        total = np.sum(middle, axis=0, dtype=np.float64)
        result[name] = (total / kept).astype(tensor.dtype)
    return result


def coordinate_median(
    updates: Sequence[Update],
    *,
    reference: Reference | None = None,
    max_norm: float | None = None,
) -> Model:
    """Per coordinate, the median (mean of the two middle values for an even count)."""
    spec = _validated(updates, reference, max_norm)
    n = len(updates)
    result: Model = {}
    for name, tensor in spec.items():
        ordered = _sorted_stack(updates, name)
        if n % 2:
            middle = ordered[n // 2].astype(np.float64)
        else:  # exact in float64 for float32 inputs; numpy's median rounds the same way
            middle = (ordered[n // 2 - 1].astype(np.float64) + ordered[n // 2]) / 2
        result[name] = middle.astype(tensor.dtype)
    return result


def krum(
    updates: Sequence[Update],
    num_byzantine: int,
    *,
    reference: Reference | None = None,
    max_norm: float | None = None,
) -> Model:
    """Krum (Blanchard et al., 2017): the update whose ``N - f - 2`` nearest neighbours
    are closest in squared L2 distance; a copy of it is returned.

    Distances are computed in float64 with a fixed chunked reduction and are symmetric
    bit for bit (``(a - b)**2 == (b - a)**2``); each score sums its sorted distances;
    equal scores are broken by the SHA-256 of the update's bytes, never by position.
    Cost: ``N * (N - 1) / 2`` passes over a model.
    """
    n = len(updates)
    if num_byzantine < 0 or n < 2 * num_byzantine + 3:
        raise ValueError(f"Krum needs N >= 2f + 3 updates; got N={n}, f={num_byzantine}")
    spec = _validated(updates, reference, max_norm)
    distances = np.zeros((n, n), np.float64)
    for i in range(n):
        for j in range(i + 1, n):
            distances[i, j] = distances[j, i] = _squared_distance(updates[i], updates[j], spec)
    neighbours = n - num_byzantine - 2
    scores = []
    for i in range(n):
        others = np.sort(np.delete(distances[i], i))
        scores.append((float(np.sum(others[:neighbours])), _content_key(updates[i], spec), i))
    best = min(scores)[2]
    return {name: np.array(updates[best][name], copy=True) for name in spec}


def _validated(
    updates: Sequence[Update], reference: Reference | None, max_norm: float | None
) -> dict[str, TensorSpec]:
    if not updates:
        raise ValueError("no updates to aggregate")
    spec = spec_of(reference if reference is not None else updates[0])
    for position, update in enumerate(updates):
        try:
            validate_update(update, spec, max_norm=max_norm)
        except UpdateRejected as error:  # say which update, keep the machine-readable parts
            raise UpdateRejected(
                error.reason, f"update #{position}: {error}", tensor=error.tensor
            ) from None
    return spec


def _sorted_stack(updates: Sequence[Update], name: str) -> npt.NDArray[Any]:
    stack = np.stack([update[name] for update in updates])  # N x tensor, one tensor at a time
    np.add(stack, 0.0, out=stack)  # -0.0 + 0.0 == +0.0: one zero, so sorting is canonical
    stack.sort(axis=0)
    return stack


def _squared_distance(a: Update, b: Update, spec: Mapping[str, TensorSpec]) -> float:
    total = 0.0
    diff = np.empty(CHUNK, np.float64)
    for name in spec:
        for left, right in zip(flat_chunks(a[name]), flat_chunks(b[name]), strict=True):
            d = diff[: left.size]
            np.subtract(left, right, out=d, dtype=np.float64)
            np.multiply(d, d, out=d)
            total += float(np.add.reduce(d))
    return total


def _content_key(update: Update, spec: Mapping[str, TensorSpec]) -> str:
    sha = hashlib.sha256()
    for name in spec:
        sha.update(np.ascontiguousarray(update[name]).tobytes())
    return sha.hexdigest()

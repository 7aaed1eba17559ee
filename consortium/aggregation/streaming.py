"""Streaming FedAvg / FedProx weighted mean with a bit-identical result in any arrival order.

FedAvg and FedProx aggregate the same way on the coordinator (FedProx's proximal term
lives in the clients' loss): ``sum(n_i * update_i) / sum(n_i)`` with ``n_i`` the number
of training examples of client ``i``. `StreamingMean` folds updates in one at a time as
they arrive, checks each update's values in the same pass that adds it (taking a rejected
update out again exactly), and keeps a constant number of model-sized buffers (an int64
and an int32 limb, see `exact_sum`) however many clients report.
"""

from __future__ import annotations

import hashlib
import math
import operator
from collections.abc import Iterable, Mapping
from typing import Any

import numpy.typing as npt

from consortium.aggregation.errors import EmptyAggregateError, RejectReason, UpdateRejected
from consortium.aggregation.exact_sum import MAX_TOTAL_WEIGHT, MAX_WEIGHT, VALUE_LIMIT, ExactSum
from consortium.aggregation.validate import (
    TensorSpec,
    Update,
    check_layout,
    check_values,
    spec_of,
)


class StreamingMean:
    """Deterministic weighted mean of validated updates.

    ``add(update, weight)`` either accepts the update or raises `UpdateRejected` and
    leaves the state exactly as it was. ``result()`` may be called any number of times
    and does not end the stream; ``finish()`` ends it and returns the mean without
    allocating a new model. The result depends only on the multiset of accepted
    (update, weight) pairs, never on their order; see `exact_sum` for the error bound.
    """

    def __init__(
        self,
        reference_spec: Mapping[str, npt.NDArray[Any] | TensorSpec],
        *,
        max_norm: float | None = None,
    ) -> None:
        if max_norm is not None and not (math.isfinite(max_norm) and max_norm > 0):
            raise ValueError(f"max_norm must be a positive finite number or None, not {max_norm}")
        self.spec = spec_of(reference_spec)  # shapes and dtypes only; no reference values kept
        self.max_norm = max_norm
        self._sum = ExactSum(self.spec)
        self._count = 0
        self._total_weight = 0

    @property
    def count(self) -> int:
        """Number of accepted updates."""
        return self._count

    @property
    def total_weight(self) -> int:
        return self._total_weight

    @property
    def nbytes(self) -> int:
        """Bytes of array memory held; does not grow with the number of updates."""
        return self._sum.nbytes

    def add(self, update: Update, weight: int) -> None:
        """Validate ``update`` and fold ``weight * update`` into the sum."""
        rejected = self.add_many([(update, weight)])
        if rejected:
            raise rejected[0][1]

    def add_many(self, pairs: Iterable[tuple[Update, int]]) -> list[tuple[int, UpdateRejected]]:
        """Validate every ``(update, weight)`` pair and fold in the accepted ones.

        Returns ``(position, error)`` for each rejected pair; the state is then exactly
        what `add` on each accepted pair would give. Faster than `add` in a loop when the
        caller already holds several updates (as a Flower strategy does): the sum is
        updated block by block for all of them, so its memory is read and written once.
        """
        pairs = list(pairs)
        rejected: list[tuple[int, UpdateRejected]] = []
        candidates: list[tuple[int, Update, int]] = []
        total = self._total_weight
        for position, (update, weight) in enumerate(pairs):
            try:
                checked = _check_weight(weight, total)
                check_layout(update, self.spec)
            except UpdateRejected as error:
                if error.reason == RejectReason.WEIGHT and _fits_alone(weight, self._total_weight):
                    # Over capacity only because of earlier updates in this batch, which
                    # may yet be rejected: decide one by one, as `add` would.
                    return self._add_one_by_one(pairs)
                rejected.append((position, error))
                continue
            candidates.append((position, update, checked))
            total += checked
        added = [(update, weight) for _, update, weight in candidates]
        stats = self._sum.add_many(added)
        taken_out: list[tuple[Update, int]] = []
        for (position, update, weight), update_stats in zip(candidates, stats, strict=True):
            try:
                check_values(update, update_stats, max_norm=self.max_norm, value_limit=VALUE_LIMIT)
            except UpdateRejected as error:
                rejected.append((position, error))
                taken_out.append((update, weight))
                continue
            self._count += 1
            self._total_weight += weight
        self._sum.subtract(taken_out)
        return sorted(rejected, key=operator.itemgetter(0))

    def _add_one_by_one(self, pairs: list[tuple[Update, int]]) -> list[tuple[int, UpdateRejected]]:
        rejected = []
        for position, pair in enumerate(pairs):
            rejected += [(position, error) for _, error in self.add_many([pair])]
        return rejected

    def result(self) -> dict[str, npt.NDArray[Any]]:
        """The weighted mean, with each tensor in its reference dtype."""
        if self._count == 0:
            raise EmptyAggregateError("no update has been accepted yet; nothing to average")
        return self._sum.mean(self._total_weight)

    def finish(self) -> dict[str, npt.NDArray[Any]]:
        """The weighted mean, written over the accumulator's own memory; ends the stream.

        Read `digest` first if it is needed: afterwards only the returned arrays remain.
        """
        if self._count == 0:
            raise EmptyAggregateError("no update has been accepted yet; nothing to average")
        return self._sum.finish(self._total_weight)

    def digest(self) -> str:
        """SHA-256 of the aggregate's value (exact sum and total weight).

        Equal digests mean equal results; the update count is deliberately left out, so
        adding an update once with weight 3 or three times with weight 1 digests alike.
        """
        state = f"{self._sum.digest()}:{self._total_weight}"
        return hashlib.sha256(state.encode()).hexdigest()


def _check_weight(weight: int, total_weight: int) -> int:
    # bool is an int subclass, but True as an example count is almost surely a bug.
    if isinstance(weight, bool | float):
        raise UpdateRejected(RejectReason.WEIGHT, _weight_message(weight, "must be an int"))
    try:
        value = operator.index(weight)  # int and numpy integer types
    except TypeError:
        raise UpdateRejected(
            RejectReason.WEIGHT, _weight_message(weight, "must be an int")
        ) from None
    if not 1 <= value <= MAX_WEIGHT:
        raise UpdateRejected(
            RejectReason.WEIGHT, _weight_message(weight, f"must be in [1, {MAX_WEIGHT}]")
        )
    if total_weight + value > MAX_TOTAL_WEIGHT:
        raise UpdateRejected(
            RejectReason.WEIGHT,
            _weight_message(
                weight,
                f"would bring the total weight above {MAX_TOTAL_WEIGHT}, the capacity of the "
                "exact accumulator; aggregate in smaller rounds or scale the weights down",
            ),
        )
    return value


def _fits_alone(weight: int, total_weight: int) -> bool:
    try:
        _check_weight(weight, total_weight)
    except UpdateRejected:
        return False
    return True


def _weight_message(weight: object, problem: str) -> str:
    return f"update rejected (weight): weight {weight!r} {problem}"

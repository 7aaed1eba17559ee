"""Typed errors of the aggregation core.

`UpdateRejected` carries a machine-readable `reason` so the coordinator can count,
log and report rejections without parsing messages. It is both a `ValueError` (what a
caller of a pure function expects) and an `InvalidArgumentError` (so the API layer maps
it to INVALID_ARGUMENT without a special case).
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any

from consortium.errors import ConflictError, InvalidArgumentError


class RejectReason(StrEnum):
    """Why an update was refused; the values are stable strings for logs and metrics."""

    NAMES = "names"  # tensor names differ from the reference (missing or extra)
    SHAPE = "shape"  # a tensor's shape differs from the reference
    DTYPE = "dtype"  # a tensor's dtype differs, or is not float32/float64
    NON_FINITE = "non_finite"  # NaN or +-inf somewhere
    NORM = "norm"  # global L2 norm above the configured bound
    RANGE = "range"  # a value the exact accumulator cannot represent
    WEIGHT = "weight"  # weight not an integer in range, or total weight capacity used up


class UpdateRejected(InvalidArgumentError, ValueError):  # noqa: N818 - name fixed by the API
    """An update failed validation; nothing was changed by the call that raised it."""

    def __init__(self, reason: RejectReason, message: str, *, tensor: str | None = None) -> None:
        super().__init__(message)
        self.reason = reason
        self.tensor = tensor

    def __reduce__(self) -> tuple[Any, ...]:
        # The default pickling calls cls(message) and would fail; errors may cross
        # process boundaries (Ray workers, Flower child processes).
        return (type(self), (self.reason, str(self)), {"tensor": self.tensor})


class EmptyAggregateError(ConflictError):
    """A result was asked for before any update was accepted."""

"""Aggregation core: update validation, exact streaming weighted mean, robust rules.

See docs/aggregation.md for the method, its error bound and its memory use.
"""

from __future__ import annotations

from consortium.aggregation.errors import EmptyAggregateError, RejectReason, UpdateRejected
from consortium.aggregation.exact_sum import (
    MAX_TOTAL_WEIGHT,
    MAX_WEIGHT,
    QUANTUM,
    VALUE_LIMIT,
    ExactSum,
)
from consortium.aggregation.robust import coordinate_median, krum, trimmed_mean
from consortium.aggregation.streaming import StreamingMean
from consortium.aggregation.validate import TensorSpec, spec_of, validate_update

__all__ = [
    "MAX_TOTAL_WEIGHT",
    "MAX_WEIGHT",
    "QUANTUM",
    "VALUE_LIMIT",
    "EmptyAggregateError",
    "ExactSum",
    "RejectReason",
    "StreamingMean",
    "TensorSpec",
    "UpdateRejected",
    "coordinate_median",
    "krum",
    "spec_of",
    "trimmed_mean",
    "validate_update",
]

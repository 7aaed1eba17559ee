"""Why an update is refused, as the stable strings logs, provenance and metrics use.

Admission's reasons (`admission.py`), the strategy's one (`strategy.py`: a second
update of one institution in a round) and the aggregation core's validation
(`consortium.aggregation.RejectReason`). Kept apart from those modules so the
coordinator's metrics can list them at scrape time without importing Flower.
"""

from __future__ import annotations

from consortium.aggregation.errors import RejectReason

ADMISSION_REASONS = (
    "client_error",
    "unsigned",
    "malformed",
    "unknown_key",
    "stale",
    "bad_signature",
    "digest_mismatch",
    "weight_mismatch",
    "bad_metrics",
    "inflated_count",
    "uncosigned",
    "bad_cosignature",
    "replayed",
)
DUPLICATE = "duplicate"  # a second update of one institution in one round
# Admitted in an attempt of a round that had fewer accepted updates than min_clients:
# that attempt does not count, and the round is sent again.
RETRIED = "round_retried"

UPDATE_REJECT_REASONS = (
    *ADMISSION_REASONS,
    DUPLICATE,
    RETRIED,
    *(r.value for r in RejectReason),
)

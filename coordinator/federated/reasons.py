"""Why an update is refused, as the stable strings logs, provenance and metrics use.

Admission's reasons (`admission.py`), the strategy's (`strategy.py`: a second
update of one institution in a round, an update signed for another institution than
its node's) and the aggregation core's validation
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
# A reply signed for another institution than the one its node was onboarded for
# (fine-tuning: coordinator/federated/strategy.py; federated pretraining:
# coordinator/federated/diloco_sites.py).
IMPERSONATION = "impersonation"
# How a refused federated pretraining reply is written in its step's `workers_lost`
# (the `outer_step` record), which the metrics read back with `refused_reason`.
REFUSED_PREFIX = "update refused ("


def refused(reason: str, detail: str) -> str:
    return f"{REFUSED_PREFIX}{reason}): {detail}"


def refused_reason(lost: str) -> str | None:
    """The reason of a `refused` text; None for any other loss (a crash, a timeout)."""
    if not lost.startswith(REFUSED_PREFIX):
        return None
    reason, closed, _ = lost[len(REFUSED_PREFIX) :].partition(")")
    return reason if closed else None


# Admitted in an attempt of a round that had fewer accepted updates than min_clients:
# that attempt does not count, and the round is sent again.
RETRIED = "round_retried"

UPDATE_REJECT_REASONS = (
    *ADMISSION_REASONS,
    DUPLICATE,
    IMPERSONATION,
    RETRIED,
    *(r.value for r in RejectReason),
)

"""`coordinator replay JOB` (a federated job) replays a round only with the aggregation
rule the round names.

The attack: a log whose signer claims a robust rule that no code has ("krum-v2": rounds
that look protected against poisoning) while it aggregated by the plain mean. The
aggregation core takes any name it does not know for the mean, so the replay reproduced
the mean and reported the round as reproduced bit for bit under the claimed rule. A rule
this code does not have is refused, naming it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from consortium.errors import ConflictError
from consortium.provenance.records import Record, parse_body
from consortium.tensor_digest import arrays_digest
from coordinator.federated.replay import replay_rounds
from coordinator.federated.retention import retain
from coordinator.federated.strategy import AggregationRule, aggregate

JOB = "job-1"
UPDATE = {"w": np.array([1.0, 2.0, 3.0], np.float32)}
MEAN = arrays_digest(aggregate(AggregationRule("mean"), UPDATE, [(UPDATE, 10)]))


def round_with_rule(rule: str) -> list[Record]:
    """One round: one retained update, aggregated by the mean, logged under `rule`."""
    body: dict[str, Any] = {
        "job_id": JOB,
        "round": 1,
        "global_digest": "0" * 64,
        "participants": ["aurora"],
        "updates": [
            {
                "institution": "aurora",
                "node_id": "1",
                "accepted": True,
                "key_id": "k" * 64,
                "update_digest": arrays_digest(UPDATE),
                "num_examples": 10,
                "nonce": "00",
                "signature": "c2ln",
            }
        ],
        "aggregation": {"rule": rule},
        "aggregate_digest": MEAN,
    }
    return [parse_body("round", body)]


def test_a_round_logged_under_a_rule_no_code_has_is_not_reported_reproduced(
    tmp_path: Path,
) -> None:
    retain(tmp_path, JOB, 1, arrays_digest(UPDATE), UPDATE, 10)

    with pytest.raises(ConflictError, match="aggregation rule 'krum-v2'"):
        replay_rounds(tmp_path, JOB, round_with_rule("krum-v2"))


def test_a_round_logged_under_the_rule_it_used_replays(tmp_path: Path) -> None:
    retain(tmp_path, JOB, 1, arrays_digest(UPDATE), UPDATE, 10)

    [result] = replay_rounds(tmp_path, JOB, round_with_rule("mean"))

    assert result.matches

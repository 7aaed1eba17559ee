"""`coordinator replay JOB` (a federated job) against a log its signer crafted: whoever
holds the coordinator's key (and the CA's, to bind an institution key of its making)
can write any round.

- A rule no code has: a round claiming a robust rule ("krum-v2": rounds that look
  protected against poisoning) while it aggregated by the plain mean. The aggregation
  core takes any name it does not know for the mean, so the replay reproduced the mean
  and reported the round reproduced under the claimed rule. Such a rule is refused.
- A digest that is a path: an accepted update whose digest is "/x" or "../../x". The
  replay turned the logged digest into the retained file's name, so it opened
  `<path>.safetensors` anywhere on the reviewer's machine. A digest is a sha256, and
  nothing else becomes a file name.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
from safetensors.numpy import save_file

from consortium.errors import ConflictError
from consortium.provenance.records import Record, parse_body
from consortium.tensor_digest import arrays_digest
from coordinator.federated import replay as federated_replay
from coordinator.federated.replay import ReplayMismatchError, replay_rounds
from coordinator.federated.retention import load_retained, retain
from coordinator.federated.strategy import AggregationRule, aggregate

JOB = "job-1"
WEIGHTS = {"w": np.array([1.0, 2.0, 3.0], np.float32)}
MEAN = arrays_digest(aggregate(AggregationRule("mean"), WEIGHTS, [(WEIGHTS, 10)]))


def logged_round(digest: str = arrays_digest(WEIGHTS), rule: str = "mean") -> list[Record]:
    """One round, as a verified log yields it: one accepted update with `digest`,
    aggregated by the mean and logged under `rule`."""
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
                "update_digest": digest,
                "num_examples": 10,
                "nonce": "00",
                "signature": "c2ln",
            }
        ],
        "aggregation": {"rule": rule},
        "aggregate_digest": MEAN,
    }
    return [parse_body("round", body)]


@pytest.fixture
def opened(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """Every file the replay loads as a retained update."""
    paths: list[Path] = []

    def spy(path: Path) -> dict[str, npt.NDArray[Any]]:
        paths.append(path)
        return load_retained(path)

    monkeypatch.setattr(federated_replay, "load_retained", spy)
    return paths


def test_a_round_logged_under_a_rule_no_code_has_is_not_reported_reproduced(
    tmp_path: Path,
) -> None:
    retain(tmp_path, JOB, 1, arrays_digest(WEIGHTS), WEIGHTS, 10)

    with pytest.raises(ConflictError, match="aggregation rule 'krum-v2'"):
        replay_rounds(tmp_path, JOB, logged_round(rule="krum-v2"))


@pytest.mark.parametrize("relative", [False, True], ids=["absolute", "dot-dot"])
def test_a_logged_digest_that_is_a_path_opens_nothing_outside_the_data_dir(
    tmp_path: Path, opened: list[Path], relative: bool
) -> None:
    data_dir = tmp_path / "data"
    (data_dir / "provenance" / "updates" / JOB / "1").mkdir(parents=True)  # as retention left it
    outside = tmp_path / "elsewhere" / "secret"
    outside.parent.mkdir()
    save_file(WEIGHTS, str(outside.with_suffix(".safetensors")))
    # data/provenance/updates/job-1/1/ -> five levels up is tmp_path
    digest = "../../../../../elsewhere/secret" if relative else str(outside)

    with pytest.raises(ReplayMismatchError, match="not a sha256"):
        replay_rounds(data_dir, JOB, logged_round(digest))
    assert opened == []


def test_a_round_under_the_rule_it_used_with_its_retained_update_replays(
    tmp_path: Path, opened: list[Path]
) -> None:
    retain(tmp_path, JOB, 1, arrays_digest(WEIGHTS), WEIGHTS, 10)

    [result] = replay_rounds(tmp_path, JOB, logged_round())

    assert result.matches and result.updates == 1
    assert [path.parent.parent.parent.parent.parent for path in opened] == [tmp_path]

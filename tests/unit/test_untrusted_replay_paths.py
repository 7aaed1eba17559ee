"""`coordinator replay JOB` (a federated job) opens only retained updates in the data
dir, whatever the log names.

The attack: a log whose signer (who holds the coordinator's key, and the CA's to bind an
institution key of its making) records an accepted update whose digest is a path, "/x"
or "../../x". The replay turned the logged digest into the retained file's name, so it
opened `<path>.safetensors` anywhere on the reviewer's machine (a path joined to an
absolute one is that absolute path). A digest is a sha256 and nothing else becomes a
file name.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
from safetensors.numpy import save_file

from consortium.provenance.records import Record, parse_body
from consortium.tensor_digest import arrays_digest
from coordinator.federated import replay as federated_replay
from coordinator.federated.replay import ReplayMismatchError, replay_rounds
from coordinator.federated.retention import load_retained, retain

JOB = "job-1"
WEIGHTS = {"w": np.ones(3, np.float32)}


def round_naming(digest: str) -> list[Record]:
    """One round whose one accepted update has `digest`, as a verified log yields it."""
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
        "aggregate_digest": arrays_digest(WEIGHTS),
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
        replay_rounds(data_dir, JOB, round_naming(digest))
    assert opened == []


def test_a_retained_update_named_by_its_digest_still_replays(
    tmp_path: Path, opened: list[Path]
) -> None:
    digest = arrays_digest(WEIGHTS)
    retain(tmp_path, JOB, 1, digest, WEIGHTS, 10)

    [result] = replay_rounds(tmp_path, JOB, round_naming(digest))

    assert result.matches and result.updates == 1
    assert [path.parent.parent.parent.parent.parent for path in opened] == [tmp_path]

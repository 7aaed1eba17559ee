"""Members send correctly signed but dishonest updates; none fails the job or moves the
model (issue 13, item 5).

Against a real mutual-TLS `coordinator serve`: alpha runs the installed client; beta
and gamma run a modified one (`modified_client.py`) whose replies their own keys sign.
Beta reports a NaN training loss (it used to make the ServerApp raise while logging
the round, failing the job); gamma claims 100000 examples against the few hundred it
declared when it joined (it used to take over 99% of the round's weight); alpha also
tries to run a second node with the same keys. Each such
update is refused with its reason in the round's provenance record, logged with the
institution's name and counted; the job completes on alpha's updates alone.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from consortium.proto.v1 import jobs_pb2
from consortium.provenance.log import read_lines
from consortium.provenance.records import Round, parse_record
from coordinator.data_dir import DataDir
from coordinator.demo import write_partitions
from tests.conftest import Processes
from tests.helpers import FINAL_STATES, local_consortium, metric_value, wait_for
from tests.security.modified_client import ATTACK_ENV, INFLATED_COUNT, NAN_LOSS

ATTACKS = {"alpha": None, "beta": NAN_LOSS, "gamma": INFLATED_COUNT}
JOB = """\
name = "attacked"
model = "digits-cnn"
dataset = "digits"
rounds = 2
min_clients = 3
local_epochs = 1
"""


@dataclass
class AttackedJob:
    root: Path
    data_dir: Path
    job: jobs_pb2.Job
    rounds: list[Round]
    twin_exit_code: int | None
    twin_supernode_log: str


@pytest.fixture(scope="module")
def attacked_job(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AttackedJob]:
    root = tmp_path_factory.mktemp("update-attacks")
    processes = Processes(root / "logs")
    try:
        consortium = local_consortium(processes, root)
        consortium.init()
        consortium.serve()
        for name in ATTACKS:
            consortium.onboard(name)
        consortium.wait_for_supernode_keys()
        for (name, attack), data in zip(
            ATTACKS.items(), write_partitions(root, list(ATTACKS)), strict=True
        ):
            if attack is None:
                consortium.join(name, data)
                continue
            consortium.start(
                f"client-{name}",
                "python",
                "-m",
                "tests.security.modified_client",
                "join",
                "--bundle",
                str(consortium.bundle_dir(name)),
                "--data",
                str(data),
                "--state-dir",
                str(consortium.state_dir(name)),
                "--no-ray",
                env={ATTACK_ENV: attack},
            )
        consortium.wait_for_online(len(ATTACKS))
        # alpha also starts a second node from a copy of its state dir (same keys), in
        # the hope of two updates per round: Flower admits one node per SuperNode key.
        twin_state = root / "alpha-twin-state"
        shutil.copytree(consortium.state_dir("alpha"), twin_state)
        twin = consortium.start(
            "client-alpha-twin",
            "client",
            "join",
            "--bundle",
            str(consortium.bundle_dir("alpha")),
            "--data",
            str(root / "institutions" / "alpha" / "data"),
            "--state-dir",
            str(twin_state),
            "--no-ray",
        )
        wait_for("alpha's second node to give up", lambda: twin.poll() is not None, 120)
        with consortium.connect() as remote:
            job = remote.submit(JOB)
            final = None
            for event in remote.watch(job.job_id):
                if event.HasField("job") and event.job.state in FINAL_STATES:
                    final = event.job
            assert final is not None, "the watch stream ended before the job did"
        entries = [json.loads(line) for line in read_lines(consortium.paths.provenance_log)]
        records = [parse_record(e) for e in entries if e.get("type") == "round"]
        yield AttackedJob(
            root,
            consortium.data_dir,
            final,
            [r for r in records if isinstance(r, Round)],
            twin.poll(),
            (twin_state / "supernode.log").read_text(errors="replace"),
        )
    finally:
        processes.stop_all()


def test_the_job_completes_on_the_honest_institutions_updates(attacked_job: AttackedJob) -> None:
    assert attacked_job.job.state == jobs_pb2.JOB_STATE_SUCCEEDED, attacked_job.job.message
    assert [r.round for r in attacked_job.rounds] == [1, 2]
    for round_ in attacked_job.rounds:
        accepted = [u.institution for u in round_.updates if u.accepted]
        assert accepted == ["alpha"], round_.updates


def test_a_second_node_of_one_institution_cannot_join_flower(attacked_job: AttackedJob) -> None:
    """One update per institution per round: Flower activates one node per registered
    SuperNode key (one per institution, kept so by the coordinator's key sync), and the
    ServerApp refuses a second update of an institution in a round (`duplicate`, proven
    in tests/unit/test_update_admission.py)."""
    assert attacked_job.twin_exit_code not in (None, 0)
    assert "Failed to activate SuperNode" in attacked_job.twin_supernode_log
    for round_ in attacked_job.rounds:
        assert [u.institution for u in round_.updates].count("alpha") == 1


@pytest.mark.parametrize(
    ("institution", "reason"), [("beta", "bad_metrics"), ("gamma", "inflated_count")]
)
def test_each_dishonest_update_is_refused_recorded_logged_and_counted(
    attacked_job: AttackedJob, institution: str, reason: str
) -> None:
    for round_ in attacked_job.rounds:
        (update,) = [u for u in round_.updates if u.institution == institution]
        assert not update.accepted
        assert update.reason == reason
    log = DataDir(attacked_job.data_dir).log_file("superlink").read_text(errors="replace")
    assert f"({institution}): {reason}" in log
    rejected = metric_value(
        attacked_job.data_dir, "consortium_updates_rejected_total", {"reason": reason}
    )
    assert rejected == len(attacked_job.rounds)

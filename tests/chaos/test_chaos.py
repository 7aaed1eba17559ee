"""A short seeded chaos run in CI (issue 15): a federated job completes with every round
logged exactly once while its coordinator, SuperLink, ServerApp, a site's SuperNode and
a site's `client join` are killed with SIGKILL at seeded moments; the log verifies, the
aggregates replay, and no process outlives the run. benchmarks/chaos.py runs long ones.
"""

from __future__ import annotations

from pathlib import Path

from tests.chaos.driver import TARGETS, ChaosRun
from tests.conftest import Processes

SEED = 15
FAULTS = 6
ROUNDS = 8


def test_a_federated_job_survives_seeded_kills_with_every_round_exactly_once(
    tmp_path: Path, processes: Processes
) -> None:
    chaos = ChaosRun(tmp_path, processes, seed=SEED, faults=FAULTS, rounds=ROUNDS, say=print)
    report = chaos.run()
    chaos.stop_and_count_leftovers(report)

    assert report.faults[0].target == "coordinator" and report.faults[0].after_round >= 2
    assert {fault.target for fault in report.faults} == set(TARGETS), report.faults
    assert report.recoveries >= 1
    assert report.job is not None
    assert report.job.state.value == "succeeded", report.job.message
    assert report.logged_rounds == list(range(1, ROUNDS + 1))  # none lost, none twice
    assert report.rounds_lost == 0 and report.rounds_twice == 0
    assert report.verify_ok
    assert report.replay is not None and report.replay.returncode == 0, report.replay.stderr
    assert report.left_running == []

"""SqliteStateStore: the shared contract, plus what only a file can do (reopen after a
restart, two stores and two processes on one file, WAL mode)."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from consortium.errors import ConflictError
from coordinator.state import JobState, RoundRecord, SqliteStateStore, StateStore
from tests.unit.state.contract import StateTest, make_job, make_node

SUBPROCESS_TIMEOUT_S = 120


class TestSqliteStateStore(StateTest):
    def state_factory(self, tmp_path: Path) -> StateStore:
        return SqliteStateStore(tmp_path / "data" / "state.db")


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "data" / "state.db"


@pytest.fixture
def store(db_path: Path) -> Iterator[SqliteStateStore]:
    s = SqliteStateStore(db_path)
    try:
        yield s
    finally:
        s.close()


def test_reopen_same_file_after_close_keeps_all_data(db_path: Path) -> None:
    first = SqliteStateStore(db_path)
    first.add_node(make_node())
    first.add_job(make_job())
    first.update_job("j1", state=JobState.RUNNING, started_at_ms=5)
    first.record_round(RoundRecord("j1", 1, participants=2, metrics={"acc": 0.5}))
    node, job = first.get_node("n1"), first.get_job("j1")
    rounds, events = first.list_rounds("j1"), first.events_after("j1", 0)
    first.close()

    second = SqliteStateStore(db_path)
    try:
        assert second.get_node("n1") == node
        assert second.get_job("j1") == job
        assert second.list_rounds("j1") == rounds
        assert second.events_after("j1", 0) == events
        # Sequences keep growing after a restart.
        second.update_job("j1", state=JobState.SUCCEEDED)
        new = second.events_after("j1", events[-1].sequence)
        assert len(new) == 1
        assert new[0].sequence > events[-1].sequence
    finally:
        second.close()


def test_two_stores_same_file_see_each_others_writes(db_path: Path) -> None:
    coordinator = SqliteStateStore(db_path)
    server_app = SqliteStateStore(db_path)
    try:
        coordinator.add_job(make_job())
        assert server_app.get_job("j1").state is JobState.QUEUED

        server_app.record_round(RoundRecord("j1", 1, participants=3))
        assert coordinator.get_job("j1").rounds_completed == 1
        assert [r.round for r in coordinator.list_rounds("j1")] == [1]
        assert [e.kind for e in coordinator.events_after("j1", 0)] == ["job", "round"]

        coordinator.update_job("j1", state=JobState.CANCELLED)
        assert server_app.get_job("j1").state is JobState.CANCELLED

        with pytest.raises(ConflictError):
            server_app.update_job(
                "j1", state=JobState.RUNNING, expect_states=frozenset({JobState.QUEUED})
            )
    finally:
        server_app.close()
        coordinator.close()


def test_round_written_by_another_process_seen_by_this_one(store: SqliteStateStore) -> None:
    """The ServerApp runs in its own process and writes rounds into serve's file."""
    store.add_job(make_job())
    writer = (
        "import sys\n"
        "from pathlib import Path\n"
        "from coordinator.state import RoundRecord, SqliteStateStore\n"
        "s = SqliteStateStore(Path(sys.argv[1]))\n"
        "s.record_round(RoundRecord('j1', 1, participants=4, metrics={'loss': 0.25}))\n"
        "s.update_job('j1', state='succeeded', finished_at_ms=9)\n"
        "s.close()\n"
    )
    subprocess.run(
        [sys.executable, "-c", writer, str(store.path)],
        check=True,
        timeout=SUBPROCESS_TIMEOUT_S,
    )
    job = store.get_job("j1")
    assert (job.state, job.rounds_completed, job.finished_at_ms) == (JobState.SUCCEEDED, 1, 9)
    assert store.list_rounds("j1") == [RoundRecord("j1", 1, participants=4, metrics={"loss": 0.25})]
    assert [e.kind for e in store.events_after("j1", 0)] == ["job", "round", "job"]


def test_database_file_uses_write_ahead_log(store: SqliteStateStore) -> None:
    """WAL lets serve read while a ServerApp process writes; the mode is kept in the file."""
    store.add_node(make_node())
    other = sqlite3.connect(store.path)
    try:
        assert other.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    finally:
        other.close()

"""InMemoryStateStore passes the same contract as the SQLite store."""

from __future__ import annotations

from pathlib import Path

from coordinator.state import InMemoryStateStore, StateStore
from tests.unit.state.contract import StateTest, make_job


class TestInMemoryStateStore(StateTest):
    def state_factory(self, tmp_path: Path) -> StateStore:
        return InMemoryStateStore()


def test_close_then_use_again_keeps_data() -> None:
    """close() has nothing to release; a test may keep reading what a component wrote."""
    store = InMemoryStateStore()
    store.add_job(make_job())
    store.close()
    assert store.get_job("j1") == make_job()

"""The supervisor's decisions, one `check()` at a time, on a fake clock (issue 19)."""

from __future__ import annotations

import logging

import pytest

from consortium.supervision import ChildState, RestartPolicy, Supervisor
from tests.unit.supervision_fakes import Clock, FakeChild

MAX_RESTARTS = 3
POLICY = RestartPolicy(
    initial_backoff_s=1.0, max_backoff_s=8.0, max_restarts=MAX_RESTARTS, window_s=60.0
)


def supervised(child: FakeChild, clock: Clock) -> tuple[Supervisor, list[str]]:
    counted: list[str] = []
    return Supervisor([child], POLICY, on_restart=counted.append, clock=clock), counted


def test_a_dead_child_is_restarted_after_its_backoff_logged_and_counted(
    caplog: pytest.LogCaptureFixture,
) -> None:
    child, clock = FakeChild(), Clock()
    supervisor, counted = supervised(child, clock)
    supervisor.check()
    assert supervisor.status()[0].state is ChildState.RUNNING and child.restarts == 0

    child.code = -9
    with caplog.at_level(logging.WARNING):
        supervisor.check()
    status = supervisor.status()[0]
    assert status.state is ChildState.RESTARTING and status.last_exit_code == -9
    assert "exited with code -9" in caplog.text and "last line of its log" in caplog.text
    clock.now += 0.5
    supervisor.check()
    assert child.restarts == 0  # still waiting out the first backoff
    clock.now += 0.6
    supervisor.check()
    assert child.restarts == 1 and counted == ["superlink"]
    status = supervisor.status()[0]
    assert (status.state, status.restarts, status.detail) == (ChildState.RUNNING, 1, "")


def test_each_restart_within_the_window_doubles_the_wait() -> None:
    child, clock = FakeChild(), Clock()
    supervisor, _ = supervised(child, clock)
    waits: list[float] = []
    for _ in range(3):
        child.code = 1
        supervisor.check()
        died_at = clock.now
        while child.code is not None:
            clock.now += 0.25
            supervisor.check()
        waits.append(clock.now - died_at)
    assert waits == [1.0, 2.0, 4.0]


def test_a_restart_that_raises_counts_and_is_tried_again_later() -> None:
    child, clock = FakeChild(), Clock()
    supervisor, counted = supervised(child, clock)
    child.code, child.fail_next_restarts = 1, 1
    supervisor.check()
    clock.now += 1.0
    supervisor.check()
    status = supervisor.status()[0]
    assert status.state is ChildState.RESTARTING and "port 9092 is held" in status.detail
    clock.now += 2.0
    supervisor.check()
    assert supervisor.status()[0].state is ChildState.RUNNING
    assert child.restarts == 2 and counted == ["superlink", "superlink"]


def test_too_many_restarts_within_the_window_leave_it_failed_and_alone() -> None:
    child, clock = FakeChild(), Clock()
    supervisor, counted = supervised(child, clock)
    for _ in range(MAX_RESTARTS):
        child.code = 1
        supervisor.check()
        clock.now += POLICY.max_backoff_s
        supervisor.check()
    child.code = 1
    supervisor.check()
    status = supervisor.status()[0]
    assert status.state is ChildState.FAILED and "gave up after 3 restarts" in status.detail
    assert supervisor.failed() == ["superlink"]
    clock.now += 3600.0
    supervisor.check()
    assert child.restarts == MAX_RESTARTS and len(counted) == MAX_RESTARTS


def test_restarts_older_than_the_window_are_forgotten() -> None:
    child, clock = FakeChild(), Clock()
    supervisor, _ = supervised(child, clock)
    for _ in range(MAX_RESTARTS):
        child.code = 1
        supervisor.check()
        clock.now += POLICY.max_backoff_s
        supervisor.check()
        clock.now += POLICY.window_s + 1.0  # then it ran for longer than the window
    child.code = 1
    supervisor.check()
    status = supervisor.status()[0]
    assert status.state is ChildState.RESTARTING and "restarting in 1 s" in status.detail


def test_children_are_supervised_independently() -> None:
    superlink, ray_head, clock = FakeChild("superlink"), FakeChild("Ray head"), Clock()
    supervisor = Supervisor([superlink, ray_head], POLICY, clock=clock)
    ray_head.code = 1
    supervisor.check()
    states = {s.name: s.state for s in supervisor.status()}
    assert states == {"superlink": ChildState.RUNNING, "Ray head": ChildState.RESTARTING}


def test_a_policy_without_a_limit_keeps_restarting_at_the_longest_wait() -> None:
    child, clock = FakeChild(), Clock()
    policy = RestartPolicy(initial_backoff_s=1.0, max_backoff_s=4.0, max_restarts=None)
    supervisor = Supervisor([child], policy, clock=clock)
    for _ in range(20):
        child.code = 1
        supervisor.check()
        clock.now += policy.max_backoff_s
        supervisor.check()
    assert child.restarts == 20 and supervisor.failed() == []


def test_down_reason_names_the_state_and_why_until_it_runs_again() -> None:
    child, clock = FakeChild(), Clock()
    supervisor, _ = supervised(child, clock)
    assert supervisor.down_reason("superlink") is None
    child.code = -9
    supervisor.check()
    reason = supervisor.down_reason("superlink")
    assert reason is not None and reason.startswith("waiting: the superlink is restarting")
    assert "exited with code -9" in reason
    clock.now += 1.0
    supervisor.check()
    assert supervisor.down_reason("superlink") is None


def test_refusals_in_a_row_fail_the_child_at_once_and_one_success_forgives_them() -> None:
    child, clock = FakeChild("supernode"), Clock()
    policy = RestartPolicy(max_restarts=None, max_refusals=3)
    supervisor = Supervisor([child], policy, clock=clock)
    child.refused = "the SuperLink refused to activate it"
    for _ in range(2):
        child.code = 1
        supervisor.check()
        clock.now += 60.0
        supervisor.check()
    child.refused = None  # a death that is no refusal starts the count again
    child.code = 1
    supervisor.check()
    clock.now += 60.0
    supervisor.check()
    child.refused = "the SuperLink refused to activate it"
    for _ in range(2):
        child.code = 1
        supervisor.check()
        clock.now += 60.0
        supervisor.check()
    assert supervisor.failed() == []
    child.code = 1
    supervisor.check()
    status = supervisor.status()[0]
    assert status.state is ChildState.FAILED and supervisor.failed() == ["supernode"]
    assert "refused to activate it (3 times in a row)" in status.detail

"""`DriverProcessEngine`: a pretraining run's Ray driver lives in a child process, so the
coordinator hears its steps and its end over a pipe and survives its crash.

The children here run stand-in drivers (module-level functions, so a spawned child can
import them) that speak the driver's protocol without a Ray cluster; the real driver runs
in the pretraining integration tests."""

from __future__ import annotations

import multiprocessing
import threading
from pathlib import Path

import psutil
import pytest

from coordinator.jobs.spec import parse_submitted_spec
from coordinator.pretraining import ControllerState, PretrainJobSpec
from coordinator.pretraining.api import PretrainResult
from coordinator.pretraining.driver import STOP, DriverRequest
from coordinator.pretraining.engine import DriverProcessEngine, DriverTarget
from coordinator.pretraining.errors import DriverDiedError, PretrainFailedError
from coordinator.pretraining.records import OuterStepRecord
from coordinator.ray.head import RayCluster
from tests.helpers import TINY_PRETRAIN
from tests.pretrain_drivers import (
    WAIT,
    crashes_after_a_step,
    fails,
    ignores_stop,
    step_record,
    stops_when_asked,
    waits_for_stop,
    waits_steps_and_finishes,
)

_SPEC = parse_submitted_spec(
    'name = "tiny"\n' + TINY_PRETRAIN + "inner_steps = 2\nouter_steps = 3\n"
)
assert isinstance(_SPEC, PretrainJobSpec)
SPEC: PretrainJobSpec = _SPEC


def drivers_left() -> list[psutil.Process]:
    """Spawned children still alive (multiprocessing's resource tracker is not one)."""
    return [c for c in psutil.Process().children() if "spawn_main" in " ".join(c.cmdline())]


class Run:
    """One engine run on a thread, with what it heard."""

    def __init__(self, target: DriverTarget, stop_grace_s: float = 20.0) -> None:
        self.engine = DriverProcessEngine(
            RayCluster("127.0.0.1:1", None), stop_grace_s=stop_grace_s, target=target
        )
        self.steps: list[OuterStepRecord] = []
        self.waits: list[str | None] = []
        self.stop = threading.Event()

    def run(self, tmp_path: Path) -> PretrainResult:
        return self.engine.run(SPEC, tmp_path, self.steps.append, self.stop, self.waits.append)


def test_steps_waits_and_the_result_cross_from_the_driver(tmp_path: Path) -> None:
    run = Run(waits_steps_and_finishes)
    finished = run.run(tmp_path)
    assert run.waits == [WAIT, None]
    assert run.steps == [step_record(0)]
    assert finished.state is ControllerState.FINISHED
    assert finished.model_digest == "model0"
    assert finished.weights["w"].tolist() == [[1.0, 1.0], [1.0, 1.0]]


def test_a_run_that_fails_in_the_driver_fails_with_its_message(tmp_path: Path) -> None:
    with pytest.raises(PretrainFailedError, match=r"^2 outer steps in a row got too few"):
        Run(fails).run(tmp_path)


def test_a_driver_crash_is_reported_and_this_process_lives_on(tmp_path: Path) -> None:
    run = Run(crashes_after_a_step)
    with pytest.raises(DriverDiedError, match="the pretraining driver died of SIGSEGV"):
        run.run(tmp_path)
    assert run.steps == [step_record(0)]  # what it finished before crashing is kept
    assert not drivers_left()


def test_a_stopped_run_ends_after_its_step(tmp_path: Path) -> None:
    run = Run(stops_when_asked)
    run.stop.set()
    stopped = run.run(tmp_path)
    assert stopped.state is ControllerState.RUNNING
    assert run.steps == [step_record(0)]


def test_a_driver_that_does_not_stop_is_killed_after_the_grace_period(tmp_path: Path) -> None:
    run = Run(ignores_stop, stop_grace_s=1.0)
    threading.Timer(1.0, run.stop.set).start()
    with pytest.raises(DriverDiedError, match="did not stop within 1 s"):
        run.run(tmp_path)
    assert not drivers_left()


@pytest.mark.parametrize(("told", "exitcode"), [("stop", 0), ("nothing: the pipe closes", 1)])
def test_a_driver_whose_coordinator_has_gone_exits_at_once(
    told: str, exitcode: int, tmp_path: Path
) -> None:
    """An orphan finishing its step would race the next driver for the workers and the
    checkpoint: it exits as soon as the coordinator's end of the pipe closes."""
    context = multiprocessing.get_context("spawn")
    ours, theirs = context.Pipe()
    request = DriverRequest(RayCluster("127.0.0.1:1", None), SPEC, tmp_path)
    process = context.Process(target=waits_for_stop, args=(theirs, request))
    process.start()
    theirs.close()
    if told == "stop":
        ours.send(STOP)
    ours.close()
    process.join(30)
    assert process.exitcode == exitcode

"""Every program the project starts loads its modules with the garbage collector paused
(consortium/startup.py): the console scripts point at launchers that do so, the
launchers run the programs they name, and the coordinator and the sites start Flower's
and Ray's programs through them."""

from __future__ import annotations

import gc
import importlib
import subprocess
import sys
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import cast

import pytest
from flwr.superlink.grid import http_grid

from client.ray_worker import worker_argv
from consortium.inner_loop import InnerTrainer, WorkerConfig
from consortium.processes import venv_executable
from consortium.startup import imports_without_gc, load

ROOT = Path(__file__).resolve().parents[2]
LAUNCHERS = ("coordinator.launch", "client.launch", "consortium.startup")
# What each console script runs (through `load`).
TARGETS = {
    "coordinator": "coordinator.cli.main:app",
    "client": "client.cli:app",
    "consortium-flower-supernode": "client.federated.fast_poll_supernode:main",
    "consortium-flower-superlink": "flwr.superlink.cli:flower_superlink",
    "consortium-flwr-serverapp": "flwr.superlink.cli:flwr_serverapp",
    "consortium-ray": "ray.scripts.scripts:main",
}
# The programs the coordinator and the sites start, by the script they start them with.
PROGRAMS = {
    "consortium-flower-superlink": ROOT / "coordinator/federated/superlink.py",
    "consortium-flwr-serverapp": ROOT / "coordinator/federated/serverapp_launcher.py",
    "consortium-flower-supernode": ROOT / "client/supernode.py",
    "consortium-ray": ROOT / "coordinator/ray/head.py",
}


def scripts() -> dict[str, str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    found: dict[str, str] = project["scripts"]
    return found


def run_fresh(code: str) -> None:
    """`code` in a fresh interpreter (nothing loaded yet), which must exit 0."""
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=False, timeout=120
    )
    assert result.returncode == 0, result.stderr


class Collector:
    """`gc` as the code under test sees it, recording freezes and full collections
    instead of making them (so the test runner's own heap is left as it was)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls: list[str] = []
        monkeypatch.setattr(gc, "freeze", lambda: self.calls.append("freeze"))
        monkeypatch.setattr(gc, "collect", lambda *_: self.calls.append("collect") or 0)
        enabled = gc.isenabled()
        monkeypatch.setattr(gc, "enable", self._enable)
        monkeypatch.setattr(gc, "disable", self._disable)
        monkeypatch.setattr(gc, "isenabled", lambda: self.enabled)
        self.enabled = enabled

    def _enable(self) -> None:
        self.enabled = True

    def _disable(self) -> None:
        self.enabled = False


@pytest.fixture
def collector(monkeypatch: pytest.MonkeyPatch) -> Collector:
    spy = Collector(monkeypatch)
    spy.enabled = True  # as in a program
    return spy


def test_the_collector_is_off_while_modules_load_then_on_with_what_they_made_frozen(
    collector: Collector,
) -> None:
    with imports_without_gc():
        assert not collector.enabled
    assert collector.enabled
    assert collector.calls == ["freeze"]


def test_a_load_after_start_up_collects_before_it_freezes(collector: Collector) -> None:
    with imports_without_gc(collect_first=True):
        assert not collector.enabled
    assert collector.calls == ["collect", "freeze"] and collector.enabled


def test_a_failed_load_brings_the_collector_back_and_freezes_nothing(
    collector: Collector,
) -> None:
    """A half-loaded module is a garbage cycle: frozen, a program that tries again (a
    site's ClientApp at each task) would keep one per try."""
    with pytest.raises(ModuleNotFoundError), imports_without_gc():
        __import__("consortium_no_such_module")
    assert collector.enabled
    assert collector.calls == []


def test_a_collector_that_was_off_stays_off(collector: Collector) -> None:
    collector.enabled = False
    with imports_without_gc():
        pass
    assert not collector.enabled
    assert collector.calls == ["freeze"]


def test_load_returns_the_named_attribute_with_its_preloads_loaded_and_frozen() -> None:
    """In a fresh interpreter: the module and the preloads are loaded, under the pause."""
    code = (
        "import gc, sys\n"
        "from consortium.startup import load\n"
        "dumps = load('json:dumps', 'decimal')\n"
        "import json\n"
        "assert dumps is json.dumps and 'decimal' in sys.modules\n"
        "assert gc.isenabled() and gc.get_freeze_count() > 0\n"
    )
    run_fresh(code)


def test_a_bad_target_names_what_is_missing() -> None:
    with pytest.raises(AttributeError, match="no_such_function"):
        load("json:no_such_function")


def test_every_console_script_starts_its_program_through_load(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Each script's launcher hands its program to `load` and runs what it returns
    (test_each_launcher_runs_its_program runs the real ones)."""
    entries = scripts()
    assert entries.keys() == TARGETS.keys()
    # The ServerApp's launcher also shortens its Grid's object retries (coordinator/
    # launch.py): undone after the test, as this process is no ServerApp.
    monkeypatch.setattr(http_grid, "pull_objects", http_grid.pull_objects)
    for name, entry in entries.items():
        module_name, _, function = entry.partition(":")
        assert module_name in LAUNCHERS, (name, entry)
        module = importlib.import_module(module_name)
        loaded: list[str] = []

        def spy(target: str, *preload: str, seen: list[str] = loaded) -> Callable[[], str]:
            seen.append(target)
            return lambda: "ran"

        monkeypatch.setattr(module, "load", spy)
        assert getattr(module, function)() == "ran", name
        assert loaded == [TARGETS[name]], name


@pytest.mark.parametrize("script", sorted(TARGETS))
def test_each_launcher_runs_its_program(script: str) -> None:
    """`--help` of each: the launcher found and started the program it wraps."""
    result = subprocess.run(
        [venv_executable(script), "--help"],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "usage" in result.stdout.lower(), result.stdout


@pytest.mark.parametrize("script", sorted(PROGRAMS))
def test_the_coordinator_and_sites_start_the_wrapped_program(script: str) -> None:
    source = PROGRAMS[script].read_text()
    assert f'venv_executable("{script}")' in source
    plain = script.removeprefix("consortium-")
    assert f'venv_executable("{plain}")' not in source


def test_a_sites_ray_node_starts_through_the_launcher() -> None:
    argv = worker_argv("127.0.0.1:6379", "aurora", "0123456789abcdef", None, Path("/tmp/r"))
    assert Path(argv[0]).name == "consortium-ray"


def test_ray_start_loads_none_of_the_command_groups_it_never_uses() -> None:
    """`consortium-ray start` (every Ray node's) runs Ray's `ray start` without loading
    Ray Serve's, Ray Jobs' or the state API's command groups (1.2 CPU-s of its load);
    the rest of Ray's command line keeps those it can load (Serve's cannot: Ray is
    installed without the `serve` extra)."""
    code = (
        "import sys\n"
        "from consortium.startup import RAY_START_UNUSED_CLI_GROUPS, ray_cli\n"
        "sys.argv = ['consortium-ray', *sys.argv[1:]]\n"
        "try:\n"
        "    ray_cli()\n"
        "except SystemExit as done:\n"
        "    assert done.code in (0, None), done.code\n"
        "heavy = ('ray.serve', 'pandas', 'fastapi', 'ray.util.state.api')\n"
        "print('LOADED', *(m for m in (*RAY_START_UNUSED_CLI_GROUPS, *heavy)"
        " if sys.modules.get(m) is not None))\n"
    )

    def run(*args: str) -> tuple[list[str], str]:
        result = subprocess.run(
            [sys.executable, "-c", code, *args],
            capture_output=True,
            text=True,
            check=False,
            timeout=120,
        )
        assert result.returncode == 0, result.stderr
        help_text, _, loaded = result.stdout.rpartition("LOADED")
        return loaded.split(), help_text

    loaded, help_text = run("start", "--help")
    assert loaded == [] and "--head" in help_text, (loaded, help_text)
    loaded, help_text = run("--help")
    assert {"ray.dashboard.modules.job.cli", "ray.util.state.state_cli"} <= set(loaded)
    commands = {line.split()[0] for line in help_text.splitlines() if line.startswith("  ")}
    assert {"job", "list", "start"} <= commands, help_text


def test_a_sites_client_app_loads_at_its_first_task_once_with_the_collector_paused() -> None:
    """`client join` loads torch and the training code at the first task (not at
    start-up), paused and frozen once; later tasks find them loaded and freeze nothing."""
    code = (
        "import gc, sys\n"
        "from client.join import load_client_app\n"
        "assert 'torch' not in sys.modules\n"
        "frozen = gc.get_freeze_count()\n"
        "trainer, app = load_client_app()\n"
        "from client.federated.client_app import TRAINER, app as installed\n"
        "assert (trainer, app) == (TRAINER, installed) and 'torch' in sys.modules\n"
        "assert gc.isenabled() and gc.get_freeze_count() > frozen\n"
        "frozen = gc.get_freeze_count()\n"
        "assert load_client_app() == (trainer, app) and gc.get_freeze_count() == frozen\n"
    )
    run_fresh(code)


def test_a_ray_pool_trainer_freezes_what_its_worker_loaded_before_it_trains(
    collector: Collector,
) -> None:
    """Ray's worker process imports torch as it unpickles the actor's class, with the
    collector running: the trainer collects and freezes once, before it builds its model."""
    from coordinator.pretraining.worker import DiLoCoWorker, PoolTrainer

    built: list[str] = []

    def build_model(self: InnerTrainer, config: WorkerConfig, device: str | None) -> None:
        built.append(f"model after {collector.calls}")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(InnerTrainer, "__init__", build_model)
        PoolTrainer(cast(WorkerConfig, None))
    assert built == ["model after ['collect', 'freeze']"]
    assert DiLoCoWorker.__ray_metadata__.modified_class.__name__ == "PoolTrainer"


def test_replay_loads_aggregation_and_torch_with_the_collector_paused() -> None:
    """`coordinator replay` imports Flower's aggregation and, for a pretraining job,
    torch and the compute engine after start-up: both are frozen once loaded."""
    code = (
        "import gc, sys\n"
        "from coordinator.cli.replay import replay, replay_pretraining_job\n"
        "assert 'torch' not in sys.modules\n"
        "frozen = gc.get_freeze_count()\n"
        "try:\n"
        "    replay(job_id=None)\n"
        "except BaseException:\n"
        "    pass\n"
        "assert 'coordinator.federated.replay' in sys.modules\n"
        "assert gc.isenabled() and gc.get_freeze_count() > frozen\n"
        "frozen = gc.get_freeze_count()\n"
        "try:\n"
        "    replay_pretraining_job('job', [])\n"
        "except BaseException:\n"
        "    pass\n"
        "assert 'torch' in sys.modules and 'coordinator.pretraining.replay' in sys.modules\n"
        "assert gc.isenabled() and gc.get_freeze_count() > frozen\n"
    )
    run_fresh(code)

"""Every program the project starts loads its modules with the garbage collector paused
(consortium/startup.py): the console scripts point at launchers that do so, the
launchers run the programs they name, and the coordinator and the sites start Flower's
and Ray's programs through them."""

from __future__ import annotations

import gc
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest

from client.ray_worker import worker_argv
from consortium.processes import venv_executable
from consortium.startup import imports_without_gc, load

ROOT = Path(__file__).resolve().parents[2]
LAUNCHERS = ("coordinator.launch", "client.launch", "consortium.startup")
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


@pytest.fixture
def collector_on() -> Iterator[None]:
    """The collector on, as in a program, whatever the test runner set."""
    enabled = gc.isenabled()
    gc.enable()
    yield
    if not enabled:
        gc.disable()


@pytest.mark.usefixtures("collector_on")
def test_the_collector_is_off_while_modules_load_then_on_with_what_they_made_frozen() -> None:
    frozen = gc.get_freeze_count()
    made = []
    with imports_without_gc():
        assert not gc.isenabled()
        made.append({"module-level": [object()]})
    assert gc.isenabled()
    assert gc.get_freeze_count() > frozen
    gc.unfreeze()  # the runner's heap back to normal collection


@pytest.mark.usefixtures("collector_on")
def test_the_collector_is_back_even_when_loading_fails() -> None:
    with pytest.raises(ModuleNotFoundError), imports_without_gc():
        __import__("consortium_no_such_module")
    assert gc.isenabled()
    gc.unfreeze()


def test_a_collector_that_was_off_stays_off() -> None:
    enabled = gc.isenabled()
    gc.disable()
    try:
        with imports_without_gc():
            pass
        assert not gc.isenabled()
    finally:
        gc.unfreeze()
        if enabled:
            gc.enable()


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


def test_every_console_script_starts_through_a_launcher() -> None:
    entries = scripts()
    assert {"coordinator", "client", *PROGRAMS} <= entries.keys()
    for name, target in entries.items():
        module = target.partition(":")[0]
        assert module in LAUNCHERS, (name, target)
        assert callable(load(target)), (name, target)


@pytest.mark.parametrize("script", sorted(PROGRAMS))
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

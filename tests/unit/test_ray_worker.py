"""The `ray start` command line a contributed node runs, and its restarts."""

from __future__ import annotations

import json
from pathlib import Path

import psutil
import pytest

from client.devices import hardware_labels, label_value
from client.ray_worker import UNSTARTED_STOP_S, RayWorker, worker_argv
from client.settings import ClientSettings
from consortium.errors import UnreachableError
from consortium.net import reserve_free_port
from consortium.ray_env import ray_port_flags, short_temp_dir
from coordinator.settings import CoordinatorSettings
from tests.helpers import wait_for


def flag(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


def test_worker_announces_institution_resource_and_labels_on_cpu() -> None:
    argv = worker_argv("127.0.0.1:6379", "aurora", "0123456789abcdef", None, Path("/tmp/r"))
    assert argv[1:3] == ["start", "--address"] and "--block" in argv
    assert json.loads(flag(argv, "--resources")) == {"institution:aurora": 1}
    assert flag(argv, "--labels") == "institution=aurora,node=0123456789ab"
    assert (flag(argv, "--num-cpus"), flag(argv, "--num-gpus")) == ("1", "0")
    assert flag(argv, "--node-ip-address") == "127.0.0.1"
    assert flag(argv, "--include-log-monitor") == "false"  # its logs stay at the site


def test_worker_contributes_one_gpu_when_given_one() -> None:
    argv = worker_argv("10.0.0.5:6379", "aurora", "n1", 0, Path("/tmp/r"))
    assert flag(argv, "--num-gpus") == "1"


def test_worker_announces_its_address_on_the_route_to_a_remote_head() -> None:
    """Not Ray's own guess (which routes towards a public address a site on a private
    network may not have): an address of this machine's own interfaces, not loopback."""
    argv = worker_argv("10.0.0.5:6379", "aurora", "n1", None, Path("/tmp/r"))
    announced = flag(argv, "--node-ip-address")
    own = {a.address for addrs in psutil.net_if_addrs().values() for a in addrs}
    assert announced in own and announced != "127.0.0.1"
    loopback = worker_argv("127.0.0.1:6379", "aurora", "n1", None, Path("/tmp/r"))
    assert flag(loopback, "--node-ip-address") == "127.0.0.1"


def test_worker_skips_label_for_institution_name_ray_refuses(
    caplog: pytest.LogCaptureFixture,
) -> None:
    argv = worker_argv("127.0.0.1:6379", "st olaf/hospital", "n1", None, Path("/tmp/r"))
    assert flag(argv, "--labels") == "node=n1"
    assert json.loads(flag(argv, "--resources")) == {"institution:st olaf/hospital": 1}
    assert "institution 'st olaf/hospital' is not a valid Ray label value" in caplog.text


def test_worker_warning_names_the_label_ray_refuses(caplog: pytest.LogCaptureFixture) -> None:
    argv = worker_argv("127.0.0.1:6379", "alpha", "alpha-again-node", None, Path("/tmp/r"))
    assert flag(argv, "--labels") == "institution=alpha"  # "alpha-again-" ends in "-"
    assert "node 'alpha-again-' is not a valid Ray label value" in caplog.text
    assert "institution" not in caplog.text


def test_worker_labels_its_hardware() -> None:
    hardware = {"memory": "24GiB", "gpu-model": "NVIDIA-H100-80GB-HBM3", "gpu-memory": "80GiB"}
    argv = worker_argv("127.0.0.1:6379", "aurora", "n1", 0, Path("/tmp/r"), hardware)
    assert flag(argv, "--labels") == (
        "institution=aurora,node=n1,memory=24GiB,gpu-model=NVIDIA-H100-80GB-HBM3,gpu-memory=80GiB"
    )


def test_cpu_node_labels_its_memory_and_no_gpu() -> None:
    labels = hardware_labels("cpu")
    assert set(labels) == {"memory"}
    assert labels["memory"].endswith("GiB") and int(labels["memory"][:-3]) > 0


def test_gpu_names_become_validlabel_values() -> None:
    assert label_value("NVIDIA H100 80GB HBM3") == "NVIDIA-H100-80GB-HBM3"
    assert label_value("Tesla T4 (rev. a1) ") == "Tesla-T4-rev.-a1"
    assert label_value("***") == "unknown"


class _FakeProcess:
    def __init__(self) -> None:
        self.code: int | None = None
        self.stopped = False

    def poll(self) -> int | None:
        return self.code

    def stop(self, timeout_s: float = 0) -> None:
        self.stopped = True

    def log_tail(self, lines: int = 20) -> str:
        return ""


def test_worker_fetches_the_token_before_every_start_and_stays_out_when_refused(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    started: list[_FakeProcess] = []
    labels: list[str] = []  # each start's --labels

    def fake_start(self: RayWorker, claim: str | None) -> _FakeProcess:
        labels.append(flag(self._argv(claim=claim), "--labels"))
        started.append(_FakeProcess())
        return started[-1]

    monkeypatch.setattr(RayWorker, "_start", fake_start)
    fetches: list[str] = []
    refuse = [False]

    def fetch() -> str:
        if refuse[0]:
            raise UnreachableError(
                "the coordinator refused the Ray token (UNAUTHENTICATED: revoked)"
            )
        fetches.append("token")
        return f"claim{len(fetches)}"  # the coordinator's fresh claim for this start

    worker = RayWorker(
        "127.0.0.1:6379", "alpha", "n1", None, tmp_path, tmp_path / "t", before_start=fetch
    )
    assert fetches == ["token"] and len(started) == 1
    started[0].code = 1  # the head restarted with a new token: the worker exits
    worker.restart()  # what `client join`'s supervisor calls
    assert fetches == ["token", "token"] and len(started) == 2
    # Each start carries its own claim, the one fetched just before it.
    assert [label.split(",")[-1] for label in labels] == [
        "consortium-claim=claim1",
        "consortium-claim=claim2",
    ]
    started[1].code = 1
    refuse[0] = True  # revoked: no token, no restart (the supervisor tries again later)
    with pytest.raises(UnreachableError, match="refused the Ray token"):
        worker.restart()
    assert len(started) == 2 and worker.process is started[1]


def test_a_port_range_pins_every_port_the_node_listens_on() -> None:
    argv = worker_argv("10.0.0.5:6379", "aurora", "n1", None, Path("/tmp/r"), None, "20000-20099")
    assert flag(argv, "--node-manager-port") == "20000"
    assert flag(argv, "--object-manager-port") == "20001"
    assert (flag(argv, "--min-worker-port"), flag(argv, "--max-worker-port")) == ("20010", "20099")
    assert "--ray-client-server-port" not in argv  # a head's only
    head = ray_port_flags("20000-20099", head=True)
    assert head[head.index("--ray-client-server-port") + 1] == "20006"
    assert ray_port_flags(None, head=True) == []


@pytest.mark.parametrize("value", ["20000", "20099-20000", "80-200", "20000-20010", "a-b"])
def test_a_port_range_that_cannot_hold_a_node_is_refused_by_the_settings(value: str) -> None:
    with pytest.raises(ValueError, match="ray_port_range"):
        ClientSettings(institution="a", ray_port_range=value)
    with pytest.raises(ValueError, match="ray_port_range"):
        CoordinatorSettings(ray_port_range=value)


def test_a_node_that_has_not_started_is_stopped_after_a_short_grace_not_a_drain(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """`ray start` does not act on SIGTERM until its node runs (here: a head that never
    answers); a `client join` stopped then waited out drain + stop timeout (11 s with a
    1 s drain) before killing it. There is nothing to drain yet: the short grace."""
    state_dir = tmp_path / "state"
    state_dir.mkdir()
    worker = RayWorker(
        f"127.0.0.1:{reserve_free_port()}", "aurora", "n1", None, state_dir, None, 1.0
    )
    try:
        wait_for(
            "ray start to be up and waiting for the head",
            lambda: "Local node IP" in (state_dir / "logs" / "ray-worker.log").read_text(),
            60,
        )
        assert not worker.started
        with caplog.at_level("WARNING", logger="consortium.processes"):
            worker.stop()
    finally:
        worker.process.stop(timeout_s=1.0)  # a no-op once stopped
    assert worker.process.poll() is not None
    assert f"did not stop in {UNSTARTED_STOP_S:.0f} s; killing it" in caplog.text
    assert not short_temp_dir(state_dir).exists()

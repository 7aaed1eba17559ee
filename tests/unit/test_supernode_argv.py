"""What `client join` passes its SuperNode: our fast-poll entry point with the site's
poll interval, and the workloads the site runs in its node config."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from client import supernode
from client.settings import ClientSettings
from client.supernode import SuperNode


class RecordedChild:
    def __init__(self, name: str, argv: list[str], log_path: Path, env: Any = None) -> None:
        self.argv = argv


def start(tmp_path: Path, **options: Any) -> list[str]:
    node = SuperNode(
        "127.0.0.1:9092", tmp_path / "data", "alpha", "cpu", tmp_path, None, port=9, **options
    )
    child = node.process
    assert isinstance(child, RecordedChild)
    return child.argv


@pytest.fixture(autouse=True)
def no_process(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(supernode, "ChildProcess", RecordedChild)


def test_the_supernode_polls_every_fifth_of_a_second_and_runs_the_builtin_workloads(
    tmp_path: Path,
) -> None:
    argv = start(tmp_path)
    assert Path(argv[0]).name == "consortium-flower-supernode"
    assert argv[argv.index("--poll-interval-s") + 1] == "0.2"
    assert argv[argv.index("--heartbeat-interval-s") + 1] == "30.0"  # Flower's
    assert 'workloads="digits-cnn,bytelm"' in argv[argv.index("--node-config") + 1]


def test_the_site_settings_choose_the_poll_interval_and_workloads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CONSORTIUM_CLIENT_SUPERNODE_POLL_INTERVAL_S", "3")
    monkeypatch.setenv("CONSORTIUM_CLIENT_SUPERNODE_HEARTBEAT_INTERVAL_S", "10")
    monkeypatch.setenv("CONSORTIUM_CLIENT_WORKLOADS", '["softmax-digits"]')
    settings = ClientSettings(coordinator="127.0.0.1:1", institution="alpha", data=tmp_path)
    argv = start(
        tmp_path,
        poll_interval_s=settings.supernode_poll_interval_s,
        heartbeat_interval_s=settings.supernode_heartbeat_interval_s,
        workloads=settings.workloads,
    )
    assert argv[argv.index("--poll-interval-s") + 1] == "3.0"
    assert argv[argv.index("--heartbeat-interval-s") + 1] == "10.0"
    assert 'workloads="softmax-digits"' in argv[argv.index("--node-config") + 1]


def test_a_site_must_run_some_workload_poll_at_some_interval_and_heartbeat_in_bounds(
    tmp_path: Path,
) -> None:
    with pytest.raises(ValueError, match="workloads"):
        ClientSettings(coordinator="c:1", institution="a", data=tmp_path, workloads=[])
    with pytest.raises(ValueError, match="supernode_poll_interval_s"):
        ClientSettings(
            coordinator="c:1", institution="a", data=tmp_path, supernode_poll_interval_s=0
        )
    # The SuperLink refuses a heartbeat interval outside [10, 1800] s: refused here, at
    # `client join`'s start, rather than by a SuperNode that cannot activate.
    for refused in (5, 3600):
        with pytest.raises(ValueError, match="supernode_heartbeat_interval_s"):
            ClientSettings(
                coordinator="c:1",
                institution="a",
                data=tmp_path,
                supernode_heartbeat_interval_s=refused,
            )

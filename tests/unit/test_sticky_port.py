"""Which port a coordinator server takes (coordinator/serve.py `sticky_port`), and when
a child is moved off a port another process bound first (consortium/net.py
`ready_on_a_free_port`; the move itself, with the real SuperLink and Ray head, is in
tests/integration/test_serve_startup.py)."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from consortium.errors import ChildProcessFailedError
from consortium.net import PORT_TAKEN_ATTEMPTS, ready_on_a_free_port
from consortium.ray_env import RAY_DEFAULT_PORTS
from coordinator.serve import sticky_port


class FailingChild:
    """A child that fails every start, on a taken port or not."""

    def __init__(self, port_taken: bool) -> None:
        self.taken = port_taken
        self.starts = 1
        self.ports: list[int] = []

    def wait_ready(self) -> None:
        raise ChildProcessFailedError(f"start {self.starts} failed")

    def port_taken(self) -> bool:
        return self.taken

    def move_to(self, port: int) -> None:
        self.starts += 1
        self.ports.append(port)


def test_a_failure_other_than_a_taken_port_is_raised_without_a_second_start() -> None:
    child = FailingChild(port_taken=False)
    with pytest.raises(ChildProcessFailedError, match="start 1 failed"):
        ready_on_a_free_port("child", child.wait_ready, child.port_taken, child.move_to)
    assert child.starts == 1


def test_a_port_taken_at_every_start_is_raised_after_the_last_attempt() -> None:
    child = FailingChild(port_taken=True)
    with pytest.raises(ChildProcessFailedError, match=f"start {PORT_TAKEN_ATTEMPTS} failed"):
        ready_on_a_free_port("child", child.wait_ready, child.port_taken, child.move_to)
    assert child.starts == PORT_TAKEN_ATTEMPTS
    assert len(child.ports) == PORT_TAKEN_ATTEMPTS - 1 and all(child.ports)  # one each


def test_the_port_used_last_time_is_kept_while_free(tmp_path: Path) -> None:
    record = tmp_path / "head.port"
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        last = holder.getsockname()[1]
    record.write_text(str(last))
    assert sticky_port(record, "127.0.0.1", 0) == last


def test_a_port_rays_other_parts_take_is_not_the_heads_even_if_used_last_time(
    tmp_path: Path,
) -> None:
    """A Ray head whose GCS port was 52365 (its dashboard agent's default) refused to start,
    and the port, recorded, would have been chosen again at every start."""
    record = tmp_path / "head.port"
    for port in RAY_DEFAULT_PORTS:
        record.write_text(str(port))
        chosen = sticky_port(record, "127.0.0.1", 0, avoid=RAY_DEFAULT_PORTS)
        assert chosen not in RAY_DEFAULT_PORTS and chosen > 0
    # An operator's explicit choice stands (Ray then says what it refuses).
    assert sticky_port(record, "127.0.0.1", 52365, avoid=RAY_DEFAULT_PORTS) == 52365


def test_an_empty_record_gives_a_fresh_port_not_zero(tmp_path: Path) -> None:
    record = tmp_path / "head.port"
    record.write_text("")
    assert sticky_port(record, "127.0.0.1", 0) > 0

"""Which port a coordinator server takes (coordinator/serve.py `sticky_port`)."""

from __future__ import annotations

import socket
from pathlib import Path

from consortium.ray_env import RAY_DEFAULT_PORTS
from coordinator.serve import sticky_port


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

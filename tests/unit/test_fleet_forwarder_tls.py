"""The Fleet forwarder's throwaway loopback TLS: made anew at every `client join`."""

from __future__ import annotations

from pathlib import Path

from client.fleet_forwarder import LocalTls


def test_a_second_join_on_the_same_state_dir_gets_a_fresh_root(tmp_path: Path) -> None:
    """A join that crashed (or a copy of the state dir) leaves the last key behind; the
    next join must not fail on it."""
    first = LocalTls.create(tmp_path)
    first_root = first.ca_cert.read_bytes()
    second = LocalTls.create(tmp_path)
    assert second.ca_cert.read_bytes() != first_root
    assert second.key.stat().st_mode & 0o777 == 0o600
    second.server_context()  # the new key matches the new certificate

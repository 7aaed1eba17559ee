"""consortium/ray_head_services.py: the services a head leaves out, and a Ray that no
longer starts them the expected way refused loudly (the started head's processes are
checked in tests/integration/test_pretrain_job.py)."""

from __future__ import annotations

import pytest
from ray._private.node import Node

from consortium.ray_head_services import UNUSED_HEAD_SERVICES, skip_unused_head_services


def test_the_head_starts_neither_service(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in UNUSED_HEAD_SERVICES:  # restored after the test, for this worker's Ray
        monkeypatch.setattr(Node, name, getattr(Node, name))
    skip_unused_head_services()
    node = object.__new__(Node)  # the methods touch nothing of the node any more
    assert node.start_ray_client_server() is None
    assert node.start_api_server(include_dashboard=False, raise_on_failure=False) is None


def test_a_ray_without_the_start_method_is_refused_by_name(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delattr(Node, "start_api_server")
    original = Node.start_ray_client_server
    monkeypatch.setattr(Node, "start_ray_client_server", original)
    with pytest.raises(RuntimeError, match="has no start_api_server"):
        skip_unused_head_services()
    assert Node.start_ray_client_server is original  # nothing replaced

"""Shorter retries where Flower pulls a message's objects (consortium/flower_waits.py):
the SuperNode's pulls of the ServerApp's instructions and the ServerApp's of replies."""

from __future__ import annotations

import functools
import types

import pytest
from flwr.supercore.inflatable import inflatable_utils
from flwr.superlink.grid import http_grid
from flwr.supernode import start_client_internal

from consortium.flower_waits import FIRST_OBJECT_RETRY_S, shorten_object_retries
from coordinator.federated.prompt_grid import MAX_POLL_S
from coordinator.launch import shorten_reply_object_retries


def test_object_pulls_retry_sooner_with_the_rest_of_their_arguments_kept() -> None:
    calls: list[dict[str, object]] = []

    def pull_objects(
        object_ids: list[str],
        pull_object_fn: object,
        initial_backoff: float = 1,
        backoff_cap: float = 10,
    ) -> dict[str, bytes]:
        calls.append({"ids": object_ids, "first": initial_backoff, "cap": backoff_cap})
        return {}

    module = types.ModuleType("fake_supernode_loop")
    module.pull_objects = pull_objects  # type: ignore[attr-defined]
    shorten_object_retries(module, 0.2)
    module.pull_objects(["a"], pull_object_fn=None)
    assert calls == [{"ids": ["a"], "first": 0.05, "cap": 0.2}]
    # Flower's own function still takes both (checked against the installed version).
    shorten_object_retries(types.SimpleNamespace(**vars(start_client_internal)), 0.2)  # type: ignore[arg-type]


def test_a_pull_objects_without_backoff_arguments_is_refused() -> None:
    module = types.ModuleType("renamed_loop")
    module.pull_objects = lambda object_ids: {}  # type: ignore[attr-defined]
    with pytest.raises(RuntimeError, match="no longer takes initial_backoff"):
        shorten_object_retries(module, 0.2)


def test_the_serverapp_pulls_a_replys_missing_objects_again_soon(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The installed Flower's Grid, as `consortium-flwr-serverapp` runs it: its replies'
    # objects were asked for again only after 1 s, doubling (a second of every round).
    monkeypatch.setattr(http_grid, "pull_objects", inflatable_utils.pull_objects)  # restored after
    shorten_reply_object_retries()
    patched = http_grid.pull_objects
    assert isinstance(patched, functools.partial)
    assert patched.func is inflatable_utils.pull_objects  # Flower's own, arguments kept
    assert patched.keywords == {"initial_backoff": FIRST_OBJECT_RETRY_S, "backoff_cap": MAX_POLL_S}

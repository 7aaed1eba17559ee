"""The coordinator's console scripts (pyproject.toml): each loads its program's modules
with the garbage collector paused (`consortium.startup`), then runs it."""

from __future__ import annotations

from typing import Any

from consortium.startup import load


def coordinator() -> Any:
    """`coordinator`: the command line (coordinator/cli)."""
    return load("coordinator.cli.main:app")()


def flower_superlink() -> Any:
    """`consortium-flower-superlink`: Flower's `flower-superlink`, unchanged."""
    return load("flwr.superlink.cli:flower_superlink")()


def flwr_serverapp() -> Any:
    """`consortium-flwr-serverapp`: Flower's `flwr-serverapp`, its Grid retrying a reply's
    missing objects sooner (`shorten_reply_object_retries`). The run's ServerApp module
    (named by the coordinator's app, coordinator/federated/flower_app.py) is loaded with
    it rather than when Flower asks for it: Flower then finds it loaded."""
    main = load("flwr.superlink.cli:flwr_serverapp", "coordinator.federated.server_app")
    shorten_reply_object_retries()
    return main()


def shorten_reply_object_retries() -> None:
    """The ServerApp's Grid (`flwr.superlink.grid.http_grid`) asks again for a reply's
    missing objects after 0.05 s and at most every `MAX_POLL_S` (its pause between pulls
    of replies), not after 1 s doubling to 10 s (why: consortium/flower_waits.py)."""
    from flwr.superlink.grid import http_grid

    from consortium.flower_waits import shorten_object_retries
    from coordinator.federated.prompt_grid import MAX_POLL_S

    shorten_object_retries(http_grid, MAX_POLL_S)

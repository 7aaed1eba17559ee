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
    """`consortium-flwr-serverapp`: Flower's `flwr-serverapp`, unchanged. The run's
    ServerApp module (named by the coordinator's app, coordinator/federated/flower_app.py)
    is loaded with it rather than when Flower asks for it: Flower then finds it loaded."""
    return load("flwr.superlink.cli:flwr_serverapp", "coordinator.federated.server_app")()

"""The site's console scripts (pyproject.toml): each loads its program's modules with
the garbage collector paused (`consortium.startup`), then runs it."""

from __future__ import annotations

from typing import Any

from consortium.startup import load


def client() -> Any:
    """`client`: the command line (client/cli.py)."""
    return load("client.cli:app")()


def flower_supernode() -> Any:
    """`consortium-flower-supernode`: Flower's SuperNode with shorter polls
    (client/federated/fast_poll_supernode.py), Flower's modules loaded up front."""
    return load(
        "client.federated.fast_poll_supernode:main",
        "flwr.supernode.start_client_internal",
        "flwr.supernode.cli",
    )()

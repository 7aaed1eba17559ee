"""What a Consortium Ray head leaves out of what `ray start --head` starts beside its GCS.

Ray starts two Python services on every head that nothing here uses, and has no setting
for either:

* Ray Client's server, on port 10001 of every interface: a way for any holder of the
  cluster token to run code on the cluster from outside it. Drivers here (the
  coordinator's pretraining driver) reach the GCS itself.
* Ray's API server (`dashboard.py`): with `--include-dashboard false` it loads only its
  usage-statistics module, which `--disable-usage-stats` turns off, so it serves nothing.

Left out, a head start is two processes and about 2 CPU-s lighter, and one listener
fewer faces the network. `consortium-ray` (consortium/startup.py) calls
`skip_unused_head_services` before Ray's `ray start --head` runs in that process; the
processes a head starts are checked in tests/integration/test_pretrain_job.py.
"""

from __future__ import annotations

from typing import Any

# `ray._private.node.Node`'s methods that start them (Ray 2.60, pinned in pyproject.toml).
UNUSED_HEAD_SERVICES = ("start_ray_client_server", "start_api_server")


def _not_started(self: Any, *args: Any, **kwargs: Any) -> None:
    """In place of a service's start: the node starts nothing for it."""


def skip_unused_head_services() -> None:
    """In this process, Ray's head starts neither service. A Ray that no longer starts
    them through these methods fails here, loudly, rather than starting them unseen."""
    from ray._private.node import Node

    missing = [name for name in UNUSED_HEAD_SERVICES if not callable(getattr(Node, name, None))]
    if missing:  # checked before any is replaced: all or nothing
        raise RuntimeError(
            f"ray._private.node.Node has no {', '.join(missing)}: this Ray is not the one "
            "consortium/ray_head_services.py was written for"
        )
    for name in UNUSED_HEAD_SERVICES:
        setattr(Node, name, _not_started)

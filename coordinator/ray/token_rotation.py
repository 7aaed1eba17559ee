"""Revocation on the Ray channel: a new cluster token that the revoked institution never gets.

Ray authenticates with one token for the whole cluster, so it cannot refuse one
institution by itself. After `coordinator revoke NAME`, the coordinator therefore
replaces the token (``pki/ray-token``) and restarts its Ray head with it: every node's
connection is refused from then on. Every other institution's `client join` fetches the
new token over the mutual-TLS control plane (`GetRayToken`, which the revoked
institution's certificate can no longer call) and restarts its Ray worker with it.

A restart would break a running pretraining job, so the rotation waits until none runs;
meanwhile `RayRevocationSync` drains the revoked institution's nodes and the planner
skips them. The institutions the current token excludes are kept in
``<data dir>/ray/token-excludes.json``, so a restart of the coordinator neither rotates
again nor forgets a pending rotation.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path

from consortium.ray_env import new_ray_token, write_ray_token
from coordinator.state import StateStore

log = logging.getLogger(__name__)


class RayTokenRotation:
    """Call `sync()` before every scheduler step (it never raises)."""

    def __init__(
        self,
        store: StateStore,
        token_path: Path,
        excludes_path: Path,
        restart_head: Callable[[], None],
        pretraining_busy: Callable[[], bool],
    ) -> None:
        self._store = store
        self._token_path = token_path
        self._excludes_path = excludes_path
        self._restart_head = restart_head
        self._busy = pretraining_busy
        self._waiting_logged: frozenset[str] = frozenset()

    def excluded(self) -> set[str]:
        """Institutions revoked before the current token was made."""
        try:
            return set(json.loads(self._excludes_path.read_text()))
        except FileNotFoundError:
            return set()

    def sync(self) -> None:
        revoked = set(self._store.revoked_institutions())
        pending = frozenset(revoked - self.excluded())
        if not pending:
            return
        if self._busy():
            if pending != self._waiting_logged:
                log.warning(
                    "Ray: %s revoked; the cluster token is replaced when the running "
                    "pretraining job ends (until then their nodes are drained)",
                    ", ".join(sorted(pending)),
                )
                self._waiting_logged = pending
            return
        try:
            write_ray_token(self._token_path, new_ray_token())
            self._restart_head()
        except Exception:
            log.exception("Ray: replacing the cluster token failed; retrying at the next step")
            return
        self._excludes_path.parent.mkdir(parents=True, exist_ok=True)
        self._excludes_path.write_text(json.dumps(sorted(revoked)))
        log.warning(
            "Ray: replaced the cluster token and restarted the head: %s can no longer join "
            "(other institutions' nodes fetch the new token and rejoin)",
            ", ".join(sorted(pending)),
        )

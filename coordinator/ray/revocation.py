"""Revocation on the Ray channel: drain a revoked institution's nodes, tell the planner.

Ray authenticates with one cluster-wide token, so it cannot refuse one institution:
a revoked site still holds a valid token until `RayTokenRotation` replaces it, which
waits while a pretraining job runs (and cannot happen on a cluster the coordinator only
attaches to). Meanwhile the coordinator does, from its scheduler thread before every
step (like `SuperNodeKeySync`), once any institution is revoked:

* ask the GCS to drain every alive node claiming a revoked institution, by what it
  declares or by the claim it carries (coordinator/ray/claims.py)
  (``DRAIN_NODE_REASON_PREEMPTION``): Ray places nothing new there, an idle node's raylet
  shuts down at once, a busy one when its work ends (the planner drops our worker at the
  next outer step). A node that joins again is drained again at the next sync.

Each drain is logged. Without any revocation this costs nothing: no GCS call is made.

The pretraining planner hears of revocations from the coordinator too, not from the
cluster: a running driver gets the revoked set (`StateStore.revoked_institutions`) over its socket
whenever it changes (coordinator/pretraining/engine.py), and never places a worker on a
node that claims a revoked institution (by ``institution:<name>`` resource or
``institution`` label) from its next plan on. The cluster's own KV store is writable by
every member holding the token, so nothing there is trusted.
"""

from __future__ import annotations

import importlib
import logging
import time
from collections.abc import Iterable, Mapping, Sequence, Set
from dataclasses import dataclass, field
from typing import Any, Protocol

from consortium.ray_env import CLAIM_LABEL
from coordinator.pretraining.cluster import claimed_institutions
from coordinator.ray.head import RayCluster
from coordinator.ray.nodes import ALIVE, RayNodeInfo, gcs_client, node_from_gcs
from coordinator.state import StateStore

log = logging.getLogger(__name__)

GCS_TIMEOUT_S = 5.0
# Told to Ray with the drain (Ray-aware libraries read it); Ray does not kill at it.
DRAIN_DEADLINE_S = 60
DRAIN_REASON = "DRAIN_NODE_REASON_PREEMPTION"


def _institutions(node: RayNodeInfo, claim_owners: Mapping[str, str]) -> frozenset[str]:
    """What `node` declares, and the institution its claim was issued to: a node's owner
    types its labels, so a revoked site's node (whose claim makes it count for that site)
    could otherwise declare another name, or none, and never be drained."""
    owner = claim_owners.get(node.labels.get(CLAIM_LABEL, ""))
    declared = claimed_institutions(node.resources, node.labels)
    return declared | {owner} if owner else declared


def nodes_to_drain(
    nodes: Iterable[RayNodeInfo],
    revoked: Set[str],
    claim_owners: Mapping[str, str] | None = None,
) -> list[RayNodeInfo]:
    """Alive, not yet draining, non-head nodes that claim a revoked institution
    (`claim_owners`: claim -> the institution it was issued to)."""
    owners = claim_owners or {}
    return sorted(
        (
            node
            for node in nodes
            if node.state == ALIVE and not node.is_head and _institutions(node, owners) & revoked
        ),
        key=lambda node: node.ray_node_id,
    )


def drain_message(
    node: RayNodeInfo, revoked: Set[str], claim_owners: Mapping[str, str] | None = None
) -> str:
    names = ", ".join(sorted(_institutions(node, claim_owners or {}) & revoked))
    return f"institution {names} revoked by the consortium operator"


class GcsControl(Protocol):
    """What the sync needs from the GCS (a fake in unit tests)."""

    def nodes(self) -> Sequence[RayNodeInfo]: ...

    def drain(self, node_id: str, message: str, deadline_ms: int) -> tuple[bool, str]: ...


class RayGcsControl:
    """`GcsControl` over Ray's ``ray._raylet.GcsClient`` (no ``ray.init``), built lazily
    and rebuilt after a failure (the head may have restarted)."""

    def __init__(self, address: str) -> None:
        self.address = address
        self._client: Any = None

    def _gcs(self) -> Any:
        if self._client is None:
            self._client = gcs_client(self.address)
        return self._client

    def _call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        try:
            return getattr(self._gcs(), method)(*args, **kwargs)
        except Exception:
            self._client = None
            raise

    def nodes(self) -> list[RayNodeInfo]:
        infos = self._call("get_all_node_info", timeout=GCS_TIMEOUT_S)
        return [node_from_gcs(info) for info in infos.values()]

    def drain(self, node_id: str, message: str, deadline_ms: int) -> tuple[bool, str]:
        autoscaler_pb2 = importlib.import_module("ray.core.generated.autoscaler_pb2")
        reason = autoscaler_pb2.DrainNodeReason.Value(DRAIN_REASON)
        accepted, rejection = self._call("drain_node", node_id, reason, message, deadline_ms)
        return bool(accepted), str(rejection)


@dataclass
class RayRevocationSync:
    """Call `sync()` before every scheduler step; it never raises."""

    store: StateStore
    gcs: GcsControl
    _failing: str = field(default="", init=False)  # logged once until it changes or clears

    @classmethod
    def for_cluster(cls, store: StateStore, cluster: RayCluster) -> RayRevocationSync:
        """Over the GCS of `cluster`; this process must already authenticate to it
        (`consortium.ray_env.use_ray_auth_in_this_process`, done by `serve`)."""
        return cls(store, RayGcsControl(cluster.address))

    def sync(self) -> None:
        revoked = self.store.revoked_institutions()
        if not revoked:
            return
        try:
            nodes = self.gcs.nodes()
            owners = self._claim_owners(nodes)
            for node in nodes_to_drain(nodes, revoked, owners):
                self._drain(node, revoked, owners)
        except Exception as error:  # the GCS may be restarting; the next step retries
            failing = f"{type(error).__name__}: {error}"
            if failing != self._failing:
                log.warning(
                    "Ray: could not enforce revocation of %s yet (retrying every step): %s",
                    sorted(revoked),
                    error,
                )
            self._failing = failing
            return
        if self._failing:
            log.info("Ray: enforcing revocation of %s again", sorted(revoked))
            self._failing = ""

    def _claim_owners(self, nodes: Sequence[RayNodeInfo]) -> dict[str, str]:
        """Claim -> institution, for the claims `nodes` carry that this coordinator
        issued (bound or not: a copy of a revoked site's claim is drained too, which
        harms only whoever copied it)."""
        carried = {claim for node in nodes if (claim := node.labels.get(CLAIM_LABEL))}
        if not carried:
            return {}
        return {c.claim: c.institution for c in self.store.ray_node_claims(carried)}

    def _drain(self, node: RayNodeInfo, revoked: Set[str], owners: Mapping[str, str]) -> None:
        message = drain_message(node, revoked, owners)
        deadline_ms = int(time.time() * 1000) + DRAIN_DEADLINE_S * 1000
        accepted, rejection = self.gcs.drain(node.ray_node_id, message, deadline_ms)
        if accepted:
            log.info(
                "Ray: draining node %s (%s): %s; nothing new is placed there",
                node.ray_node_id,
                node.address or "no address",
                message,
            )
        else:
            log.warning(
                "Ray: the GCS refused to drain node %s (%s): %s",
                node.ray_node_id,
                message,
                rejection or "no reason given",
            )

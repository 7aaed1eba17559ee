"""Which institution each Ray node counts for: assigned by the coordinator, never
taken from what the node declares.

Every member holds the cluster's one token, and a Ray node announces its own labels
and resources, so ``institution=<name>`` on a node says only what its owner typed: one
member could start nodes in another's name, and their work (or their bad updates)
would be planned, accounted and logged as that institution's. So before each start of
its Ray node, `client join` asks the coordinator over the mutual-TLS control plane
(`GetRayToken`, which already names the caller by its certificate) and gets a *claim*
with the token: a random value recorded here for the caller's institution. The node
carries it as its ``consortium-claim`` label. The coordinator binds each claim to the
first Ray node it sees carrying it, for good; that node counts for the institution the
claim was issued to, whatever else it declares.

A claim is visible to every member once its node is in the cluster (labels are public
to token holders), so a member can copy it onto a node of its own. The copy never
counts: the claim is bound to the node that carried it first, which its institution
started before the claim could be seen, and a later carrier is refused (logged and
counted as ``consortium_auth_refusals_total{channel="ray",reason="claim_reused"}``).
Only if the coordinator first sees both at once (it reads the cluster every second or
two) can it not tell them apart: it then burns the claim (no node ever counts for it,
not even the one left when the other goes), and the institution's next start gets a
fresh claim. A node with no claim, or one this coordinator never issued,
counts for no institution and is given no work.

A plain-text consortium (no mutual TLS, loopback experiments) authenticates no one;
its nodes' declared institutions are used as before (`assignments` returns None).
"""

from __future__ import annotations

import logging
import secrets
import threading
from collections.abc import Callable, Iterable

from consortium.ray_env import CLAIM_LABEL
from coordinator.ray.nodes import DEAD, RayNodeInfo, RayNodesSource
from coordinator.state import RayNodeClaim, StateStore, now_ms

log = logging.getLogger(__name__)

CLAIM_BYTES = 16
# What a claim is bound to once two nodes were first seen carrying it together: no
# node, ever (not a Ray node id, which is hex).
BURNT = "burnt"
# A claim is carried within seconds of its issue (the node starts right after); one
# unused for a day (its node never started) is forgotten.
UNUSED_CLAIM_TTL_MS = 24 * 3600 * 1000
REFUSAL_CHANNEL = "ray"
CLAIM_REUSED = "claim_reused"
CLAIM_UNKNOWN = "claim_unknown"

RefusalCounter = Callable[[str, str], None]  # (channel, reason)


class RayNodeClaims:
    """Issues claims and turns the cluster's nodes into node id -> institution."""

    def __init__(
        self,
        store: StateStore,
        nodes: RayNodesSource,
        on_refusal: RefusalCounter = lambda channel, reason: None,
    ) -> None:
        self._store = store
        self._nodes = nodes
        self._on_refusal = on_refusal
        self._lock = threading.Lock()  # one binding pass at a time
        self._refused: set[tuple[str, str]] = set()  # (ray node id, reason) logged once
        self._last_read_ms = -1  # the cluster read `sync` last bound

    def issue(self, institution: str) -> str:
        """A fresh claim for one start of `institution`'s Ray node; claims no node
        carried within UNUSED_CLAIM_TTL_MS of their issue are forgotten meanwhile."""
        claim = secrets.token_hex(CLAIM_BYTES)
        now = now_ms()
        self._store.drop_unbound_ray_node_claims(now - UNUSED_CLAIM_TTL_MS)
        self._store.add_ray_node_claim(RayNodeClaim(claim, institution, now))
        return claim

    def sync(self) -> None:
        """Bind what a new read of the cluster shows (the coordinator's scheduler loop
        calls this: claims are bound in the order nodes appear, whether or not anyone
        asks); a read already seen is not gone through again."""
        snapshot = self._nodes.snapshot()
        if snapshot.available and snapshot.read_at_ms != self._last_read_ms:
            self._last_read_ms = snapshot.read_at_ms
            self.bind(snapshot.nodes)

    def assignments(self) -> dict[str, str]:
        """Ray node id (hex) -> institution, for every node bound to a claim, after
        binding the claims the cluster shows for the first time."""
        return self.bind(self._nodes.snapshot().nodes)

    def bind(self, nodes: Iterable[RayNodeInfo]) -> dict[str, str]:
        """Bind what `nodes` show (see the module docstring); the assignments after."""
        with self._lock:
            return self._bind(list(nodes))

    def _bind(self, nodes: list[RayNodeInfo]) -> dict[str, str]:
        carriers: dict[str, list[RayNodeInfo]] = {}
        for node in nodes:
            claim = node.labels.get(CLAIM_LABEL)
            if claim:
                carriers.setdefault(claim, []).append(node)
        # Only the claims the cluster shows matter (a node leaves with its claim), so
        # this reads as many rows as there are nodes, however many were ever issued.
        claims = {c.claim: c for c in self._store.ray_node_claims(carriers)}
        assigned: dict[str, str] = {}
        for claim, holders in sorted(carriers.items()):
            record = claims.get(claim)
            if record is None:
                for node in holders:
                    self._refuse(node, CLAIM_UNKNOWN, "carries a claim this coordinator never made")
                continue
            bound = self._settle(record, holders)
            if bound:
                assigned[bound] = record.institution
        return assigned

    def _settle(self, record: RayNodeClaim, holders: list[RayNodeInfo]) -> str:
        """The node `record` counts for after this pass ("" for none): bound now if
        it has exactly one live carrier and none before; every other carrier refused."""
        bound = record.ray_node_id
        if not bound:
            live = [n for n in holders if n.state != DEAD]
            if len(live) == 1 and self._store.bind_ray_node_claim(
                record.claim, live[0].ray_node_id
            ):
                bound = live[0].ray_node_id
                log.info(
                    "Ray node %s counts for %s (its claim, issued over mutual TLS)",
                    bound[:12],
                    record.institution,
                )
            elif len(live) > 1:
                # Burnt for good: were one carrier to leave, the other (perhaps the
                # copy) must not inherit the claim.
                self._store.bind_ray_node_claim(record.claim, BURNT)
                for node in live:
                    self._refuse(
                        node,
                        CLAIM_REUSED,
                        f"{len(live)} nodes appeared at once with {record.institution}'s "
                        "claim; none counts (its next start gets a fresh one)",
                    )
                return ""
        if bound == BURNT:
            for node in holders:
                self._refuse(node, CLAIM_REUSED, f"carries {record.institution}'s burnt claim")
            return ""
        for node in holders:
            if bound and node.ray_node_id != bound:
                self._refuse(
                    node,
                    CLAIM_REUSED,
                    f"copies the claim of {record.institution}'s node {bound[:12]}",
                )
        return bound

    def _refuse(self, node: RayNodeInfo, reason: str, why: str) -> None:
        if (node.ray_node_id, reason) in self._refused:
            return
        self._refused.add((node.ray_node_id, reason))
        declared = node.institution or "nothing"
        log.warning(
            "Ray node %s (declares %s) counts for no institution: it %s",
            node.ray_node_id[:12],
            declared,
            why,
        )
        self._on_refusal(REFUSAL_CHANNEL, reason)

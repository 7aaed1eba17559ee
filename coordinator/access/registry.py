"""Node registry: institutions' nodes register, heartbeat and leave.

Every member is treated as an adversary that registers whatever it likes, so what one
institution can put into the registry is bounded: string fields have lengths, an
institution has at most `MAX_LIVE_NODES_PER_INSTITUTION` nodes online or stale and
keeps at most `MAX_GONE_NODES_PER_INSTITUTION` gone ones (ListNodes answers with all
of them, and a reply over the client's 4 MiB message limit would fail for everyone),
and the example count it declares is fixed by its first declaration.
"""

from __future__ import annotations

import logging
import threading
import uuid

from consortium.aggregation import MAX_WEIGHT
from consortium.errors import ConflictError, InvalidArgumentError, PermissionDeniedError
from consortium.provenance.signing import SignatureError, VerifyingKey
from coordinator.access.caller import current_caller, require_acting_as
from coordinator.observability.metrics import CoordinatorMetrics
from coordinator.state import NodeRecord, NodeState, StateStore
from coordinator.state.sqlite_store import now_ms

log = logging.getLogger(__name__)

MAX_NAME_LENGTH = 128
# A DNS name's limit: every real hostname fits.
MAX_HOSTNAME_LENGTH = 253
# `client join` sends "cuda:0 (NVIDIA H100 80GB HBM3)"-like names, about 30 characters.
MAX_DEVICE_LENGTH = 128
# As many as the connections the Fleet edge lets an institution hold
# (coordinator/federated/edge.py, MAX_CONNECTIONS_PER_INSTITUTION), each node's
# SuperNode holding one: more nodes could not all train anyway.
MAX_LIVE_NODES_PER_INSTITUTION = 32
# Gone nodes are kept only to show recent departures (`coordinator nodes`). With both
# caps an institution has at most 64 rows in ListNodes of under 0.6 kB each (the field
# caps above), under 40 kB: a 4 MiB reply holds a hundred institutions.
MAX_GONE_NODES_PER_INSTITUTION = 32


class NodeLimitError(ConflictError):
    """The institution has `MAX_LIVE_NODES_PER_INSTITUTION` nodes online already; the
    control plane answers RESOURCE_EXHAUSTED (coordinator/api/servicers.py)."""


class NodeRegistry:
    def __init__(
        self, store: StateStore, node_timeout_s: float, metrics: CoordinatorMetrics | None = None
    ) -> None:
        self._store = store
        self._node_timeout_ms = int(node_timeout_s * 1000)
        self._metrics = metrics or CoordinatorMetrics()
        # Counting an institution's nodes and adding one is one step: concurrent
        # registrations must not each see room under the cap.
        self._registering = threading.Lock()

    def register(
        self,
        institution: str,
        hostname: str,
        device: str,
        signing_public_key: bytes = b"",
        declared_examples: int = 0,
    ) -> NodeRecord:
        """`declared_examples` > 0 caps the example count of the institution's updates
        if it is the institution's first declaration (see `_declare`); 0 declares
        nothing. Refuses (creating nothing) overlong fields and a node beyond
        `MAX_LIVE_NODES_PER_INSTITUTION` (NodeLimitError)."""
        _check_length("institution", institution, MAX_NAME_LENGTH)
        if not institution.strip():
            raise InvalidArgumentError("field 'institution': must not be empty")
        _check_length("hostname", hostname, MAX_HOSTNAME_LENGTH)
        _check_length("device", device, MAX_DEVICE_LENGTH)
        self._authorize(institution)
        if signing_public_key:
            try:
                key = VerifyingKey.from_raw(signing_public_key)
            except SignatureError as err:
                raise InvalidArgumentError(f"field 'signing_public_key': {err}") from None
            self._admit_signing_key(institution, key)
        with self._registering:
            self._make_room(institution)
            now = now_ms()
            node = NodeRecord(
                node_id=uuid.uuid4().hex,
                institution=institution,
                hostname=hostname,
                device=device or "cpu",
                state=NodeState.ONLINE,
                registered_at_ms=now,
                last_heartbeat_ms=now,
            )
            self._store.add_node(node)
        if declared_examples > 0:
            self._declare(institution, node.node_id, declared_examples)
        self._metrics.institution_seen(institution)
        return node

    def _make_room(self, institution: str) -> None:
        """Bound the institution's rows before it gets another: forget its oldest gone
        nodes, retire its longest-silent stale node when it is at the cap (a crashed
        site that restarts leaves one stale node per start, and must still get back in),
        and refuse when all of them are online."""
        self._store.forget_gone_nodes(institution, MAX_GONE_NODES_PER_INSTITUTION)
        self.expire()
        live = [
            n
            for n in self._store.list_nodes()
            if n.institution == institution and n.state is not NodeState.GONE
        ]
        if len(live) < MAX_LIVE_NODES_PER_INSTITUTION:
            return
        stale = [n for n in live if n.state is NodeState.STALE]
        if stale:
            oldest = min(stale, key=lambda n: n.last_heartbeat_ms)
            self._store.set_node_state(oldest.node_id, NodeState.GONE)
            log.info(
                "%s is at its cap of %d live nodes: stale node %s retired (gone) for a new one",
                institution,
                MAX_LIVE_NODES_PER_INSTITUTION,
                oldest.node_id[:12],
            )
            return
        log.warning(
            "control plane refused: %s registered a node beyond its %d online ones",
            institution,
            MAX_LIVE_NODES_PER_INSTITUTION,
        )
        raise NodeLimitError(
            f"{institution!r} has {len(live)} nodes online, the most an institution may "
            "have; stop one (it leaves) or let one go silent for the node timeout before "
            "registering another"
        )

    def _declare(self, institution: str, node_id: str, declared_examples: int) -> None:
        """The institution's first declaration is its cap for good, so the update
        admission's `inflated_count` check means "above what the institution declared
        when it joined": a later node declaring more cannot raise it (mid-job, to weigh
        more). A later node declaring less does not lower it either: that would turn a
        larger sibling's honest updates into refused ones, and gains the member nothing."""
        # No update may weigh more than MAX_WEIGHT anyway; a uint64 beyond it would not
        # even fit SQLite's integers.
        declared = min(declared_examples, MAX_WEIGHT)
        cap = self._store.declare_examples(institution, declared)
        if declared > cap:
            log.warning(
                "%s node %s declared %d examples, above the %d its institution declared "
                "first; not raised: its updates may claim at most %d",
                institution,
                node_id[:12],
                declared,
                cap,
                cap,
            )
            return
        log.info(
            "%s node %s declared %d examples; the institution's updates may claim at most %d",
            institution,
            node_id[:12],
            declared,
            cap,
        )

    def _admit_signing_key(self, institution: str, key: VerifyingKey) -> None:
        """With certificates, update-signing keys are pinned at onboarding: a node may
        only name one of them (another key would let it sign for the institution).
        A plain-text coordinator has no onboarding; its nodes register their keys."""
        pinned = self._store.institution_keys(institution)
        if key.key_id in pinned:
            return
        if current_caller() is not None:
            log.warning(
                "control plane refused: %s offered signing key %s, not pinned at onboarding",
                institution,
                key.key_id[:16],
            )
            self._metrics.auth_refused("control_plane", "unpinned_signing_key")
            raise PermissionDeniedError(
                f"signing key {key.key_id[:16]} is not the one pinned for {institution!r}; "
                "only the operator changes it (`coordinator replace-signing-key`, recorded "
                "in the provenance log)"
            )
        self._store.add_institution_key(institution, key.key_id, key.raw)

    def _authorize(self, institution: str) -> None:
        """A certificate may only act for its own institution."""
        try:
            require_acting_as(institution)
        except PermissionDeniedError:
            self._metrics.auth_refused("control_plane", "institution_mismatch")
            raise

    def heartbeat(self, node_id: str) -> NodeRecord:
        self._authorize(self._store.get_node(node_id).institution)
        node = self._store.touch_node(node_id, now_ms())
        self._metrics.heartbeat(node.institution)
        return node

    def leave(self, node_id: str) -> NodeRecord:
        self._authorize(self._store.get_node(node_id).institution)
        return self._store.set_node_state(node_id, NodeState.GONE)

    def list_nodes(self) -> list[NodeRecord]:
        self.expire()
        return self._store.list_nodes()

    def expire(self) -> list[NodeRecord]:
        """Mark nodes whose heartbeat stopped as stale."""
        return self._store.mark_stale_nodes(now_ms() - self._node_timeout_ms)


def _check_length(field: str, value: str, limit: int) -> None:
    if len(value) > limit:
        raise InvalidArgumentError(
            f"field {field!r}: {len(value)} characters, at most {limit} are allowed"
        )

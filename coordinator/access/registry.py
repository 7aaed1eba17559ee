"""Node registry: institutions' nodes register, heartbeat and leave."""

from __future__ import annotations

import logging
import uuid

from consortium.aggregation import MAX_WEIGHT
from consortium.errors import InvalidArgumentError, PermissionDeniedError
from consortium.provenance.signing import SignatureError, VerifyingKey
from coordinator.access.caller import current_caller, require_acting_as
from coordinator.observability.metrics import CoordinatorMetrics
from coordinator.state import NodeRecord, NodeState, StateStore
from coordinator.state.sqlite_store import now_ms

log = logging.getLogger(__name__)

MAX_NAME_LENGTH = 128


class NodeRegistry:
    def __init__(
        self, store: StateStore, node_timeout_s: float, metrics: CoordinatorMetrics | None = None
    ) -> None:
        self._store = store
        self._node_timeout_ms = int(node_timeout_s * 1000)
        self._metrics = metrics or CoordinatorMetrics()

    def register(
        self,
        institution: str,
        hostname: str,
        device: str,
        signing_public_key: bytes = b"",
        declared_examples: int = 0,
    ) -> NodeRecord:
        """`declared_examples` > 0 caps the example count of the institution's updates
        (the largest any of its nodes declared); 0 declares nothing."""
        if not institution.strip():
            raise InvalidArgumentError("field 'institution': must not be empty")
        if len(institution) > MAX_NAME_LENGTH:
            raise InvalidArgumentError(f"field 'institution': at most {MAX_NAME_LENGTH} characters")
        self._authorize(institution)
        if signing_public_key:
            try:
                key = VerifyingKey.from_raw(signing_public_key)
            except SignatureError as err:
                raise InvalidArgumentError(f"field 'signing_public_key': {err}") from None
            self._admit_signing_key(institution, key)
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
            # No update may weigh more than MAX_WEIGHT anyway; a uint64 beyond it would
            # not even fit SQLite's integers.
            declared = min(declared_examples, MAX_WEIGHT)
            cap = self._store.declare_examples(institution, declared)
            log.info(
                "%s node %s declared %d examples; the institution's updates may claim at most %d",
                institution,
                node.node_id[:12],
                declared,
                cap,
            )
        self._metrics.institution_seen(institution)
        return node

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

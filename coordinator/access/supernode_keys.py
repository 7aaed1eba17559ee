"""Keep the SuperLink's registered SuperNode keys equal to the onboarded, unrevoked ones.

Onboarding and revocation only write the state store (the SuperLink may not be
running then); the coordinator calls `sync()` before every scheduler step, which
registers new keys and unregisters revoked ones at once.

Flower's Control API, reachable by anyone who reaches the SuperLink, lets a caller
register a key of its own (its SuperNode then comes online) or unregister another
institution's node; Flower keeps no record of who may. So every `check_interval_s`
a sync also lists what the SuperLink has (the Control API's `ListNodes`) and undoes drift:

    listed and active, node id not ours         -> unregister   (removed_unknown)
    listed and active, institution revoked      -> unregister   (removed_revoked)
    onboarded, unrevoked, not active any more   -> register     (restored)

A key onboarded by a revoked institution counts as revoked for every institution that
onboarded it too.

Each change is logged with the node and institution and counted in
`consortium_supernode_key_changes_total{action}`. Flower lists node ids, not keys;
node ids are ours because the coordinator registers every key itself and stores the
id Flower returns.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from consortium.errors import ConsortiumError
from coordinator.federated.flower_app import SuperNodeEntry
from coordinator.state import StateStore

log = logging.getLogger(__name__)

DEFAULT_CHECK_INTERVAL_S = 30.0
# The node id stored for a revoked institution's key once Flower dropped it.
UNREGISTERED = "unregistered"


class SuperNodeAdmin(Protocol):
    """What the sync needs from Flower (`FlowerControl`; tests pass a fake)."""

    def list_supernodes(self) -> list[SuperNodeEntry]: ...

    def register_supernode(self, public_key: str, name: str) -> str: ...

    def unregister_supernode(self, node_id: str) -> None: ...

    def release_unregistered_key(self, public_key: str) -> bool: ...


class KeyChangeCounter(Protocol):
    def supernode_key_changed(self, action: str) -> None: ...


@dataclass(frozen=True)
class OnboardedKey:
    institution: str
    public_key: str
    node_id: str  # "" until registered; UNREGISTERED once a revoked key was removed
    revoked: bool

    @property
    def name(self) -> str:
        """The SuperNode's name at Flower: institution and a key digest."""
        return f"{self.institution}-{hashlib.sha256(self.public_key.encode()).hexdigest()[:8]}"


class SuperNodeKeySync:
    def __init__(
        self,
        store: StateStore,
        flower: SuperNodeAdmin,
        metrics: KeyChangeCounter | None = None,
        check_interval_s: float = DEFAULT_CHECK_INTERVAL_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._store = store
        self._flower = flower
        self._metrics = metrics
        self._check_interval_s = check_interval_s
        self._clock = clock
        self._next_check = clock()  # the first sync checks the SuperLink

    def sync(self) -> None:
        rows = self._store.supernode_keys()
        # A key is revoked with any institution that onboarded it: onboarding does not
        # refuse a key another institution already named, and such a second row would
        # otherwise re-register the revoked site's key (its SuperNode back online) as
        # soon as the revoked row's node was unregistered.
        revoked_keys = {key for institution, key, _ in rows if self._store.is_revoked(institution)}
        keys = [
            OnboardedKey(institution, key, node_id, key in revoked_keys)
            for institution, key, node_id in rows
        ]
        if self._clock() >= self._next_check:
            try:
                listed = self._flower.list_supernodes()
            except ConsortiumError as error:
                log.warning("could not list the SuperLink's SuperNodes: %s", error)
            else:
                self._next_check = self._clock() + self._check_interval_s
                keys = self._reconcile(keys, listed)
        for key in keys:
            self._follow_store(key)

    # --- what the store asks for: new keys, revoked keys -----------------------
    def _follow_store(self, key: OnboardedKey) -> None:
        try:
            if not key.node_id and not key.revoked:
                new_id = self._register(key)
                log.info("registered the SuperNode key of %s (node %s)", key.institution, new_id)
            elif key.revoked and key.node_id and key.node_id != UNREGISTERED:
                self._flower.unregister_supernode(key.node_id)
                self._store.set_supernode_node_id(key.institution, key.public_key, UNREGISTERED)
                log.info("unregistered the SuperNode of revoked %s", key.institution)
        except ConsortiumError as error:
            log.warning("SuperNode key of %s not synced yet: %s", key.institution, error)

    # --- what the SuperLink has: undo changes made behind our back -------------
    def _reconcile(
        self, keys: list[OnboardedKey], listed: list[SuperNodeEntry]
    ) -> list[OnboardedKey]:
        """Unregister active nodes that are not ours or revoked; restore ours that are
        gone. Returns the keys as the store now has them."""
        ours = {key.node_id: key for key in keys if key.node_id not in ("", UNREGISTERED)}
        active = {node.node_id for node in listed if node.active}
        for node_id in sorted(active):
            owner = ours.get(node_id)
            if owner is None:
                removed = self._remove(node_id, "removed_unknown", "its key was never onboarded")
            elif owner.revoked:
                removed = self._remove(
                    node_id, "removed_revoked", f"{owner.institution} is revoked"
                )
            else:
                continue
            if removed:
                active.discard(node_id)
        return [self._settle(key, active) for key in keys]

    def _settle(self, key: OnboardedKey, active: set[str]) -> OnboardedKey:
        """A key whose node is gone: restored if onboarded, else marked unregistered."""
        if key.node_id in ("", UNREGISTERED) or key.node_id in active:
            return key
        if not key.revoked:
            return self._restore(key)
        self._store.set_supernode_node_id(key.institution, key.public_key, UNREGISTERED)
        return OnboardedKey(key.institution, key.public_key, UNREGISTERED, key.revoked)

    def _remove(self, node_id: str, action: str, why: str) -> bool:
        try:
            self._flower.unregister_supernode(node_id)
        except ConsortiumError as error:
            log.warning("could not unregister SuperNode %s (%s): %s", node_id, why, error)
            return False
        log.warning("unregistered SuperNode %s at the SuperLink: %s", node_id, why)
        self._count(action)
        return True

    def _restore(self, key: OnboardedKey) -> OnboardedKey:
        try:
            new_id = self._register(key)
        except ConsortiumError as error:
            log.warning(
                "the SuperNode key of %s is missing at the SuperLink (node %s) and could "
                "not be restored yet: %s",
                key.institution,
                key.node_id,
                error,
            )
            return key
        log.warning(
            "restored the SuperNode key of %s at the SuperLink: node %s was gone "
            "(unregistered by someone else), now node %s",
            key.institution,
            key.node_id,
            new_id,
        )
        self._count("restored")
        return OnboardedKey(key.institution, key.public_key, new_id, key.revoked)

    def _register(self, key: OnboardedKey) -> str:
        """Register the key (releasing Flower's tombstone of an unregistered node with
        this key first, see `FlowerControl.release_unregistered_key`); store the node id."""
        self._flower.release_unregistered_key(key.public_key)
        new_id = self._flower.register_supernode(key.public_key, key.name)
        self._store.set_supernode_node_id(key.institution, key.public_key, new_id)
        return new_id

    def _count(self, action: str) -> None:
        if self._metrics is not None:
            self._metrics.supernode_key_changed(action)

"""A revoked institution's SuperNode key stays off the SuperLink even when another
institution onboarded the same public key (onboarding does not refuse it)."""

from __future__ import annotations

import itertools

from consortium.errors import ChildProcessFailedError
from coordinator.access.supernode_keys import SuperNodeKeySync
from coordinator.federated.flower_app import SuperNodeEntry
from coordinator.state.memory_store import InMemoryStateStore

KEY_A = "ecdsa-sha2-nistp256 AAAA-alpha"
KEY_B = "ecdsa-sha2-nistp256 AAAA-beta"


class FakeSuperLink:
    """Flower's node table: one active row per key; an unregistered row keeps its key
    until released (as tests/unit/test_supernode_keys.py models it)."""

    def __init__(self) -> None:
        self.nodes: dict[str, tuple[str, str]] = {}
        self._ids = itertools.count(100)

    def list_supernodes(self) -> list[SuperNodeEntry]:
        return [SuperNodeEntry(node_id, status) for node_id, (_, status) in self.nodes.items()]

    def register_supernode(self, public_key: str, name: str) -> str:
        if any(key == public_key for key, _ in self.nodes.values()):
            raise ChildProcessFailedError("Public key already in use")
        node_id = str(next(self._ids))
        self.nodes[node_id] = (public_key, "registered")
        return node_id

    def unregister_supernode(self, node_id: str) -> None:
        key, _ = self.nodes[node_id]
        self.nodes[node_id] = (key, "unregistered")

    def release_unregistered_key(self, public_key: str) -> bool:
        gone = [i for i, (k, s) in self.nodes.items() if k == public_key and s == "unregistered"]
        for node_id in gone:
            del self.nodes[node_id]
        return bool(gone)

    def active_keys(self) -> set[str]:
        return {key for key, status in self.nodes.values() if status != "unregistered"}


def test_a_revoked_key_is_not_re_registered_under_another_institution_that_named_it() -> None:
    store = InMemoryStateStore()
    # gamma (a colluding member) onboarded with beta's SuperNode public key.
    for institution, key in (("alpha", KEY_A), ("beta", KEY_B), ("gamma", KEY_B)):
        store.add_certificate(f"serial-{institution}", institution, "fp", 2**62)
        store.add_supernode_key(institution, key)
    link = FakeSuperLink()
    sync = SuperNodeKeySync(store, link, check_interval_s=0.0)
    sync.sync()
    assert link.active_keys() == {KEY_A, KEY_B}

    store.revoke_institution("beta")
    for _ in range(3):  # beta's node unregistered, then every later step and check
        sync.sync()

    assert link.active_keys() == {KEY_A}

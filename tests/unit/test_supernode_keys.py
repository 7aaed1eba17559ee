"""SuperNodeKeySync's decisions, against a Flower stand-in that keeps node rows like
the SuperLink does (an unregistered node's key stays taken until released)."""

from __future__ import annotations

import itertools

from consortium.errors import ChildProcessFailedError
from coordinator.access.supernode_keys import UNREGISTERED, SuperNodeKeySync
from coordinator.federated.flower_app import SuperNodeEntry
from coordinator.state.memory_store import InMemoryStateStore

KEY_A = "ecdsa-sha2-nistp256 AAAA-alpha"
KEY_B = "ecdsa-sha2-nistp256 AAAA-beta"
OUTSIDER_KEY = "ecdsa-sha2-nistp256 AAAA-outsider"


class FakeSuperLink:
    """Node rows by id: (public key, status), as Flower's node table."""

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
        key, status = self.nodes.get(node_id, ("", "unregistered"))
        if status == "unregistered":
            raise ChildProcessFailedError(f"Node {node_id} already deleted or not found")
        self.nodes[node_id] = (key, "unregistered")

    def release_unregistered_key(self, public_key: str) -> bool:
        gone = [i for i, (k, s) in self.nodes.items() if k == public_key and s == "unregistered"]
        for node_id in gone:
            del self.nodes[node_id]
        return bool(gone)

    def active_keys(self) -> set[str]:
        return {key for key, status in self.nodes.values() if status != "unregistered"}


class Counts:
    def __init__(self) -> None:
        self.actions: list[str] = []

    def supernode_key_changed(self, action: str) -> None:
        self.actions.append(action)


class Clock:
    def __init__(self) -> None:
        self.now_s = 0.0

    def __call__(self) -> float:
        return self.now_s


def onboarded(*keys: tuple[str, str]) -> InMemoryStateStore:
    store = InMemoryStateStore()
    for institution, key in keys:
        store.add_certificate(f"serial-{institution}", institution, "fp", 2**62)
        store.add_supernode_key(institution, key)
    return store


def node_of(store: InMemoryStateStore, institution: str) -> str:
    return next(node_id for inst, _, node_id in store.supernode_keys() if inst == institution)


def test_sync_registers_onboarded_keys_without_counting_a_change() -> None:
    store, link, counts = onboarded(("alpha", KEY_A), ("beta", KEY_B)), FakeSuperLink(), Counts()
    SuperNodeKeySync(store, link, counts).sync()
    assert link.active_keys() == {KEY_A, KEY_B}
    assert node_of(store, "alpha") in link.nodes
    assert counts.actions == []


def test_sync_removes_a_key_nobody_onboarded() -> None:
    store, link, counts = onboarded(("alpha", KEY_A)), FakeSuperLink(), Counts()
    sync = SuperNodeKeySync(store, link, counts, check_interval_s=0.0)
    sync.sync()
    link.register_supernode(OUTSIDER_KEY, "outsider")
    sync.sync()
    assert link.active_keys() == {KEY_A}
    assert counts.actions == ["removed_unknown"]


def test_sync_restores_an_onboarded_key_someone_unregistered() -> None:
    store, link, counts = onboarded(("alpha", KEY_A), ("beta", KEY_B)), FakeSuperLink(), Counts()
    sync = SuperNodeKeySync(store, link, counts, check_interval_s=0.0)
    sync.sync()
    old_node = node_of(store, "beta")
    link.unregister_supernode(old_node)
    sync.sync()
    assert link.active_keys() == {KEY_A, KEY_B}
    assert node_of(store, "beta") not in ("", old_node)
    assert counts.actions == ["restored"]


def test_sync_removes_a_revoked_key_and_never_restores_it() -> None:
    store, link, counts = onboarded(("alpha", KEY_A), ("beta", KEY_B)), FakeSuperLink(), Counts()
    sync = SuperNodeKeySync(store, link, counts, check_interval_s=0.0)
    sync.sync()
    store.revoke_institution("beta")
    sync.sync()
    sync.sync()
    assert link.active_keys() == {KEY_A}
    assert node_of(store, "beta") == UNREGISTERED
    assert counts.actions == ["removed_revoked"]


def test_a_revoked_key_is_not_re_registered_under_another_institution_that_named_it() -> None:
    """gamma, a colluding member, onboarded with beta's SuperNode key (onboarding now
    refuses that: tests/unit/test_key_binding.py; a store from before may hold it).
    Revoking beta unregisters the key for good: gamma's row once re-registered it."""
    store = onboarded(("alpha", KEY_A), ("beta", KEY_B), ("gamma", KEY_B))
    link = FakeSuperLink()
    sync = SuperNodeKeySync(store, link, check_interval_s=0.0)
    sync.sync()
    assert link.active_keys() == {KEY_A, KEY_B}
    store.revoke_institution("beta")
    for _ in range(3):  # beta's node unregistered, then every later step and check
        sync.sync()
    assert link.active_keys() == {KEY_A}


def test_sync_follows_the_store_between_checks_of_the_superlink() -> None:
    store, link, counts = onboarded(("alpha", KEY_A)), FakeSuperLink(), Counts()
    clock = Clock()
    sync = SuperNodeKeySync(store, link, counts, check_interval_s=10.0, clock=clock)
    sync.sync()
    link.register_supernode(OUTSIDER_KEY, "outsider")
    store.add_certificate("serial-beta", "beta", "fp", 2**62)
    store.add_supernode_key("beta", KEY_B)
    clock.now_s = 5.0
    sync.sync()  # a new key is registered at once; drift waits for the next check
    assert link.active_keys() == {KEY_A, KEY_B, OUTSIDER_KEY}
    clock.now_s = 10.0
    sync.sync()
    assert link.active_keys() == {KEY_A, KEY_B}
    assert counts.actions == ["removed_unknown"]


def test_sync_retries_when_the_superlink_cannot_be_listed() -> None:
    class Unreachable(FakeSuperLink):
        def list_supernodes(self) -> list[SuperNodeEntry]:
            raise ChildProcessFailedError("connection refused")

    store, link = onboarded(("alpha", KEY_A)), Unreachable()
    SuperNodeKeySync(store, link, check_interval_s=0.0).sync()
    assert link.active_keys() == {KEY_A}

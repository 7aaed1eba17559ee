"""Keep the SuperLink's registered SuperNode keys equal to the onboarded, unrevoked ones.

Onboarding and revocation only write the state store (the SuperLink may not be
running then); the coordinator calls `sync()` before every scheduler step and
registers new keys or unregisters revoked ones through Flower's Control API.
"""

from __future__ import annotations

import hashlib
import logging

from consortium.errors import ConsortiumError
from coordinator.federated.flower_app import FlowerCli
from coordinator.state import StateStore

log = logging.getLogger(__name__)


class SuperNodeKeySync:
    def __init__(self, store: StateStore, flower: FlowerCli) -> None:
        self._store = store
        self._flower = flower

    def sync(self) -> None:
        for institution, public_key, node_id in self._store.supernode_keys():
            revoked = self._store.is_revoked(institution)
            try:
                if not node_id and not revoked:
                    name = f"{institution}-{hashlib.sha256(public_key.encode()).hexdigest()[:8]}"
                    new_id = self._flower.register_supernode(public_key, name)
                    self._store.set_supernode_node_id(institution, public_key, new_id)
                    log.info("registered the SuperNode key of %s (node %s)", institution, new_id)
                elif node_id and revoked and node_id != "unregistered":
                    self._flower.unregister_supernode(node_id)
                    self._store.set_supernode_node_id(institution, public_key, "unregistered")
                    log.info("unregistered the SuperNode of revoked %s", institution)
            except ConsortiumError as error:
                log.warning("SuperNode key of %s not synced yet: %s", institution, error)

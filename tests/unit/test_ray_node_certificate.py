"""A site's Ray node certificate on a TLS Ray channel (client/join.py): each `client join`
makes a fresh key and gets it certified, in the same state dir as the last join's. The
second join on a state dir (any restart, any reboot) failed with FileExistsError on the
key the first had left, after the node had registered."""

from __future__ import annotations

import types
from pathlib import Path
from typing import Any

from cryptography import x509

from client.join import SiteNode
from consortium import pki
from consortium.rpc import RetryPolicy


class Coordinator:
    """The coordinator's IssueRayCertificate, answering with what it was sent."""

    def __init__(self) -> None:
        self.csrs: list[bytes] = []

    def IssueRayCertificate(self, request: Any, timeout: float | None = None) -> Any:  # noqa: N802
        self.csrs.append(request.csr_pem)
        return types.SimpleNamespace(certificate_pem=b"CERT", ca_certificate_pem=b"CA")


def test_each_join_replaces_the_last_joins_node_key(tmp_path: Path) -> None:
    coordinator = Coordinator()
    site: Any = types.SimpleNamespace(
        bundle=object(),
        settings=types.SimpleNamespace(
            resolved_state_dir=tmp_path, institution="alpha", coordinator="127.0.0.1:1"
        ),
        _stub=coordinator,
        _policy=RetryPolicy(attempts=1, initial_backoff_s=0.1),
    )

    first = SiteNode._ray_certificate(site, "10.0.0.1:6379")
    first_key = first.key.read_bytes()
    second = SiteNode._ray_certificate(site, "10.0.0.1:6379")

    assert second.key == first.key and second.key.read_bytes() != first_key
    assert (second.key.stat().st_mode & 0o777) == 0o600
    # The key on disk is the one the second request was signed with.
    csr = x509.load_pem_x509_csr(coordinator.csrs[-1])
    key = pki.load_private_key(second.key)
    assert csr.public_key().public_numbers() == key.public_key().public_numbers()

"""Ray TLS certificates: both uses, the node's address, and who may ask for which."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from consortium import pki
from consortium.errors import InvalidArgumentError, PermissionDeniedError
from consortium.ray_env import RayTls, ray_auth_env
from coordinator.access.pki_files import CoordinatorPki
from coordinator.ray import tls as ray_tls
from coordinator.ray.tls import coordinator_ray_tls, peer_ip, sign_node_csr


@pytest.fixture
def files(tmp_path: Path) -> CoordinatorPki:
    files = CoordinatorPki(tmp_path)
    files.root.mkdir(parents=True)
    key = pki.generate_key()
    pki.write_private_key(files.ca_key, key)
    files.ca_cert.write_bytes(pki.pem(pki.create_ca(key, "Test Consortium CA")))
    return files


def _ips(cert: x509.Certificate) -> set[str]:
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return {str(ip) for ip in names.get_values_for_type(x509.IPAddress)}


def _csr(institution: str, ips: list[str]) -> bytes:
    return pki.pem(pki.make_node_csr(pki.generate_key(), institution, ips))


def test_node_certificate_is_for_server_and_client_use_at_the_callers_address(
    files: CoordinatorPki,
) -> None:
    cert = sign_node_csr(files, "alpha", _csr("alpha", ["10.1.2.3"]), "10.1.2.3")
    usages = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(usages) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    assert _ips(cert) == {"10.1.2.3", "127.0.0.1"}
    assert pki.institution_of(cert.subject) == "alpha"
    ca = pki.load_certificate(files.ca_cert)
    cert.verify_directly_issued_by(ca)


def test_a_node_cannot_get_a_certificate_for_another_machines_address(
    files: CoordinatorPki,
) -> None:
    with pytest.raises(PermissionDeniedError, match=r"10\.9\.9\.9"):
        sign_node_csr(files, "alpha", _csr("alpha", ["10.9.9.9"]), "10.1.2.3")


def test_a_loopback_caller_may_name_this_hosts_addresses_only(files: CoordinatorPki) -> None:
    from consortium.ray_env import ray_node_ip

    cert = sign_node_csr(files, "alpha", _csr("alpha", [ray_node_ip()]), "127.0.0.1")
    assert ray_node_ip() in _ips(cert)
    with pytest.raises(PermissionDeniedError):
        sign_node_csr(files, "alpha", _csr("alpha", ["203.0.113.7"]), "127.0.0.1")


@pytest.mark.parametrize(
    ("csr", "message"),
    [
        (b"not a csr", "not a PEM CSR"),
        (_csr("beta", ["10.1.2.3"]), "names 'beta'"),
        (pki.pem(pki.make_csr(pki.generate_key(), "alpha")), "IP address"),
    ],
)
def test_bad_csrs_are_invalid_arguments(files: CoordinatorPki, csr: bytes, message: str) -> None:
    with pytest.raises(InvalidArgumentError, match=message):
        sign_node_csr(files, "alpha", csr, "10.1.2.3")


def test_peer_addresses_are_parsed_and_unix_sockets_refused() -> None:
    assert peer_ip("ipv4:10.1.2.3:5555") == "10.1.2.3"
    assert peer_ip("ipv6:[::1]:5555") == "::1"
    with pytest.raises(PermissionDeniedError):
        peer_ip("unix:/tmp/socket")


def test_coordinator_certificate_is_issued_once_and_kept(files: CoordinatorPki) -> None:
    first = coordinator_ray_tls(files)
    issued = first.certificate.read_bytes()
    assert oct(first.key.stat().st_mode & 0o777) == "0o600"
    assert coordinator_ray_tls(files).certificate.read_bytes() == issued


def test_coordinator_certificate_near_its_end_is_renewed_with_a_new_key(
    files: CoordinatorPki, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Within RENEW_BEFORE of its end (or for another address) the next start issues a
    new one: its key replaces the old key file (which `write_private_key` would refuse
    to overwrite, so a coordinator with --ray-tls failed to start once a year)."""
    first = coordinator_ray_tls(files)
    old_key, old_cert = first.key.read_bytes(), first.certificate.read_bytes()
    monkeypatch.setattr(ray_tls, "RENEW_BEFORE", dt.timedelta(days=ray_tls.NODE_CERT_DAYS + 1))
    renewed = coordinator_ray_tls(files)
    assert renewed.certificate.read_bytes() != old_cert and renewed.key.read_bytes() != old_key
    assert oct(renewed.key.stat().st_mode & 0o777) == "0o600"
    key = pki.load_private_key(renewed.key)
    assert pki.load_certificate(renewed.certificate).public_key() == key.public_key()


def test_tls_environment_names_all_three_files(tmp_path: Path) -> None:
    tls = RayTls(tmp_path / "n.crt", tmp_path / "n.key", tmp_path / "ca.crt")
    env = ray_auth_env(tmp_path / "token", tls)
    assert env["RAY_USE_TLS"] == "1" and env["RAY_AUTH_MODE"] == "token"
    assert env["RAY_TLS_CA_CERT"].endswith("ca.crt")
    assert ray_auth_env(None)["RAY_USE_TLS"] == "0"

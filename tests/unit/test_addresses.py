"""Listen and announced addresses, checked against the server certificate (issue 20)."""

from __future__ import annotations

from pathlib import Path

import pytest

from consortium import pki
from consortium.errors import NotFoundError, SettingsError
from coordinator.access.onboarding import init_consortium, reissue_server_certificate
from coordinator.access.pki_files import CoordinatorPki
from coordinator.addresses import (
    announced,
    certificate_names,
    check_server_names,
    names_host,
    public_host,
    told_hosts,
)
from coordinator.serve import check_transport
from coordinator.settings import CoordinatorSettings


def test_public_host_defaults_to_a_specific_listen_host_and_wins_when_set() -> None:
    assert public_host(CoordinatorSettings(listen_address="10.1.2.3:50051")) == "10.1.2.3"
    settings = CoordinatorSettings(listen_address="0.0.0.0:50051", public_host="c.example.org")
    assert public_host(settings) == "c.example.org"


@pytest.mark.parametrize("listen", ["0.0.0.0:50051", "[::]:50051"])
def test_a_wildcard_listen_address_needs_a_public_host(listen: str) -> None:
    with pytest.raises(SettingsError, match="set public_host"):
        public_host(CoordinatorSettings(listen_address=listen))


def test_a_runtime_bound_to_a_wildcard_is_announced_with_the_public_host() -> None:
    assert announced("0.0.0.0:9093", "c.example.org") == "c.example.org:9093"
    assert announced("[::]:9093", "2001:db8::1") == "[2001:db8::1]:9093"
    assert announced("10.0.0.7:9093", "c.example.org") == "10.0.0.7:9093"


def test_names_match_addresses_as_addresses_and_names_without_case() -> None:
    names = ["Coordinator.Example.org", "127.0.0.1", "2001:db8::1"]
    assert names_host(names, "coordinator.example.ORG")
    assert names_host(names, "[2001:db8:0::1]")
    assert not names_host(names, "10.0.0.1")
    assert not names_host(names, "example.org")


def test_told_hosts_names_the_setting_that_decides_each_host() -> None:
    settings = CoordinatorSettings(
        listen_address="0.0.0.0:1", public_host="c.example.org", fleet_edge_address="10.0.0.2:2"
    )
    assert told_hosts(settings) == {
        "public_host": "c.example.org",
        "fleet_edge_address": "10.0.0.2",
    }
    wildcard_edge = CoordinatorSettings(listen_address="10.0.0.1:1", fleet_edge_address="[::]:2")
    assert told_hosts(wildcard_edge) == {"listen_address": "10.0.0.1"}


def test_serve_refuses_a_public_host_its_certificate_does_not_name(tmp_path: Path) -> None:
    init_consortium(tmp_path, ["coordinator.example.org", "127.0.0.1"], cert_days=1)
    ok = CoordinatorSettings(
        data_dir=tmp_path, listen_address="0.0.0.0:0", public_host="coordinator.example.org"
    )
    assert check_transport(ok) is not None
    wrong = ok.model_copy(update={"public_host": "192.0.2.99"})
    with pytest.raises(SettingsError) as raised:
        check_transport(wrong)
    message = str(raised.value)
    assert "192.0.2.99" in message and "public_host" in message
    assert "coordinator.example.org, 127.0.0.1" in message  # what the certificate names
    assert "coordinator server-certificate" in message  # and the way out


def test_a_new_server_certificate_keeps_the_ca_and_names_the_new_hosts(tmp_path: Path) -> None:
    files = init_consortium(tmp_path, ["localhost"], cert_days=1)
    ca_before = files.ca_cert.read_bytes()
    reissue_server_certificate(tmp_path, ["c.example.org", "192.0.2.10"], cert_days=1)
    assert files.ca_cert.read_bytes() == ca_before  # sites' bundles stay valid
    cert = pki.load_certificate(files.server_cert)
    assert certificate_names(cert) == ["c.example.org", "192.0.2.10"]
    cert.verify_directly_issued_by(pki.load_certificate(files.ca_cert))
    check_server_names(files.server_cert, {"public_host": "192.0.2.10"})


def test_a_new_server_certificate_needs_the_ca_key(tmp_path: Path) -> None:
    files = init_consortium(tmp_path, ["localhost"], cert_days=1)
    CoordinatorPki(tmp_path).ca_key.unlink()
    with pytest.raises(NotFoundError, match="CA key"):
        reissue_server_certificate(tmp_path, ["c.example.org"], cert_days=1)
    assert certificate_names(pki.load_certificate(files.server_cert)) == ["localhost"]


@pytest.mark.parametrize("host", ["coordinator.example.org", "0.0.0.0", "::"])
def test_the_ray_host_must_be_an_address_ray_can_announce(host: str) -> None:
    with pytest.raises(ValueError, match="ray_host"):
        CoordinatorSettings(ray_host=host)

"""Where the coordinator listens, and the addresses sites are told: one model.

Every runtime a site reaches has a bind address: the control-plane API
(`listen_address`), the Fleet edge (`fleet_edge_address`), the Ray head (`ray_host`,
which Ray also announces to its nodes, so it is never a wildcard). Sites are told an
address too: the API's goes into `coordinator.address`, which `coordinator onboard`
writes into every bundle, and the edge's is returned by `RegisterNode`. A runtime bound
to a specific host is announced with that host; one bound to a wildcard (`0.0.0.0`,
`::`) with `public_host`, the name sites reach the coordinator by.

Sites check the coordinator's server certificate against the host they dial, so every
host sites are told must be named in that certificate; `check_server_names` refuses a
start-up that would fail every site's handshake, and says how to fix it.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path

from cryptography import x509

from consortium import pki
from consortium.errors import SettingsError
from consortium.net import is_wildcard_host, join_host_port, split_host_port
from coordinator.settings import CoordinatorSettings

FIX_HINT = (
    "issue a server certificate that names it with `coordinator server-certificate "
    "--data-dir DIR --host NAME [--host ...]` (docs/operations.md, 'Ports and directions')"
)


def public_host(settings: CoordinatorSettings) -> str:
    """The host sites reach this coordinator by: `public_host`, else the API's bind host."""
    if settings.public_host:
        return settings.public_host
    host, _ = split_host_port(settings.listen_address)
    if is_wildcard_host(host):
        raise SettingsError(
            f"listen_address {settings.listen_address!r} binds every interface, so it does "
            "not say where sites reach this coordinator: set public_host (--public-host "
            "NAME), a name or address in its server certificate"
        )
    return host


def announced(bind_address: str, public: str) -> str:
    """What sites are told for a runtime bound to `bind_address`."""
    host, port = split_host_port(bind_address)
    return join_host_port(public if is_wildcard_host(host) else host, port)


def certificate_names(certificate: x509.Certificate) -> list[str]:
    """The DNS names and IP addresses a certificate's subjectAltName lists."""
    try:
        sans = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    names: list[str] = list(sans.get_values_for_type(x509.DNSName))
    names += [str(address) for address in sans.get_values_for_type(x509.IPAddress)]
    return names


def names_host(names: list[str], host: str) -> bool:
    """Whether a certificate listing `names` is valid for `host` (IP addresses compared
    as addresses, DNS names without case)."""
    host = host.strip("[]")
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return host.lower().rstrip(".") in {name.lower() for name in names}
    for name in names:
        try:
            if ipaddress.ip_address(name) == address:
                return True
        except ValueError:
            continue
    return False


def check_server_names(server_cert: Path, told: dict[str, str]) -> None:
    """Raise SettingsError when a host sites are told (`told`: setting -> host) is not
    named in the server certificate."""
    names = certificate_names(pki.load_certificate(server_cert))
    for setting, host in told.items():
        if not names_host(names, host):
            raise SettingsError(
                f"sites are told to reach this coordinator at {host!r} ({setting}), but its "
                f"server certificate {server_cert} names only {', '.join(names) or 'nothing'}"
                f": every site's TLS handshake would fail. Set {setting} to one of those, or "
                f"{FIX_HINT}"
            )


def told_hosts(settings: CoordinatorSettings) -> dict[str, str]:
    """Each host sites are told, by the setting that decides it."""
    public = public_host(settings)
    told = {"public_host" if settings.public_host else "listen_address": public}
    edge_host, _ = split_host_port(settings.fleet_edge_address)
    if not is_wildcard_host(edge_host):
        told["fleet_edge_address"] = edge_host
    return told

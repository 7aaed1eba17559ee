"""`coordinator init / onboard / revoke / renew / replace-signing-key`: the operator's
side of onboarding."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from consortium import pki
from consortium.cli_errors import cli_errors
from consortium.console import plain_console
from consortium.file_modes import restrict_umask
from consortium.net import split_host_port
from consortium.site_keys import create_site_keys
from coordinator.access import onboarding
from coordinator.access.pki_files import CoordinatorPki
from coordinator.addresses import check_server_names
from coordinator.data_dir import DataDir
from coordinator.settings import CoordinatorSettings
from coordinator.state import SqliteStateStore

console = plain_console()

DataDirOption = Annotated[Path, typer.Option("--data-dir", help="Coordinator data dir.")]
CertDays = Annotated[int, typer.Option("--cert-days", min=1, help="Certificate lifetime.")]
Address = Annotated[
    str | None,
    typer.Option(
        "--coordinator-address",
        help="host:port sites connect to (default: the running coordinator's address).",
    ),
]


def _address(data_dir: Path, given: str | None) -> str:
    """The API address a bundle names, checked against the server certificate (a site
    told a host the certificate does not name fails every TLS handshake)."""
    if given:
        address = given
    elif DataDir(data_dir).address_file.exists():
        address = DataDir(data_dir).address_file.read_text().strip()
    elif DataDir(data_dir).port_file.exists():
        address = f"127.0.0.1:{DataDir(data_dir).port_file.read_text().strip()}"
    else:
        raise typer.BadParameter(
            "no coordinator address known yet: pass --coordinator-address HOST:PORT"
        )
    try:
        host, _ = split_host_port(address)
    except ValueError as err:
        raise typer.BadParameter(str(err)) from None
    check_server_names(CoordinatorPki(data_dir).server_cert, {"--coordinator-address": host})
    return address


def init(
    data_dir: DataDirOption = Path(".consortium"),
    host: Annotated[
        list[str] | None, typer.Option("--host", help="Name or IP in the server certificate.")
    ] = None,
    cert_days: CertDays = 365,
    force: Annotated[bool, typer.Option(help="Replace an existing consortium.")] = False,
) -> None:
    """Create the root CA, the coordinator's certificates and signing key, the Ray token."""
    restrict_umask()  # keys, certificates, bundles and state: owner-only
    with cli_errors():
        hosts = host or ["localhost", "127.0.0.1"]
        files = onboarding.init_consortium(data_dir, hosts, cert_days, force)
        fingerprint = pki.fingerprint(pki.load_certificate(files.ca_cert))
        console.print(f"consortium created in {files.root}")
        console.print(f"CA certificate: {files.ca_cert}")
        console.print(f"CA SHA-256 fingerprint (give it to sites out of band):\n  {fingerprint}")
        console.print(f"provenance signing key: {DataDir(data_dir).signing_key}")
        console.print(
            f"its certificate from the CA (to publish): {DataDir(data_dir).signing_certificate}"
        )
        console.print("private keys are mode 0600; keep pki/ca.key offline if you can")


def server_certificate(
    host: Annotated[
        list[str],
        typer.Option("--host", help="Name or IP sites reach the coordinator by (repeatable)."),
    ],
    data_dir: DataDirOption = Path(".consortium"),
    cert_days: CertDays = 365,
) -> None:
    """Issue the coordinator a new server certificate for these names (the CA stays; sites
    need nothing new). Restart `coordinator serve` to use it."""
    restrict_umask()
    with cli_errors():
        files = onboarding.reissue_server_certificate(data_dir, host, cert_days)
        console.print(f"server certificate {files.server_cert} now names {', '.join(host)}")
        console.print("restart `coordinator serve` to use it")


def onboard(
    institution: str,
    request: Annotated[
        Path | None,
        typer.Option(help="The site's request dir (from `client keygen`): CSR and public keys."),
    ] = None,
    generate_keys: Annotated[
        Path | None,
        typer.Option(
            "--generate-keys",
            help="DEMO ONLY: create the site's private keys here, on the operator's machine.",
        ),
    ] = None,
    out: Annotated[Path | None, typer.Option(help="Bundle dir to write.")] = None,
    data_dir: DataDirOption = Path(".consortium"),
    coordinator_address: Address = None,
    cert_days: CertDays = 365,
) -> None:
    """Sign an institution's CSR, register its keys and write its startup bundle."""
    restrict_umask()  # keys, certificates, bundles and state: owner-only
    with cli_errors():
        CoordinatorPki(data_dir).require()
        if (request is None) == (generate_keys is None):
            raise typer.BadParameter("pass exactly one of --request or --generate-keys")
        if generate_keys is not None:
            console.print(
                "demo onboarding: the site's private keys are generated by the "
                "operator; real sites run `client keygen` and keep their keys",
                style="yellow",
            )
            request = create_site_keys(generate_keys, institution).request_dir
        assert request is not None
        settings = CoordinatorSettings(data_dir=data_dir)
        store = SqliteStateStore(settings.state_path)
        try:
            bundle = onboarding.onboard(
                data_dir,
                store,
                institution,
                onboarding.Request.from_dir(request),
                out or DataDir(data_dir).bundle_dir(institution),
                _address(data_dir, coordinator_address),
                cert_days,
            )
        finally:
            store.close()
        console.print(f"onboarded {institution}; startup bundle: {bundle}")


def revoke(institution: str, data_dir: DataDirOption = Path(".consortium")) -> None:
    """Deny the institution on every channel: control plane, SuperLink, updates."""
    restrict_umask()  # keys, certificates, bundles and state: owner-only
    with cli_errors():
        store = SqliteStateStore(CoordinatorSettings(data_dir=data_dir).state_path)
        try:
            onboarding.revoke(store, institution)
        finally:
            store.close()
        console.print(
            f"revoked {institution}: its certificate is refused, its nodes are marked gone, "
            "its SuperNode key is unregistered by the running coordinator"
        )


def renew(
    institution: str,
    csr: Annotated[Path, typer.Option(help="A new CSR from the site.")],
    out: Annotated[Path | None, typer.Option(help="Bundle dir to write.")] = None,
    data_dir: DataDirOption = Path(".consortium"),
    coordinator_address: Address = None,
    cert_days: CertDays = 365,
) -> None:
    """Issue a new certificate for an onboarded institution."""
    restrict_umask()  # keys, certificates, bundles and state: owner-only
    with cli_errors():
        store = SqliteStateStore(CoordinatorSettings(data_dir=data_dir).state_path)
        try:
            bundle = onboarding.renew(
                data_dir,
                store,
                institution,
                csr,
                out or DataDir(data_dir).bundle_dir(institution),
                _address(data_dir, coordinator_address),
                cert_days,
            )
        finally:
            store.close()
        console.print(f"renewed {institution}; new bundle: {bundle}")


def replace_signing_key(
    institution: str,
    public_key: Annotated[
        Path, typer.Option("--public-key", help="The site's new update-signing public key.")
    ],
    reason: Annotated[str, typer.Option("--reason", help="Why (written to the log).")],
    data_dir: DataDirOption = Path(".consortium"),
) -> None:
    """Replace the institution's pinned update-signing key, recorded in the provenance log."""
    restrict_umask()
    with cli_errors():
        store = SqliteStateStore(CoordinatorSettings(data_dir=data_dir).state_path)
        try:
            record = onboarding.replace_signing_key(
                data_dir, store, institution, public_key, reason
            )
        finally:
            store.close()
        replaced = ", ".join(k[:16] for k in record.replaced_key_ids) or "none"
        console.print(
            f"{institution} now signs updates with key {record.key_id[:16]} only "
            f"(replaced: {replaced}); recorded in the provenance log"
        )

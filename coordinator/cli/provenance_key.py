"""`coordinator provenance key`: the provenance signing key's X.509 certificate, issued
by the consortium CA, printed (and written) for publication.

With it and the CA certificate anyone checks the key with standard tools::

    openssl verify -CAfile ca.crt coordinator-signing.crt

The certificate is issued when missing or stale (another key, another CA, expired),
which needs the CA key in the data dir; `ensure_signing_certificate` says so if not.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from consortium import pki
from consortium.cli_errors import cli_errors
from consortium.file_modes import replace_file
from consortium.provenance.signing import VerifyingKey
from coordinator.access.onboarding import ensure_signing_certificate
from coordinator.access.pki_files import CoordinatorPki

DataDirOption = Annotated[Path, typer.Option("--data-dir", help="Coordinator data dir.")]
OutOption = Annotated[Path | None, typer.Option("--out", help="Also write the certificate here.")]


def key(data_dir: DataDirOption = Path(".consortium"), out: OutOption = None) -> None:
    """Print the provenance signing key's certificate, issued by the consortium CA, for
    publication."""
    with cli_errors():
        cert = ensure_signing_certificate(data_dir)
        ca_cert = pki.load_certificate(CoordinatorPki(data_dir).ca_cert)
        certified = pki.check_signing_key_certificate(cert, ca_cert)
        pem = pki.pem(cert)
        typer.echo(pem.decode(), nl=False)
        typer.echo(f"key id: {VerifyingKey(certified).key_id}")
        typer.echo(f"certificate sha256: {pki.fingerprint(cert)}")
        typer.echo(
            f"issued by: {pki.institution_of(ca_cert.subject)} "
            f"(CA sha256 {pki.fingerprint(ca_cert)})"
        )
        if out is not None:
            replace_file(out, pem)
            typer.echo(f"written to {out}")

"""The consortium CA certifies the coordinator's Ed25519 provenance signing key with an
X.509 certificate (`consortium/pki.py: issue_signing_key_certificate`), so an outsider
holding the CA certificate checks the key with standard tools; every bundle carries it.
"""

from __future__ import annotations

import datetime as dt
import shutil
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
import typer
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.x509.verification import ExtensionPolicy, PolicyBuilder, Store
from typer.testing import CliRunner

from consortium import pki
from consortium.errors import NotFoundError
from consortium.exit_codes import ExitCode
from consortium.provenance.signing import SigningKey, VerifyingKey
from consortium.site_keys import create_site_keys
from coordinator.access.onboarding import (
    Request,
    ensure_signing_certificate,
    init_consortium,
    onboard,
)
from coordinator.access.pki_files import CoordinatorPki
from coordinator.cli.provenance_key import key as key_command
from coordinator.data_dir import DataDir
from coordinator.state import SqliteStateStore

CERT_DAYS = 30


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    """A coordinator data dir just after `coordinator init`."""
    root = tmp_path / "coordinator"
    init_consortium(root, ["127.0.0.1"], cert_days=CERT_DAYS)
    return root


@pytest.fixture
def store(data_dir: Path) -> Iterator[SqliteStateStore]:
    state = SqliteStateStore(DataDir(data_dir).state_db)
    try:
        yield state
    finally:
        state.close()


def ca_of(data_dir: Path) -> x509.Certificate:
    return pki.load_certificate(CoordinatorPki(data_dir).ca_cert)


def signing_key_of(data_dir: Path) -> VerifyingKey:
    return VerifyingKey.load(DataDir(data_dir).signing_public_key)


def certificate_of(data_dir: Path) -> x509.Certificate:
    return pki.load_certificate(DataDir(data_dir).signing_certificate)


def ed25519(key: VerifyingKey) -> Ed25519PublicKey:
    return Ed25519PublicKey.from_public_bytes(key.raw)


def move_ca_key_offline(data_dir: Path, tmp_path: Path) -> Path:
    offline = tmp_path / "offline-ca.key"
    shutil.move(CoordinatorPki(data_dir).ca_key, offline)
    return offline


def test_init_writes_a_certificate_the_ca_issued_for_the_signing_key(data_dir: Path) -> None:
    cert = certificate_of(data_dir)
    certified = pki.check_signing_key_certificate(cert, ca_of(data_dir))
    assert VerifyingKey(certified).raw == signing_key_of(data_dir).raw
    signing = SigningKey.load(DataDir(data_dir).signing_key)
    assert VerifyingKey(certified).raw == signing.public.raw
    assert pki.institution_of(cert.subject) == pki.SIGNING_KEY_COMMON_NAME


def test_the_certificate_allows_signing_only_and_is_not_a_ca(data_dir: Path) -> None:
    cert = certificate_of(data_dir)
    assert cert.version == x509.Version.v3
    assert isinstance(cert.signature_hash_algorithm, hashes.SHA256)
    usage = cert.extensions.get_extension_for_class(x509.KeyUsage)
    assert usage.critical
    assert usage.value.digital_signature
    assert not (usage.value.key_cert_sign or usage.value.crl_sign)
    assert not usage.value.content_commitment
    constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert constraints.critical
    assert not constraints.value.ca
    with pytest.raises(x509.ExtensionNotFound):
        cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage)
    assert cert.not_valid_after_utc <= ca_of(data_dir).not_valid_after_utc


def test_the_certificate_passes_rfc_5280_path_validation_to_the_ca(data_dir: Path) -> None:
    """What an outsider's X.509 tooling does (`openssl verify -CAfile ca.crt`):
    cryptography's path validator, with no EKU asked of the end entity."""
    verifier = (
        PolicyBuilder()
        .store(Store([ca_of(data_dir)]))
        .extension_policies(
            ca_policy=ExtensionPolicy.webpki_defaults_ca(), ee_policy=ExtensionPolicy.permit_all()
        )
        .build_client_verifier()
    )
    chain = verifier.verify(certificate_of(data_dir), []).chain
    assert chain[-1] == ca_of(data_dir)


def test_a_certificate_from_another_ca_is_refused(data_dir: Path, tmp_path: Path) -> None:
    """Another consortium's CA has the same name; only its signature tells them apart."""
    other = tmp_path / "other"
    init_consortium(other, ["127.0.0.1"], cert_days=CERT_DAYS)
    assert ca_of(other).subject == ca_of(data_dir).subject
    with pytest.raises(pki.CertificateError, match="not issued by the CA"):
        pki.check_signing_key_certificate(certificate_of(other), ca_of(data_dir))
    # Even when it certifies this coordinator's own key.
    forged = pki.issue_signing_key_certificate(
        pki.load_private_key(CoordinatorPki(other).ca_key),
        ca_of(other),
        ed25519(signing_key_of(data_dir)),
        CERT_DAYS,
    )
    with pytest.raises(pki.CertificateError, match="not issued by the CA"):
        pki.check_signing_key_certificate(forged, ca_of(data_dir))


def test_a_certificate_for_another_key_is_detected_and_reissued(data_dir: Path) -> None:
    files = CoordinatorPki(data_dir)
    stranger = SigningKey.generate().public
    wrong = pki.issue_signing_key_certificate(
        pki.load_private_key(files.ca_key), ca_of(data_dir), ed25519(stranger), CERT_DAYS
    )
    certified = pki.check_signing_key_certificate(wrong, ca_of(data_dir))  # the CA's, valid
    assert VerifyingKey(certified).raw == stranger.raw != signing_key_of(data_dir).raw
    DataDir(data_dir).signing_certificate.write_bytes(pki.pem(wrong))
    cert = ensure_signing_certificate(data_dir)
    assert cert != wrong
    certified = pki.check_signing_key_certificate(cert, ca_of(data_dir))
    assert VerifyingKey(certified).raw == signing_key_of(data_dir).raw
    assert certificate_of(data_dir) == cert
    mode = DataDir(data_dir).signing_certificate.stat().st_mode
    assert stat.S_IMODE(mode) == 0o600  # like all of the data dir, whatever the umask


def test_a_certificate_from_another_ca_on_disk_is_reissued(data_dir: Path, tmp_path: Path) -> None:
    other = tmp_path / "other"
    init_consortium(other, ["127.0.0.1"], cert_days=CERT_DAYS)
    shutil.copyfile(DataDir(other).signing_certificate, DataDir(data_dir).signing_certificate)
    cert = ensure_signing_certificate(data_dir)
    pki.check_signing_key_certificate(cert, ca_of(data_dir))


def test_a_valid_certificate_is_kept(data_dir: Path) -> None:
    assert ensure_signing_certificate(data_dir) == certificate_of(data_dir)
    assert ensure_signing_certificate(data_dir) == certificate_of(data_dir)


def test_an_ecdsa_leaf_certificate_is_refused(data_dir: Path) -> None:
    server = pki.load_certificate(CoordinatorPki(data_dir).server_cert)
    server.verify_directly_issued_by(ca_of(data_dir))  # the CA's: refused for its key alone
    with pytest.raises(pki.CertificateError, match=r"EC \(secp256r1\) key, not an Ed25519"):
        pki.check_signing_key_certificate(server, ca_of(data_dir))


def test_a_certificate_without_digital_signature_usage_is_refused(data_dir: Path) -> None:
    ca_cert = ca_of(data_dir)
    now = dt.datetime.now(dt.UTC)
    no_signing = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([]))
        .issuer_name(ca_cert.subject)
        .public_key(ed25519(signing_key_of(data_dir)))
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=1))
        .not_valid_after(now + dt.timedelta(days=1))
        .sign(pki.load_private_key(CoordinatorPki(data_dir).ca_key), hashes.SHA256())
    )
    with pytest.raises(pki.CertificateError, match="digital signatures"):
        pki.check_signing_key_certificate(no_signing, ca_cert)


def test_an_expired_certificate_is_refused(data_dir: Path) -> None:
    cert = certificate_of(data_dir)
    later = cert.not_valid_after_utc + dt.timedelta(seconds=1)
    with pytest.raises(pki.CertificateError, match="not at"):
        pki.check_signing_key_certificate(cert, ca_of(data_dir), at=later)


def test_without_the_ca_key_a_missing_certificate_names_the_ca_key(
    data_dir: Path, tmp_path: Path
) -> None:
    move_ca_key_offline(data_dir, tmp_path)
    DataDir(data_dir).signing_certificate.unlink()
    with pytest.raises(NotFoundError, match=r"CA key .*ca\.key.*offline") as refused:
        ensure_signing_certificate(data_dir)
    assert "does not exist" in str(refused.value)
    assert not DataDir(data_dir).signing_certificate.exists()


def test_without_the_ca_key_a_valid_certificate_is_still_returned(
    data_dir: Path, tmp_path: Path
) -> None:
    move_ca_key_offline(data_dir, tmp_path)
    assert ensure_signing_certificate(data_dir) == certificate_of(data_dir)


def test_the_bundle_holds_a_certificate_that_chains_to_its_ca(
    data_dir: Path, store: SqliteStateStore, tmp_path: Path
) -> None:
    bundle = onboard_alpha(data_dir, store, tmp_path)
    cert = pki.load_certificate(bundle / pki.SIGNING_KEY_CERTIFICATE_FILE)
    assert pki.SIGNING_KEY_CERTIFICATE_FILE == "coordinator-signing.crt"
    certified = pki.check_signing_key_certificate(cert, pki.load_certificate(bundle / "ca.crt"))
    assert VerifyingKey(certified).raw == VerifyingKey.load(bundle / "coordinator-signing.pub").raw
    assert (bundle / "coordinator-signing.sig").exists()  # the endorsement stays


def test_a_consortium_from_before_certificates_gets_one_with_its_next_bundle(
    data_dir: Path, store: SqliteStateStore, tmp_path: Path
) -> None:
    DataDir(data_dir).signing_certificate.unlink()
    bundle = onboard_alpha(data_dir, store, tmp_path)
    issued = certificate_of(data_dir)
    assert pki.load_certificate(bundle / pki.SIGNING_KEY_CERTIFICATE_FILE) == issued
    pki.check_signing_key_certificate(issued, ca_of(data_dir))


def onboard_alpha(data_dir: Path, store: SqliteStateStore, tmp_path: Path) -> Path:
    keys = create_site_keys(tmp_path / "site", "alpha")
    return onboard(
        data_dir,
        store,
        "alpha",
        Request.from_dir(keys.request_dir),
        tmp_path / "bundle",
        "127.0.0.1:1",
        cert_days=CERT_DAYS,
    )


def key_app() -> typer.Typer:
    app = typer.Typer()
    app.command("key")(key_command)
    return app


def test_the_key_command_prints_the_certificate_and_the_key_id(
    data_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "published" / "coordinator-signing.crt"
    result = CliRunner().invoke(key_app(), ["--data-dir", str(data_dir), "--out", str(out)])
    assert result.exit_code == 0, result.output
    cert = certificate_of(data_dir)
    ca_cert = ca_of(data_dir)
    assert pki.pem(cert).decode() in result.stdout
    lines = result.stdout.splitlines()
    assert f"key id: {signing_key_of(data_dir).key_id}" in lines
    assert f"certificate sha256: {pki.fingerprint(cert)}" in lines
    assert f"issued by: Consortium Root CA (CA sha256 {pki.fingerprint(ca_cert)})" in lines
    assert out.read_bytes() == pki.pem(cert)


def test_the_key_command_without_the_ca_key_or_a_certificate_exits_not_found(
    data_dir: Path, tmp_path: Path
) -> None:
    move_ca_key_offline(data_dir, tmp_path)
    DataDir(data_dir).signing_certificate.unlink()
    result = CliRunner().invoke(key_app(), ["--data-dir", str(data_dir)])
    assert result.exit_code == ExitCode.NOT_FOUND
    assert "ca.key" in result.stderr
    assert "BEGIN CERTIFICATE" not in result.stdout

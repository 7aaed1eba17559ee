"""Operator-side onboarding: create the consortium, onboard, revoke and renew institutions.

Everything here works on the coordinator's data dir and state store; the
running coordinator picks changes up (new SuperNode keys are registered with
the SuperLink, revoked ones unregistered, revoked certificates refused).
"""

from __future__ import annotations

import hashlib
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from consortium import pki
from consortium.errors import ConflictError, InvalidArgumentError, NotFoundError
from consortium.file_modes import private_dir
from consortium.names import is_institution_name
from consortium.provenance.binding import check_binding_against_csr
from consortium.provenance.log import ProvenanceLog
from consortium.provenance.records import InstitutionKey, InstitutionKeyChanged, KeyBinding
from consortium.provenance.signing import SignatureError, SigningKey, VerifyingKey, b64, unb64
from consortium.ray_env import new_ray_token
from consortium.run_approval import (
    COORDINATOR_KEY_ENDORSEMENT_FILE,
    COORDINATOR_KEY_FILE,
    ca_endorsement_payload,
)
from coordinator.access.pki_files import OPERATOR, CoordinatorPki
from coordinator.data_dir import DataDir
from coordinator.state import StateStore

BUNDLE_FILE = "bundle.toml"


@dataclass(frozen=True)
class Request:
    """What a site sends: its CSR, two public keys and the binding of the
    update-signing key to the institution, signed with the CSR's key (no secrets)."""

    csr: Path
    supernode_public: Path
    signing_public: Path
    binding: Path

    @classmethod
    def from_dir(cls, directory: Path) -> Request:
        """The request a site's `client keygen` wrote; NotFoundError names what is missing."""
        if not directory.is_dir():
            raise NotFoundError(
                f"the site request {directory} is not a directory: pass the request/ "
                "folder the site's `client keygen` wrote (tls.csr, supernode.pub, "
                "institution-signing.pub, institution-signing.binding)"
            )
        request = cls(
            directory / "tls.csr",
            directory / "supernode.pub",
            directory / "institution-signing.pub",
            directory / "institution-signing.binding",
        )
        for path in (request.csr, request.supernode_public, request.signing_public):
            if not path.exists():
                raise NotFoundError(
                    f"the site request is missing {path.name} (in {directory}): ask the site "
                    "for the whole request/ folder `client keygen` wrote"
                )
        if not request.binding.exists():
            raise NotFoundError(
                f"the site request is missing {request.binding.name} (in {directory}): "
                "the site's keys predate key bindings; ask the site to run `client keygen "
                "--force` (new keys and a new request) and send the whole request/ folder"
            )
        return request


def _write_secret(path: Path, data: bytes, force: bool) -> None:
    if force:
        path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)


def init_consortium(
    data_dir: Path, hosts: list[str], cert_days: int, force: bool = False
) -> CoordinatorPki:
    """Root CA, server certificate, operator certificate, signing key and the CA's
    certificate for it, Ray token."""
    files = CoordinatorPki(data_dir)
    existing = [p for p in (files.ca_key, DataDir(data_dir).signing_key) if p.exists()]
    if existing and not force:
        raise ConflictError(f"{existing[0]} already exists; pass --force to start over")
    # Owner-only dirs even when called in-process (the demo, the test harness),
    # where no CLI set the umask.
    private_dir(data_dir)
    private_dir(files.root)
    ca_key = pki.generate_key()
    ca_cert = pki.create_ca(ca_key)
    pki.write_private_key(files.ca_key, ca_key, force=force)
    files.ca_cert.write_bytes(pki.pem(ca_cert))
    _write_server_certificate(files, ca_key, ca_cert, hosts, cert_days, force)
    operator_key = pki.generate_key()
    pki.write_private_key(files.operator_key, operator_key, force=force)
    operator_csr = pki.make_csr(operator_key, OPERATOR)
    files.operator_cert.write_bytes(
        pki.pem(pki.sign_csr(ca_key, ca_cert, operator_csr, OPERATOR, cert_days))
    )
    _write_secret(files.ray_token, new_ray_token(), force)
    signing = DataDir(data_dir).signing_key
    if force:
        signing.unlink(missing_ok=True)
        signing.with_suffix(".pub").unlink(missing_ok=True)
    private_dir(signing.parent)
    key = SigningKey.generate()
    key.save(signing)
    _write_signing_certificate(
        DataDir(data_dir),
        pki.issue_signing_key_certificate(
            ca_key, ca_cert, _ed25519(key.public), pki.CA_VALIDITY_DAYS
        ),
    )
    return files


def ensure_signing_certificate(data_dir: Path) -> x509.Certificate:
    """The CA's certificate for the provenance signing key (`keys/coordinator-signing.pub`):
    the one on disk if the current CA issued it for that key and it is valid now, else a
    new one, which needs the CA key here (consortia created before certificates existed
    get theirs this way)."""
    files = CoordinatorPki(data_dir)
    files.require()
    paths = DataDir(data_dir)
    if not paths.signing_public_key.exists():
        raise NotFoundError(
            f"the provenance signing key {paths.signing_public_key} does not exist: "
            f"run `coordinator init --data-dir {data_dir}` first"
        )
    try:
        key = VerifyingKey.load(paths.signing_public_key)
    except ValueError as err:  # SignatureError: not an Ed25519 public key
        raise InvalidArgumentError(f"{paths.signing_public_key}: {err}") from None
    ca_cert = pki.load_certificate(files.ca_cert)
    path = paths.signing_certificate
    if path.exists():
        try:
            cert = pki.load_certificate(path)
            certified = pki.check_signing_key_certificate(cert, ca_cert)
        except InvalidArgumentError as err:  # CertificateError, or not PEM
            problem = str(err)
        else:
            other = VerifyingKey(certified)
            if other.raw == key.raw:
                return cert
            problem = f"{path} certifies key {other.key_id[:16]}, not {key.key_id[:16]}"
    else:
        problem = f"{path} does not exist"
    if not files.ca_key.exists():
        raise NotFoundError(
            f"the provenance signing key needs a new certificate ({problem}), and issuing "
            f"it needs the CA key {files.ca_key}, which is not here (it may be kept "
            "offline): copy it back (mode 0600), run the command again, then move it away again"
        )
    cert = pki.issue_signing_key_certificate(
        pki.load_private_key(files.ca_key), ca_cert, _ed25519(key), pki.CA_VALIDITY_DAYS
    )
    _write_signing_certificate(paths, cert)
    return cert


def _ed25519(key: VerifyingKey) -> Ed25519PublicKey:
    return Ed25519PublicKey.from_public_bytes(key.raw)


def _write_signing_certificate(paths: DataDir, cert: x509.Certificate) -> None:
    """Written whole or not at all (a reader never sees half a certificate), 0600 like
    everything in the data dir whatever the umask (`coordinator provenance key` leaves
    it alone: its --out copy is for publication)."""
    partial = paths.signing_certificate.with_suffix(".crt.partial")
    partial.unlink(missing_ok=True)
    _write_secret(partial, pki.pem(cert), force=False)
    os.replace(partial, paths.signing_certificate)


def reissue_server_certificate(data_dir: Path, hosts: list[str], cert_days: int) -> CoordinatorPki:
    """A new key and server certificate for `hosts`, from the existing CA (which needs
    its key here): what a coordinator moved to a new name or address needs."""
    files = CoordinatorPki(data_dir)
    files.require()
    if not files.ca_key.exists():
        raise NotFoundError(
            f"the CA key {files.ca_key} is not here: bring it back (it may be kept offline)"
        )
    ca_key = pki.load_private_key(files.ca_key)
    _write_server_certificate(
        files, ca_key, pki.load_certificate(files.ca_cert), hosts, cert_days, force=True
    )
    return files


def _write_server_certificate(
    files: CoordinatorPki,
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    hosts: list[str],
    cert_days: int,
    force: bool,
) -> None:
    server_key = pki.generate_key()
    pki.write_private_key(files.server_key, server_key, force=force)
    files.server_cert.write_bytes(
        pki.pem(pki.issue_server_certificate(ca_key, ca_cert, server_key, hosts, cert_days))
    )


def _issue(
    files: CoordinatorPki, store: StateStore, institution: str, csr_path: Path, days: int
) -> x509.Certificate:
    files.require()
    ca_key = pki.load_private_key(files.ca_key)
    ca_cert = pki.load_certificate(files.ca_cert)
    cert = pki.sign_csr(ca_key, ca_cert, pki.load_csr(csr_path), institution, days)
    store.add_certificate(
        format(cert.serial_number, "x"),
        institution,
        pki.fingerprint(cert),
        int(cert.not_valid_after_utc.timestamp() * 1000),
    )
    return cert


def onboard(
    data_dir: Path,
    store: StateStore,
    institution: str,
    request: Request,
    bundle_dir: Path,
    coordinator_address: str,
    cert_days: int,
) -> Path:
    """Sign the site's CSR, register its keys, write its startup bundle."""
    if institution == OPERATOR or not is_institution_name(institution):
        raise InvalidArgumentError(
            f"institution name {institution!r}: use letters, digits, '-' and '_' "
            f"(and not {OPERATOR!r})"
        )
    if store.is_revoked(institution):
        raise ConflictError(f"{institution} was revoked; choose a new name to onboard again")
    files = CoordinatorPki(data_dir)
    try:
        signing = VerifyingKey.load(request.signing_public)
    except (SignatureError, ValueError) as err:
        raise InvalidArgumentError(f"{request.signing_public}: {err}") from None
    for other in store.institutions():
        if other != institution and signing.key_id in store.institution_keys(other):
            raise ConflictError(
                f"{request.signing_public}: signing key {signing.key_id[:16]} belongs to {other}"
            )
    supernode_key = request.supernode_public.read_text().strip()
    if not supernode_key.startswith("ecdsa-sha2-nistp"):
        raise InvalidArgumentError(f"{request.supernode_public} is not an OpenSSH EC public key")
    # One SuperNode key, one institution: the SuperLink knows nodes by key, so a second
    # institution naming a member's key would count that member's SuperNode as its own
    # (and keep it registered if the member were revoked).
    for other, key, _ in store.supernode_keys():
        if other != institution and key == supernode_key:
            raise ConflictError(
                f"{request.supernode_public}: this SuperNode key belongs to {other}; each site "
                "makes its own (client keys)"
            )
    binding = _checked_binding(request, institution, signing)
    paths = DataDir(data_dir)
    coordinator_key = SigningKey.load(paths.signing_key)
    cert = _issue(files, store, institution, request.csr, cert_days)
    # Logged before the key is pinned, so no pinned key goes unrecorded.
    log = ProvenanceLog(paths.provenance_log, coordinator_key)
    if signing.key_id not in log.logged_key_ids():
        record = InstitutionKey(
            institution=institution,
            key_id=signing.key_id,
            public_key=b64(signing.raw),
            binding=KeyBinding(certificate=pki.pem(cert).decode(), signature=b64(binding)),
        )
        log.append_record(record)
        log.publish_tree_head()
    store.add_institution_key(institution, signing.key_id, signing.raw)
    store.add_supernode_key(institution, supernode_key)
    return write_bundle(files, institution, cert, bundle_dir, coordinator_address)


def _checked_binding(request: Request, institution: str, signing: VerifyingKey) -> bytes:
    """The request's binding signature, once it verifies with the CSR's key over
    (institution, signing key): checked before anything is issued or written."""
    csr = pki.load_csr(request.csr)
    named = pki.institution_of(csr.subject)
    if named != institution:  # the CSR's fault, not the binding's: say so first
        raise InvalidArgumentError(f"{request.csr}: the CSR names {named!r}, not {institution!r}")
    try:
        signature = unb64(request.binding.read_text().strip())
        check_binding_against_csr(csr, institution, signing, signature)
    except ValueError as err:  # BindingError, SignatureError (not base64), not text
        raise InvalidArgumentError(
            f"{request.binding}: {err}; the binding must come from the same "
            "`client keygen` as the CSR and the signing key"
        ) from None
    return signature


def write_bundle(
    files: CoordinatorPki,
    institution: str,
    cert: x509.Certificate,
    bundle_dir: Path,
    coordinator_address: str,
) -> Path:
    """The startup bundle: public material (the CA, the institution's certificate, the
    coordinator's public signing key, the CA's endorsement of it and the CA's X.509
    certificate for it) and the Ray token, never a CA or coordinator private key."""
    signing_certificate = ensure_signing_certificate(files.data_dir)  # before any write
    private_dir(bundle_dir)  # it holds the Ray token
    ca_cert = pki.load_certificate(files.ca_cert)
    shutil.copyfile(files.ca_cert, bundle_dir / "ca.crt")
    fingerprint = pki.fingerprint(ca_cert)
    (bundle_dir / "ca.sha256").write_text(fingerprint + "\n")
    (bundle_dir / "institution.crt").write_bytes(pki.pem(cert))
    _write_secret(bundle_dir / "ray-token", files.ray_token.read_bytes(), force=True)
    # The key whose signed run approvals the site checks, endorsed by the pinned CA.
    coordinator_key = VerifyingKey.load(DataDir(files.data_dir).signing_public_key)
    (bundle_dir / COORDINATOR_KEY_FILE).write_bytes(coordinator_key.pem())
    (bundle_dir / COORDINATOR_KEY_ENDORSEMENT_FILE).write_bytes(
        pki.endorse(pki.load_private_key(files.ca_key), ca_endorsement_payload(coordinator_key))
    )
    # The same key as an X.509 certificate, which outsiders check with standard tools.
    (bundle_dir / pki.SIGNING_KEY_CERTIFICATE_FILE).write_bytes(pki.pem(signing_certificate))
    (bundle_dir / BUNDLE_FILE).write_text(
        f'institution = "{institution}"\n'
        f'coordinator_address = "{coordinator_address}"\n'
        f'ca_fingerprint = "{fingerprint}"\n'
        f'certificate_not_after = "{cert.not_valid_after_utc.isoformat()}"\n'
    )
    return bundle_dir


def renew(
    data_dir: Path,
    store: StateStore,
    institution: str,
    csr: Path,
    bundle_dir: Path,
    coordinator_address: str,
    cert_days: int,
) -> Path:
    if institution not in store.institutions():
        raise NotFoundError(f"{institution} was never onboarded")
    if store.is_revoked(institution):
        raise ConflictError(f"{institution} is revoked; it cannot renew")
    files = CoordinatorPki(data_dir)
    cert = _issue(files, store, institution, csr, cert_days)
    return write_bundle(files, institution, cert, bundle_dir, coordinator_address)


def revoke(store: StateStore, institution: str) -> None:
    if institution not in store.institutions():
        raise NotFoundError(f"{institution} was never onboarded")
    store.revoke_institution(institution)


def replace_signing_key(
    data_dir: Path, store: StateStore, institution: str, public_key: Path, reason: str
) -> InstitutionKeyChanged:
    """The operator's one way to change an institution's update-signing key: the new
    key becomes its only pinned key, and the change is a signed record in the
    provenance log (written first, so no change goes unrecorded)."""
    if institution not in store.institutions():
        raise NotFoundError(f"{institution} was never onboarded")
    if store.is_revoked(institution):
        raise ConflictError(f"{institution} is revoked; onboard it under a new name")
    if not reason.strip():
        raise InvalidArgumentError("--reason: say why the key changes (it is logged)")
    try:
        key = VerifyingKey.load(public_key)
    except (SignatureError, ValueError, OSError) as err:
        raise InvalidArgumentError(f"{public_key}: {err}") from None
    for other in store.institutions():
        if other != institution and key.key_id in store.institution_keys(other):
            raise ConflictError(f"signing key {key.key_id[:16]} belongs to {other}")
    paths = DataDir(data_dir)
    replaced = sorted(k for k in store.institution_keys(institution) if k != key.key_id)
    record = InstitutionKeyChanged(
        institution=institution,
        key_id=key.key_id,
        public_key=b64(key.raw),
        replaced_key_ids=replaced,
        reason=reason.strip(),
    )
    log = ProvenanceLog(paths.provenance_log, SigningKey.load(paths.signing_key))
    log.append_record(record)
    log.publish_tree_head()
    store.replace_institution_keys(institution, key.key_id, key.raw)
    return record


def key_digest(public_key: str) -> str:
    return hashlib.sha256(public_key.encode()).hexdigest()[:16]

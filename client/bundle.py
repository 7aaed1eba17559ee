"""The startup bundle an operator sends a site, checked before anything connects.

bundle dir: ca.crt, ca.sha256, institution.crt, bundle.toml, ray-token,
coordinator-signing.pub (the key that signs run approvals) and coordinator-signing.sig
(the CA's endorsement of that key, so pinning the CA pins it too). The
site's private keys live in its state dir (`client keygen`), never in a bundle.
Every problem names the file that is wrong.
"""

from __future__ import annotations

import datetime as dt
import os
import stat
import tomllib
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization

from consortium import pki
from consortium.errors import SettingsError
from consortium.names import name_problem
from consortium.net import split_host_port
from consortium.provenance.signing import SignatureError, VerifyingKey
from consortium.run_approval import (
    COORDINATOR_KEY_ENDORSEMENT_FILE,
    COORDINATOR_KEY_FILE,
    ca_endorsement_payload,
)
from consortium.site_keys import SiteKeys
from consortium.tls import ClientTls


class BundleError(SettingsError):
    """The bundle or the site's keys are missing, corrupt or do not belong together."""


@dataclass(frozen=True)
class Bundle:
    directory: Path
    institution: str
    coordinator_address: str
    keys: SiteKeys
    coordinator_key: VerifyingKey  # checks the coordinator's signed run approvals
    ca_fingerprint: str  # SHA-256, as `openssl x509 -fingerprint -sha256` prints it

    @property
    def ca_cert(self) -> Path:
        return self.directory / "ca.crt"

    @property
    def cert(self) -> Path:
        return self.directory / "institution.crt"

    @property
    def coordinator_key_file(self) -> Path:
        """The coordinator's public signing key, endorsed by the CA (checked on loading)."""
        return self.directory / COORDINATOR_KEY_FILE

    @property
    def ray_token(self) -> Path:
        return self.directory / "ray-token"

    def tls(self) -> ClientTls:
        return ClientTls(self.ca_cert, self.cert, self.keys.tls_key)


def _require(path: Path) -> Path:
    """`path`, a plain file. Not a link: a bundle's `ray-token` linked to a file of the
    site's (another service's secret) was copied into the state dir as the cluster
    token and sent where Ray sends its token."""
    try:
        mode = path.lstat().st_mode
    except FileNotFoundError:
        raise BundleError(f"{path} is missing") from None
    if stat.S_ISLNK(mode):
        raise BundleError(f"{path} is a link; a bundle holds plain files only")
    if not stat.S_ISREG(mode):
        raise BundleError(f"{path} is not a file")
    return path


# The largest file a bundle holds is a certificate of a few KiB.
MAX_BUNDLE_FILE_BYTES = 1 << 20


def read_bundle_file(path: Path) -> bytes:
    """A bundle file's bytes, read through one descriptor opened without following a
    link (so nothing swapped in after a check is read), from a regular file with no
    other name (a hard link to a file of the site's is no bundle file) and of a
    bundle file's size."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except FileNotFoundError:
        raise BundleError(f"{path} is missing") from None
    except OSError as error:
        raise BundleError(f"{path} cannot be read as a bundle file: {error}") from None
    with os.fdopen(fd, "rb") as handle:
        info = os.fstat(handle.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise BundleError(f"{path} is not a file")
        if info.st_nlink != 1:
            raise BundleError(f"{path} has other names (hard links); a bundle holds its own")
        if info.st_size > MAX_BUNDLE_FILE_BYTES:
            raise BundleError(f"{path} is {info.st_size} bytes, larger than any bundle file")
        return handle.read(MAX_BUNDLE_FILE_BYTES + 1)


def _text(path: Path) -> str:
    """A bundle file's text; a file that is not UTF-8 is a bad bundle, not a crash."""
    _require(path)
    try:
        return read_bundle_file(path).decode("utf-8")
    except UnicodeDecodeError as err:
        raise BundleError(f"{path} is not UTF-8 text: {err}") from None


def _certificate(path: Path) -> x509.Certificate:
    _require(path)
    try:
        return x509.load_pem_x509_certificate(read_bundle_file(path))
    except ValueError as err:
        raise BundleError(f"{path} is not a PEM certificate: {err}") from None


def load_bundle(directory: Path, state_dir: Path) -> Bundle:
    if not directory.is_dir():
        raise BundleError(f"bundle dir {directory} does not exist")
    try:
        meta = tomllib.loads(_text(directory / "bundle.toml"))
        institution = str(meta["institution"])
        address = str(meta["coordinator_address"])
        split_host_port(address)
    except (tomllib.TOMLDecodeError, KeyError, ValueError) as err:
        raise BundleError(f"{directory / 'bundle.toml'} is incomplete or invalid: {err}") from None
    problem = name_problem(institution)
    if problem is not None:  # it names the state dir: nothing signs bundle.toml
        raise BundleError(f"{directory / 'bundle.toml'}: {problem}")
    ca = _certificate(directory / "ca.crt")
    expected = _text(directory / "ca.sha256").strip()
    if pki.fingerprint(ca) != expected or meta.get("ca_fingerprint") != expected:
        raise BundleError(
            f"{directory / 'ca.crt'} does not match the fingerprint in ca.sha256 and "
            "bundle.toml; compare it with the operator's out of band"
        )
    _check_pinned_ca(state_dir, expected)
    cert = _certificate(directory / "institution.crt")
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        raise BundleError(f"{directory / 'institution.crt'} was not issued by ca.crt") from None
    if pki.institution_of(cert.subject) != institution:
        raise BundleError(
            f"{directory / 'institution.crt'} is for {pki.institution_of(cert.subject)!r}, "
            f"bundle.toml says {institution!r}"
        )
    now = dt.datetime.now(dt.UTC)
    if now < cert.not_valid_before_utc:
        raise BundleError(
            f"{directory / 'institution.crt'} is not valid before "
            f"{cert.not_valid_before_utc.isoformat()}"
        )
    if now > cert.not_valid_after_utc:
        raise BundleError(
            f"{directory / 'institution.crt'} expired on "
            f"{cert.not_valid_after_utc.isoformat()}; ask the operator to renew"
        )
    read_bundle_file(_require(directory / "ray-token"))
    coordinator_key = _coordinator_key(directory, ca)
    keys = SiteKeys(state_dir)
    try:
        key = pki.load_private_key(_require(keys.tls_key))
    except (ValueError, SettingsError) as err:
        raise BundleError(f"{keys.tls_key} is not a usable private key: {err}") from None
    public = serialization.PublicFormat.SubjectPublicKeyInfo
    encoding = serialization.Encoding.DER
    if key.public_key().public_bytes(encoding, public) != cert.public_key().public_bytes(
        encoding, public
    ):
        raise BundleError(f"{directory / 'institution.crt'} does not match the key {keys.tls_key}")
    _require(keys.supernode_key)
    _require(keys.signing_key)
    return Bundle(directory, institution, address, keys, coordinator_key, expected)


def _coordinator_key(directory: Path, ca: x509.Certificate) -> VerifyingKey:
    key_file = directory / COORDINATOR_KEY_FILE
    try:
        key = VerifyingKey.load(_require(key_file))
    except (SignatureError, ValueError) as err:
        raise BundleError(f"{key_file} is not an Ed25519 public key: {err}") from None
    endorsement = read_bundle_file(_require(directory / COORDINATOR_KEY_ENDORSEMENT_FILE))
    if not pki.endorsed_by(ca, ca_endorsement_payload(key), endorsement):
        raise BundleError(
            f"{key_file} is not endorsed by ca.crt ({COORDINATOR_KEY_ENDORSEMENT_FILE} does "
            "not verify); ask the operator for a fresh bundle"
        )
    return key


CA_PIN_FILE = "ca.sha256"  # in the state dir: the CA this site first joined under


def _check_pinned_ca(state_dir: Path, fingerprint: str) -> None:
    """A bundle under another CA than the one this site joined with is refused: a
    bundle's CA is checked against the operator's fingerprint by a person, once, at
    the first join; a "renewal" from another consortium (or altered in transit) was
    taken later without a word."""
    pin = state_dir / CA_PIN_FILE
    try:
        pinned = pin.read_text().strip()
    except FileNotFoundError:
        return
    if pinned != fingerprint:
        raise BundleError(
            f"the bundle's CA (sha256 {fingerprint}) is not the one this site joined with "
            f"({pinned}, pinned in {pin}): a bundle of another consortium, or altered in "
            "transit. If your consortium really replaced its CA (compare the fingerprint "
            "with the operator's), remove that file and join again"
        )


def pin_ca(bundle: Bundle) -> None:
    """Remember the bundle's CA as this site's (once it has joined under it)."""
    pin = bundle.keys.state_dir / CA_PIN_FILE
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
    try:
        fd = os.open(pin, flags, 0o600)
    except FileExistsError:
        return
    with os.fdopen(fd, "w") as handle:
        handle.write(bundle.ca_fingerprint + "\n")

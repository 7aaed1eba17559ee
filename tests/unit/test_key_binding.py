"""An institution binds its update-signing key to its name with its own TLS key
(`consortium/provenance/binding.py`): onboarding refuses a request whose binding does
not hold, and logs the binding, with the issued certificate, for anyone to check."""

from __future__ import annotations

import base64
import json
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from consortium import pki
from consortium.errors import ConflictError, InvalidArgumentError, NotFoundError
from consortium.exit_codes import ExitCode
from consortium.provenance.binding import BindingError, check_binding, sign_binding
from consortium.provenance.log import read_lines
from consortium.provenance.records import InstitutionKey, KeyBinding, parse_record
from consortium.provenance.signing import SigningKey, VerifyingKey, b64
from consortium.site_keys import SiteKeys, create_site_keys
from coordinator.access.onboarding import Request, init_consortium, onboard
from coordinator.access.pki_files import CoordinatorPki
from coordinator.data_dir import DataDir
from coordinator.state import SqliteStateStore
from tests.helpers import run_cli

CERT_DAYS = 30
ADDRESS = "127.0.0.1:1"


@pytest.fixture
def consortium(tmp_path: Path) -> Iterator[tuple[Path, SqliteStateStore]]:
    """A coordinator data dir with nobody onboarded yet; its state store."""
    data_dir = tmp_path / "coordinator"
    init_consortium(data_dir, ["127.0.0.1"], cert_days=CERT_DAYS)
    store = SqliteStateStore(DataDir(data_dir).state_db)
    try:
        yield data_dir, store
    finally:
        store.close()


def onboard_site(data_dir: Path, store: SqliteStateStore, keys: SiteKeys, name: str) -> Path:
    return onboard(
        data_dir,
        store,
        name,
        Request.from_dir(keys.request_dir),
        keys.state_dir.parent / f"bundle-{name}",
        ADDRESS,
        cert_days=CERT_DAYS,
    )


def logged_keys(data_dir: Path) -> list[InstitutionKey]:
    path = DataDir(data_dir).provenance_log
    if not path.exists():
        return []
    entries = [json.loads(line) for line in read_lines(path)]
    records = [parse_record(e) for e in entries if e["kind"] == "record"]
    return [r for r in records if isinstance(r, InstitutionKey)]


def consortium_ca(data_dir: Path) -> x509.Certificate:
    return pki.load_certificate(CoordinatorPki(data_dir).ca_cert)


def test_onboarding_logs_one_binding_that_checks_against_the_consortium_ca(
    consortium: tuple[Path, SqliteStateStore], tmp_path: Path
) -> None:
    data_dir, store = consortium
    keys = create_site_keys(tmp_path / "alpha", "alpha")
    bundle = onboard_site(data_dir, store, keys, "alpha")
    issued = (bundle / "institution.crt").read_text()
    onboard_site(data_dir, store, keys, "alpha")  # again: the key is logged once
    (record,) = logged_keys(data_dir)
    signing = VerifyingKey.load(keys.signing_public)
    assert (record.institution, record.key_id) == ("alpha", signing.key_id)
    assert record.public_key == b64(signing.raw)
    assert record.binding is not None
    assert record.binding.signature == keys.binding.read_text().strip()
    assert record.binding.certificate == issued  # the certificate of the first onboard
    assert (bundle / "institution.crt").read_text() != issued  # the second re-issued
    check_binding(
        "alpha", record.key_id, record.public_key, record.binding, consortium_ca(data_dir)
    )
    assert store.institution_keys("alpha") == {signing.key_id: signing.raw}


def tls_key_of(keys: SiteKeys) -> ec.EllipticCurvePrivateKey:
    return pki.load_private_key(keys.tls_key)


def swap_in_own_key_and_binding(keys: SiteKeys, attacker: SiteKeys) -> None:
    """A man in the middle puts his update-signing key into alpha's request and binds
    it to alpha with the only TLS key he has: his own."""
    own = VerifyingKey.load(attacker.signing_public)
    keys.signing_public.write_bytes(own.pem())
    keys.binding.write_text(b64(sign_binding(tls_key_of(attacker), "alpha", own)) + "\n")


def swap_in_own_key_only(keys: SiteKeys, attacker: SiteKeys) -> None:
    """...or puts his key in and leaves alpha's binding (of alpha's key) as it was."""
    keys.signing_public.write_bytes(attacker.signing_public.read_bytes())


def replace_the_binding_with_junk(keys: SiteKeys, attacker: SiteKeys) -> None:
    keys.binding.write_text("not base64 at all\n")


@pytest.mark.parametrize(
    "attack", [swap_in_own_key_and_binding, swap_in_own_key_only, replace_the_binding_with_junk]
)
def test_a_request_whose_binding_does_not_hold_is_refused_and_nothing_is_onboarded(
    consortium: tuple[Path, SqliteStateStore],
    tmp_path: Path,
    attack: Callable[[SiteKeys, SiteKeys], None],
) -> None:
    data_dir, store = consortium
    keys = create_site_keys(tmp_path / "alpha", "alpha")
    attacker = create_site_keys(tmp_path / "mallory", "mallory")
    attack(keys, attacker)
    with pytest.raises(InvalidArgumentError, match=r"institution-signing\.binding"):
        onboard_site(data_dir, store, keys, "alpha")
    assert "alpha" not in store.institutions()
    assert store.current_certificate_serial("alpha") is None
    assert store.institution_keys("alpha") == {}
    assert not (tmp_path / "bundle-alpha").exists()
    assert logged_keys(data_dir) == []


def test_the_cli_refuses_a_swapped_binding_in_one_line_naming_the_file(
    consortium: tuple[Path, SqliteStateStore], tmp_path: Path
) -> None:
    data_dir, store = consortium
    keys = create_site_keys(tmp_path / "alpha", "alpha")
    swap_in_own_key_and_binding(keys, create_site_keys(tmp_path / "mallory", "mallory"))
    done = run_cli(
        "coordinator", "onboard", "alpha", "--request", str(keys.request_dir),
        "--data-dir", str(data_dir), "--coordinator-address", ADDRESS,
    )  # fmt: skip
    assert done.returncode == ExitCode.INVALID_JOB_SPEC, done.stderr  # InvalidArgumentError
    assert "institution-signing.binding" in done.stderr
    assert "does not verify" in done.stderr
    assert "alpha" not in store.institutions()


def test_a_request_without_a_binding_is_not_found_naming_it(tmp_path: Path) -> None:
    keys = create_site_keys(tmp_path / "alpha", "alpha")
    keys.binding.unlink()  # what a `client keygen` from before bindings wrote
    with pytest.raises(NotFoundError, match=r"institution-signing\.binding.*keygen --force"):
        Request.from_dir(keys.request_dir)


def test_a_signing_key_onboarded_for_another_institution_is_refused_before_issuing(
    consortium: tuple[Path, SqliteStateStore], tmp_path: Path
) -> None:
    data_dir, store = consortium
    alpha = create_site_keys(tmp_path / "alpha", "alpha")
    onboard_site(data_dir, store, alpha, "alpha")
    beta = create_site_keys(tmp_path / "beta", "beta")
    alpha_key = VerifyingKey.load(alpha.signing_public)
    beta.signing_public.write_bytes(alpha_key.pem())  # beta claims alpha's key, and binds it
    beta.binding.write_text(b64(sign_binding(tls_key_of(beta), "beta", alpha_key)) + "\n")
    with pytest.raises(ConflictError, match="belongs to alpha"):
        onboard_site(data_dir, store, beta, "beta")
    assert store.current_certificate_serial("beta") is None
    assert [r.institution for r in logged_keys(data_dir)] == ["alpha"]


def test_a_supernode_key_onboarded_for_another_institution_is_refused_before_issuing(
    consortium: tuple[Path, SqliteStateStore], tmp_path: Path
) -> None:
    """Flower's SuperLink knows a node by its key alone: beta naming alpha's SuperNode key
    would count alpha's node as beta's, and keep it registered were alpha revoked."""
    data_dir, store = consortium
    alpha = create_site_keys(tmp_path / "alpha", "alpha")
    onboard_site(data_dir, store, alpha, "alpha")
    beta = create_site_keys(tmp_path / "beta", "beta")
    beta.supernode_public.write_bytes(alpha.supernode_public.read_bytes())
    with pytest.raises(ConflictError, match="this SuperNode key belongs to alpha"):
        onboard_site(data_dir, store, beta, "beta")
    assert store.current_certificate_serial("beta") is None
    assert [institution for institution, _, _ in store.supernode_keys()] == ["alpha"]


@pytest.fixture
def logged(
    consortium: tuple[Path, SqliteStateStore], tmp_path: Path
) -> tuple[InstitutionKey, KeyBinding, x509.Certificate]:
    """alpha's logged key, its binding, and the consortium CA; beta onboarded too."""
    data_dir, store = consortium
    for name in ("alpha", "beta"):
        onboard_site(data_dir, store, create_site_keys(tmp_path / name, name), name)
    (record,) = [r for r in logged_keys(data_dir) if r.institution == "alpha"]
    assert record.binding is not None
    return record, record.binding, consortium_ca(data_dir)


def test_check_binding_refuses_a_certificate_of_another_institution(
    logged: tuple[InstitutionKey, KeyBinding, x509.Certificate], tmp_path: Path
) -> None:
    """beta, holding its own valid certificate, signs "alpha's key is K" for a key K of
    beta's choosing: the signature holds, the certificate's name does not."""
    record, binding, ca = logged
    beta = SiteKeys(tmp_path / "beta")
    own = SigningKey.generate().public
    forged = KeyBinding(
        certificate=(tmp_path / "bundle-beta" / "institution.crt").read_text(),
        signature=b64(sign_binding(tls_key_of(beta), "alpha", own)),
    )
    with pytest.raises(BindingError, match="names 'beta', not 'alpha'"):
        check_binding("alpha", own.key_id, b64(own.raw), forged, ca)
    with pytest.raises(BindingError, match="names 'beta', not 'alpha'"):
        check_binding("alpha", own.key_id, b64(own.raw), forged)  # without the CA too
    check_binding("alpha", record.key_id, record.public_key, binding, ca)  # the real one


def test_check_binding_refuses_an_edited_key_id_or_public_key(
    logged: tuple[InstitutionKey, KeyBinding, x509.Certificate],
) -> None:
    record, binding, ca = logged
    other = SigningKey.generate().public
    with pytest.raises(BindingError, match="not the sha256"):
        check_binding("alpha", other.key_id, record.public_key, binding, ca)
    with pytest.raises(BindingError, match="does not verify"):  # both edited, consistently
        check_binding("alpha", other.key_id, b64(other.raw), binding, ca)


def test_check_binding_refuses_a_tampered_signature(
    logged: tuple[InstitutionKey, KeyBinding, x509.Certificate],
) -> None:
    record, binding, ca = logged
    der = bytearray(base64.b64decode(binding.signature))
    der[-1] ^= 0x01
    tampered = binding.model_copy(update={"signature": b64(bytes(der))})
    with pytest.raises(BindingError, match="does not verify"):
        check_binding("alpha", record.key_id, record.public_key, tampered, ca)
    garbled = binding.model_copy(update={"signature": binding.signature + "="})
    with pytest.raises(BindingError, match="base64"):
        check_binding("alpha", record.key_id, record.public_key, garbled, ca)


def test_check_binding_refuses_a_certificate_from_another_ca(
    logged: tuple[InstitutionKey, KeyBinding, x509.Certificate], tmp_path: Path
) -> None:
    """Someone with a CA of his own issues alpha a certificate for alpha's key; the
    binding signature still holds, but not the consortium CA's issuance."""
    record, binding, ca = logged
    elsewhere = init_consortium(tmp_path / "elsewhere", ["127.0.0.1"], cert_days=CERT_DAYS)
    alpha = SiteKeys(tmp_path / "alpha")
    foreign = pki.sign_csr(
        pki.load_private_key(elsewhere.ca_key),
        pki.load_certificate(elsewhere.ca_cert),
        pki.load_csr(alpha.csr),
        "alpha",
        CERT_DAYS,
    )
    moved = binding.model_copy(update={"certificate": pki.pem(foreign).decode()})
    check_binding("alpha", record.key_id, record.public_key, moved)  # no CA: it holds
    with pytest.raises(BindingError, match="not issued by the CA"):
        check_binding("alpha", record.key_id, record.public_key, moved, ca)
    with pytest.raises(BindingError, match="not issued by"):  # and the reverse
        check_binding(
            "alpha",
            record.key_id,
            record.public_key,
            binding,
            pki.load_certificate(elsewhere.ca_cert),
        )


def test_check_binding_refuses_a_certificate_that_does_not_parse(
    logged: tuple[InstitutionKey, KeyBinding, x509.Certificate],
) -> None:
    record, binding, ca = logged
    broken = binding.model_copy(update={"certificate": "-----BEGIN CERTIFICATE-----\nAAAA\n"})
    with pytest.raises(BindingError, match="does not parse"):
        check_binding("alpha", record.key_id, record.public_key, broken, ca)

"""The PKI helpers and the site's bundle checks, without servers."""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import stat
from pathlib import Path

import pytest

from client.bundle import BundleError, load_bundle, pin_ca
from consortium import pki
from consortium.errors import ConflictError, DataDirError, InvalidArgumentError
from consortium.exit_codes import ExitCode
from consortium.provenance.signing import SigningKey
from consortium.site_keys import SiteKeys, create_site_keys
from coordinator.access.onboarding import Request, init_consortium, onboard, renew, revoke
from coordinator.access.pki_files import CoordinatorPki
from coordinator.data_dir import DataDir
from coordinator.state import SqliteStateStore
from tests.helpers import run_cli


@pytest.fixture
def onboarded(tmp_path: Path) -> tuple[Path, Path, Path]:
    """(coordinator data dir, site state dir, bundle dir) for institution 'alpha'."""
    data_dir = tmp_path / "coordinator"
    init_consortium(data_dir, ["127.0.0.1"], cert_days=30)
    keys = create_site_keys(tmp_path / "site", "alpha")
    store = SqliteStateStore(data_dir / "state.db")
    try:
        onboard(
            data_dir,
            store,
            "alpha",
            Request.from_dir(keys.request_dir),
            tmp_path / "bundle",
            "127.0.0.1:1",
            cert_days=30,
        )
    finally:
        store.close()
    return data_dir, tmp_path / "site", tmp_path / "bundle"


def test_bundle_of_an_onboarded_site_loads(onboarded: tuple[Path, Path, Path]) -> None:
    _, site, bundle_dir = onboarded
    bundle = load_bundle(bundle_dir, site)
    assert bundle.institution == "alpha"
    assert bundle.coordinator_address == "127.0.0.1:1"
    data_dir, _, _ = onboarded
    coordinator = SigningKey.load(DataDir(data_dir).signing_key)
    assert bundle.coordinator_key.raw == coordinator.public.raw


def test_a_swapped_coordinator_key_is_refused(
    onboarded: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    """Whoever alters the bundle in transit cannot swap in a key of their own that
    would then sign run approvals: the pinned CA endorses only the coordinator's."""
    _, site, bundle_dir = onboarded
    SigningKey.generate().save(tmp_path / "mallory.key")
    shutil.copyfile(tmp_path / "mallory.pub", bundle_dir / "coordinator-signing.pub")
    with pytest.raises(BundleError, match=r"not endorsed by ca\.crt"):
        load_bundle(bundle_dir, site)


def test_init_refuses_to_overwrite_without_force(tmp_path: Path) -> None:
    init_consortium(tmp_path, ["127.0.0.1"], cert_days=1)
    first = (tmp_path / "pki" / "ca.crt").read_bytes()
    with pytest.raises(ConflictError, match="--force"):
        init_consortium(tmp_path, ["127.0.0.1"], cert_days=1)
    init_consortium(tmp_path, ["127.0.0.1"], cert_days=1, force=True)
    assert (tmp_path / "pki" / "ca.crt").read_bytes() != first
    assert stat.S_IMODE((tmp_path / "pki" / "ca.key").stat().st_mode) == 0o600


def test_csr_for_another_institution_is_refused(tmp_path: Path) -> None:
    data_dir = tmp_path / "coordinator"
    init_consortium(data_dir, ["127.0.0.1"], cert_days=30)
    keys = create_site_keys(tmp_path / "site", "mallory")
    store = SqliteStateStore(data_dir / "state.db")
    try:
        with pytest.raises(InvalidArgumentError, match="names 'mallory', not 'alpha'"):
            onboard(
                data_dir,
                store,
                "alpha",
                Request.from_dir(keys.request_dir),
                tmp_path / "bundle",
                "127.0.0.1:1",
                cert_days=30,
            )
    finally:
        store.close()


@pytest.mark.parametrize(
    "name",
    [
        "ca.crt",
        "institution.crt",
        "ca.sha256",
        "bundle.toml",
        "ray-token",
        "coordinator-signing.pub",
        "coordinator-signing.sig",
    ],
)
def test_missing_bundle_file_is_named(onboarded: tuple[Path, Path, Path], name: str) -> None:
    _, site, bundle_dir = onboarded
    (bundle_dir / name).unlink()
    with pytest.raises(BundleError, match=name):
        load_bundle(bundle_dir, site)


def test_ca_not_matching_its_fingerprint_is_refused(
    onboarded: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    _, site, bundle_dir = onboarded
    other = tmp_path / "other"
    init_consortium(other, ["127.0.0.1"], cert_days=1)
    shutil.copyfile(other / "pki" / "ca.crt", bundle_dir / "ca.crt")
    with pytest.raises(BundleError, match="fingerprint"):
        load_bundle(bundle_dir, site)


def test_certificate_not_matching_the_site_key_is_refused(
    onboarded: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    _, _, bundle_dir = onboarded
    stranger = create_site_keys(tmp_path / "stranger", "alpha")
    with pytest.raises(BundleError, match="does not match the key"):
        load_bundle(bundle_dir, stranger.state_dir)


@pytest.mark.parametrize(
    ("not_before", "days", "words"),
    [
        (dt.datetime.now(dt.UTC) - dt.timedelta(days=10), 1, "expired"),
        (dt.datetime.now(dt.UTC) + dt.timedelta(days=2), 30, "not valid before"),
    ],
)
def test_expired_or_future_certificate_is_refused(
    onboarded: tuple[Path, Path, Path], not_before: dt.datetime, days: int, words: str
) -> None:
    data_dir, site, bundle_dir = onboarded
    files = CoordinatorPki(data_dir)
    csr = pki.make_csr(pki.load_private_key(site / "tls.key"), "alpha")
    cert = pki.sign_csr(
        pki.load_private_key(files.ca_key),
        pki.load_certificate(files.ca_cert),
        csr,
        "alpha",
        days,
        not_before,
    )
    (bundle_dir / "institution.crt").write_bytes(pki.pem(cert))
    with pytest.raises(BundleError, match=words):
        load_bundle(bundle_dir, site)


def test_revoked_institution_cannot_renew(
    onboarded: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    data_dir, site, _ = onboarded
    store = SqliteStateStore(data_dir / "state.db")
    try:
        renewed = renew(
            data_dir,
            store,
            "alpha",
            site / "request" / "tls.csr",
            tmp_path / "renewed",
            "127.0.0.1:1",
            cert_days=5,
        )
        assert load_bundle(renewed, site).institution == "alpha"
        revoke(store, "alpha")
        assert store.is_revoked("alpha")
        with pytest.raises(ConflictError, match="revoked"):
            renew(
                data_dir,
                store,
                "alpha",
                site / "request" / "tls.csr",
                tmp_path / "again",
                "127.0.0.1:1",
                cert_days=5,
            )
    finally:
        store.close()


# --- a bundle altered in transit (nothing signs bundle.toml, ray-token or the dir) ------


def rewrite_toml(bundle_dir: Path, key: str, value: str) -> None:
    path = bundle_dir / "bundle.toml"
    lines = [
        f"{key} = {json.dumps(value)}" if line.startswith(f"{key} =") else line
        for line in path.read_text().splitlines()
    ]
    path.write_text("\n".join(lines) + "\n")


@pytest.mark.parametrize("name", ["../../victim", "/tmp/victim", "..", "a b"])
def test_a_bundle_naming_no_institution_name_is_refused(
    onboarded: tuple[Path, Path, Path], name: str
) -> None:
    _, site, bundle_dir = onboarded
    rewrite_toml(bundle_dir, "institution", name)
    with pytest.raises(BundleError, match="use letters, digits"):
        load_bundle(bundle_dir, site)


def test_a_bundle_address_that_is_not_host_port_is_refused(
    onboarded: tuple[Path, Path, Path],
) -> None:
    _, site, bundle_dir = onboarded
    rewrite_toml(bundle_dir, "coordinator_address", "nohostport")
    with pytest.raises(BundleError, match="not host:port"):
        load_bundle(bundle_dir, site)


def test_a_bundle_file_that_is_a_link_is_refused(
    onboarded: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    """The attack: `ray-token` linked to another secret of the site's, which joining
    copied into the state dir as the cluster token."""
    _, site, bundle_dir = onboarded
    secret = tmp_path / "site-secret.txt"
    secret.write_text("SITE-SECRET-API-TOKEN\n")
    (bundle_dir / "ray-token").unlink()
    (bundle_dir / "ray-token").symlink_to(secret)
    with pytest.raises(BundleError, match="ray-token is a link"):
        load_bundle(bundle_dir, site)


def test_client_join_with_a_bundle_naming_a_path_leaves_that_path_alone(
    onboarded: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    """Run as root, `client join` made its state dir (by default named after the
    bundle's institution) owner-only, recursively: a bundle naming a path of the
    attacker's choosing stripped the group and world bits of that tree."""
    _, _, bundle_dir = onboarded
    victim = tmp_path / "victim"
    (victim / "shared").mkdir(parents=True)
    (victim / "shared").chmod(0o1777)
    (victim / "public.txt").write_text("for everyone\n")
    (victim / "public.txt").chmod(0o644)
    victim.chmod(0o755)
    rewrite_toml(bundle_dir, "institution", str(victim))
    (tmp_path / "data").mkdir()

    done = run_cli(
        "client", "join", "--bundle", str(bundle_dir), "--data", str(tmp_path / "data"), "--no-ray"
    )

    assert done.returncode == ExitCode.SETTINGS_INVALID, done.stdout + done.stderr
    assert "use letters, digits" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert stat.S_IMODE(victim.stat().st_mode) == 0o755
    assert stat.S_IMODE((victim / "shared").stat().st_mode) == 0o1777
    assert stat.S_IMODE((victim / "public.txt").stat().st_mode) == 0o644


def test_client_join_with_a_bundle_toml_that_is_not_utf8_is_one_line(
    onboarded: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    _, _, bundle_dir = onboarded
    (bundle_dir / "bundle.toml").write_bytes(b'institution = "\xff\xfe"\n')
    (tmp_path / "data").mkdir()
    done = run_cli(
        "client", "join", "--bundle", str(bundle_dir), "--data", str(tmp_path / "data"), "--no-ray"
    )
    assert done.returncode not in (0, 1), done.stdout + done.stderr
    assert "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr


def test_onboard_refuses_a_bundle_dir_another_user_owns(tmp_path: Path) -> None:
    """The attack: a dir of another user's given as `--out`, holding a link where the
    bundle's ca.sha256 goes, pointing at a file of root's."""
    data_dir = tmp_path / "coordinator"
    init_consortium(data_dir, ["127.0.0.1"], cert_days=30)
    keys = create_site_keys(tmp_path / "site", "alpha")
    victim = tmp_path / "victim.txt"
    victim.write_text("root's own\n")
    out = tmp_path / "out"
    out.mkdir(mode=0o777)
    (out / "ca.sha256").symlink_to(victim)
    os.chown(out, 65534, 65534)
    store = SqliteStateStore(data_dir / "state.db")
    try:
        with pytest.raises(DataDirError, match="another user's"):
            onboard(data_dir, store, "alpha", Request.from_dir(keys.request_dir), out, "h:1", 30)
    finally:
        store.close()
    assert victim.read_text() == "root's own\n"


def test_a_bundle_under_another_ca_than_the_site_joined_with_is_refused(
    onboarded: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    """The first join's CA is checked by a person against the operator's fingerprint; a
    later "renewal" from another consortium (or altered in transit) was taken without a
    word. The CA a site joined under is pinned in its state dir."""
    _, site, bundle_dir = onboarded
    pin_ca(load_bundle(bundle_dir, site))  # as the first join does once registered
    other = tmp_path / "other-consortium"
    init_consortium(other, ["127.0.0.1"], cert_days=30)
    store = SqliteStateStore(other / "state.db")
    try:
        request = Request.from_dir(SiteKeys(site).request_dir)  # the same site's keys
        onboard(other, store, "alpha", request, tmp_path / "other-bundle", "127.0.0.1:1", 30)
    finally:
        store.close()
    with pytest.raises(BundleError, match="not the one this site joined with"):
        load_bundle(tmp_path / "other-bundle", site)
    assert load_bundle(bundle_dir, site).institution == "alpha"  # its own still loads


def test_a_bundle_file_hard_linked_to_a_file_of_the_sites_is_refused(
    onboarded: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    """A hard link is no link to `lstat`: the bundle's `ray-token` as another name of a
    secret of the site's would have been copied in as the cluster token."""
    _, site, bundle_dir = onboarded
    secret = tmp_path / "site-secret.txt"
    secret.write_text("SITE-SECRET-API-TOKEN\n")
    (bundle_dir / "ray-token").unlink()
    os.link(secret, bundle_dir / "ray-token")
    with pytest.raises(BundleError, match="ray-token has other names"):
        load_bundle(bundle_dir, site)

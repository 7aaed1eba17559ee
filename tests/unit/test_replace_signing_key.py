"""`coordinator replace-signing-key`: the operator's one way to change an institution's
pinned update-signing key, recorded (signed) in the provenance log."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from consortium.errors import ConflictError, InvalidArgumentError, NotFoundError
from consortium.provenance.log import read_lines
from consortium.provenance.records import InstitutionKeyChanged, parse_record
from consortium.provenance.signing import SigningKey, VerifyingKey
from consortium.provenance.verify import verify_log
from consortium.site_keys import create_site_keys
from coordinator.access.onboarding import (
    Request,
    init_consortium,
    onboard,
    replace_signing_key,
    revoke,
)
from coordinator.data_dir import DataDir
from coordinator.state import SqliteStateStore
from tests.helpers import run_cli


@pytest.fixture
def consortium(tmp_path: Path) -> Iterator[tuple[Path, SqliteStateStore]]:
    """A coordinator data dir with alpha and beta onboarded; its state store."""
    data_dir = tmp_path / "coordinator"
    init_consortium(data_dir, ["127.0.0.1"], cert_days=30)
    store = SqliteStateStore(DataDir(data_dir).state_db)
    for name in ("alpha", "beta"):
        keys = create_site_keys(tmp_path / name, name)
        onboard(
            data_dir,
            store,
            name,
            Request.from_dir(keys.request_dir),
            tmp_path / f"bundle-{name}",
            "127.0.0.1:1",
            cert_days=30,
        )
    try:
        yield data_dir, store
    finally:
        store.close()


def new_key(tmp_path: Path, name: str = "new") -> tuple[SigningKey, Path]:
    key = SigningKey.generate()
    key.save(tmp_path / f"{name}.key")
    return key, tmp_path / f"{name}.pub"


def logged_changes(data_dir: Path) -> list[InstitutionKeyChanged]:
    records = [
        parse_record(json.loads(line))
        for line in read_lines(DataDir(data_dir).provenance_log)
        if json.loads(line)["kind"] == "record"
    ]
    return [r for r in records if isinstance(r, InstitutionKeyChanged)]


def test_the_new_key_replaces_the_pinned_one_and_the_change_is_a_signed_record(
    consortium: tuple[Path, SqliteStateStore], tmp_path: Path
) -> None:
    data_dir, store = consortium
    (old,) = store.institution_keys("alpha")
    key, public = new_key(tmp_path)
    record = replace_signing_key(data_dir, store, "alpha", public, "laptop stolen")
    assert store.institution_keys("alpha") == {key.key_id: key.public.raw}
    assert record.replaced_key_ids == [old]
    assert logged_changes(data_dir) == [record]
    assert record.reason == "laptop stolen"
    coordinator = VerifyingKey.load(DataDir(data_dir).signing_public_key)
    report = verify_log(DataDir(data_dir).provenance_log, coordinator)
    # alpha's and beta's bound keys (logged at onboarding), then the change: all
    # covered by a signed tree head
    assert report.records == 3


@pytest.mark.parametrize(
    ("institution", "reason", "error", "words"),
    [
        ("gamma", "x", NotFoundError, "never onboarded"),
        ("alpha", "  ", InvalidArgumentError, "--reason"),
    ],
)
def test_unknown_institution_or_no_reason_changes_nothing(
    consortium: tuple[Path, SqliteStateStore],
    tmp_path: Path,
    institution: str,
    reason: str,
    error: type[Exception],
    words: str,
) -> None:
    data_dir, store = consortium
    before = store.institution_keys("alpha")
    _, public = new_key(tmp_path)
    with pytest.raises(error, match=words):
        replace_signing_key(data_dir, store, institution, public, reason)
    assert store.institution_keys("alpha") == before
    assert logged_changes(data_dir) == []


def test_another_institutions_key_a_revoked_institution_or_a_bad_file_is_refused(
    consortium: tuple[Path, SqliteStateStore], tmp_path: Path
) -> None:
    data_dir, store = consortium
    before = store.institution_keys("alpha")
    (beta_key,) = store.institution_keys("beta").values()
    (tmp_path / "beta.pub").write_text(VerifyingKey.from_raw(beta_key).pem().decode())
    with pytest.raises(ConflictError, match="belongs to beta"):
        replace_signing_key(data_dir, store, "alpha", tmp_path / "beta.pub", "mistake")
    (tmp_path / "junk.pub").write_text("not a key\n")
    with pytest.raises(InvalidArgumentError, match=r"junk\.pub"):
        replace_signing_key(data_dir, store, "alpha", tmp_path / "junk.pub", "typo")
    revoke(store, "alpha")
    _, public = new_key(tmp_path)
    with pytest.raises(ConflictError, match="revoked"):
        replace_signing_key(data_dir, store, "alpha", public, "too late")
    assert store.institution_keys("alpha") == before
    assert logged_changes(data_dir) == []


def test_cli_says_what_changed_in_one_line(
    consortium: tuple[Path, SqliteStateStore], tmp_path: Path
) -> None:
    data_dir, store = consortium
    key, public = new_key(tmp_path)
    argv = ["coordinator", "replace-signing-key", "beta", "--public-key", str(public)]
    done = run_cli(*argv, "--reason", "rotation", "--data-dir", str(data_dir))
    assert done.returncode == 0, done.stderr
    assert f"beta now signs updates with key {key.key_id[:16]} only" in done.stdout
    assert store.institution_keys("beta") == {key.key_id: key.public.raw}
    refused = run_cli(*argv, "--reason", "", "--data-dir", str(data_dir))
    assert refused.returncode != 0
    assert "--reason" in refused.stderr + refused.stdout

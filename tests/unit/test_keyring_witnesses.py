"""Whose cosignature of a published checkpoint counts: the keys `Keyring.cosigner` would
accept for a cosignature in the log itself. A key the operator replaced (say, after it
leaked) does not vouch for a checkpoint that covers the replacement, the key it set in
its place vouches for none (the operator chose it), and an unbound key counts only
where the verifier allows unbound keys."""

from __future__ import annotations

import pytest

from consortium.provenance.checkpoint import (
    Checkpoint,
    CheckpointError,
    Cosignature,
    cosign,
    note_tree_size,
    origin_of,
    read_signed_note,
    signed_note,
)
from consortium.provenance.keyring import Keyring
from consortium.provenance.records import InstitutionKey, InstitutionKeyChanged
from consortium.provenance.signing import SigningKey, b64

CHANGE_AT = 5  # the log index of the key change record
COORDINATOR = SigningKey.generate()
OLD, NEW = SigningKey.generate(), SigningKey.generate()


def keyring(allow_unbound: bool, change_at: int | None = CHANGE_AT) -> Keyring:
    """OLD logged unbound, then replaced by NEW in a key change at log index `change_at`
    (None: read without indexes, as an attestation's entries are)."""
    ring = Keyring(allow_unbound=allow_unbound)
    ring.add(InstitutionKey(institution="uni-a", key_id=OLD.key_id, public_key=b64(OLD.public.raw)))
    ring.add(
        InstitutionKeyChanged(
            institution="uni-a",
            key_id=NEW.key_id,
            public_key=b64(NEW.public.raw),
            replaced_key_ids=[OLD.key_id],
            reason="the old key leaked",
        ),
        change_at,
    )
    return ring


def note(tree_size: int, witness: SigningKey) -> str:
    checkpoint = Checkpoint(origin_of(COORDINATOR.key_id), tree_size, "ab" * 32)
    signature = cosign(witness, checkpoint.body, 1_700_000_000)
    return signed_note(
        checkpoint, COORDINATOR, [Cosignature("uni-a", witness.public, 1_700_000_000, signature)]
    )


def witness_ids(ring: Keyring, tree_size: int | None = None) -> list[str]:
    return [k.key_id for k in ring.witness_keys(tree_size).get("uni-a", [])]


def test_a_replaced_key_vouches_only_for_checkpoints_before_its_replacement() -> None:
    ring = keyring(allow_unbound=True)
    assert {size: witness_ids(ring, size) for size in (5, 6)} == {5: [OLD.key_id], 6: []}
    assert witness_ids(ring) == []

    before = note(CHANGE_AT, OLD)
    assert note_tree_size(before) == CHANGE_AT
    read = read_signed_note(before, COORDINATOR.public, ring.witness_keys(CHANGE_AT))
    assert read.witnesses == ["uni-a"]
    after = note(CHANGE_AT + 1, OLD)  # the leaked key cosigning a later checkpoint
    assert (
        read_signed_note(after, COORDINATOR.public, ring.witness_keys(CHANGE_AT + 1)).witnesses
        == []
    )


def test_the_key_an_operator_set_vouches_for_no_checkpoint() -> None:
    """It signs the institution's updates from the key change on, but as a witness it
    would be the operator vouching for its own log."""
    ring = keyring(allow_unbound=True)
    with pytest.raises(CheckpointError, match="by a key not bound to it"):  # uni-a has OLD
        read_signed_note(note(CHANGE_AT, NEW), COORDINATOR.public, ring.witness_keys(CHANGE_AT))
    later = read_signed_note(note(CHANGE_AT + 1, NEW), COORDINATOR.public, ring.witness_keys(6))
    assert later.witnesses == []  # no key of uni-a's witnesses it at all
    with pytest.raises(ValueError, match="which the operator set"):
        ring.cosigner("uni-a", NEW.key_id)
    assert ring.signer("uni-a", NEW.key_id, "the update").key_id == NEW.key_id


def test_an_unbound_key_vouches_for_nothing_unless_unbound_keys_are_allowed() -> None:
    ring = keyring(allow_unbound=False)
    assert witness_ids(ring, CHANGE_AT) == []
    read = read_signed_note(note(CHANGE_AT, OLD), COORDINATOR.public, ring.witness_keys(CHANGE_AT))
    assert read.witnesses == []


def test_a_replaced_key_read_without_log_indexes_vouches_for_nothing() -> None:
    ring = keyring(allow_unbound=True, change_at=None)
    assert witness_ids(ring, 1) == []

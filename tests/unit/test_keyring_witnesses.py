"""Whose cosignature of a published checkpoint counts: the keys `Keyring.signer` would
accept for a cosignature in the log itself. A key the operator replaced (say, after it
leaked) does not vouch for a checkpoint that covers the replacement, and an unbound key
counts only where the verifier allows unbound keys."""

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


def test_a_replaced_key_vouches_only_for_checkpoints_before_its_replacement() -> None:
    ring = keyring(allow_unbound=True)
    ids = {size: [k.key_id for k in ring.witness_keys(size)["uni-a"]] for size in (5, 6)}
    assert ids == {5: [OLD.key_id, NEW.key_id], 6: [NEW.key_id]}
    assert [k.key_id for k in ring.witness_keys()["uni-a"]] == [NEW.key_id]

    before = note(CHANGE_AT, OLD)
    assert note_tree_size(before) == CHANGE_AT
    read = read_signed_note(before, COORDINATOR.public, ring.witness_keys(CHANGE_AT))
    assert read.witnesses == ["uni-a"]
    after = note(CHANGE_AT + 1, OLD)  # the leaked key cosigning a later checkpoint
    with pytest.raises(CheckpointError, match="by a key not bound to it"):
        read_signed_note(after, COORDINATOR.public, ring.witness_keys(CHANGE_AT + 1))


def test_an_unbound_key_vouches_for_nothing_unless_unbound_keys_are_allowed() -> None:
    ring = keyring(allow_unbound=False)
    assert [k.key_id for k in ring.witness_keys(CHANGE_AT)["uni-a"]] == [NEW.key_id]
    with pytest.raises(CheckpointError, match="by a key not bound to it"):
        read_signed_note(note(CHANGE_AT, OLD), COORDINATOR.public, ring.witness_keys(CHANGE_AT))


def test_a_replaced_key_read_without_log_indexes_vouches_for_nothing() -> None:
    ring = keyring(allow_unbound=True, change_at=None)
    assert [k.key_id for k in ring.witness_keys(1)["uni-a"]] == [NEW.key_id]

"""Which institution each update-signing key in a log belongs to, and how it got there.

A key enters the log three ways, and `verify_log` reads them into a `Keyring`:

* `institution_key` with a binding (written at onboarding): the institution itself
  signed, with its TLS certificate's key, that this key is its own
  (`binding.py`) — "bound";
* `institution_key_changed`: the operator replaced the institution's keys, an action
  the log shows with its reason; the replaced keys sign nothing after it — "operator";
* `institution_key` without a binding, written by versions before keys were bound (the
  coordinator alone vouched for it) — "unbound", accepted only when the verifier
  allows it.

A key belongs to one institution: a record that gives a key to a second institution
fails, and an update or cosignature is checked with the key of the institution it
names, never looked up by key id alone.

A cosignature is a site's word against the operator's log, so it counts only with a
key the institution vouched for itself: a key the operator set ("operator") signs
updates, but not as a witness. Otherwise an operator could replace every institution's
key with one of its own and write cosignatures of a forged history that `verify
--min-witnesses` would count.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from cryptography import x509

from consortium.provenance.binding import BindingError, check_binding
from consortium.provenance.records import InstitutionKey, InstitutionKeyChanged
from consortium.provenance.signing import VerifyingKey

KeySource = Literal["bound", "operator", "unbound"]


@dataclass
class LoggedKey:
    institution: str
    key: VerifyingKey
    source: KeySource
    active: bool = True
    # The log index of the key change that replaced it (None: not replaced, or read
    # without indexes, as from an attestation's entries).
    replaced_at: int | None = None


@dataclass
class Keyring:
    allow_unbound: bool = False
    ca: x509.Certificate | None = None
    keys: dict[str, LoggedKey] = field(default_factory=dict)

    def add(self, record: InstitutionKey | InstitutionKeyChanged, index: int | None = None) -> None:
        key = VerifyingKey.from_b64(record.public_key)
        if key.key_id != record.key_id:
            raise ValueError("institution key id does not match its public key")
        known = self.keys.get(key.key_id)
        if known is not None and known.institution != record.institution:
            raise ValueError(
                f"key {key.key_id[:16]} of {known.institution!r} is also given to "
                f"{record.institution!r}"
            )
        if isinstance(record, InstitutionKeyChanged):
            for replaced in record.replaced_key_ids:
                old = self.keys.get(replaced)
                if old is None or old.institution != record.institution:
                    raise ValueError(
                        f"the key change of {record.institution!r} replaces key "
                        f"{replaced[:16]}, which is not one of its keys"
                    )
                old.active = False
                old.replaced_at = index
            self.keys[key.key_id] = LoggedKey(record.institution, key, "operator")
            return
        if record.binding is None:
            source: KeySource = "unbound"
        else:
            try:
                check_binding(
                    record.institution, record.key_id, record.public_key, record.binding, self.ca
                )
            except BindingError as err:
                raise ValueError(f"the key binding of {record.institution!r}: {err}") from None
            source = "bound"
        if known is None or known.source == "unbound":
            self.keys[key.key_id] = LoggedKey(record.institution, key, source)

    def cosigner(self, institution: str, key_id: str) -> VerifyingKey:
        """The key of `institution`'s cosignature, as `signer`, and one the institution
        vouched for itself: not one an operator's key change set."""
        key = self.signer(institution, key_id, "a cosignature")
        if self.keys[key_id].source == "operator":
            raise ValueError(
                f"a cosignature of {institution!r} is signed by key {key_id[:16]}, which "
                "the operator set (institution_key_changed), not the institution: it does "
                "not witness the operator's log"
            )
        return key

    def signer(self, institution: str, key_id: str, what: str) -> VerifyingKey:
        """The key `institution` signs `what` with; ValueError when the log does not show
        that key as the institution's, in force and bound."""
        logged = self.keys.get(key_id)
        if logged is None:
            raise ValueError(f"{what} of {institution!r} names unknown key {key_id[:16]}")
        if logged.institution != institution:
            raise ValueError(
                f"{what} of {institution!r} is signed by key {key_id[:16]}, which is bound "
                f"to {logged.institution!r}"
            )
        if not logged.active:
            raise ValueError(
                f"{what} of {institution!r} is signed by key {key_id[:16]}, which the "
                "operator replaced before it"
            )
        if logged.source == "unbound" and not self.allow_unbound:
            raise ValueError(
                f"{what} of {institution!r} is signed by key {key_id[:16]}, which no binding "
                "of the institution's own vouches for (a log written before keys were "
                "bound: pass --allow-unbound-keys to accept it)"
            )
        return logged.key

    def keys_of(self, institution: str) -> list[VerifyingKey]:
        return [k.key for k in self.keys.values() if k.institution == institution]

    def witness_keys(self, tree_size: int | None = None) -> dict[str, list[VerifyingKey]]:
        """Per institution, the keys whose cosignature of a checkpoint of `tree_size`
        counts, by the rules `cosigner` applies to the log's own cosignatures: a key
        replaced by a key change the checkpoint covers does not (nor, when the change's
        index is unknown, any replaced key), nor one the operator set, and an unbound
        one only when allowed."""
        found: dict[str, list[VerifyingKey]] = {}
        for logged in self.keys.values():
            if logged.source == "operator" or (
                logged.source == "unbound" and not self.allow_unbound
            ):
                continue
            if not logged.active and (
                tree_size is None or logged.replaced_at is None or logged.replaced_at < tree_size
            ):
                continue
            found.setdefault(logged.institution, []).append(logged.key)
        return dict(sorted(found.items()))

    def sources(self) -> dict[str, set[KeySource]]:
        """Per institution, how its keys entered the log."""
        found: dict[str, set[KeySource]] = {}
        for logged in self.keys.values():
            found.setdefault(logged.institution, set()).add(logged.source)
        return found

"""Checkpoints and cosignatures in the transparency-dev formats (C2SP), so that tools
outside this project can read what the log publishes and what the sites witnessed.

* A checkpoint (C2SP tlog-checkpoint) is the text ``<origin>\\n<tree size>\\n<base64
  root hash>\\n``: a tree head as a signed note's body.
* A signed note (C2SP signed-note) is that body, a blank line, and one line per
  signature: ``— <key name> <base64(key id || signature)>``. The coordinator signs
  with Ed25519 (signature type 0x01): the key id is the first 4 bytes of
  SHA-256(name || "\\n" || 0x01 || public key) and the signature covers the body.
* A witness cosignature (C2SP tlog-cosignature, ``cosignature/v1``, type 0x04) is an
  Ed25519 signature over ``"cosignature/v1\\ntime <t>\\n" + body`` by a site's
  institution key, where ``t`` is when it cosigned (Unix seconds); the line's value is
  key id || uint64 big-endian ``t`` || signature.

A log's origin names the log by its coordinator key (`origin_of`), so a checkpoint of
one consortium can never be taken for another's. A site's witness name is its
institution. References: https://c2sp.org/tlog-checkpoint, https://c2sp.org/signed-note,
https://c2sp.org/tlog-cosignature.
"""

from __future__ import annotations

import base64
import hashlib
import struct
from dataclasses import dataclass

from consortium.provenance.signing import SignatureError, SigningKey, VerifyingKey

_ED25519 = b"\x01"
_COSIGNATURE_V1 = b"\x04"
_DASH = "\u2014"  # the em dash that opens a signature line
KEY_ID_BYTES = 4
SIGNATURE_BYTES = 64


class CheckpointError(ValueError):
    """A checkpoint or note is malformed, or one of its signatures does not verify."""


def origin_of(coordinator_key_id: str) -> str:
    """The log's origin line: one per coordinator key (named by its key id)."""
    return f"consortium/log/{coordinator_key_id[:32]}"


def checkpoint_body(origin: str, tree_size: int, root_hash_hex: str) -> bytes:
    root = base64.b64encode(bytes.fromhex(root_hash_hex)).decode()
    return f"{origin}\n{tree_size}\n{root}\n".encode()


def _key_id(name: str, kind: bytes, key: VerifyingKey) -> bytes:
    return hashlib.sha256(name.encode() + b"\n" + kind + key.raw).digest()[:KEY_ID_BYTES]


def cosigned_message(body: bytes, timestamp_s: int) -> bytes:
    """What a witness signs for a checkpoint body at a time (cosignature/v1)."""
    return b"cosignature/v1\ntime " + str(timestamp_s).encode() + b"\n" + body


def cosign(key: SigningKey, body: bytes, timestamp_s: int) -> bytes:
    """A raw Ed25519 cosignature (64 bytes) of `body` at `timestamp_s`."""
    return key.sign(cosigned_message(body, timestamp_s))


def verify_cosignature(key: VerifyingKey, body: bytes, timestamp_s: int, signature: bytes) -> None:
    """Raises SignatureError unless `signature` cosigns `body` at `timestamp_s`."""
    key.verify(signature, cosigned_message(body, timestamp_s))


@dataclass(frozen=True)
class Cosignature:
    """One witness's cosignature of a checkpoint."""

    name: str  # the institution
    key: VerifyingKey
    timestamp_s: int
    signature: bytes

    def line(self) -> str:
        value = (
            _key_id(self.name, _COSIGNATURE_V1, self.key)
            + struct.pack(">Q", self.timestamp_s)
            + self.signature
        )
        return f"{_DASH} {self.name} {base64.b64encode(value).decode()}\n"


@dataclass(frozen=True)
class Checkpoint:
    origin: str
    tree_size: int
    root_hash: str  # hex

    @property
    def body(self) -> bytes:
        return checkpoint_body(self.origin, self.tree_size, self.root_hash)


def signed_note(
    checkpoint: Checkpoint, coordinator: SigningKey, cosignatures: list[Cosignature]
) -> str:
    """The checkpoint as a signed note: the coordinator's signature, then each witness's."""
    body = checkpoint.body
    value = _key_id(checkpoint.origin, _ED25519, coordinator.public) + coordinator.sign(body)
    lines = [f"{_DASH} {checkpoint.origin} {base64.b64encode(value).decode()}\n"]
    lines += [c.line() for c in sorted(cosignatures, key=lambda c: c.name)]
    return body.decode() + "\n" + "".join(lines)


@dataclass(frozen=True)
class ReadNote:
    """A parsed, coordinator-verified checkpoint with its verified witnesses."""

    checkpoint: Checkpoint
    witnesses: list[str]  # names whose cosignatures verified


def note_tree_size(text: str) -> int | None:
    """The tree size a checkpoint note states (None when it has none to read); the
    note itself is checked by `read_signed_note`."""
    lines = text.split("\n")
    return int(lines[1]) if len(lines) > 1 and lines[1].isdigit() else None


def read_signed_note(
    text: str, coordinator: VerifyingKey, witness_keys: dict[str, list[VerifyingKey]]
) -> ReadNote:
    """Parse and check a checkpoint note: the coordinator's signature must verify; each
    cosignature line of a name in `witness_keys` must verify with one of its keys (a line
    of an unknown name is ignored, as C2SP asks of verifiers; a bad one is an error)."""
    body_text, sep, signatures = text.partition("\n\n")
    if not sep:
        raise CheckpointError("not a signed note: no blank line after the checkpoint")
    body = (body_text + "\n").encode()
    lines = body_text.split("\n")
    if len(lines) < 3:
        raise CheckpointError("a checkpoint needs an origin, a tree size and a root hash")
    origin, size_text, root_text = lines[:3]
    if origin != origin_of(coordinator.key_id):
        raise CheckpointError(
            f"the checkpoint's origin {origin!r} is not this coordinator's log "
            f"({origin_of(coordinator.key_id)!r})"
        )
    if not size_text.isdigit():
        raise CheckpointError(f"tree size {size_text!r} is not a decimal number")
    try:
        root = base64.b64decode(root_text, validate=True)
    except ValueError:
        raise CheckpointError("the root hash is not base64") from None
    checkpoint = Checkpoint(origin, int(size_text), root.hex())
    coordinator_signed = False
    witnesses: set[str] = set()
    for line in signatures.splitlines():
        name, value = _signature_line(line)
        if name == origin and value[:KEY_ID_BYTES] == _key_id(origin, _ED25519, coordinator):
            _verify(coordinator, value[KEY_ID_BYTES:], body, f"the coordinator's ({name})")
            coordinator_signed = True
        elif name in witness_keys:
            _check_cosignature(name, value, body, witness_keys[name])
            witnesses.add(name)
    if not coordinator_signed:
        raise CheckpointError("the checkpoint carries no signature of the coordinator's key")
    return ReadNote(checkpoint, sorted(witnesses))


def _signature_line(line: str) -> tuple[str, bytes]:
    parts = line.split(" ")
    if len(parts) != 3 or parts[0] != _DASH:
        raise CheckpointError(f"not a signature line: {line[:80]!r}")
    try:
        return parts[1], base64.b64decode(parts[2], validate=True)
    except ValueError:
        raise CheckpointError(f"the signature of {parts[1]!r} is not base64") from None


def _verify(key: VerifyingKey, signature: bytes, data: bytes, whose: str) -> None:
    try:
        key.verify(signature, data)
    except SignatureError:
        raise CheckpointError(f"{whose} signature does not verify") from None


def _check_cosignature(name: str, value: bytes, body: bytes, keys: list[VerifyingKey]) -> None:
    if len(value) != KEY_ID_BYTES + 8 + SIGNATURE_BYTES:
        raise CheckpointError(f"the cosignature of {name!r} has {len(value)} bytes")
    key_id, rest = value[:KEY_ID_BYTES], value[KEY_ID_BYTES:]
    (timestamp,) = struct.unpack(">Q", rest[:8])
    for key in keys:
        if _key_id(name, _COSIGNATURE_V1, key) == key_id:
            try:
                verify_cosignature(key, body, timestamp, rest[8:])
            except SignatureError:
                raise CheckpointError(f"the cosignature of {name!r} does not verify") from None
            return
    raise CheckpointError(f"the cosignature of {name!r} is by a key not bound to it")

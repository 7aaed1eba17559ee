"""Ed25519 keys for the coordinator and the institutions (`cryptography`).

Private keys are PEM (PKCS#8) files written with mode 0600; a key's id is the
hex sha256 of its raw 32-byte public key, so a log can name keys compactly.
"""

from __future__ import annotations

import base64
import hashlib
import os
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)


class SignatureError(ValueError):
    """A signature does not verify, or a key is malformed."""


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def unb64(text: str) -> bytes:
    try:
        data = base64.b64decode(text, validate=True)
    except ValueError as err:
        raise SignatureError(f"not base64: {err}") from None
    # Several spellings decode to the same bytes; only the canonical one is accepted,
    # so a log line cannot be altered without detection.
    if b64(data) != text:
        raise SignatureError("base64 is not in canonical form")
    return data


class VerifyingKey:
    def __init__(self, key: Ed25519PublicKey) -> None:
        self._key = key
        self.raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        self.key_id = hashlib.sha256(self.raw).hexdigest()

    @classmethod
    def from_raw(cls, raw: bytes) -> VerifyingKey:
        try:
            return cls(Ed25519PublicKey.from_public_bytes(raw))
        except ValueError as err:
            raise SignatureError(f"not an Ed25519 public key: {err}") from None

    @classmethod
    def from_b64(cls, text: str) -> VerifyingKey:
        return cls.from_raw(unb64(text))

    @classmethod
    def load(cls, path: Path) -> VerifyingKey:
        data = path.read_bytes()
        try:
            key = serialization.load_pem_public_key(data)
        except ValueError:
            return cls.from_b64(data.decode().strip())
        if not isinstance(key, Ed25519PublicKey):
            raise SignatureError(f"{path} does not hold an Ed25519 public key")
        return cls(key)

    def verify(self, signature: bytes, data: bytes) -> None:
        try:
            self._key.verify(signature, data)
        except InvalidSignature:
            raise SignatureError(f"bad signature for key {self.key_id[:16]}") from None

    def pem(self) -> bytes:
        return self._key.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )


class SigningKey:
    def __init__(self, key: Ed25519PrivateKey) -> None:
        self._key = key
        self.public = VerifyingKey(key.public_key())

    @property
    def key_id(self) -> str:
        return self.public.key_id

    @classmethod
    def generate(cls) -> SigningKey:
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def load(cls, path: Path) -> SigningKey:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
        if not isinstance(key, Ed25519PrivateKey):
            raise SignatureError(f"{path} does not hold an Ed25519 private key")
        return cls(key)

    @classmethod
    def load_or_create(cls, path: Path) -> SigningKey:
        """The key at `path`, created (mode 0600, public key beside it) if absent."""
        if path.exists():
            return cls.load(path)
        key = cls.generate()
        key.save(path)
        return key

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        pem = self._key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as handle:
            handle.write(pem)
        path.with_suffix(".pub").write_bytes(self.public.pem())

    def sign(self, data: bytes) -> bytes:
        return self._key.sign(data)

"""An institution's keys, created at the site (`client keygen`); private keys stay there.

<state dir>/
    tls.key                      mTLS key (ECDSA P-256), 0600
    supernode.key                Flower SuperNode authentication key (OpenSSH EC), 0600
    institution-signing.key      Ed25519 key that signs model updates, 0600
    request/                     what the operator needs, nothing secret:
        tls.csr                  certificate signing request (CN = institution)
        supernode.pub            SuperNode public key (OpenSSH)
        institution-signing.pub  update-signing public key (PEM)
        institution-signing.binding
                                 the institution's binding of that key to its name:
                                 base64 of a DER ECDSA signature by tls.key over the
                                 statement of `consortium/provenance/binding.py`
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from consortium import pki
from consortium.errors import ConflictError
from consortium.file_modes import private_dir
from consortium.provenance.binding import sign_binding
from consortium.provenance.signing import SigningKey, b64


@dataclass(frozen=True)
class SiteKeys:
    state_dir: Path

    @property
    def tls_key(self) -> Path:
        return self.state_dir / "tls.key"

    @property
    def supernode_key(self) -> Path:
        return self.state_dir / "supernode.key"

    @property
    def signing_key(self) -> Path:
        return self.state_dir / "institution-signing.key"

    @property
    def request_dir(self) -> Path:
        return self.state_dir / "request"

    @property
    def csr(self) -> Path:
        return self.request_dir / "tls.csr"

    @property
    def supernode_public(self) -> Path:
        return self.request_dir / "supernode.pub"

    @property
    def signing_public(self) -> Path:
        return self.request_dir / "institution-signing.pub"

    @property
    def binding(self) -> Path:
        return self.request_dir / "institution-signing.binding"


def create_site_keys(state_dir: Path, institution: str, force: bool = False) -> SiteKeys:
    """Generate the three key pairs and the request the operator signs, with the
    TLS key's binding of the update-signing key to `institution`."""
    keys = SiteKeys(state_dir)
    existing = [p for p in (keys.tls_key, keys.supernode_key, keys.signing_key) if p.exists()]
    if existing and not force:
        raise ConflictError(
            f"{existing[0]} already exists; pass --force to replace this site's keys"
        )
    # Owner-only even when called in-process, where no CLI set the umask.
    private_dir(state_dir)
    private_dir(keys.request_dir)
    tls_key = pki.generate_key()
    pki.write_private_key(keys.tls_key, tls_key, force=force)
    keys.csr.write_bytes(pki.pem(pki.make_csr(tls_key, institution)))
    supernode_key = pki.generate_key()
    pki.write_private_key(keys.supernode_key, supernode_key, openssh=True, force=force)
    keys.supernode_public.write_bytes(pki.openssh_public_key(supernode_key))
    if force:
        keys.signing_key.unlink(missing_ok=True)
        keys.signing_key.with_suffix(".pub").unlink(missing_ok=True)
    signing = SigningKey.generate()
    signing.save(keys.signing_key)
    shutil.copyfile(keys.signing_key.with_suffix(".pub"), keys.signing_public)
    keys.binding.write_text(b64(sign_binding(tls_key, institution, signing.public)) + "\n")
    return keys

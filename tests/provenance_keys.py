"""Institution keys as onboarding logs them: bound by the institution's TLS key."""

from __future__ import annotations

from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from consortium import pki
from consortium.provenance.binding import sign_binding
from consortium.provenance.records import InstitutionKey, KeyBinding
from consortium.provenance.signing import SigningKey, b64


@dataclass(frozen=True)
class ScratchCa:
    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate

    @classmethod
    def create(cls) -> ScratchCa:
        key = pki.generate_key()
        return cls(key, pki.create_ca(key))

    def bound_key(self, institution: str, signing: SigningKey) -> InstitutionKey:
        """The `institution_key` record `coordinator onboard` writes for `signing`."""
        tls_key = pki.generate_key()
        cert = pki.sign_csr(
            self.key, self.cert, pki.make_csr(tls_key, institution), institution, 30
        )
        signature = sign_binding(tls_key, institution, signing.public)
        return InstitutionKey(
            institution=institution,
            key_id=signing.key_id,
            public_key=b64(signing.public.raw),
            binding=KeyBinding(certificate=pki.pem(cert).decode(), signature=b64(signature)),
        )

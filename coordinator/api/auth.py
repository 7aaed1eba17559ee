"""Who is calling: the institution named by the caller's verified client certificate.

gRPC's TLS layer has already checked that the certificate chains to our CA and
is within its validity period (an unknown CA, an expired or not-yet-valid
certificate never reaches Python: the handshake fails). This interceptor adds
what gRPC in Python cannot: a deny-list of revoked institutions, checked on
every call, and the caller's identity for the servicers' authorization checks.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import grpc
from cryptography import x509

from coordinator.access.caller import CALLER
from coordinator.access.pki_files import OPERATOR
from coordinator.state import StateStore

log = logging.getLogger(__name__)

RefusalHook = Callable[[str, str], None]  # (reason, institution)


class CertificateAuthInterceptor(grpc.ServerInterceptor):  # type: ignore[misc]
    def __init__(self, store: StateStore, on_refusal: RefusalHook | None = None) -> None:
        self._store = store
        self._on_refusal = on_refusal

    def _refuse(
        self, context: grpc.ServicerContext, reason: str, institution: str, message: str
    ) -> None:
        log.warning("control plane refused %s: %s", institution or "a caller", message)
        if self._on_refusal is not None:
            self._on_refusal(reason, institution)
        context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    def _authenticate(self, context: grpc.ServicerContext) -> str:
        auth = context.auth_context()
        names = auth.get("x509_common_name") or []
        institution = names[0].decode() if names else ""
        if not institution:
            self._refuse(context, "no_client_certificate", "", "a client certificate is required")
        if self._store.is_revoked(institution):
            self._refuse(
                context,
                "revoked_certificate",
                institution,
                f"the certificate of {institution!r} has been revoked",
            )
        self._require_current_certificate(context, institution, auth.get("x509_pem_cert") or [])
        return institution

    def _require_current_certificate(
        self, context: grpc.ServicerContext, institution: str, pems: list[bytes]
    ) -> None:
        """A renewal supersedes the institution's earlier certificates: only the latest
        one issued (by serial) is accepted. The operator's own has nothing to supersede.
        Any other name the CA signed without onboarding is no caller: the coordinator's
        Ray certificate ("consortium-coordinator") chains to the CA too, and its key is
        copied to the sandboxed Ray head and drivers, where a member's code can run."""
        current = self._store.current_certificate_serial(institution)
        if current is None:
            if institution == OPERATOR:
                return
            self._refuse(
                context,
                "unknown_certificate",
                institution,
                f"no certificate was issued to {institution!r} at onboarding: it is not "
                "a member's or the operator's",
            )
        if not pems:
            return
        serial = format(x509.load_pem_x509_certificate(pems[0]).serial_number, "x")
        if serial != current:
            self._refuse(
                context,
                "superseded_certificate",
                institution,
                f"the certificate of {institution!r} (serial {serial}) was replaced by a "
                "renewal; use the renewed bundle",
            )

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Any],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Any:
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        if handler.unary_unary is not None:
            inner_unary = handler.unary_unary

            def unary(request: Any, context: grpc.ServicerContext) -> Any:
                token = CALLER.set(self._authenticate(context))
                try:
                    return inner_unary(request, context)
                finally:
                    CALLER.reset(token)

            return grpc.unary_unary_rpc_method_handler(
                unary, handler.request_deserializer, handler.response_serializer
            )
        if handler.unary_stream is not None:
            inner_stream = handler.unary_stream

            def stream(request: Any, context: grpc.ServicerContext) -> Any:
                token = CALLER.set(self._authenticate(context))
                try:
                    yield from inner_stream(request, context)
                finally:
                    CALLER.reset(token)

            return grpc.unary_stream_rpc_method_handler(
                stream, handler.request_deserializer, handler.response_serializer
            )
        return handler

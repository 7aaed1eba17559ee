"""Who is calling the control plane, and the one check that a caller acts for itself.

`coordinator.api.auth.CertificateAuthInterceptor` sets `CALLER` from the verified
client certificate for the duration of each call; domain code (the registry, the
servicers) asks `require_acting_as` before acting for an institution.
"""

from __future__ import annotations

import contextvars

from consortium.errors import InvalidArgumentError, PermissionDeniedError
from coordinator.access.pki_files import OPERATOR

# The institution (certificate common name) of the current call; None without TLS.
CALLER: contextvars.ContextVar[str | None] = contextvars.ContextVar("CALLER", default=None)


def require_acting_as(institution: str) -> None:
    """Refuse a caller acting for an institution other than its own."""
    caller = CALLER.get()
    if caller is None or caller == OPERATOR:
        return
    if not institution:
        raise InvalidArgumentError("field 'institution': must not be empty")
    if institution != caller:
        raise PermissionDeniedError(
            f"the certificate is for {caller!r}; it cannot act as {institution!r}"
        )


def current_caller() -> str | None:
    """The calling certificate's institution ("operator" for the operator's), or None
    on a plain-text (loopback-only) coordinator, where every caller is trusted."""
    return CALLER.get()


def require_owner_or_operator(owner: str, what: str) -> None:
    """The operator may act on anything; an institution only on what it owns."""
    caller = CALLER.get()
    if caller is None or caller in (OPERATOR, owner):
        return
    raise PermissionDeniedError(
        f"{caller!r} may not {what}: only its owner ({owner or 'the operator'!r}) or the "
        "operator may"
    )

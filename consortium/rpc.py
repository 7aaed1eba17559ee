"""Client side of the control-plane API: channels, retries, typed errors.

Transient failures (UNAVAILABLE, DEADLINE_EXCEEDED) are retried with
exponential backoff; after the last attempt the caller gets an
UnreachableError saying where it tried. Other statuses become the matching
typed error at once, so a bad request is never retried.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import grpc

from consortium.errors import (
    ConflictError,
    ConsortiumError,
    InvalidArgumentError,
    NotFoundError,
    PermissionDeniedError,
    UnauthenticatedError,
    UnreachableError,
)
from consortium.tls import ClientTls

log = logging.getLogger(__name__)

T = TypeVar("T")

TRANSIENT = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})
ERROR_BY_STATUS: dict[grpc.StatusCode, type[ConsortiumError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgumentError,
    grpc.StatusCode.NOT_FOUND: NotFoundError,
    grpc.StatusCode.FAILED_PRECONDITION: ConflictError,
    grpc.StatusCode.UNAUTHENTICATED: UnauthenticatedError,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDeniedError,
}


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int = 6
    initial_backoff_s: float = 0.5
    max_backoff_s: float = 8.0
    rpc_timeout_s: float = 10.0


DEFAULT_RETRY = RetryPolicy()


def open_channel(address: str, tls: ClientTls | None = None) -> grpc.Channel:
    """Mutual-TLS channel to the coordinator, or plain text (loopback, --insecure)."""
    if tls is None:
        return grpc.insecure_channel(address)
    return grpc.secure_channel(address, tls.credentials())


def translate(error: grpc.RpcError, address: str) -> ConsortiumError:
    code = error.code() if isinstance(error, grpc.Call) else grpc.StatusCode.UNKNOWN
    details = error.details() if isinstance(error, grpc.Call) else str(error)
    if code in TRANSIENT:
        return UnreachableError(f"coordinator at {address} is unreachable: {details}")
    return ERROR_BY_STATUS.get(code, ConsortiumError)(details or code.name)


def call_with_retry(
    fn: Callable[[float], T],
    address: str,
    policy: RetryPolicy = DEFAULT_RETRY,
    on_retry: Callable[[int, float, str], None] | None = None,
) -> T:
    """Call `fn(timeout_s)`; retry transient failures with exponential backoff."""
    backoff = policy.initial_backoff_s
    for attempt in range(1, policy.attempts + 1):
        try:
            return fn(policy.rpc_timeout_s)
        except grpc.RpcError as error:
            if not isinstance(error, grpc.Call) or error.code() not in TRANSIENT:
                raise translate(error, address) from None
            if attempt == policy.attempts:
                raise UnreachableError(
                    f"coordinator at {address} did not answer after {policy.attempts} "
                    f"attempts ({error.code().name}: {error.details()}); check the address "
                    "and that `coordinator serve` is running"
                ) from None
            reason = f"{error.code().name}: {error.details()}"
            if on_retry is not None:
                on_retry(attempt, backoff, reason)
            log.warning("coordinator at %s: %s; retrying in %.1f s", address, reason, backoff)
            time.sleep(backoff)
            backoff = min(backoff * 2, policy.max_backoff_s)
    raise AssertionError("unreachable")  # pragma: no cover - the loop returns or raises

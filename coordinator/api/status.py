"""The one place where domain errors become gRPC status codes."""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Iterator
from typing import Any, NoReturn, TypeVar

import grpc

from consortium.errors import (
    ConflictError,
    ConsortiumError,
    InvalidArgumentError,
    NotFoundError,
    PermissionDeniedError,
    UnauthenticatedError,
)

log = logging.getLogger(__name__)

STATUS_BY_ERROR: tuple[tuple[type[ConsortiumError], grpc.StatusCode], ...] = (
    (UnauthenticatedError, grpc.StatusCode.UNAUTHENTICATED),
    (PermissionDeniedError, grpc.StatusCode.PERMISSION_DENIED),
    (InvalidArgumentError, grpc.StatusCode.INVALID_ARGUMENT),
    (NotFoundError, grpc.StatusCode.NOT_FOUND),
    (ConflictError, grpc.StatusCode.FAILED_PRECONDITION),
)

F = TypeVar("F", bound=Callable[..., Any])


def status_for(error: ConsortiumError) -> grpc.StatusCode:
    for error_type, code in STATUS_BY_ERROR:
        if isinstance(error, error_type):
            return code
    return grpc.StatusCode.INTERNAL


def _abort(context: grpc.ServicerContext, error: Exception) -> NoReturn:
    if isinstance(error, ConsortiumError):
        code = status_for(error)
        message = str(error)
    else:
        log.exception("unexpected error in an RPC")
        code, message = grpc.StatusCode.INTERNAL, f"internal error: {error}"
    context.abort(code, message)
    raise AssertionError("context.abort returned")  # pragma: no cover - abort raises


def unary(method: F) -> F:
    """Wrap a unary servicer method so domain errors become statuses."""

    @functools.wraps(method)
    def wrapper(self: Any, request: Any, context: grpc.ServicerContext) -> Any:
        try:
            return method(self, request, context)
        except Exception as error:  # one place that maps every error
            _abort(context, error)

    return wrapper  # type: ignore[return-value]


def streaming(method: F) -> F:
    """Wrap a server-streaming servicer method the same way."""

    @functools.wraps(method)
    def wrapper(self: Any, request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        try:
            yield from method(self, request, context)
        except Exception as error:
            _abort(context, error)

    return wrapper  # type: ignore[return-value]

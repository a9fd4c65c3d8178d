"""Typed errors of the serving layer and their status codes.

Code inside the server raises these (or :class:`~deltaserve.plugins.errors.BundleError`);
only the gRPC interceptor and the HTTP exception handler translate them, through
:func:`status_of`. Anything else that escapes is a bug and maps to INTERNAL / 500.
"""

from __future__ import annotations

import grpc

from deltaserve.plugins.errors import BundleError, DeltaServeError, KindRegistryError


class InvalidRequestError(DeltaServeError):
    """The request itself is wrong (empty prompt, bad sampling value, undecodable image …)."""


class NotFoundError(DeltaServeError):
    """A task / delta name that is not registered."""


class UnauthenticatedError(DeltaServeError):
    """A registry mutation without the right admin token."""


class ResourceExhaustedError(DeltaServeError):
    """The server is at a limit (upload too large, queue full)."""


class UnavailableError(DeltaServeError):
    """The server is shutting down or the engine is dead; retry elsewhere."""


class EngineBindError(DeltaServeError):
    """The engine refused a delta that passed validation (e.g. LoRA rank above ``--max-lora-rank``)."""


# (gRPC status, HTTP status, OpenAI error type). First match in MRO order wins.
_STATUS: dict[type[BaseException], tuple[grpc.StatusCode, int, str]] = {
    InvalidRequestError: (grpc.StatusCode.INVALID_ARGUMENT, 400, "invalid_request_error"),
    BundleError: (grpc.StatusCode.INVALID_ARGUMENT, 400, "invalid_request_error"),
    KindRegistryError: (grpc.StatusCode.INVALID_ARGUMENT, 400, "invalid_request_error"),
    EngineBindError: (grpc.StatusCode.INVALID_ARGUMENT, 400, "invalid_request_error"),
    NotFoundError: (grpc.StatusCode.NOT_FOUND, 404, "not_found_error"),
    UnauthenticatedError: (grpc.StatusCode.UNAUTHENTICATED, 401, "authentication_error"),
    ResourceExhaustedError: (grpc.StatusCode.RESOURCE_EXHAUSTED, 429, "rate_limit_error"),
    UnavailableError: (grpc.StatusCode.UNAVAILABLE, 503, "service_unavailable"),
}
_INTERNAL = (grpc.StatusCode.INTERNAL, 500, "internal_error")


def status_of(exc: BaseException) -> tuple[grpc.StatusCode, int, str]:
    """``(grpc code, http status, OpenAI error type)`` for an exception."""
    for cls in type(exc).__mro__:
        if cls in _STATUS:
            return _STATUS[cls]
    return _INTERNAL


def client_message(exc: BaseException) -> str:
    """What a client is told: a typed error's own message; for anything else (a bug, the server's file system)
    only that it was internal — such messages can carry the server's paths, and they are logged instead."""
    if isinstance(exc, DeltaServeError):
        return str(exc) or type(exc).__name__
    return "internal server error"

"""One error hierarchy for the whole project.

Every error carries a stable ``code`` so that a reply on the bus can be turned back into the same
exception type on the other side (see :func:`error_from_info`).
"""

from __future__ import annotations

from typing import ClassVar


class CadreError(Exception):
    """Root of every error cadre raises on purpose."""

    code: ClassVar[str] = "internal"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class ValidationError(CadreError):
    """The request is wrong; the message says what to change."""

    code = "invalid"


class InvalidRequestError(ValidationError):
    """The request itself is malformed (not JSON, a field of the wrong type, one missing): the message names it."""

    code = "invalid_request"


class NotFoundError(CadreError):
    code = "not_found"


class ConflictError(CadreError):
    """The request raced with another change, or would break an invariant (e.g. an illegal state move)."""

    code = "conflict"


class NotSupportedError(CadreError):
    """A documented parameter whose implementation has not landed yet."""

    code = "not_supported"


class ClusterNotRunningError(CadreError):
    code = "cluster_not_running"


class AuthenticationError(CadreError):
    """The bus refused these credentials."""

    code = "unauthorized"


class ServiceUnavailableError(CadreError):
    """No service answered in time (down, overloaded, or this role may not call it)."""

    code = "unavailable"


class RunFailedError(CadreError):
    code = "run_failed"


class StorageError(CadreError):
    code = "storage"


_BY_CODE: dict[str, type[CadreError]] = {
    cls.code: cls
    for cls in (
        CadreError,
        ValidationError,
        InvalidRequestError,
        NotFoundError,
        ConflictError,
        NotSupportedError,
        ClusterNotRunningError,
        AuthenticationError,
        ServiceUnavailableError,
        RunFailedError,
        StorageError,
    )
}


def error_class(code: str) -> type[CadreError]:
    return _BY_CODE.get(code, CadreError)

"""Errors a caller can act on: what went wrong (kind), a stable code, a message, and the field."""

from __future__ import annotations

from enum import StrEnum


class ErrorKind(StrEnum):
    INVALID = "invalid"  # the request names something impossible: HTTP 422
    NOT_FOUND = "not_found"  # missing, or another organization's: HTTP 404
    CONFLICT = "conflict"  # clashes with what exists: HTTP 409


class DomainError(Exception):
    def __init__(self, kind: ErrorKind, code: str, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.kind = kind
        self.code = code
        self.message = message
        self.field = field


def invalid(code: str, message: str, field: str | None = None) -> DomainError:
    return DomainError(ErrorKind.INVALID, code, message, field)


def not_found(code: str, message: str) -> DomainError:
    return DomainError(ErrorKind.NOT_FOUND, code, message)


def conflict(code: str, message: str, field: str | None = None) -> DomainError:
    return DomainError(ErrorKind.CONFLICT, code, message, field)


def error_body(code: str, message: str, field: str | None = None) -> dict[str, dict[str, str]]:
    """The JSON error shape every HTTP answer of ingest and admin uses: ``{"error": {code, message, field?}}``."""
    error = {"code": code, "message": message}
    if field is not None:
        error["field"] = field
    return {"error": error}

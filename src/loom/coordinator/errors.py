"""Errors a service raises for its caller; the API turns them into 4xx JSON bodies."""

from __future__ import annotations


class ServiceError(Exception):
    """A refusal with a stable code and a message that says what to change."""

    status = 400

    def __init__(self, code: str, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.field = field


class BadRequest(ServiceError):
    status = 400


class Unauthorized(ServiceError):
    status = 401


class Forbidden(ServiceError):
    status = 403


class NotFound(ServiceError):
    status = 404


class Conflict(ServiceError):
    status = 409


class PaymentRequired(ServiceError):
    status = 402

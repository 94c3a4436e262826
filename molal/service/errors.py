"""Errors the backend maps to HTTP answers (never a 5xx for malformed input)."""

from __future__ import annotations


class ServiceError(Exception):
    """A request the service cannot serve; ``status`` is the HTTP status the backend answers."""

    status = 400

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        if status is not None:
            self.status = status


class BadRequest(ServiceError):
    status = 400


class Unprocessable(ServiceError):
    status = 422


class NotFound(ServiceError):
    status = 404


class Gone(ServiceError):
    status = 410


class Forbidden(ServiceError):
    status = 403


class TooLarge(ServiceError):
    """A request over one of the documented limits (the message names the limit and its variable)."""

    status = 413


class UnsupportedMediaType(ServiceError):
    status = 415


class InsufficientStorage(ServiceError):
    """A new project beyond ``MOLAL_MAX_PROJECTS`` (the message names the variable)."""

    status = 507
